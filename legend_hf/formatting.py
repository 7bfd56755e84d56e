"""Turn (prompt, response) inputs in the formats users have into the text an annotator model reads.

Accepted inputs: plain strings, TRL conversational lists of ``{"role", "content"}`` messages, and
HH-RLHF dialogues ("\\n\\nHuman: ... \\n\\nAssistant: ...") where the prompt is implicit.
Templates: the tokenizer's chat template, the paper's Alpaca template, ``"none"`` or a custom
format string with ``{prompt}`` and ``{response}``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]
Conversation = tuple[list[Message], str]  # (prompt messages, response text)

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that completes the request."
    "\n\n### Instruction:\n{prompt}\n\n### Response:\n{response}"
)
TEMPLATE_KINDS = ("auto", "chat", "alpaca", "none")

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class InputError(ValueError):
    """Input data is not what legend-hf expects (a row, a column, a file, an artifact): the message names
    where (row and column, or file) and what was expected."""


def _where(column: str, row: int | str | None) -> str:
    return f"column {column!r}" + (f", row {row}" if row is not None else "")


def parse_hh_dialogue(
    text: str, *, column: str = "chosen", row: int | str | None = None
) -> tuple[list[Message], str]:
    """Split an HH-RLHF dialogue into prompt messages and the final assistant response."""
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    # parts = [preamble, role, content, role, content, ...]
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    if not turns or turns[-1][0] != "Assistant":
        raise InputError(
            f"{_where(column, row)}: expected an HH-RLHF dialogue ending in '\\n\\nAssistant: <response>', "
            f"got {text[:80]!r}"
        )
    messages = [{"role": "user" if r == "Human" else "assistant", "content": c} for r, c in turns[:-1]]
    return messages, turns[-1][1]


def is_hh_dialogue(text: Any) -> bool:
    return isinstance(text, str) and "\n\nAssistant:" in text and "Human:" in text


def _check_messages(value: list[Any], column: str, row: int | str | None) -> list[Message]:
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise InputError(
                f"{_where(column, row)}: message {i} must be a dict with string 'role' and 'content', got {m!r:.80}"
            )
    return value


def to_conversation(
    prompt: Any, response: Any, *, prompt_column: str, response_column: str, row: int | str | None = None
) -> tuple[list[Message], str]:
    """Normalise one (prompt, response) pair to (prompt messages, response text).

    ``prompt`` may be ``None`` (implicit prompt: the response is an HH dialogue or a full conversation),
    a string or a list of messages; ``response`` a string or a list of messages.
    """
    if isinstance(response, list):
        messages = _check_messages(response, response_column, row)
        if not messages or messages[-1]["role"] != "assistant":
            raise InputError(f"{_where(response_column, row)}: the last message must have role 'assistant'")
        prefix, text = messages[:-1], messages[-1]["content"]
    elif isinstance(response, str):
        if prompt is None:
            if not is_hh_dialogue(response):
                raise InputError(
                    f"{_where(response_column, row)}: without a prompt column the response must be an HH-RLHF "
                    f"dialogue or a list of messages, got {response[:80]!r}"
                )
            return parse_hh_dialogue(response, column=response_column, row=row)
        prefix, text = [], response
    else:
        raise InputError(
            f"{_where(response_column, row)}: expected a string or a list of messages, "
            f"got {type(response).__name__} {response!r:.80}"
        )
    if prompt is None:
        if not prefix:
            raise InputError(f"{_where(response_column, row)}: no prompt column and no prompt messages")
        return prefix, text
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}, *prefix], text
    if isinstance(prompt, list):
        return [*_check_messages(prompt, prompt_column, row), *prefix], text
    raise InputError(
        f"{_where(prompt_column, row)}: expected a string or a list of messages, "
        f"got {type(prompt).__name__} {prompt!r:.80}"
    )


def pair_conversations(
    prompts: Sequence[Any] | None,
    chosen: Sequence[Any],
    rejected: Sequence[Any],
    *,
    columns: tuple[str, str, str] = ("prompt", "chosen", "rejected"),
    rows: Sequence[int] | None = None,
) -> tuple[list[Conversation], list[Conversation]]:
    """(prompt messages, response) of both sides of every pair. ``prompts=None`` means no prompt column:
    the responses are HH-RLHF dialogues or message lists that hold their prompt. Errors name the column
    (``columns``: the prompt, chosen and rejected names) and the row (``rows``: dataset row numbers)."""
    n = len(chosen)
    if len(rejected) != n or (prompts is not None and len(prompts) != n):
        lengths = {
            columns[1]: n,
            columns[2]: len(rejected),
            **({columns[0]: len(prompts)} if prompts is not None else {}),
        }
        raise InputError(f"the inputs differ in length: {lengths}")
    names: list[int | str] = list(rows) if rows is not None else [f"{i} of this batch" for i in range(n)]
    out: tuple[list[Conversation], list[Conversation]] = ([], [])
    for side, responses, column in ((0, chosen, columns[1]), (1, rejected, columns[2])):
        for i in range(n):
            if prompts is not None and prompts[i] is None:
                raise InputError(f"{_where(columns[0], names[i])}: expected text or messages, got None")
            prompt = None if prompts is None else prompts[i]
            out[side].append(
                to_conversation(
                    prompt, responses[i], prompt_column=columns[0], response_column=column, row=names[i]
                )
            )
    return out


def schema_hint(columns: Sequence[str]) -> str:
    """What to do with data that lacks the response columns, going by the schema its columns look like."""
    have = set(columns)
    if {"response_0", "response_1", "safer_response_id"} <= have:
        return (
            "it looks like PKU-SafeRLHF's raw schema: convert it with legend_hf.data_io.pku_saferlhf_to_pairs "
            "(CLI: --pku_saferlhf)"
        )
    if {"response_j", "response_k"} <= have:
        return "set chosen_column='response_j', rejected_column='response_k' (CLI: --chosen_column/--rejected_column)"
    if {"completion", "label"} <= have:
        return "it looks like TRL's unpaired preference format (completion/label): margins need chosen/rejected pairs"
    if "messages" in have or have == {"text"}:
        return "it looks like SFT or language-modelling data: margins need preference pairs (chosen/rejected)"
    return (
        "set chosen_column=/rejected_column= (CLI: --chosen_column/--rejected_column) to the response columns"
    )


def messages_to_text(messages: list[Message]) -> str:
    """A single user turn is its content; a longer conversation is written HH-RLHF style."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in messages).lstrip("\n")


