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


def _write_histogram(dataset: Any, folder: Path) -> Path | None:
    if not has_matplotlib():
        logger.warning("matplotlib is not installed: no histogram (pip install 'legend-hf[plot]')")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    from ..publish import dataset_histogram

    return dataset_histogram(dataset, folder / HISTOGRAM_NAME)


def format_report(report: dict[str, Any]) -> str:
    """The text summary of :func:`legend_hf.evaluation.annotation_report`, in the statistics' own names."""
    record = report.get("record")
    margins = report["margins"]
    q = margins["quantiles"]
    overall = report["scores"]["all"]
    lines = []
    if record:
        scaling = record["scale"] or "none"
        if record["scale"]:
            scaling += f" (x{record['scale_factor']:.4g})"
        if record["clip"]:
            scaling += f", clip {record['clip']}"
        if record["bins"]:
            edges = ", ".join(f"{e:.4g}" for e in record["bin_edges"])
            scaling += f", {record['bins']} bins split at {edges}, levels {record['levels']}"
        lines += [
            f"  direction          {record['direction']} (fingerprint {record['direction_fingerprint']})",
            f"  annotator          {record['model_id']}, layer {record['layer']}/{record['num_layers']}, "
            f"{record['pooling']} pooling, template {record['template'][:40]!r}, {record['method']}",
            f"  scaling            {scaling}",
        ]
    else:
        lines.append(
            "  direction          not recorded (a plain Dataset.map annotation, or a format without a schema)"
        )
    truncated = margins.get("truncated")
    lines += [
        f"  pairs              {report['rows']}" + (f" ({truncated} truncated)" if truncated else ""),
        f"  {'raw margin' if margins['column'] == 'margin_raw' else 'margin':<18} mean {_fmt(overall['mean_margin'])}  "
        f"std {_fmt(margins['std_margin'])}  median {_fmt(overall['median_margin'])}  "
        f"5%..95% {_fmt(q.get('5%'))}..{_fmt(q.get('95%'))}",
        f"  share_positive     {_fmt(overall['share_positive'])} (margin > 0: the direction finds chosen safer)",
        f"  labels             {report['labels']}",
        f"  pair_accuracy      {_fmt(overall['pair_accuracy'])} on {int(overall['n_ordered'])} pairs with a safer "
        "side (margin sign vs label)",
        f"  response_auc       {_fmt(overall['response_auc'])} (safety scores, safe vs unsafe responses; "
        f"{int(overall['n_responses'])} labelled)",
        f"  severity_spearman  {_fmt(overall['severity_spearman'])} (margin vs severity difference)",
        f"  length_spearman    {_fmt(overall['length_spearman'])} (margin vs length difference, characters)",
    ]
    groups = {k: v for k, v in report["scores"].items() if k != "all"}
    if groups:
        lines.append("  per group          pairs  mean_margin  share_positive  pair_accuracy  response_auc")
        for name, s in groups.items():
            lines.append(
                f"    {name:<24} {int(s['n_pairs']):>5}  {_fmt(s['mean_margin']):>11}  {_fmt(s['share_positive']):>14}  "
                f"{_fmt(s['pair_accuracy']):>13}  {_fmt(s['response_auc']):>12}"
            )
    return "\n".join(lines)


# ----- commands ---------------------------------------------------------------------------------------


