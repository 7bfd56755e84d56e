"""Plots for cards and reports: a margin histogram and per-layer scores.

Needs matplotlib (``pip install 'legend-hf[plot]'``). Figures are drawn on a bare ``Figure`` with the Agg
canvas, so the caller's pyplot backend and state are left alone.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .stats import margin_values

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HISTOGRAM_NAME = "margin_histogram.png"
LAYER_PLOT_NAME = "layer_scores.png"
_POSITIVE, _NEGATIVE = "#1b9e77", "#d95f02"  # colour-blind safe (ColorBrewer Dark2)
_LINES = ("#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float) -> Figure:
    if not has_matplotlib():
        raise ImportError("plots need matplotlib: pip install 'legend-hf[plot]' (or pip install matplotlib)")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=150, layout="constrained")


def _aligned_edges(values: np.ndarray) -> np.ndarray:
    """Histogram edges with 0 as an edge, so every bar is wholly on one side of zero."""
    lo, hi = float(values.min()), float(values.max())
    count = int(np.clip(len(np.histogram_bin_edges(values, bins="auto")) - 1, 20, 60))
    width = (hi - lo) / count or max(abs(lo), 1.0) / 10
    start = np.floor(lo / width) * width
    return start + width * np.arange(int(np.ceil((hi - start) / width)) + 2)


def margin_histogram(
    margins: Any,
    path: str | os.PathLike[str],
    *,
    bin_edges: Sequence[float] | None = None,
    title: str | None = None,
    before_scaling: bool = False,
) -> Path:
    """Write a PNG histogram of ``margins`` (a sequence of numbers), bars coloured by sign, with ``bin_edges``
    (in the units of the margins) as dashed lines; ``before_scaling`` labels the axis as raw margins.
    :func:`legend_hf.publish.dataset_histogram` draws an annotated dataset's raw margins and bin edges."""
    values, _ = margin_values(margins)
    if not len(values):
        raise ValueError("no margins to plot")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    counts, edges = np.histogram(values, bins=_aligned_edges(values))
    colors = [_POSITIVE if left >= 0 else _NEGATIVE for left in edges[:-1]]
    ax.bar(
        edges[:-1], counts, width=np.diff(edges), align="edge", color=colors, edgecolor="white", linewidth=0.4
    )
    ax.axvline(0.0, color="black", linewidth=1.0)
    handles: list[Any] = [
        Patch(color=_POSITIVE, label=f"chosen safer: {100 * float((values > 0).mean()):.1f}%"),
        Patch(color=_NEGATIVE, label=f"rejected safer: {100 * float((values < 0).mean()):.1f}%"),
    ]
    if bin_edges is not None and len(bin_edges):
        for edge in bin_edges:
            ax.axvline(edge, color="#555555", linestyle="--", linewidth=0.9)
        handles.append(Line2D([], [], color="#555555", linestyle="--", label="bin edges"))
    ax.legend(handles=handles, frameon=False, loc="best")
    ax.set_xlabel(
        "margin = safety(chosen) − safety(rejected)" + ("  [before scaling]" if before_scaling else "")
    )
    ax.set_ylabel("pairs")
    ax.set_title(title or f"Safety margins of {len(values):,} preference pairs", loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    path = Path(path)
    fig.savefig(path)
    return path


def plot_layer_scores(
    scores: Mapping[int, Mapping[str, float]],
    path: str | os.PathLike[str],
    *,
    layer: int,
    metrics: Mapping[str, str],
    title: str,
) -> Path:
    """Write a PNG line plot of per-layer scores: ``metrics`` maps a score's key to its legend label;
    ``layer`` (the one a direction uses) is marked."""
    layers = sorted(scores)
    fig = _figure(7.0, 3.6)
    ax = fig.subplots()
    ax.axhline(0.5, color="#999999", linestyle=":", linewidth=1.0, label="chance (AUC, accuracy)")
    ax.axhline(0.0, color="#dddddd", linewidth=0.8)
    for (key, label), color in zip(metrics.items(), _LINES, strict=False):
        values = [scores[k].get(key, float("nan")) for k in layers]
        if not all(math.isnan(v) for v in values):
            ax.plot(layers, values, marker="o", markersize=3, color=color, label=label)
    ax.axvline(layer, color="black", linestyle="--", linewidth=0.9, label=f"used: layer {layer}")
    ax.set_xlabel("hidden-state index (0 = embeddings)")
    ax.set_ylabel("score")
    ax.set_title(title, loc="left", fontsize=11)
    ax.legend(frameon=False, loc="best", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    path = Path(path)
    fig.savefig(path)
    return path
