"""What the Gemma 3 270M direction costs in speed against the SmolLM2 one: the same pairs annotated with each
shipped direction (``annotate_margins``, default runtime options), in alternating rounds in one process.

    OMP_NUM_THREADS=1 python bench/annotator_speed.py --pairs 96 --rounds 2

Models are loaded (and converted from their GGUF once, if needed) before timing; the first 8 pairs warm up.
Reported: pairs/s per round and the ratio of the medians, side by side on the same machine and moment.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from legend_hf import SafetyDirection, annotate_margins
from legend_hf.data_io import SAMPLE_PREFERENCES, load_data
from legend_hf.models import load_model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=96, help="first N pairs of the shipped sample")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--directions", nargs="+", default=["smv-smollm2", "smv-gemma3-270m"])
    args = parser.parse_args(argv)
    from datasets import Dataset

    # in memory: map writes no cache file, so every round computes
    pairs = Dataset.from_list(load_data(SAMPLE_PREFERENCES).select(range(args.pairs)).to_list())
    annotators = {}
    for name in args.directions:
        direction = SafetyDirection.from_pretrained(name)
        began = time.perf_counter()
        model, tokenizer = load_model(direction.model_id)
        print(f"{name}: {direction.model_id} loaded in {time.perf_counter() - began:.1f} s", flush=True)
        annotate_margins(pairs.select(range(8)), direction, model=model, tokenizer=tokenizer)  # warm-up
        annotators[name] = (direction, model, tokenizer)
    speed: dict[str, list[float]] = {name: [] for name in annotators}
    for r in range(args.rounds):
        for name, (direction, model, tokenizer) in annotators.items():
            began = time.perf_counter()
            annotate_margins(pairs, direction, model=model, tokenizer=tokenizer)
            speed[name].append(len(pairs) / (time.perf_counter() - began))
            print(f"round {r}: {name} {speed[name][-1]:.2f} pairs/s", flush=True)
    first, *others = args.directions
    for name in others:
        ratio = statistics.median(speed[first]) / statistics.median(speed[name])
        print(f"{name} takes {ratio:.2f}x the time of {first} (torch threads: {torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