def run_generate(args: GenerateArguments, data: InputArguments, runtime: RuntimeOptions) -> int:
    from ..generate import GENERATION_KEY, GenerationSettings, generate_responses

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
    )
    record = json.loads(generated.info.description)[GENERATION_KEY]
    record.update(source_dataset=public_name(source))
    with quiet_progress_bars():
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
    from ..evaluation import annotation_report
    from ..publish import dataset_card, push_annotated_dataset

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
    with quiet_progress_bars():
        data_path = write_dataset(annotated, output_dir / f"{split}.{args.format}")
    histogram = _write_histogram(annotated, output_dir)
    license = args.license or ("apache-2.0" if Path(source) == SAMPLE_PREFERENCES else None)
    report = annotation_report(
        annotated,
        prompt_column=args.prompt_column,
        chosen_column=args.chosen_column,
        rejected_column=args.rejected_column,
    )
    card = dataset_card(
        annotated,
        direction,
        source_dataset=public_name(source),
        source_revision=data.dataset_revision,
        license=license,
        histogram=histogram.name if histogram else None,
        repo_id=hub.push_to_hub,
        report=report,
    )
    card.save(output_dir / "README.md")
    (output_dir / "report.json").write_text(
        json.dumps(clean({"dataset": public_name(source), **report}), indent=2) + "\n"
    )
    outputs = [data_path.name, "README.md", *([histogram.name] if histogram else []), "report.json"]
    print(
        f"legend-hf annotate: {len(annotated)} pairs from {public_name(source)} in {elapsed:.0f} s\n"
        + format_report(report)
        + f"\n  outputs            {output_dir}/ ({', '.join(outputs)})"
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
    from ..evaluation import annotation_report

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
            json.dumps(clean({"dataset": public_name(source), **report}), indent=2) + "\n"
        )
        outputs = ["report.json", *([histogram.name] if histogram else [])]
        written = f"\n  outputs            {output_dir}/ ({', '.join(outputs)})"
    if args.json:
        print(json.dumps(clean(report), indent=2))
        return 0
    print(f"legend-hf report: {public_name(source)}\n" + format_report(report) + written)
    return 0


def run_train(args: TrainArguments, scale: ScaleArguments, data: InputArguments, hub: HubArguments) -> int:
    import importlib.util

    from ..annotate import check_columns, scale_margins
    from ..cards import trained_model_card
    from ..evaluation import LabelledPairs
    from ..provenance import read_record

    if importlib.util.find_spec("trl") is None:
        raise ImportError('legend-hf train needs TRL, which is not installed: pip install "legend-hf[train]"')
    scaling = _scaling(scale)
    if not 0 <= args.test_fraction < 1:
        raise UsageError(f"--test_fraction must be in [0, 1), got {args.test_fraction}")
    if args.beta <= 0 or args.per_device_train_batch_size < 1 or args.max_length < 2:
        raise UsageError("--beta, --per_device_train_batch_size and --max_length must be positive")
    columns = (args.prompt_column, args.chosen_column, args.rejected_column)
    source = _annotated_input(args.dataset)
    dataset = _load_input(source, data)
    check_columns(dataset.column_names, columns, new_columns=())
    card = Path(source).with_name("README.md") if Path(source).is_file() else None
    record = read_record(dataset, card)
    notes = []
    if args.margins != "none":
        if "margin" not in dataset.column_names:
            raise KeyError(
                f"{public_name(source)} has no 'margin' column: annotate it first (legend-hf annotate --dataset "
                f"{source}), or train without margins (--margins none)"
            )
        if scale.given or (record is not None and not record.scaled):
            if not scale.given:  # raw projection differences are not logit units
                scaling = {**scaling, "scale": "standardize"}
                notes.append("raw margins standardised (--scale standardize --target_std 1)")
            dataset = scale_margins(dataset, **scaling)
            record = read_record(dataset)
    split = dataset.train_test_split(test_size=args.test_fraction, seed=0) if args.test_fraction else None
    train, test = (split["train"], split["test"]) if split else (dataset, None)
    if args.margins == "shuffled":
        order = torch_permutation(len(train), args.seed)
        train = train.remove_columns("margin").add_column("margin", [train["margin"][i] for i in order])
    output_dir = Path(args.output_dir)
    settings: dict[str, Any] = {
        **{
            k: getattr(args, k)
            for k in ("trainer", "model", "margins", "margin_mode", "margin_scale", "beta")
        },
        **{
            k: getattr(args, k)
            for k in (
                "max_length",
                "num_train_epochs",
                "max_steps",
                "per_device_train_batch_size",
                "bf16",
                "seed",
            )
        },
        "learning_rate": args.learning_rate or (5e-6 if args.trainer == "dpo" else 5e-5),
        "dataset": public_name(source),
        "n_train": len(train),
        "n_test": 0 if test is None else len(test),
    }
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # TRL's logs and metrics dicts: stdout keeps the summary
        model, tokenizer, accuracy = _train(args, settings, train, test, columns, output_dir)
    metrics = {
        "held_out_accuracy": accuracy,
        "n_held_out": None,
        "train_seconds": time.perf_counter() - start,
    }
    if test is not None:
        pairs = LabelledPairs.from_data(
            test, prompt_column=columns[0], chosen_column=columns[1], rejected_column=columns[2]
        )
        metrics["n_held_out"] = sum(s is not None for s in pairs.labels.chosen_is_safer)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    trained_model_card(settings, metrics, record, args.margins).save(output_dir / "README.md")
    (output_dir / "metrics.json").write_text(
        json.dumps(
            clean({"settings": settings, "metrics": metrics, "record": record and record.to_dict()}), indent=2
        )
        + "\n"
    )
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


