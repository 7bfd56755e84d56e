"""legend-hf: safety margins for preference datasets by representation engineering (Legend, arXiv 2406.08124).

Imports are lazy so ``import legend_hf`` stays light (torch and transformers load on first use).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SafetyDirection": "direction",
    "DirectionModelWarning": "direction",
    "fit_direction": "fitting",
    "MarginAnnotator": "annotate",
    "annotate_margins": "annotate",
    "TextTemplate": "formatting",
}

__all__ = [
    "__version__",
    "DirectionModelWarning",
    "MarginAnnotator",
    "SafetyDirection",
    "TextTemplate",
    "annotate_margins",
    "fit_direction",
]

if TYPE_CHECKING:
    from .annotate import MarginAnnotator, annotate_margins
    from .direction import DirectionModelWarning, SafetyDirection
    from .fitting import fit_direction
    from .formatting import TextTemplate


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'legend_hf' has no attribute {name!r}")
