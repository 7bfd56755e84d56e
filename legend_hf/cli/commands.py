"""What each ``legend-hf`` command does: check every option and column, then call the library, then write and
print. The commands hold no scoring or statistics of their own (those are :mod:`legend_hf.scoring`,
:mod:`legend_hf.stats` and :mod:`legend_hf.evaluation`)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from ..data_io import (
    DEFAULT_DIRECTION,
    FIT_HARMFUL,
    SAMPLE_PREFERENCES,
    load_data,
    pku_saferlhf_to_pairs,
    write_dataset,
)
from ..formatting import InputError, TextTemplate
from ..names import public_name
from ..options import RuntimeOptions, quiet_progress_bars
from ..plots import HISTOGRAM_NAME, has_matplotlib
from ..stats import clean
from .arguments import (
    ANNOTATED,
    AnnotateArguments,
    FitArguments,
    GenerateArguments,
    HubArguments,
    InputArguments,
    ReportArguments,
    ScaleArguments,
    TrainArguments,
)

logger = logging.getLogger("legend_hf.cli")


class UsageError(Exception):
    """An option value the command cannot use (exit code 2)."""


# ----- shared helpers ---------------------------------------------------------------------------------


def _load_input(source: str | Path, data: InputArguments, *, split: str | None = None) -> Any:
    with quiet_progress_bars():
        dataset = load_data(
            source,
            split=split or data.split,
            name=data.config_name,
            revision=data.dataset_revision,
            limit=data.limit,
        )
    if len(dataset) == 0:
        raise InputError(f"{public_name(source)}: no rows to work on")
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


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _warn_without_matplotlib() -> bool:
    if not has_matplotlib():
        logger.warning("matplotlib is not installed: no histogram (pip install 'legend-hf[plot]')")
    return has_matplotlib()


def _write_histogram(dataset: Any, folder: Path) -> Path | None:
    if not _warn_without_matplotlib():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    from ..publish import dataset_histogram

    return dataset_histogram(dataset, folder / HISTOGRAM_NAME)


def run_generate(args: GenerateArguments, data: InputArguments, runtime: RuntimeOptions) -> int:
    from ..generate import GenerationSettings, generate_responses
    from ..provenance import read_generation_record

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
    source = args.dataset or FIT_HARMFUL
    dataset = _load_input(source, data)
    if args.prompt_column not in dataset.column_names:
        raise KeyError(
            f"column {args.prompt_column!r} not found in {public_name(source)}; it has {dataset.column_names} "
            "(set --prompt_column)"
        )
    replaced = [c for c in (args.response_column, "response_truncated") if c in dataset.column_names]
    if replaced:
        logger.warning("replacing the input's %s column(s) with new generations", replaced)
        dataset = dataset.remove_columns(replaced)
    start = time.perf_counter()
    generated = generate_responses(
        args.model,
        dataset,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        batch_size=args.batch_size,
        runtime=runtime,
        settings=settings,
        source_dataset=str(source),
    )
    record = read_generation_record(generated, args.response_column)
    assert record is not None  # generate_responses writes it
    with quiet_progress_bars():
        write_dataset(generated, output)
    # The record travels in the data's schema (Parquet); beside it too, for JSON Lines, which has none.
    settings_path = output.with_name(output.stem + ".settings.json")
    settings_path.write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    n_cut = sum(generated["response_truncated"])
    print(
        f"legend-hf generate: {len(generated)} responses from {record.model_id} "
        f"({'sampled' if args.do_sample else 'greedy'}, template {record.template}, "
        f"{n_cut} stopped at --max_new_tokens={args.max_new_tokens}) in {time.perf_counter() - start:.0f} s\n"
        f"  outputs: {output}, {settings_path}\n"
        f"  next:    legend-hf fit --dataset {output} --response_column {args.response_column}"
    )
    return 0


def run_fit(args: FitArguments, data: InputArguments, runtime: RuntimeOptions, hub: HubArguments) -> int:
    from ..fitting import fit_direction

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
    source = args.dataset or FIT_HARMFUL
    harmful = _load_input(source, data)
    harmless = _load_input(args.harmless, data, split=args.harmless_split) if args.harmless else None
    severity = [args.severity_column] if args.severity_column else []
    for name, rows, needed in (("--dataset", harmful, severity), ("--harmless", harmless, [])):
        columns = [] if rows is None else rows.column_names
        missing = [
            c
            for c in (args.prompt_column, args.response_column, *needed)
            if rows is not None and c not in columns
        ]
        if missing:
            raise KeyError(
                f"{name} has no column(s) {missing}; it has {columns} "
                "(set --prompt_column/--response_column/--severity_column)"
            )
    start = time.perf_counter()
    direction = fit_direction(
        args.model,
        harmful,
        harmless=harmless,
        layer=layer,
        pooling=args.pooling,
        method=args.method,
        template=args.template,
        refusals=refusals,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        holdout=args.holdout,
        seed=args.seed,
        severity_column=args.severity_column,
        description=args.description or _fit_description(args, source, refusals),
        model_id=args.model_id,
        runtime=runtime,
    )
    folder = direction.save_pretrained(args.output_dir, repo_id=hub.push_to_hub)
    scores = direction.layer_scores.get(direction.layer)
    held_out = (
        f"held-out pair_accuracy {_fmt(scores['pair_accuracy'])}, response_auc {_fmt(scores['response_auc'])} "
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
    if hub.push_to_hub:
        commit = direction.push_to_hub(
            hub.push_to_hub, private=hub.private or None, revision=hub.hub_revision, create_pr=hub.create_pr
        )
        print(f"  pushed:   {commit.pr_url or commit.commit_url}")
    return 0


def _fit_description(args: FitArguments, source: str | Path, refusals: list[str] | None) -> str:
    if args.harmless:
        safe = public_name(args.harmless)
    elif args.refusals_file:
        safe = f"refusals from {public_name(args.refusals_file)}"
    else:
        safe = f"{len(refusals)} refusal(s)" if refusals else 'the refusal "I can\'t answer that."'
    return f"harmful: {public_name(source)}; safe: {safe}"


def _scaling(scale: ScaleArguments) -> dict[str, Any]:
    try:
        return scale.scaling()
    except ValueError as e:
        raise UsageError(str(e)) from None


def _annotated_input(dataset: str | None) -> str:
    """``--dataset``, else what ``legend-hf annotate`` wrote, which must then be there."""
    if dataset:
        return dataset
    if not ANNOTATED.exists():
        raise FileNotFoundError(
            f"nothing annotated yet: {ANNOTATED} does not exist; run `legend-hf annotate` first, or pass --dataset"
        )
    return str(ANNOTATED)


def run_annotate(
    args: AnnotateArguments,
    scale: ScaleArguments,
    data: InputArguments,
    runtime: RuntimeOptions,
    hub: HubArguments,
) -> int:
    from ..annotate import annotate_margins, check_columns, scale_margins
    from ..direction import SafetyDirection
    from ..publish import push_annotated_dataset, save_annotated
    from ..report import annotation_report

    # Every option first: nothing below loads a model until all of them are known to be usable.
    scaling = _scaling(scale)
    if args.engine != "local" and args.num_proc:
        raise UsageError(f"--num_proc is for --engine local; --engine {args.engine} runs its own workers")
    if args.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise ImportError('--engine ray needs Ray, which is not installed: pip install "legend-hf[ray]"')
    source = args.dataset or SAMPLE_PREFERENCES
    dataset = _load_input(source, data)
    if args.pku_saferlhf:
        dataset = pku_saferlhf_to_pairs(dataset, preference=args.pku_preference)
    check_columns(dataset.column_names, (args.prompt_column, args.chosen_column, args.rejected_column))
    output_dir = Path(args.output_dir)
    start = time.perf_counter()
    direction = SafetyDirection.from_pretrained(
        args.direction or DEFAULT_DIRECTION, revision=args.direction_revision
    )
    options: dict[str, Any] = dict(
        model=args.model,
        prompt_column=args.prompt_column,
        chosen_column=args.chosen_column,
        rejected_column=args.rejected_column,
        runtime=runtime,
    )
    batch_size = args.batch_size or _map_batch_size(args, runtime)
    if args.engine == "local":
        annotated = annotate_margins(
            dataset, direction, batch_size=batch_size, num_proc=args.num_proc, **options, **scaling
        )
    else:
        annotated = _annotate_with_engine(args, dataset, direction, options, batch_size)
        if annotated is None:  # a torchrun rank other than 0: its shards are written, rank 0 merges
            return 0
        if scale.given:
            annotated = scale_margins(annotated, **scaling)
    elapsed = time.perf_counter() - start
    local = Path(source).exists()
    split = "train" if local else data.split
    license = args.license or ("apache-2.0" if Path(source) == SAMPLE_PREFERENCES else None)
    report = annotation_report(
        annotated,
        prompt_column=args.prompt_column,
        chosen_column=args.chosen_column,
        rejected_column=args.rejected_column,
    )
    _warn_without_matplotlib()
    with quiet_progress_bars():
        written = save_annotated(
            annotated,
            output_dir,
            direction,
            split=split,
            format=args.format,
            source_dataset=str(source),
            source_revision=data.dataset_revision,
            license=license,
            repo_id=hub.push_to_hub,
            report=report,
        )
    print(
        f"legend-hf annotate: {len(annotated)} pairs from {public_name(source)} in {elapsed:.0f} s\n"
        + report.to_text()
        + f"\n  outputs            {output_dir}/ ({', '.join(p.name for p in written)})"
    )
    if hub.push_to_hub:
        commit = push_annotated_dataset(
            annotated,
            hub.push_to_hub,
            direction,
            private=hub.private or None,
            revision=hub.hub_revision,
            create_pr=hub.create_pr,
            source_dataset=None if local else str(source),
            source_revision=data.dataset_revision,
            license=license,
            report=report,
            split=split,
        )
        print(f"  pushed             {commit.pr_url or commit.commit_url}")
    return 0


def _map_batch_size(args: AnnotateArguments, runtime: RuntimeOptions) -> int:
    """1000 rows (``datasets``' default) on a GPU; 256 on a CPU, enough for several packed rows of 2048 tokens
    per map batch, with a progress bar that still moves. The annotator packs rows by token budget within each
    map batch."""
    from ..models import resolve_device

    on_gpu = resolve_device(runtime.device).type == "cuda" or (
        args.engine == "ray" and bool(args.num_gpus_per_actor)
    )
    return 1000 if on_gpu else 256


def _annotate_with_engine(
    args: AnnotateArguments, dataset: Any, direction: Any, options: dict[str, Any], batch_size: int
) -> Any:
    """Raw margins from the torchrun or Ray engine, merged in input order (``None`` on torchrun ranks > 0)."""
    from ..distributed import annotate_distributed, load_annotated

    work_dir = Path(args.work_dir or Path(args.output_dir) / f"parts-{args.engine}")
    if args.engine == "torchrun":
        return annotate_distributed(
            dataset, direction, work_dir, shard_size=args.shard_size, batch_size=batch_size, **options
        )
    from ..ray_engine import annotate_with_ray

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
    from ..report import annotation_report

    source = _annotated_input(args.dataset)
    dataset = _load_input(source, data)
    if "margin" not in dataset.column_names:
        raise KeyError(
            f"{public_name(source)} has no 'margin' column: annotate it first (legend-hf annotate --dataset "
            f"{source}); it has {dataset.column_names}"
        )
    card = Path(source).with_name("README.md") if Path(source).is_file() else None
    report = annotation_report(
        dataset,
        prompt_column=args.prompt_column,
        chosen_column=args.chosen_column,
        rejected_column=args.rejected_column,
        group_column=args.group_column,
        card=card,
    )
    written = ""
    if args.output_dir:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        histogram = _write_histogram(dataset, output_dir)
        (output_dir / "report.json").write_text(
            json.dumps(clean({"dataset": public_name(source), **report.to_dict()}), indent=2) + "\n"
        )
        outputs = ["report.json", *([histogram.name] if histogram else [])]
        written = f"\n  outputs            {output_dir}/ ({', '.join(outputs)})"
    if args.json:
        print(json.dumps(clean(report.to_dict()), indent=2))
        return 0
    print(f"legend-hf report: {public_name(source)}\n" + report.to_text() + written)
    return 0


def run_train(args: TrainArguments, scale: ScaleArguments, data: InputArguments, hub: HubArguments) -> int:
    if importlib.util.find_spec("trl") is None:
        raise ImportError('legend-hf train needs TRL, which is not installed: pip install "legend-hf[train]"')
    from ..training import train_with_margins

    scaling = _scaling(scale)
    if not 0 <= args.test_fraction < 1:
        raise UsageError(f"--test_fraction must be in [0, 1), got {args.test_fraction}")
    if args.beta <= 0 or args.per_device_train_batch_size < 1 or args.max_length < 2:
        raise UsageError("--beta, --per_device_train_batch_size and --max_length must be positive")
    source = _annotated_input(args.dataset)
    dataset = _load_input(source, data)
    dpo = {"beta": args.beta, "margin_mode": args.margin_mode, "margin_scale": args.margin_scale}
    output_dir = Path(args.output_dir)
    with contextlib.redirect_stdout(sys.stderr):  # TRL's logs and metrics dicts: stdout keeps the summary
        trained = train_with_margins(
            dataset,
            args.model,
            trainer=args.trainer,
            margins=args.margins,
            scaling=scaling if scale.given else None,
            test_fraction=args.test_fraction,
            columns=(args.prompt_column, args.chosen_column, args.rejected_column),
            max_length=args.max_length,
            seed=args.seed,
            card=Path(source).with_name("README.md") if Path(source).is_file() else None,
            dataset_name=str(source),
            output_dir=output_dir,  # save_strategy="no": TRL writes no checkpoints there
            num_train_epochs=args.num_train_epochs,
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            per_device_train_batch_size=args.per_device_train_batch_size,
            bf16=args.bf16,
            report_to=args.report_to,
            **(dpo if args.trainer == "dpo" else {}),
        )
    trained.save(output_dir)
    metrics, settings, notes = trained.metrics, trained.settings, trained.notes
    accuracy = metrics["held_out_accuracy"]
    held_out = (
        f"held-out accuracy {_fmt(accuracy)} on {metrics['n_held_out']} pairs (safer side scores higher)"
        if accuracy is not None
        else "no held-out pairs (--test_fraction 0)"
    )
    print(
        f"legend-hf train: {args.trainer} on {settings['n_train']} pairs of {settings['dataset']} from {args.model}, "
        f"margins {args.margins}{' (' + '; '.join(notes) + ')' if notes else ''}, in {metrics['train_seconds']:.0f} s\n"
        f"  {held_out}\n"
        f"  outputs: {output_dir}/ (model, README.md, metrics.json)"
    )
    if hub.push_to_hub:
        from ..hub import push_folder

        commit = push_folder(
            output_dir,
            hub.push_to_hub,
            revision=hub.hub_revision,
            create_pr=hub.create_pr,
            private=hub.private or None,
            commit_message="Upload a model trained with Legend margins (legend-hf train)",
        )
        print(f"  pushed:  {commit.pr_url or commit.commit_url}")
    return 0


COMMANDS = {
    "generate": run_generate,
    "fit": run_fit,
    "annotate": run_annotate,
    "report": run_report,
    "train": run_train,
}
