"""legend-hf: safety margins for preference datasets by representation engineering (Legend, arXiv 2406.08124).

The top level holds the main flow (fit or load a direction, annotate, check, publish); everything else lives in
its module, and every submodule is reachable as an attribute (``legend_hf.data_io``, ``legend_hf.training``).
Imports are lazy so ``import legend_hf`` stays light (torch and transformers load on first use).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .names import __version__

_EXPORTS = {
    # the artifact and how to fit it
    "SafetyDirection": "direction",
    "fit_direction": "fitting",
    "DEFAULT_DIRECTION": "data_io",
    # annotating
    "RuntimeOptions": "options",
    "MarginAnnotator": "annotate",
    "annotate_margins": "annotate",
    "scale_margins": "annotate",
    "read_record": "provenance",
    # quality and reports
    "evaluate_direction": "evaluation",
    "annotation_report": "report",
    "load_metric": "metric",
    "METRIC_PATH": "data_io",
    # publishing
    "dataset_card": "publish",
    "push_annotated_dataset": "publish",
}

__all__ = [
    "__version__",
    "DEFAULT_DIRECTION",
    "METRIC_PATH",
    "MarginAnnotator",
    "RuntimeOptions",
    "SafetyDirection",
    "annotate_margins",
    "annotation_report",
    "dataset_card",
    "evaluate_direction",
    "fit_direction",
    "load_metric",
    "push_annotated_dataset",
    "read_record",
    "scale_margins",
]

if TYPE_CHECKING:
    from .annotate import MarginAnnotator, annotate_margins, scale_margins
    from .data_io import DEFAULT_DIRECTION, METRIC_PATH
    from .direction import SafetyDirection
    from .evaluation import evaluate_direction
    from .fitting import fit_direction
    from .metric import load_metric
    from .options import RuntimeOptions
    from .provenance import read_record
    from .publish import dataset_card, push_annotated_dataset
    from .report import annotation_report


def __getattr__(name: str) -> Any:
    """The exports above, and the submodules (``legend_hf.evaluation``...), imported on first use."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'legend_hf' has no attribute {name!r}")
