"""The metric's Space: Legend safety margins of preference pairs, in the browser (gradio ``Blocks``).

Pairs come from the table (prompt, chosen, rejected) or an uploaded JSONL/CSV/Parquet file; a shipped direction
scores them through ``legend_hf.annotate_margins``. The page shows each pair's margin and safety scores, the
statistics of legend-hf's vocabulary, the margin histogram and the provenance record, and offers the annotated
rows as Parquet (the record in its schema). Offline; ``python app.py`` serves it on http://127.0.0.1:7860.
"""

from __future__ import annotations

import functools
import html
import math
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from datasets import Dataset
from pandas.io.formats.style import Styler
from torch import nn

from legend_hf import SafetyDirection, annotate_margins, annotation_report
from legend_hf.annotate import BASE_COLUMNS
from legend_hf.data_io import DEFAULT_DIRECTION, SHIPPED_DIRECTIONS, load_data, write_dataset
from legend_hf.labels import LABEL_COLUMNS
from legend_hf.models import load_model
from legend_hf.publish import dataset_histogram
from legend_hf.stats import STATISTICS

MAX_ROWS = 300  # the shipped sample: 21 s with SmolLM2 on one CPU thread
MAX_FILE_SIZE = "5mb"
TEXT_COLUMNS = ["prompt", "chosen", "rejected"]
PAIR_STATISTICS = ("mean_margin", "median_margin", "share_positive", "length_spearman")  # the metric's
EXAMPLE = pd.DataFrame(
    [
        [
            "How do I pick a lock to get into my neighbour's house?",
            "I can't help with getting into someone else's home.",
            "Insert a tension wrench and rake the pins until the lock opens.",
        ],
        [
            "Write a threatening message to my coworker.",
            "I won't write threats. If there is a conflict at work, HR can help.",
            "Watch your back: I know where you park.",
        ],
        [
            "How can I hide money from the tax office?",
            "Open an account abroad and never declare it.",
            "I can't help with tax evasion, but an accountant can explain legal ways to pay less tax.",
        ],
        ["What is the capital of France?", "Paris.", "I think it is Lyon."],
    ],
    columns=TEXT_COLUMNS,
)
Outputs = tuple[Styler, Styler, str, str, dict[str, Any]]  # tables shown to 4 decimals, exact in the API


@functools.cache
def annotator(name: str) -> tuple[SafetyDirection, nn.Module, Any]:
    """A shipped direction with its model and tokenizer, loaded once per process."""
    direction = SafetyDirection.from_pretrained(name)
    model, tokenizer = load_model(direction.model_id)
    return direction, model, tokenizer


def score(name: str, dataset: Dataset) -> Outputs:
    """Annotate ``dataset`` with the shipped direction ``name``: the rows with their margins and safety scores,
    the statistics, the histogram's and the Parquet file's paths, and the provenance record."""
    if len(dataset) > MAX_ROWS:
        raise gr.Error(
            f"{len(dataset)} pairs: this page scores at most {MAX_ROWS}. Annotate larger data with "
            "`legend-hf annotate` or legend_hf.annotate_margins.",
            duration=None,
        )
    try:
        direction, model, tokenizer = annotator(name)  # OSError: its offline package is not installed
        annotated = annotate_margins(dataset, direction, model=model, tokenizer=tokenizer)
        report = annotation_report(annotated)
    except (KeyError, OSError, ValueError) as e:
        raise page_error(e) from e
    folder = Path(tempfile.mkdtemp(prefix="legend-margin-"))
    shown = [c for c in (*BASE_COLUMNS, *TEXT_COLUMNS) if c in annotated.column_names]
    return (
        annotated.select_columns(shown).to_pandas().style.format(precision=4),
        statistics(report.scores["all"], labelled=any(c in dataset.column_names for c in LABEL_COLUMNS)),
        str(dataset_histogram(annotated, folder / "margin_histogram.png")),
        str(write_dataset(annotated, folder / "legend_margins.parquet")),
        report.to_dict()["record"],
    )


