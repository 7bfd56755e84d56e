"""The default dtype follows the hardware; half precision keeps the residual stream float32 where texts pack."""

from __future__ import annotations

import torch
from transformers import AutoModel

from legend_hf import RuntimeOptions, precision
from legend_hf.hidden_states import LayerReader
from legend_hf.models import load_model
from legend_hf.precision import compute_dtypes, matmul_layers, resolve_dtype

CPU = torch.device("cpu")
IDS = [[101] + list(range(1000, 1000 + n)) + [102] for n in (3, 40, 7, 19)]


def test_the_default_dtype_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch):
    """Simulated CPUs: AMX or AVX512-BF16 run bf16 matmuls natively; elsewhere bf16 is emulated and slower."""
    assert resolve_dtype("float32", CPU) == "float32" and resolve_dtype("bfloat16", CPU) == "bfloat16"
    for amx, avx512_bf16, expected in (
        (False, False, "float32"),
        (True, False, "bfloat16"),
        (False, True, "bfloat16"),
    ):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda flag=avx512_bf16: flag)
        assert resolve_dtype(None, CPU) == expected
        assert RuntimeOptions(dtype="auto").dtype is None  # "auto" is the default


def test_bfloat16_matmuls_over_a_float32_residual_stream(tiny_llama_path):
    model, _ = load_model(str(tiny_llama_path), runtime=RuntimeOptions(dtype="bfloat16"))
    assert compute_dtypes(model) == ("bfloat16", "float32")
    assert {layer.weight.dtype for layer in matmul_layers(model)} == {torch.bfloat16}
    assert model.embed_tokens.weight.dtype == torch.float32 and model.norm.weight.dtype == torch.float32
    blocks: list[torch.dtype] = []
    for block in model.layers:
        block.register_forward_hook(
            lambda m, a, out: blocks.append(out[0].dtype if isinstance(out, tuple) else out.dtype)
        )
    reader = LayerReader(model, [2, -1], "last")
    mixed = reader.read(IDS, pad_id=0)
    assert set(blocks) == {torch.float32}
    exact = LayerReader(AutoModel.from_pretrained(tiny_llama_path).eval(), [2, -1], "last").read(
        IDS, pad_id=0
    )
    for k in reader.layers:
        cosine = torch.nn.functional.cosine_similarity(mixed[k], exact[k])
        assert cosine.min() > 0.999, cosine  # bf16 noise, not a different computation


def test_a_model_that_does_not_pack_runs_wholly_in_the_dtype(tiny_llama_path):
    model, _ = load_model(str(tiny_llama_path), runtime=RuntimeOptions(dtype="bfloat16", packing=False))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert compute_dtypes(model) == ("bfloat16", "bfloat16")


def test_a_loaded_model_runs_as_loaded_unless_a_dtype_is_given(tiny_llama_path):
    model = AutoModel.from_pretrained(tiny_llama_path)
    assert compute_dtypes(load_model(model, str(tiny_llama_path))[0]) == ("float32", "float32")
    runtime = RuntimeOptions(dtype="bfloat16")
    assert compute_dtypes(load_model(model, str(tiny_llama_path), runtime)[0]) == ("bfloat16", "float32")


def test_cpu_half_matmuls_run_on_whole_buckets_of_rows(tiny_llama_path, monkeypatch):
    """oneDNN caches a compiled kernel per matmul shape: rows padded to ROW_BUCKET keep RSS flat on long runs
    (bench/memory.py); the padding rows never reach the states."""
    model, _ = load_model(str(tiny_llama_path), runtime=RuntimeOptions(dtype="bfloat16"))
    rows: list[int] = []
    for layer in matmul_layers(model):
        layer.register_forward_pre_hook(lambda m, a: rows.append(a[0].numel() // a[0].shape[-1]))
    bucketed = LayerReader(model, [2, -1], "last").read(IDS, pad_id=0)
    assert rows and all(n % precision.ROW_BUCKET == 0 for n in rows)
    assert sum(len(ids) for ids in IDS) % precision.ROW_BUCKET  # the test pack does need padding
    monkeypatch.setattr(precision, "ROW_BUCKET", 1)
    rows.clear()
    unpadded = LayerReader(model, [2, -1], "last").read(IDS, pad_id=0)
    assert sum(len(ids) for ids in IDS) in rows
    for k in unpadded:
        torch.testing.assert_close(bucketed[k], unpadded[k], rtol=1e-2, atol=1e-2)


def test_cpu_bfloat16_gated_mlps_fuse_the_activation_into_the_matmuls(tiny_llama_path, monkeypatch):
    """The fused MLP computes what the model's own bf16 MLP does (to the bf16 band), and replaces it."""
    fused_model, _ = load_model(str(tiny_llama_path), runtime=RuntimeOptions(dtype="bfloat16"))
    native = precision.native_bf16(CPU)  # elsewhere the model's own MLP runs
    assert all(("forward" in vars(block.mlp)) is native for block in fused_model.layers)
    monkeypatch.setattr(precision, "fuse_gated_mlp", lambda mlp, cast: None)
    plain_model, _ = load_model(str(tiny_llama_path), runtime=RuntimeOptions(dtype="bfloat16"))
    assert not any("forward" in vars(block.mlp) for block in plain_model.layers)
    fused = LayerReader(fused_model, [2, -1], "last").read(IDS, pad_id=0)
    plain = LayerReader(plain_model, [2, -1], "last").read(IDS, pad_id=0)
    for k in fused:
        cosine = torch.nn.functional.cosine_similarity(fused[k], plain[k])
        assert cosine.min() > 0.999, cosine
