"""Packed rows (no padding, variable-length attention) equal padded batches: pooled states within 1e-5 in
float32 for every tiny architecture (BERT, Llama, GPT-2, Gemma 3 with sliding windows), prompt sharing
included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from legend_hf import packing
from legend_hf.batching import pack_batches
from legend_hf.hidden_states import LayerReader
from legend_hf.packing import Pack

TEXTS = [
    "a short one",
    "a much longer text with quite a few more tokens in it, longer than a sliding window",
    "mid length text here",
    "x",
]
PROMPTS = ["how do I do this thing", "tell me", "a long prompt with many many words in it, okay"]


def _readers(path, pooling):
    model = AutoModel.from_pretrained(path).eval()  # float32
    layers = [1, 2, -1]
    return LayerReader(model, layers, pooling), LayerReader(model, layers, pooling, packing=False)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_rows_equal_padded_batches(any_tiny_path, pooling):
    packed, padded = _readers(any_tiny_path, pooling)
    assert packed.packing and not padded.packing
    ids = AutoTokenizer.from_pretrained(any_tiny_path)(TEXTS)["input_ids"]
    for side in ("right", "left"):
        expected = padded.read(ids, pad_id=0, padding_side=side, max_tokens=10_000)
        for budget in (1, 24, 10_000):  # a text per row, a few per row, all in one row
            got = packed.read(ids, pad_id=0, max_tokens=budget)
            for k in packed.layers:
                torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-5)


def test_an_encoder_shares_no_prompt(tiny_bert_path):
    """Encoders attend both ways: a prompt's states depend on the response after it, so nothing is shared."""
    assert not _readers(tiny_bert_path, "mean")[0].can_share_prefix


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_shared_prompts_equal_full_texts(decoder_tiny_path, pooling):
    packed, padded = _readers(decoder_tiny_path, pooling)
    assert packed.can_share_prefix
    tokenizer = AutoTokenizer.from_pretrained(decoder_tiny_path)
    first = [tokenizer(p + " sure, here it is, step by step")["input_ids"] for p in PROMPTS] + [[5, 6, 7]]
    second = [tokenizer(p + " no")["input_ids"] for p in PROMPTS] + [[8, 6]]  # the last pair shares nothing
    expected = padded.read(first + second, pad_id=0, max_batch_size=1)
    for budget in (1, 30, 10_000):
        got_first, got_second = packed.read_pairs(first, second, pad_id=0, max_tokens=budget)
        for k in packed.layers:
            torch.testing.assert_close(
                torch.cat([got_first[k], got_second[k]]), expected[k], atol=1e-5, rtol=1e-5
            )


def test_a_packed_row_has_no_padding_and_the_model_keeps_its_attention(tiny_llama_path):
    model = AutoModel.from_pretrained(tiny_llama_path).eval()
    shapes: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    ids = [[101] + list(range(1000, 1000 + n)) + [102] for n in (3, 40, 7)]
    LayerReader(model, [2], "last").read(ids, pad_id=0, max_tokens=10_000)
    assert shapes == [(1, sum(map(len, ids)))]
    assert model.config._attn_implementation == "sdpa"  # switched for the packed forward only
    assert pack_batches([5, 50, 7, 30], max_tokens=60) == [[1], [3, 2, 0]]  # longest first, within 60


def _flash_semantics(
    q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
):
    """flash-attention's varlen contract on a CPU, text by text: causal masks align bottom-right (the
    queries are the last keys), ``window_size=(left, right)``; (tokens, heads, dim) in and out."""
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        q_len, k_len = qs.stop - qs.start, ks.stop - ks.start
        at = torch.arange(k_len - q_len, k_len)[:, None]
        keys = torch.arange(k_len)[None, :]
        allowed = torch.ones(q_len, k_len, dtype=torch.bool)
        if window_size[1] >= 0:
            allowed &= keys <= at + window_size[1]
        if window_size[0] >= 0:
            allowed &= keys >= at - window_size[0]
        out[qs] = F.scaled_dot_product_attention(
            q[qs].transpose(0, 1),
            k[ks].transpose(0, 1),
            v[ks].transpose(0, 1),
            attn_mask=allowed,
            scale=scale,
            enable_gqa=enable_gqa,
        ).transpose(0, 1)
    return out


