"""How legend-hf names things it records or publishes: its own version, local paths against Hub ids.

Local paths always win: a name that exists on disk, or looks like a path (``./x``, ``/x``, ``~/x``, a file
extension, more than one ``/``), is never sent to the Hub, so a typo says "no such folder" rather than
"invalid repo id".
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__version__ = "0.3.0"

LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".pq", ".safetensors", ".arrow", ".txt")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


def looks_local(ref: str | os.PathLike[str]) -> bool:
    """Whether ``ref`` is meant as a local path (it exists, or cannot be a Hub ``owner/name`` id)."""
    text = str(ref)
    return (
        Path(text).exists()
        or Path(text).suffix.lower() in LOCAL_SUFFIXES
        or text.startswith((".", "/", "~"))
        or text.count("/") > 1
    )


def public_name(ref: str | os.PathLike[str] | None) -> str | None:
    """What to record or publish for a model, direction or dataset reference: a Hub id as it is, a local
    path by its last component only (absolute machine paths never reach a card, a report or the Hub)."""
    if ref is None:
        return None
    return Path(str(ref)).name if looks_local(ref) else str(ref)


def is_hub_id(ref: str | None) -> bool:
    """Whether ``ref`` names a Hub repo (``owner/name``, and not a local path)."""
    return bool(ref) and _HUB_ID.fullmatch(str(ref)) is not None and not looks_local(str(ref))
