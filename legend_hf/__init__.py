"""legend-hf: safety margins for preference datasets by representation engineering (Legend, arXiv 2406.08124).

Everything the README's flows use is importable from here, and every submodule is reachable as an attribute
(``legend_hf.evaluation``). Imports are lazy so ``import legend_hf`` stays light (torch and transformers load on
first use).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .names import __version__

_EXPORTS = {
    # the artifact and how to fit it
    "SafetyDirection": "direction",
    "DirectionModelWarning": "direction",
    "fit_direction": "fitting",
    "fit_balanced": "recipes",
    "remove_length": "recipes",
    # scoring and annotating
    "RuntimeOptions": "options",
    "Scorer": "scoring",
    "MarginScale": "provenance",
    "MarginAnnotator": "annotate",
    "annotate_margins": "annotate",
    "scale_margins": "annotate",
    "TextTemplate": "formatting",
    # provenance, quality and reports
    "AnnotationRecord": "provenance",
    "read_record": "provenance",
    "STATISTICS": "stats",
    "LabelledPairs": "labels",
    "QualityReport": "evaluation",
    "evaluate_direction": "evaluation",
    "annotation_report": "report",
    "load_metric": "metric",
    # data, cards and the Hub
    "DEFAULT_DIRECTION": "data_io",
    "METRIC_PATH": "data_io",
    "load_data": "data_io",
    "pku_saferlhf_to_pairs": "data_io",
    "generate_responses": "generate",
    "dataset_card": "publish",
    "margin_histogram": "plots",
    "dataset_histogram": "publish",
    "plot_layer_scores": "plots",
    "push_annotated_dataset": "publish",
}

__all__ = [
    "__version__",
    "AnnotationRecord",
    "DEFAULT_DIRECTION",
    "DirectionModelWarning",
    "LabelledPairs",
    "METRIC_PATH",
    "MarginAnnotator",
    "MarginScale",
    "QualityReport",
    "RuntimeOptions",
    "STATISTICS",
    "SafetyDirection",
    "Scorer",
    "TextTemplate",
    "annotate_margins",
    "annotation_report",
    "dataset_card",
    "dataset_histogram",
    "evaluate_direction",
    "fit_balanced",
    "fit_direction",
    "generate_responses",
    "load_data",
    "load_metric",
    "margin_histogram",
    "pku_saferlhf_to_pairs",
    "plot_layer_scores",
    "push_annotated_dataset",
    "read_record",
    "remove_length",
    "scale_margins",
]

if TYPE_CHECKING:
    from .annotate import MarginAnnotator, annotate_margins, scale_margins
    from .data_io import DEFAULT_DIRECTION, METRIC_PATH, load_data, pku_saferlhf_to_pairs
    from .direction import DirectionModelWarning, SafetyDirection
    from .evaluation import QualityReport, evaluate_direction
    from .fitting import fit_direction
    from .formatting import TextTemplate
    from .generate import generate_responses
    from .labels import LabelledPairs
    from .metric import load_metric
    from .options import RuntimeOptions
    from .plots import margin_histogram, plot_layer_scores
    from .provenance import AnnotationRecord, MarginScale, read_record
    from .publish import dataset_card, dataset_histogram, push_annotated_dataset
    from .recipes import fit_balanced, remove_length
    from .report import annotation_report
    from .scoring import Scorer
    from .stats import STATISTICS


def __getattr__(name: str) -> Any:
    """The exports above, and the submodules (``legend_hf.evaluation``...), imported on first use."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'legend_hf' has no attribute {name!r}")
