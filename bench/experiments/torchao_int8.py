"""Side-by-side on CPU: torchao int8 against bf16 and fp32 on the bare SmolLM2 forward (48 HH-RLHF texts, one
at a time, 1 thread, process CPU time), with the lowest cosine of the last-token state to fp32's.

torchao is not a dependency of legend-hf. Usage (results: bench/README.md, "What each lever did"):

    pip install --no-deps --target /tmp/tao torchao==0.18.0
    PYTHONPATH=/tmp/tao python bench/experiments/torchao_int8.py ../shared/data/hh-rlhf/harmless-base-test-first-half.jsonl
"""

import copy
import json
import sys
import time

import torch
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
from transformers import AutoModel, AutoTokenizer

from legend_hf.models import smollm2_path

torch.set_num_threads(1)
path = smollm2_path()
tokenizer = AutoTokenizer.from_pretrained(path)
with open(sys.argv[1]) as f:
    rows = [json.loads(line) for line in f][:24]
texts = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
ids = [torch.tensor([tokenizer(t)["input_ids"][-256:]]) for t in texts]


def run(model: torch.nn.Module) -> tuple[float, torch.Tensor]:
    """Process CPU seconds of the second of two passes, and the last-token states."""
    for _ in range(2):
        start, states = time.process_time(), []
        with torch.inference_mode():
            for x in ids:
                states.append(model(input_ids=x).last_hidden_state[0, -1].float())
    return time.process_time() - start, torch.stack(states)


base = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
fp32_seconds, reference = run(base)
bf16_seconds, bf16_states = run(copy.deepcopy(base).to(torch.bfloat16))
cosine = torch.nn.functional.cosine_similarity
print(f"bf16: {fp32_seconds / bf16_seconds:.2f}x fp32, min cosine {cosine(bf16_states, reference).min():.4f}")
for name, config, dtype in (
    ("int8 weight-only, bf16 activations", Int8WeightOnlyConfig(), torch.bfloat16),
    ("int8 dynamic activations + int8 weights, fp32", Int8DynamicActivationInt8WeightConfig(), torch.float32),
    (
        "int8 dynamic activations + int8 weights, bf16",
        Int8DynamicActivationInt8WeightConfig(),
        torch.bfloat16,
    ),
):
    model = copy.deepcopy(base).to(dtype)
    quantize_(model, config)
    seconds, states = run(model)
    print(
        f"{name}: {fp32_seconds / seconds:.2f}x fp32, {bf16_seconds / seconds:.2f}x bf16, "
        f"min cosine {cosine(states, reference).min():.4f}"
    )
