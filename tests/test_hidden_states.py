"""Early exit, pooling and batching must equal a plain full forward pass."""

from __future__ import annotations

import ctypes
import sys
import threading

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from legend_hf import batching
from legend_hf.batching import length_batches
from legend_hf.hidden_states import LayerReader, pool
from legend_hf.models import is_decoder, normalize_layer
from legend_hf.reader import tokenize


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_early_exit_equals_full_forward(tiny_model_path, pooling):
    model = AutoModel.from_pretrained(tiny_model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    texts = ["a short one", "a much longer text with quite a few more tokens in it", "mid length text here"]
    ids = tokenizer(texts)["input_ids"]
    for layers in ([1], [2], [0, 3], [-1], [1, 2, 4]):
        reader = LayerReader(model, layers, pooling)
        for side, max_tokens in (("right", 1000), ("left", 1000), ("right", 12)):
            got = reader.read(ids, pad_id=0, padding_side=side, max_tokens=max_tokens)
            for i, row in enumerate(ids):
                with torch.no_grad():
                    states = model(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states
                for k in reader.layers:
                    h = states[k][0]
                    ref = h[-1] if pooling == "last" else h.mean(0)
                    torch.testing.assert_close(got[k][i], ref, atol=1e-5, rtol=1e-5)


def test_early_exit_skips_deeper_blocks(tiny_llama_path):
    model = AutoModel.from_pretrained(tiny_llama_path).eval()
    calls: list[int] = []
    for i, block in enumerate(model.layers):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    LayerReader(model, [2], "last")(torch.tensor([[101, 7592, 102]]), torch.ones(1, 3, dtype=torch.long))
    assert calls == [0, 1]


def test_layer_index_like_python():
    assert normalize_layer(-1, 30) == 30
    assert normalize_layer(12, 30) == 12
    assert normalize_layer(-31, 30) == 0
    with pytest.raises(ValueError, match="out of range"):
        normalize_layer(31, 30)


def test_decoder_detection(tiny_model_path):
    model = AutoModel.from_pretrained(tiny_model_path)
    assert is_decoder(model) == ("bert" not in str(tiny_model_path))


def test_length_batches_respect_budget_and_cover_all():
    lengths = [5, 50, 7, 30, 30, 2, 64]
    batches = length_batches(lengths, max_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 64 for b in batches)
    assert [len(b) for b in length_batches(lengths, max_tokens=10_000, max_batch_size=3)] == [3, 3, 1]


def test_left_truncation_keeps_the_end_and_the_leading_special_token(tiny_bert_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_path)
    text = "start " * 50 + "the very end"
    encoded = tokenize(tokenizer, [text, "short"], max_length=10, add_special_tokens=True)
    assert encoded.truncated == [True, False]
    long = encoded.input_ids[0]
    assert len(long) == 10 and long[0] == tokenizer.cls_token_id
    assert tokenizer.decode(long[-4:-1]) == "the very end"


def test_pool_ignores_nan_in_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), float("nan")]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "last").tolist() == [[3.0, 4.0]]


def test_token_budget_batching_equals_one_by_one(tiny_llama_path):
    model = AutoModel.from_pretrained(tiny_llama_path).eval()
    reader = LayerReader(model, [2], "last")
    ids = [[101] + list(range(1000, 1000 + n)) + [102] for n in (3, 40, 7, 19, 1, 33)]
    one_by_one = reader.read(ids, pad_id=0, max_batch_size=1)
    for budget in (8, 64, 10_000):
        torch.testing.assert_close(
            reader.read(ids, pad_id=0, max_tokens=budget)[2], one_by_one[2], atol=1e-5, rtol=0
        )


