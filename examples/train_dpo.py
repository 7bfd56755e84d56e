"""DPO on SmolLM2-135M-Instruct with Legend margins, without, and with shuffled margins: held-out pairs and behaviour.

1. split the pairs in half (``--test_fraction 0.5``, seed 0) and keep ``--train_size``/``--test_size`` of them;
2. annotate the training pairs with the shipped direction and standardise the margins (``scale_margins``: one
   standard deviation = one logit), as ``legend-hf train`` does;
3. for every condition and seed, train with ``legend_hf.training.train_dpo`` (``MarginDPOTrainer``):
   ``none`` (plain DPO: all margins 0), ``offset`` (ODPO, ``-log σ(β·h - m)``), ``weight`` (``-2σ(m)·log σ(β·h)``),
   ``shuffled`` (the offset with the margins permuted over the pairs: a control with no information);
4. measure (a) held-out implicit-reward accuracy: the share of test pairs whose safer side has the larger
   ``log π(y|x) - log π_ref(y|x)`` (``legend_hf.training.dpo_accuracy``), and (b) behaviour (``behaviour.py``):
   the refusal rate on held-out harmful prompts and the compliance rate on XSTest's safe prompts, from greedy
   generations judged by a refusal rule validated on labelled refusals (not the direction that made the margins).

CPU, one condition and seed of the shipped sample: about 9 minutes on 2 cores::

    python examples/train_dpo.py --data sample --data_dir ../shared/data --output_dir bench/results/dpo-sample
    python examples/train_dpo.py --data ../shared/data/hh-rlhf/harmless-base-test-first-half.jsonl \\
        --train_size 192 --test_size 200 --max_length 256 --output_dir bench/results/dpo-hh
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).parent))
from behaviour import behaviour, held_out_prompts, validate_judge  # noqa: E402


@dataclass
class Arguments:
    data: str = field(
        default="sample", metadata={"help": "sample (the shipped 300 pairs) or a preference file"}
    )
    data_dir: str = field(default="../shared/data", metadata={"help": "the team's data (held-out prompts)"})
    conditions: list[str] = field(
        default_factory=lambda: ["none", "offset", "shuffled"],
        metadata={"help": "none, offset, weight, shuffled"},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "training seeds"})
    test_fraction: float = field(default=0.5, metadata={"help": "share of pairs held out"})
    train_size: int | None = field(default=None, metadata={"help": "at most this many training pairs"})
    test_size: int | None = field(default=None, metadata={"help": "at most this many held-out pairs"})
    n_prompts: int = field(
        default=40, metadata={"help": "held-out harmful prompts, and as many XSTest safe ones"}
    )
    max_length: int = field(default=192, metadata={"help": "tokens per prompt + response (the end is kept)"})
    beta: float = field(default=0.1, metadata={"help": "DPO beta"})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "pairs per step"})
    output_dir: str = field(default="legend-hf-output/dpo", metadata={"help": "results folder"})


def load_pairs(args: Arguments) -> tuple[Any, Any]:
    from datasets import load_dataset

    from legend_hf import data_io
    from legend_hf.data_io import load_data

    if args.data == "sample":
        pairs = load_dataset("json", data_files=str(data_io.SAMPLE_PREFERENCES), split="train")
    else:
        pairs = load_data(args.data)
    split = pairs.train_test_split(test_size=args.test_fraction, seed=0)
    train, test = split["train"], split["test"]
    if args.train_size:
        train = train.select(range(min(args.train_size, len(train))))
    if args.test_size:
        test = test.select(range(min(args.test_size, len(test))))
    return train, test


def annotate(train: Any) -> Any:
    """The training pairs with standardised margins from the shipped direction."""
    from legend_hf import DEFAULT_DIRECTION, SafetyDirection, annotate_margins

    return annotate_margins(train, SafetyDirection.from_pretrained(DEFAULT_DIRECTION), scale="standardize")


def run(
    args: Arguments,
    train: Any,
    test_pairs: Any,
    prompts: tuple[list[str], list[str]],
    condition: str,
    seed: int,
) -> dict[str, Any]:
    import tempfile

    from legend_hf.dpo import MarginDPOConfig
    from legend_hf.training import dpo_accuracy, shuffled_margins, train_dpo, trainer_config

    data = shuffled_margins(train, seed) if condition == "shuffled" else train
    with tempfile.TemporaryDirectory() as tmp:
        config = trainer_config(  # legend-hf's defaults: no checkpoints, no bf16, response ends kept
            "dpo",
            tmp,
            max_length=args.max_length,
            seed=seed,
            beta=args.beta,
            learning_rate=args.learning_rate,
            num_train_epochs=args.num_train_epochs,
            per_device_train_batch_size=args.per_device_train_batch_size,
            margin_mode="weight" if condition == "weight" else "offset",
            disable_tqdm=True,
        )
        assert isinstance(config, MarginDPOConfig)
        start = time.perf_counter()
        trainer = train_dpo(data, args=config, use_margins=condition != "none")
        seconds = time.perf_counter() - start
    policy: Any = trainer.model
    reference: Any = trainer.ref_model
    accuracy = dpo_accuracy(
        policy, reference, trainer.processing_class, test_pairs, max_length=args.max_length
    )
    behaved = behaviour(policy, trainer.processing_class, *prompts)
    return {"condition": condition, "seed": seed, "accuracy": accuracy, "train_seconds": seconds, **behaved}


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (0 with one seed)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def table(results: list[dict[str, Any]], base: dict[str, Any]) -> str:
    lines = [
        "| condition | held-out implicit-reward accuracy | refusal rate, harmful prompts | compliance, XSTest safe |",
        "|---|---|---|---|",
        f"| base model (no DPO) | - | {base['refusal_rate_harmful']:.3f} | {base['compliance_rate_safe']:.3f} |",
    ]
    for condition in dict.fromkeys(r["condition"] for r in results):
        runs = [r for r in results if r["condition"] == condition]
        cells = [
            mean_se([r[key] for r in runs])
            for key in ("accuracy", "refusal_rate_harmful", "compliance_rate_safe")
        ]
        lines.append(f"| {condition} | " + " | ".join(f"{m:.3f} ± {se:.3f}" for m, se in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from legend_hf.labels import LabelledPairs
    from legend_hf.models import DEFAULT_MODEL_ID, resolve_model

    hf_logging.set_verbosity_error()
    (args,) = HfArgumentParser(cast(Any, Arguments)).parse_args_into_dataclasses(
        args=argv, look_for_args_file=False
    )
    judge = validate_judge()
    prompts = held_out_prompts(args.data_dir, args.n_prompts)
    train, test = load_pairs(args)
    train = annotate(train)
    test_pairs = LabelledPairs.from_data(test)
    path = resolve_model(DEFAULT_MODEL_ID)
    base = behaviour(
        AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), *prompts
    )
    print(
        f"base: refusal {base['refusal_rate_harmful']:.3f}, XSTest compliance {base['compliance_rate_safe']:.3f}",
        flush=True,
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for condition in args.conditions:
        for seed in args.seeds:
            result = run(args, train, test_pairs, prompts, condition, seed)
            results.append(result)
            print(
                f"{condition:<9} seed {seed}: accuracy {result['accuracy']:.3f}, refusal {result['refusal_rate_harmful']:.3f}, "
                f"XSTest compliance {result['compliance_rate_safe']:.3f} ({result['train_seconds']:.0f} s)",
                flush=True,
            )
            summary = {
                "settings": {
                    **asdict(args),
                    "n_train": len(train),
                    "n_test": len(test),
                    "torch_threads": torch.get_num_threads(),
                },
                "judge": judge,
                "prompts": {"harmful": prompts[0], "safe": prompts[1]},
                "base": base,
                "runs": results,
            }
            (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    markdown = table(results, base)
    (out / "results.md").write_text(markdown + "\n")
    print(
        f"\n{markdown}\n\njudge on {judge['n']} labelled responses: precision {judge['precision']:.3f}, recall {judge['recall']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
