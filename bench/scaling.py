"""Annotation throughput with 1 and 2 processes on this machine: ``Dataset.map(num_proc=...)``.

    python bench/scaling.py                      # SmolLM2-135M-Instruct, the shipped 300-pair sample
    python bench/scaling.py --pairs 100 --json bench/results/scaling.json

Annotates the shipped sample (``legend_hf/data/sample_preferences.jsonl``) with the shipped SmolLM2
direction three ways, each ``--repeats`` times (best run kept): one process with torch's default
thread count, one process with one thread, and ``num_proc=2`` (fork, one model and one thread per
worker, as ``MarginAnnotator`` sets in forked workers). Model loading in the workers is part of the
``num_proc=2`` time, as it is for users. Prints pairs/s, the ratios and the machine's load average
(other processes on the machine change the result: compare runs taken at a similar load).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from datasets import Dataset

import legend_hf
from legend_hf import MarginAnnotator, RuntimeOptions, SafetyDirection
from legend_hf.models import smollm2_path

DATA = Path(legend_hf.__file__).parent / "data"


def timed(dataset: Dataset, annotator: MarginAnnotator, batch_size: int, num_proc: int | None) -> float:
    extra = {"num_proc": num_proc, "with_rank": True} if num_proc else {}
    began = time.perf_counter()
    dataset.map(
        annotator,
        batched=True,
        batch_size=batch_size,
        load_from_cache_file=False,
        keep_in_memory=True,
        **extra,
    )
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=300, help="pairs to annotate (the sample has 300)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    rows = [json.loads(line) for line in (DATA / "sample_preferences.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(rows[: args.pairs]).select_columns(["prompt", "chosen", "rejected"])
    direction = SafetyDirection.from_pretrained(DATA / "smv-smollm2")
    annotator = MarginAnnotator(direction, str(smollm2_path()), runtime=RuntimeOptions(dtype="float32"))
    annotator(dataset[:4])  # warm-up (the parent has run the model before forking, as in real use)
    threads = torch.get_num_threads()
    settings = {
        f"1 process, {threads} threads": (threads, None),
        "1 process, 1 thread": (1, None),
        "2 processes (num_proc=2), 1 thread each": (threads, 2),
    }
    seconds: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, (num_threads, num_proc) in settings.items():
            torch.set_num_threads(num_threads)
            elapsed = timed(dataset, annotator, args.batch_size, num_proc)
            seconds[name] = min(seconds.get(name, float("inf")), elapsed)
    torch.set_num_threads(threads)
    results = {
        "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "pairs": len(dataset),
        "batch_size": args.batch_size,
        "cpu_cores": os.cpu_count(),
        "load_average_1min_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "torch": torch.__version__,
        "pairs_per_second": {name: round(len(dataset) / s, 2) for name, s in seconds.items()},
    }
    one, single, two = (seconds[name] for name in settings)
    results["ratio_2proc_vs_1proc_default_threads"] = round(one / two, 2)
    results["ratio_2proc_vs_1proc_1thread"] = round(single / two, 2)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