def test_progress_counts_every_text_once(tiny_llama_path):
    """The progress callback (a bar's update) sees each text once, shared prompts included."""
    model = AutoModel.from_pretrained(tiny_llama_path).eval()
    reader = LayerReader(model, [1], "last")
    first = [[101, 5, 6, 7], [101, 9], [5, 6]]
    second = [[101, 5, 6, 8], [101, 9, 9, 4], [7]]  # the last pair shares nothing: read in full
    for max_tokens in (1, 10_000):
        done: list[int] = []
        reader.read_pairs(first, second, pad_id=0, max_tokens=max_tokens, on_batch=done.append)
        assert sum(done) == 6
        done.clear()
        reader.read(first + second, pad_id=0, max_tokens=max_tokens, on_batch=done.append)
        assert sum(done) == 6 and len(done) == (6 if max_tokens == 1 else 1)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request):
    """Run the test with one and with two torch threads (two: batches run side by side on a CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(threads)


def test_cpu_batches_run_side_by_side_as_in_a_one_thread_read(tiny_llama_path, monkeypatch):
    """With two torch threads, two batches run at once, each on one op thread; the states equal a one-thread
    read's, and the caller's thread count is back afterwards."""
    model = AutoModel.from_pretrained(tiny_llama_path).eval()
    reader = LayerReader(model, [1, 2], "mean")
    first = [[101] + list(range(1000, 1000 + n)) + [7, 102] for n in (3, 40, 7, 19, 1, 33)]
    second = [[101] + list(range(1000, 1000 + n)) + [8, 9, 102] for n in (3, 40, 7, 19, 1, 33)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = reader.read_pairs(first, second, pad_id=0, max_tokens=60)
        expected_single = reader.read(first + second, pad_id=0, max_tokens=60)
        torch.set_num_threads(2)
        forward = LayerReader.forward_pack
        together = threading.Barrier(2, timeout=30)
        workers: dict[int, int] = {}  # thread -> its torch thread count

        def meet(self, texts, pack):
            if (
                threading.current_thread() is not threading.main_thread()
                and threading.get_ident() not in workers
            ):
                workers[threading.get_ident()] = torch.get_num_threads()
                together.wait()  # both threads are inside a batch at the same time
            return forward(self, texts, pack)

        monkeypatch.setattr(LayerReader, "forward_pack", meet)
        got = reader.read_pairs(first, second, pad_id=0, max_tokens=60)
        assert sorted(workers.values()) == [1, 1] and torch.get_num_threads() == 2
        workers.clear()
        got_single = reader.read(first + second, pad_id=0, max_tokens=60)
        assert sorted(workers.values()) == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for got_side, expected_side in zip(got, expected, strict=True):
        for layer in (1, 2):
            torch.testing.assert_close(got_side[layer], expected_side[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_single[2], expected_single[2], atol=1e-5, rtol=0)


def test_an_error_in_a_batch_thread_reaches_the_caller(tiny_llama_path, monkeypatch):
    model = AutoModel.from_pretrained(tiny_llama_path).eval()
    reader = LayerReader(model, [2], "last")
    forward = LayerReader.forward_pack

    def failing(self, texts, pack):
        if len(texts) == 1:
            raise ValueError("a broken batch")
        return forward(self, texts, pack)

    monkeypatch.setattr(LayerReader, "forward_pack", failing)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match="a broken batch"):
            reader.read([[101, 5, 102], [101, 6, 7, 102], [101] * 30], pad_id=0, max_tokens=30)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_out_of_memory_halves_the_budget_and_loses_nothing(
    tiny_llama_path, monkeypatch, caplog, torch_threads
):
    """A packed row over a (simulated) memory limit is retried in smaller rows; results are unchanged."""
    model = AutoModel.from_pretrained(tiny_llama_path).eval()
    reader = LayerReader(model, [2], "last")
    first = [[101] + list(range(1000, 1000 + n)) + [7, 102] for n in (3, 40, 7, 19, 1, 33)]
    second = [[101] + list(range(1000, 1000 + n)) + [8, 9, 102] for n in (3, 40, 7, 19, 1, 33)]
    expected_single = reader.read(first, pad_id=0, max_batch_size=1)
    expected_pairs = reader.read_pairs(first, second, pad_id=0, max_batch_size=1)
    limit = 60  # tokens a packed row may hold
    forward = LayerReader.forward_pack
    sizes: list[int] = []

    def guarded(self, texts, pack):
        sizes.append(sum(pack.lengths))
        if sum(pack.lengths) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, texts, pack)

    monkeypatch.setattr(LayerReader, "forward_pack", guarded)
    with caplog.at_level("WARNING", logger="legend_hf.batching"):
        done: list[int] = []
        got = reader.read(first, pad_id=0, max_tokens=10_000, on_batch=done.append)
        assert sum(done) == len(first)  # progress counts each text once, failed tries never
        pairs = reader.read_pairs(first, second, pad_id=0, max_tokens=10_000)
    assert "max_tokens_per_batch=" in caplog.text and max(sizes) > limit
    torch.testing.assert_close(got[2], expected_single[2], atol=1e-5, rtol=0)
    for got_side, expected_side in zip(pairs, expected_pairs, strict=True):
        torch.testing.assert_close(got_side[2], expected_side[2], atol=1e-5, rtol=0)
    with pytest.raises(torch.OutOfMemoryError, match=r"single text or pair \(200 tokens\)"):
        reader.read([[101] * 200], pad_id=0)


def test_cpu_reads_keep_freed_memory_for_the_next_batch(tiny_llama_path):
    """glibc keeps freed activation blocks instead of page-faulting them in again for every layer."""
    model = AutoModel.from_pretrained(tiny_llama_path).eval()
    batching.retain_freed_memory.cache_clear()
    LayerReader(model, [-1], "last").read([[1, 2, 3]], pad_id=0)
    glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    assert batching.retain_freed_memory() is glibc
    assert batching.retain_freed_memory.cache_info().hits >= 1  # the read called it first