def _continuation(prefix_lengths: list[int]) -> tuple[Pack, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pack of 4 texts continuing a kept pack of ``prefix_lengths`` texts, with random attention inputs: the
    query, and each text's keys and values as the packed attention gathers them (its prefix's, then its own)."""
    torch.manual_seed(0)
    pack = Pack([3, 2, 5, 1], prefix=Pack(prefix_lengths, keep=True), prefix_of=[0, 1, 0, 1])
    heads, kv_heads, dim, tokens, before = 4, 2, 8, sum(pack.lengths), sum(prefix_lengths)
    query = torch.randn(1, heads, tokens, dim)
    key, value = torch.randn(1, kv_heads, tokens, dim), torch.randn(1, kv_heads, tokens, dim)
    prefix_key, prefix_value = torch.randn(1, kv_heads, before, dim), torch.randn(1, kv_heads, before, dim)
    index = pack.key_index(query.device)
    full_key, full_value = (
        torch.cat(t, dim=2)[:, :, index] for t in ((prefix_key, key), (prefix_value, value))
    )
    return pack, query, full_key, full_value


@pytest.mark.parametrize("window", [None, 3])
def test_the_gpu_varlen_call_equals_attention_text_by_text(monkeypatch, window):
    """The GPU path's layout (one row of tokens, cumulative lengths, prefix keys gathered per text), checked
    against the CPU path with a kernel that follows flash-attention's documented contract."""
    monkeypatch.setattr(packing, "_varlen_kernel", lambda: _flash_semantics)
    pack, query, full_key, full_value = _continuation([4, 6])
    args = (query, full_key, full_value, pack, pack.key_lengths(), True, 0.3, window)
    torch.testing.assert_close(packing._varlen(*args), packing._per_text(*args), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window", [None, 3])
def test_cpu_half_precision_continuations_attend_over_whole_buckets_of_keys(monkeypatch, window):
    """On a CPU, bf16 continuations attend over each text's keys padded (and masked) to a multiple of
    KEY_BUCKET, which keeps oneDNN's per-shape kernels few: the result is float32's within bf16 rounding."""
    pack, query, full_key, full_value = _continuation([4, 70])
    lengths = pack.key_lengths()
    attention = F.scaled_dot_product_attention
    widths: list[int] = []

    def spy(q, k, v, **kwargs):
        widths.append(k.shape[2])
        return attention(q, k, v, **kwargs)

    monkeypatch.setattr(packing.F, "scaled_dot_product_attention", spy)
    expected = packing._per_text(query, full_key, full_value, pack, lengths, True, 0.3, window)
    assert widths == lengths  # float32: each text's own keys
    widths.clear()
    half = (t.bfloat16() for t in (query, full_key, full_value))
    got = packing._per_text(*half, pack, lengths, True, 0.3, window)
    assert widths == [-(-n // packing.KEY_BUCKET) * packing.KEY_BUCKET for n in lengths] == [64, 128, 64, 128]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=0)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_beginning_every_text_shares_runs_once(tiny_llama_path, pooling):
    """A system prompt (here 12 tokens) runs once per read; texts and pairs continue it, as if read in full."""
    packed, padded = _readers(tiny_llama_path, pooling)
    system = [101] + list(range(2000, 2011))
    first = [system + list(range(1000, 1000 + n)) + [7, 102] for n in (3, 40, 7, 19)]
    second = [system + list(range(1000, 1000 + n)) + [8, 9, 102] for n in (3, 40, 7, 19)]
    expected = padded.read(first + second, pad_id=0, max_batch_size=1)
    forwards: list[int] = []
    packed.model.register_forward_pre_hook(
        lambda m, a, kw: forwards.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    single = packed.read(first + second, pad_id=0, max_tokens=10_000)
    assert forwards == [
        15,
        sum(map(len, first + second)) - 8 * 15,
    ]  # the shared beginning once, then the rest
    forwards.clear()
    got_first, got_second = packed.read_pairs(first, second, pad_id=0, max_tokens=10_000)
    assert forwards[0] == 14  # each prompt keeps a token of its own (the first differs after 15)
    for k in packed.layers:
        torch.testing.assert_close(single[k], expected[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            torch.cat([got_first[k], got_second[k]]), expected[k], atol=1e-5, rtol=1e-5
        )
