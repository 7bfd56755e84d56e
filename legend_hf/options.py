"""`RuntimeOptions`: how the annotator model runs, one object every entry point takes as ``runtime=``.

Fitting, annotating, evaluating, the metric, the scale-out engines and the CLI all read the model through
the same options, so they are declared once here (as transformers and TRL pass one ``*Config``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class RuntimeOptions:
    """How the annotator model runs (each field's ``help`` metadata, also shown by ``legend-hf <command>
    --help``, says what it does). None of these changes a margin beyond float noise except ``dtype``
    (``float32`` is exact; bfloat16 keeps margins to Spearman >= 0.999 of float32's on the shipped sample,
    bench/README.md), ``max_length`` (longer texts lose their start) and ``model_revision`` (another model)."""

    _argument_group_name = "model and runtime"

    device: str | None = field(
        default=None, metadata=_help("torch device; default: cuda when available, else cpu")
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = field(
        default=None,
        metadata=_help(
            "matmul dtype; float32 is exact. Default (auto): bfloat16 where the device computes it natively (a "
            "GPU with bf16, a CPU with AMX or AVX512-BF16), else float32. Half precision keeps the residual "
            "stream, embeddings and norms in float32 where texts are packed; pooling and projections stay "
            "float32/float64"
        ),
    )
    max_length: int | None = field(
        default=None,
        metadata=_help(
            "tokens per text (default: the direction's, else the model's context); longer texts lose tokens "
            "from the start, so the response end stays visible, and are flagged in the 'truncated' column"
        ),
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata=_help(
            "tokens per forward pass (a packed row, or padded tokens without packing); default 2048 on a CPU, "
            "16384 on a GPU; halved on out-of-memory"
        ),
    )
    max_batch_size: int | None = field(
        default=None,
        metadata=_help("texts (or pairs) per forward pass at most; default: the token budget decides"),
    )
    packing: bool | None = field(
        default=None,
        metadata=_help(
            "run the texts of a token budget as one row without padding (variable-length attention); "
            "default: on for models whose attention goes through transformers' attention interface"
        ),
    )
    share_prompt: bool | None = field(
        default=None,
        metadata=_help(
            "run the prompt shared by chosen and rejected once, both continuations attending to it "
            "(decoders, packed); default on"
        ),
    )
    model_revision: str | None = field(
        default=None, metadata=_help("branch, tag or commit of a Hub model (default: the direction's record)")
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("run a Hub model's own code (off unless you ask for it)")
    )
    check_model_id: bool = field(
        default=True,
        metadata=_help("warn when the model's id differs from the one the direction was fitted on"),
    )
    progress: bool = field(default=True, metadata=_help("progress bars (texts/s, ETA) on terminals"))

    def __post_init__(self) -> None:
        if self.dtype is not None:
            name = str(self.dtype).removeprefix("torch.")
            if name not in DTYPES:
                raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
            object.__setattr__(self, "dtype", None if name == "auto" else name)
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device))
        for name in ("max_length", "max_tokens_per_batch", "max_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """No progress bars from `datasets` and transformers inside the block (a step of legend-hf's own that needs
    none: loading a model, a fast pass over a dataset, reading a small file); the caller's settings come back
    after it."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets_shown = not datasets.are_progress_bars_disabled()
    transformers_shown = transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_shown:
            datasets.enable_progress_bars()
        if transformers_shown:
            transformers_logging.enable_progress_bar()
