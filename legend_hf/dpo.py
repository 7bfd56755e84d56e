"""Margin-aware DPO (`MarginDPOTrainer`, on TRL's `DPOTrainer`): the pair's margin enters the loss.

Needs the optional extra ``pip install legend-hf[train]`` (TRL); :mod:`legend_hf.training` trains with it.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
import trl.trainer.dpo_trainer as _trl_dpo
from datasets import Dataset, IterableDataset
from trl import DPOConfig, DPOTrainer

MARGIN_COLUMN = "margin"

_TRL_CHANGED = (
    "TRL's DPO loss no longer calls `F.logsigmoid` once per batch on one value per pair; this version of "
    "legend_hf.dpo cannot route the margins into it. Pin trl to a version it supports (1.16)."
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


def require_margin(dataset: Any, split: str) -> None:
    """Raise a clear error when a dataset (or any dataset of a dict of them) has no `margin` column."""
    if isinstance(dataset, dict):
        for name, part in dataset.items():
            require_margin(part, f"{split}[{name!r}]")
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
            require_margin(train_dataset, "train")
        if eval_dataset is not None:
            require_margin(eval_dataset, "eval")
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