def torch_permutation(n: int, seed: int) -> list[int]:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _train(
    args: TrainArguments, settings: dict[str, Any], train: Any, test: Any, columns: Any, output_dir: Path
) -> tuple[Any, Any, float | None]:
    """Train with the chosen trainer; the trained model, its tokenizer and the held-out accuracy (or None)."""
    import torch

    from ..evaluation import LabelledPairs
    from ..training import (
        MarginDPOConfig,
        dpo_accuracy,
        reward_accuracy,
        train_dpo,
        train_reward_model,
    )

    common: dict[str, Any] = dict(
        output_dir=str(output_dir),  # save_strategy="no": TRL writes no checkpoints there
        seed=args.seed,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        learning_rate=settings["learning_rate"],
        per_device_train_batch_size=args.per_device_train_batch_size,
        bf16=args.bf16,  # TRL's default bf16 fails on most CPUs and makes CPU rewards coarse
        activation_checkpointing=False,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning without a GPU only warns
        save_strategy="no",
        report_to=args.report_to,
        logging_steps=10,
    )
    pairs = (
        None
        if test is None
        else LabelledPairs.from_data(
            test, prompt_column=columns[0], chosen_column=columns[1], rejected_column=columns[2]
        )
    )
    use = args.margins != "none"
    if args.trainer == "reward":
        from trl import RewardConfig

        config = RewardConfig(**common, max_length=None)
        reward = train_reward_model(
            train, args.model, args=config, use_margins=use, max_length=args.max_length, columns=columns
        )
        if pairs is None:
            return reward.model, reward.processing_class, None
        model: Any = reward.model
        return (
            model,
            reward.processing_class,
            reward_accuracy(model, reward.processing_class, pairs, max_length=args.max_length),
        )
    dpo = MarginDPOConfig(
        **common,
        beta=args.beta,
        max_length=args.max_length,
        truncation_mode="keep_end",  # like the annotator: the response end stays, no pair is dropped
        margin_mode=args.margin_mode,
        margin_scale=args.margin_scale,
    )
    trainer = train_dpo(train, args.model, args=dpo, use_margins=use, columns=columns)
    policy: Any = trainer.model
    reference: Any = trainer.ref_model
    accuracy = None
    if pairs is not None:
        with torch.no_grad():
            accuracy = dpo_accuracy(
                policy, reference, trainer.processing_class, pairs, max_length=args.max_length
            )
    return policy, trainer.processing_class, accuracy


COMMANDS = {
    "generate": run_generate,
    "fit": run_fit,
    "annotate": run_annotate,
    "report": run_report,
    "train": run_train,
}
