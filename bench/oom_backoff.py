"""GPU check: a token budget too large for the device backs off on out-of-memory and changes no margin.

    python bench/oom_backoff.py --memory-gib 6 --pairs 256

A randomly initialised ~1B Llama (bench/throughput.py's ``llama-1b`` shape) in bf16 reads random
prompt/response token pairs twice: in one batch of every pair under a capped allocator
(``torch.cuda.set_per_process_memory_fraction``), which runs out of memory and halves its budget until it
fits, and one pair at a time as the reference. Prints the retries, the largest difference and both times.
Needs a CUDA device and no ``datasets``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import RANDOM_CONFIGS  # noqa: E402

from legend_hf.hidden_states import LayerReader  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--memory-gib", type=float, default=6.0, help="allocator cap (model ~2.2 GiB)")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--response-tokens", type=int, default=120)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaModel

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    config = LlamaConfig(**RANDOM_CONFIGS["llama-1b"])
    with torch.device("cuda"):
        model = LlamaModel(config).to(torch.bfloat16).eval()
    config.architectures = ["LlamaForCausalLM"]  # a decoder: prompts are shared through the KV cache
    reader = LayerReader(model, [-1], "last")
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(5, config.vocab_size, (n,), generator=g).tolist()

    first, second = [], []
    for _ in range(args.pairs):
        prompt = ids(int(torch.randint(args.prompt_tokens // 2, args.prompt_tokens, (1,), generator=g)))
        first.append(prompt + ids(int(torch.randint(8, args.response_tokens, (1,), generator=g))))
        second.append(prompt + ids(int(torch.randint(8, args.response_tokens, (1,), generator=g))))
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.synchronize()
    began = time.perf_counter()
    reference = reader.read_pairs(first, second, pad_id=0, max_batch_size=1)
    torch.cuda.synchronize()
    one_by_one = time.perf_counter() - began
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(args.memory_gib * 2**30 / total)
    torch.cuda.reset_peak_memory_stats()
    budget = 2 * sum(max(len(a), len(b)) for a, b in zip(first, second, strict=True))
    print(f"{args.pairs} pairs, one batch of {budget} tokens under a {args.memory_gib} GiB cap:", flush=True)
    began = time.perf_counter()
    got = reader.read_pairs(first, second, pad_id=0, max_tokens=budget)
    torch.cuda.synchronize()
    backed_off = time.perf_counter() - began
    layer = reader.layers[0]
    for name, a, b in (("chosen", got[0], reference[0]), ("rejected", got[1], reference[1])):
        spread = float(b[layer].abs().max())
        error = float((a[layer] - b[layer]).abs().max())
        print(f"{name}: max abs difference {error:.3g}, {error / spread:.2g} of the largest state entry")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"one pair at a time {one_by_one:.2f} s; backed-off batches {backed_off:.2f} s (retries included)")


if __name__ == "__main__":
    main()