@dataclass(frozen=True)
class TextTemplate:
    """How a conversation becomes text. ``kind`` is ``chat``, ``alpaca``, ``none`` or a format string."""

    kind: str = "alpaca"

    def __post_init__(self) -> None:
        if self.kind in ("chat", "alpaca", "none"):
            return
        if self.kind == "auto":
            raise ValueError("resolve 'auto' with TextTemplate.resolve(kind, tokenizer) first")
        if "{prompt}" not in self.kind or "{response}" not in self.kind:
            raise ValueError(
                f"template {self.kind!r} is neither one of {TEMPLATE_KINDS} nor a format string with "
                "'{prompt}' and '{response}'"
            )

    @classmethod
    def resolve(cls, kind: str | None, tokenizer: Any) -> TextTemplate:
        """``auto``/``None``: the chat template when the tokenizer has one, else the paper's Alpaca one."""
        if kind in (None, "auto"):
            kind = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
        if kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' but the tokenizer has no chat template; use 'alpaca' or 'none'")
        return cls(kind)

    @property
    def adds_special_tokens(self) -> bool:
        """Chat templates write their own special tokens; other texts get the tokenizer's."""
        return self.kind != "chat"

    def render(self, tokenizer: Any, prompt: list[Message], response: str) -> str:
        if self.kind == "chat":
            conversation = [*prompt, {"role": "assistant", "content": response}]
            return str(tokenizer.apply_chat_template(conversation, tokenize=False))
        pattern = {"alpaca": ALPACA_TEMPLATE, "none": "{prompt}\n\n{response}"}.get(self.kind, self.kind)
        return pattern.format(prompt=messages_to_text(prompt), response=response)
