"""The pipeline's first step: responses to harmful prompts from a causal LM (the paper's harmful answers).

Legend fits its direction on harmful prompts answered by an annotator model without safety tuning
(greedy decoding in the paper). `generate_responses` runs batched greedy or sampled generation with
left padding, and returns a ``datasets.Dataset`` with the input columns plus the responses; how they were
generated is a :class:`legend_hf.provenance.GenerationRecord` in the response column's feature (it travels
with the data as the annotation record does: ``read_generation_record``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .formatting import ALPACA_TEMPLATE, InputError, Message, messages_to_text
from .models import load_model
from .names import __version__, public_name
from .options import RuntimeOptions
from .provenance import GenerationRecord, generated_features

GENERATION_KEY = "legend_hf_generation"
TEMPLATES = ("auto", "chat", "alpaca", "none")


@dataclass(frozen=True)
class GenerationSettings:
    """What defines the generated text (recorded with the output)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int = 0
    template: str = "auto"
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ValueError(
                f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )

    def generate_kwargs(self) -> dict[str, Any]:
        """Arguments for ``model.generate``; sampling parameters only when sampling (no warnings)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def prompt_text(
    prompt: Any, tokenizer: Any, template: str, system_prompt: str | None, *, row: int, column: str
) -> str:
    """The text the model continues: its chat template with a generation prompt, the Alpaca one, or as is."""
    if isinstance(prompt, str):
        messages: list[Message] = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt
    ):
        messages = list(prompt)
    else:
        raise InputError(
            f"column {column!r}, row {row}: expected a prompt string or a list of messages, "
            f"got {type(prompt).__name__} {prompt!r:.80}"
        )
    if template == "chat":
        if system_prompt is not None:
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    text = messages_to_text(messages)
    if system_prompt is not None:
        text = f"{system_prompt}\n\n{text}"
    if template == "alpaca":
        return ALPACA_TEMPLATE.format(prompt=text, response="")
    return text


def load_generator(
    model: str | os.PathLike[str] | nn.Module, tokenizer: Any = None, runtime: RuntimeOptions | None = None
) -> tuple[nn.Module, Any]:
    """A causal LM (with its LM head) and its tokenizer, set up for left-padded batched generation."""
    lm, tokenizer = load_model(model, tokenizer, runtime, lm_head=True)
    tokenizer.padding_side = "left"  # generation continues the last token of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


def generate_responses(
    model: str | os.PathLike[str] | nn.Module,
    prompts: Any,
    *,
    tokenizer: Any = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    batch_size: int = 8,
    settings: GenerationSettings | None = None,
    runtime: RuntimeOptions | None = None,
    source_dataset: str | None = None,
    **setting_overrides: Any,
) -> Any:
    """Generate one response per prompt; returns a ``datasets.Dataset`` (input columns + ``response_column``).

    Args:
        model: a Hub id, local folder or loaded causal LM (ideally without safety tuning, as in the paper).
        prompts: a ``datasets.Dataset``, a list of dicts with ``prompt_column``, or a list of prompts
            (strings or message lists).
        settings: a :class:`GenerationSettings`; keyword overrides (``max_new_tokens=64``, ``do_sample=True``
            ...) replace its fields. ``template="auto"`` uses the chat template when the tokenizer has one.
        batch_size: prompts per ``generate`` call; prompts are sorted by length so batches pad little.
        runtime: device, dtype, model revision, ``trust_remote_code`` and progress bars.
        source_dataset: where the prompts came from, for the record (a local path is kept by its name only).

    The output also holds ``response_truncated`` (generation stopped at ``max_new_tokens``).
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    runtime = runtime or RuntimeOptions()
    settings = GenerationSettings(**{**asdict(settings or GenerationSettings()), **setting_overrides})
    if isinstance(prompts, Dataset):
        dataset = prompts
    else:
        rows = list(prompts)
        dataset = Dataset.from_list(
            rows if rows and isinstance(rows[0], dict) else [{prompt_column: p} for p in rows]
        )
    if len(dataset) and prompt_column not in dataset.column_names:
        raise KeyError(
            f"column {prompt_column!r} not found; the prompts have {dataset.column_names} "
            "(set prompt_column=)"
        )
    if response_column in dataset.column_names:
        raise ValueError(
            f"the prompts already have a {response_column!r} column; choose another response_column"
        )
    lm, tokenizer = load_generator(model, tokenizer, runtime)
    template = settings.template
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    elif template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' but the tokenizer has no chat template; use 'alpaca' or 'none'")
    raw = dataset[prompt_column] if len(dataset) else []
    texts = [
        prompt_text(p, tokenizer, template, settings.system_prompt, row=i, column=prompt_column)
        for i, p in enumerate(raw)
    ]
    adds_special = template != "chat"
    ids = tokenizer(texts, add_special_tokens=adds_special)["input_ids"] if texts else []
    responses: list[str] = [""] * len(texts)
    truncated: list[bool] = [False] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
    eos = _eos_ids(lm, tokenizer)
    generator: Any = lm  # a GenerationMixin model
    torch.manual_seed(settings.seed)
    device_ = next(lm.parameters()).device
    with tqdm(
        total=len(texts), desc="legend-hf generate", unit="prompt", disable=not runtime.progress
    ) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            encoded = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
            with torch.inference_mode():
                out = generator.generate(
                    input_ids=encoded["input_ids"].to(device_),
                    attention_mask=encoded["attention_mask"].to(device_),
                    pad_token_id=tokenizer.pad_token_id,
                    **settings.generate_kwargs(),
                )
            new_tokens = out[:, encoded["input_ids"].shape[1] :].cpu()
            for row, tokens in zip(batch, new_tokens, strict=True):
                real = tokens.tolist()
                finished = any(t in eos for t in real)
                truncated[row] = not finished and len(real) >= settings.max_new_tokens
                responses[row] = tokenizer.decode(real, skip_special_tokens=True).strip()
            bar.update(len(batch))
    result = dataset.add_column(response_column, responses).add_column("response_truncated", truncated)
    record = GenerationRecord(
        model_id=public_name(str(getattr(lm.config, "_name_or_path", "") or "")) or "",
        settings=asdict(settings),
        template=template,
        batch_size=batch_size,
        prompt_column=prompt_column,
        response_column=response_column,
        library_version=__version__,
        model_revision=runtime.model_revision or getattr(lm.config, "_commit_hash", None),
        source_dataset=public_name(source_dataset),
    )
    return result.cast(generated_features(result.features, record))


def _eos_ids(lm: nn.Module, tokenizer: Any) -> set[int]:
    """Every token id that ends generation (the generation config may list several)."""
    ids: set[int] = set()
    config_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Sequence):
            ids.update(int(v) for v in value)
    return ids
