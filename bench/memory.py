"""Peak memory of ``Dataset.map(MarginAnnotator(...))`` for 1k and 100k pairs: results stream to Arrow.

    python bench/memory.py --sizes 1000,100000 --out bench/results/memory

The target: peak RSS for 100k pairs within 1.2x of that for 1k pairs (nothing holds all hidden states or
all results in memory). Memory, not speed, is measured, so the model is a tiny randomly initialised Llama
(2 layers, hidden 64; the SmolLM2 tokenizer) and the texts are short synthetic pairs. Each size is written to
disk by one subprocess (``save_to_disk``) and annotated by another (``load_from_disk`` + ``map``, which
writes its result to an Arrow cache file next to the data, as it does for any on-disk dataset), so each
peak is that run's own: ``ru_maxrss`` of the process, plus the peak sampled (psutil, every 20 ms) during
``map`` alone and the RSS just before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["a lock", "my neighbour's wifi", "a bank account", "a car", "a phone", "an exam", "a password"]
VERBS = ["open", "get into", "copy", "fix", "protect", "reset", "check"]


def make_data(size: int, path: Path) -> None:
    """``size`` short synthetic pairs, every prompt distinct, saved as an on-disk Arrow dataset."""
    from datasets import Dataset

    def rows() -> Any:
        for i in range(size):
            topic, verb = TOPICS[i % len(TOPICS)], VERBS[(i // len(TOPICS)) % len(VERBS)]
            yield {
                "prompt": f"How do I {verb} {topic}? (question {i})",
                "chosen": f"I can't help with that, but here is a safe alternative for case {i}.",
                "rejected": f"Sure, to {verb} {topic} you first need to do step {i % 97}.",
            }

    Dataset.from_generator(rows).save_to_disk(str(path))


def build_model(path: Path) -> None:
    """A tiny random Llama with the SmolLM2 tokenizer, and a direction fitted on it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from legend_hf import fit_direction
    from legend_hf.models import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tokenizer),
        architectures=["LlamaForCausalLM"],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.config._name_or_path = "random-tiny-llama"
    model.save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    harmful = [
        {"prompt": f"How do I {v} {t}?", "response": f"Sure, {v} {t} like this."}
        for v in VERBS
        for t in TOPICS
    ]
    fit_direction(str(path / "model"), harmful, template="alpaca").save_pretrained(
        path / "direction", card=False
    )


def annotate(data: Path, workdir: Path, batch_size: int, threads: int) -> dict[str, Any]:
    """Annotate an on-disk dataset; RSS before ``map``, sampled peak during it, and the process high-water."""
    import psutil
    import torch
    from datasets import load_from_disk

    from legend_hf import MarginAnnotator, RuntimeOptions, SafetyDirection

    torch.set_num_threads(threads)
    direction = SafetyDirection.from_pretrained(workdir / "direction")
    annotator = MarginAnnotator(
        direction, str(workdir / "model"), runtime=RuntimeOptions(check_model_id=False)
    )
    dataset = load_from_disk(str(data))
    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    annotated = dataset.map(annotator, batched=True, batch_size=batch_size)
    seconds = time.perf_counter() - began
    done.set()
    sampler.join()
    return {
        "pairs": len(annotated),
        "seconds": seconds,
        "rss_before_map_mib": before / 2**20,
        "peak_rss_during_map_mib": max(peak[0], process.memory_info().rss) / 2**20,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
        "cache_files": [Path(f["filename"]).name for f in annotated.cache_files],
        "on_disk": all(Path(f["filename"]).parent == data for f in annotated.cache_files),
    }


def child(argv: Sequence[str]) -> None:
    """Subprocess entry: ``build DIR``, ``data SIZE DIR`` or ``annotate DATA WORKDIR BATCH THREADS RESULT``."""
    if argv[0] == "build":
        build_model(Path(argv[1]))
    elif argv[0] == "data":
        make_data(int(argv[1]), Path(argv[2]))
    else:
        result = annotate(Path(argv[1]), Path(argv[2]), int(argv[3]), int(argv[4]))
        Path(argv[5]).write_text(json.dumps(result))


def run(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, __file__, "--child", *args], check=True, env=env)


def markdown(results: dict[int, dict[str, Any]], command: str) -> str:
    sizes = sorted(results)
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; tiny random Llama (speed is not measured here).",
        "",
        "| pairs | peak RSS (process) MiB | peak RSS during map MiB | RSS before map MiB | growth during map MiB "
        "| map seconds | result cache on disk |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for size in sizes:
        r = results[size]
        growth = r["peak_rss_during_map_mib"] - r["rss_before_map_mib"]
        lines.append(
            f"| {size} | {r['ru_maxrss_mib']:.0f} | {r['peak_rss_during_map_mib']:.0f} | {r['rss_before_map_mib']:.0f} "
            f"| {growth:.0f} | {r['seconds']:.1f} | {'yes' if r['on_disk'] else 'no'} ({', '.join(r['cache_files'])}) |"
        )
    small, large = results[sizes[0]], results[sizes[-1]]
    ratio = large["ru_maxrss_mib"] / small["ru_maxrss_mib"]
    during = large["peak_rss_during_map_mib"] / small["peak_rss_during_map_mib"]
    verdict = "met" if ratio <= 1.2 else "MISSED"
    lines += [
        "",
        f"Peak RSS {sizes[-1]} / {sizes[0]} pairs: {ratio:.3f} (process high-water), {during:.3f} (during map); "
        f"target <= 1.2 -> {verdict}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,100000", help="comma list of pair counts")
    parser.add_argument("--batch-size", type=int, default=256, help="Dataset.map batch_size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (speed is not the point here)")
    parser.add_argument("--out", type=Path, help="write results.md and results.json here")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return
    command = "python bench/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="legend-memory-") as tmp:
        workdir = Path(tmp)
        run("build", str(workdir))
        for size in (int(x) for x in args.sizes.split(",")):
            data, result = workdir / f"data-{size}", workdir / f"result-{size}.json"
            run("data", str(size), str(data))
            run("annotate", str(data), str(workdir), str(args.batch_size), str(args.threads), str(result))
            results[size] = json.loads(result.read_text())
            print(f"{size} pairs: {results[size]}", flush=True)
    text = markdown(results, command)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(text)
        (args.out / "results.json").write_text(json.dumps({"command": command, "results": results}, indent=1))


if __name__ == "__main__":
    main()
