"""Where a GPU annotator's time goes: batching and prompt-sharing settings side by side, and a profile.

    python bench/gpu_profile.py --hh-rlhf HH.jsonl --tokenizer TOKENIZER_DIR --pairs 512 --out DIR

One process, one randomly initialised ~1B Llama (bench/throughput.py's ``llama-1b`` shape) in bf16: the raw
forward (``model.model``, length-sorted batches, tokenisation timed) against ``MarginAnnotator`` called
directly (no ``datasets``) with ``share_prompt`` on and off at several ``max_tokens_per_batch``; each the
best of ``--repeats``. Then a ``torch.profiler`` table of one annotator call. For diagnosis; the results
table of record comes from ``bench/throughput.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import RANDOM_CONFIGS, best_of, load_pairs, pair_texts, raw_batches  # noqa: E402

from legend_hf import MarginAnnotator, RuntimeOptions, SafetyDirection  # noqa: E402
from legend_hf.batching import pad  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # the CPU only to check this script


def best(run: Callable[[], object], repeats: int) -> float:
    """Wall seconds of the fastest run (the GPU synchronised around each)."""
    return best_of(run, repeats, DEVICE)[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hh-rlhf", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--preset", default="llama-1b", choices=sorted(RANDOM_CONFIGS))
    parser.add_argument("--budgets", default="8192,16384,32768")
    parser.add_argument("--raw-batch-sizes", default="16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    shape = dict(RANDOM_CONFIGS[args.preset], vocab_size=max(32000, len(tokenizer)))
    config = LlamaConfig(**shape, architectures=["LlamaForCausalLM"], pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    rows = load_pairs("hh", Path(args.hh_rlhf), args.pairs)
    texts = pair_texts(rows)
    n_tokens = sum(len(x) for x in tokenizer(texts)["input_ids"])
    lines = [
        f"{args.preset}, {len(rows)} pairs, {n_tokens} tokens, {torch.cuda.get_device_name() if CUDA else DEVICE}",
        "",
    ]

    def report(name: str, seconds: float) -> None:
        lines.append(f"{name}: {seconds:.3f} s, {n_tokens / seconds:.0f} tokens/s")
        print(lines[-1], flush=True)

    base = model.model
    raw_times = {}
    for size in [int(x) for x in args.raw_batch_sizes.split(",")]:

        def raw(size: int = size) -> None:
            ids = tokenizer(texts)["input_ids"]
            with torch.inference_mode():
                for batch in raw_batches([len(x) for x in ids], size):
                    input_ids, mask = pad([ids[i] for i in batch], tokenizer.pad_token_id, "right")
                    base(input_ids=input_ids.to(DEVICE), attention_mask=mask.to(DEVICE), use_cache=False)

        raw()
        raw_times[size] = best(raw, args.repeats)
        report(f"raw forward, batches of {size}", raw_times[size])
    fastest = min(raw_times.values())
    direction = SafetyDirection(
        vectors={shape["num_hidden_layers"]: torch.randn(shape["hidden_size"])},
        layer=shape["num_hidden_layers"],
        model_id="random",
        hidden_size=shape["hidden_size"],
        num_layers=shape["num_hidden_layers"],
        pooling="last",
        template="alpaca",
    )
    columns = list(rows[0])
    batch = {c: [r[c] for r in rows] for c in columns}
    annotators = {}
    budgets = [int(x) for x in args.budgets.split(",")]
    for share in (True, False):
        for budget in budgets:
            runtime = RuntimeOptions(
                device=DEVICE, share_prompt=share, max_tokens_per_batch=budget, check_model_id=False
            )
            annotator = MarginAnnotator(direction, model, tokenizer, runtime=runtime)
            annotator(batch)
            seconds = best(lambda a=annotator: a(batch), args.repeats)
            report(f"annotator share_prompt={share} max_tokens_per_batch={budget}", seconds)
            lines[-1] += f" ({fastest / seconds:.2f}x the raw forward's best)"
            annotators[(share, budget)] = annotator
    from torch.profiler import ProfilerActivity, profile

    for key in [(True, budgets[0]), (False, budgets[0])]:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
        with profile(activities=activities) as prof:
            annotators[key](batch)
            if CUDA:
                torch.cuda.synchronize()
        averages = prof.key_averages()
        lines += ["", f"profile share_prompt={key[0]} max_tokens_per_batch={key[1]}"]
        lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
        if CUDA:
            lines.append(
                averages.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60)
            )
    text = "\n".join(lines)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_profile.txt").write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
