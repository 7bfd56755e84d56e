"""Side-by-side on CPU: SmolLM2 base forward, one text at a time: eager vs SDPA attention vs torch.compile.

Usage: python bench/experiments/attention_compile.py [threads]   (results: bench/README.md, "What each lever did")
"""

import json
import sys
import time

import torch
from transformers import AutoModel

from legend_hf.models import smollm2_path

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
path = smollm2_path()
g = torch.Generator().manual_seed(0)
lengths = [120, 164, 200, 90, 150, 180, 140, 170]
texts = [torch.randint(100, 40000, (1, n), generator=g) for n in lengths]
res = {}
for dtype in (torch.float32, torch.bfloat16):
    models = {}
    for impl in ("eager", "sdpa"):
        models[impl] = AutoModel.from_pretrained(path, attn_implementation=impl, dtype=dtype).eval()
    models["sdpa+compile"] = torch.compile(
        AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).eval(), dynamic=True
    )
    with torch.inference_mode():
        t0 = time.perf_counter()
        for x in texts[:3]:
            models["sdpa+compile"](input_ids=x)
        compile_s = time.perf_counter() - t0
        times = {k: 0.0 for k in models}
        for _round in range(3):
            for name, m in models.items():
                t = time.perf_counter()
                for x in texts:
                    m(input_ids=x)
                times[name] += time.perf_counter() - t
    tok = 3 * sum(lengths)
    res[str(dtype)] = {k: round(tok / v, 1) for k, v in times.items()} | {
        "compile_warmup_s": round(compile_s, 1)
    }
    print(json.dumps(res[str(dtype)]), flush=True)
