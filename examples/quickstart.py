"""The README quick start, offline: fit a Legend direction on SmolLM2-135M-Instruct, save and reload it,
annotate preference pairs with Dataset.map, then bin the margins.

    python examples/quickstart.py
"""

import json
from importlib import resources

from datasets import Dataset

from legend_hf import MarginAnnotator, SafetyDirection, annotate_margins, fit_direction
from legend_hf.models import smollm2_path  # offline copy of HuggingFaceTB/SmolLM2-135M-Instruct

data = resources.files("legend_hf") / "data"
harmful = [json.loads(line) for line in (data / "fit_harmful.jsonl").read_text().splitlines()]
refusals = json.loads((data / "refusals.json").read_text())
pairs = [json.loads(line) for line in (data / "sample_preferences.jsonl").read_text().splitlines()][:64]

# 1. Fit the Standard Margin Vector; several layers come from one forward pass.
model = str(smollm2_path())
direction = fit_direction(
    model, harmful, refusals=refusals, layer=[15, -1], model_id="HuggingFaceTB/SmolLM2-135M-Instruct"
)
print(direction)
print(
    {k: round(v["response_auc"], 3) for k, v in direction.layer_scores.items()},
    "held-out response_auc per layer",
)
direction.save_pretrained("smv-smollm2")  # or direction.push_to_hub("me/smv-smollm2")
direction = SafetyDirection.from_pretrained("smv-smollm2")

# 2. Annotate any preference dataset.
ds = Dataset.from_list(pairs).select_columns(
    ["prompt", "chosen", "rejected", "chosen_is_safe", "rejected_is_safe"]
)
ds = ds.map(MarginAnnotator(direction, model), batched=True, batch_size=32)
print(ds)
row = ds[0]
print({k: row[k] for k in ("margin", "chosen_safety", "rejected_safety", "truncated")})
labelled = [
    (m, c)
    for m, c, r in zip(ds["margin"], ds["chosen_is_safe"], ds["rejected_is_safe"], strict=True)
    if c != r
]
print(
    f"sign agrees with the safe/unsafe label on {sum((m > 0) == c for m, c in labelled)}/{len(labelled)} pairs"
)

# 3. The convenience wrapper: standardised margins in 5 equal-frequency levels (the paper bins margins).
binned = annotate_margins(
    ds.remove_columns(["margin", "chosen_safety", "rejected_safety", "truncated"]),
    direction,
    model=model,
    scale="standardize",
    bins=5,
)
print(binned.select_columns(["margin_raw", "margin", "margin_level"])[:3])