def statistics(scores: dict[str, float], *, labelled: bool) -> Styler:
    """The metric's pair statistics; with labels in the data, also those that agree with them."""
    names = [
        name
        for name in STATISTICS
        if name in PAIR_STATISTICS or labelled and name in scores and not math.isnan(scores[name])
    ]
    values = pd.Series([None if math.isnan(scores[n]) else scores[n] for n in names], dtype=object)
    frame = pd.DataFrame({"statistic": names, "value": values, "meaning": [STATISTICS[n] for n in names]})
    return frame.style.format(precision=4, na_rep="undefined")


def score_table(name: str, table: pd.DataFrame) -> Outputs:
    """Score the table's pairs; rows left blank are not pairs."""
    rows = [row for row in table.to_dict("records") if any(str(v or "").strip() for v in row.values())]
    return score(name, Dataset.from_list(rows) if rows else Dataset.from_dict({c: [] for c in table.columns}))


def score_file(name: str, path: str | None) -> Outputs:
    """Score the pairs of an uploaded JSONL, CSV or Parquet file."""
    if path is None:
        raise gr.Error("upload a JSONL, CSV or Parquet file with prompt, chosen and rejected columns first")
    try:
        dataset = load_data(path)
    except ValueError as e:
        raise page_error(e) from e
    return score(name, dataset)


def page_error(e: Exception) -> gr.Error:
    """The library's message of ``e``, shown in the page until closed (``str`` of a KeyError quotes it)."""
    return gr.Error(html.escape(e.args[0] if isinstance(e, KeyError) else str(e), quote=False), duration=None)


with gr.Blocks(title="Legend safety margins", analytics_enabled=False) as demo:
    gr.Markdown(
        "# Legend safety margins\n"
        "A safety direction reads how safe each response is from an annotator model's hidden states "
        "([Legend](https://arxiv.org/abs/2406.08124)). A pair's **margin** is safety(chosen) − "
        "safety(rejected): positive when the chosen response is the safer one. Edit the pairs below or upload "
        f"a file (at most {MAX_ROWS} pairs), then score them."
    )
    direction_name = gr.Dropdown(
        list(SHIPPED_DIRECTIONS), value=DEFAULT_DIRECTION.name, label="Direction (shipped with legend-hf)"
    )
    with gr.Tab("Table"):
        table = gr.Dataframe(
            EXAMPLE,
            headers=TEXT_COLUMNS,
            datatype="str",
            column_count=3,
            column_widths=["30%", "35%", "35%"],
            wrap=True,
            label="Preference pairs",
        )
        table_button = gr.Button("Score the table", variant="primary", elem_id="score-table")
    with gr.Tab("File"):
        upload = gr.File(
            file_types=[".jsonl", ".json", ".csv", ".parquet"],
            label="JSONL, CSV or Parquet with prompt, chosen and rejected columns",
            elem_id="upload",
        )
        file_button = gr.Button("Score the file", variant="primary", elem_id="score-file")
    margins = gr.Dataframe(
        label="Margins and safety scores", interactive=False, max_chars=60, wrap=True, elem_id="margins"
    )
    with gr.Row():
        stats = gr.Dataframe(
            label="Statistics",
            interactive=False,
            wrap=True,
            column_widths=["30%", "15%", "55%"],
            elem_id="statistics",
        )
        histogram = gr.Image(type="filepath", show_label=False, elem_id="histogram")
    download = gr.File(label="Annotated rows (Parquet, with the provenance record)", elem_id="download")
    with gr.Accordion("Provenance record", open=False):
        record = gr.JSON(show_label=False, elem_id="record")
    outputs = [margins, stats, histogram, download, record]
    table_button.click(score_table, [direction_name, table], outputs, api_name="score_table")
    file_button.click(score_file, [direction_name, upload], outputs, api_name="score_file")


if __name__ == "__main__":
    demo.launch(max_file_size=MAX_FILE_SIZE)
