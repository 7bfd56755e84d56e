"""`SafetyDirection`: the fitted vector(s) and everything needed to reuse them, as a Hub artifact.

An artifact folder holds ``direction.safetensors`` (one fp32 vector per fitted layer, string metadata),
``direction_config.json`` (provenance and options) and a ``README.md`` card. Loading reads only
safetensors and JSON, validates everything, and never runs remote code.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelHubMixin

from .cards import DIRECTION_TAGS, direction_card, layer_plot, write_layer_plot
from .data_io import SHIPPED_DIRECTIONS
from .formatting import InputError
from .hub import download
from .models import normalize_layer, num_layers
from .names import __version__, is_hub_id, looks_local, public_name
from .plots import LAYER_PLOT_NAME
from .provenance import AnnotationRecord

FORMAT_VERSION = 1
WEIGHTS_NAME = "direction.safetensors"
CONFIG_NAME = "direction_config.json"
SIGN_CONVENTION = "margin = (h(prompt+chosen) - h(prompt+rejected)) . u; positive means chosen is safer"
LAYER_SCORES = {
    "pair_accuracy",
    "response_auc",
    "n_heldout",
}  # held-out scores of a layer (fitting.layer_scores)
_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy")


def project(states: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Safety scores: pooled states ``(n, hidden)`` projected (fp64) on the unit vector of ``vector``."""
    vector = vector.double()
    return states.double() @ (vector / vector.norm())


class DirectionModelWarning(UserWarning):
    """The model in use has another id than the one the direction was fitted on (same shapes)."""


def _library_version() -> str:
    return __version__


@dataclass(eq=False)  # tensors have no truth value: compare with fingerprint()
class SafetyDirection(ModelHubMixin, library_name="legend-hf", tags=DIRECTION_TAGS):
    """A safety direction in one model's hidden space: the Standard Margin Vector and its provenance.

    ``vectors`` maps a hidden-state index (0 = embeddings, ``num_layers`` = last hidden state) to the
    unnormalised direction, oriented so that safer text projects higher; ``layer`` is the one used for
    margins.
    """

    vectors: dict[int, torch.Tensor]
    layer: int
    model_id: str
    hidden_size: int
    num_layers: int
    pooling: str
    template: str
    method: str = "mean_diff"
    model_revision: str | None = None
    model_type: str | None = None
    refusals: list[str] = field(default_factory=list)
    max_length: int | None = None
    fit_data: dict[str, Any] = field(default_factory=dict)
    layer_scores: dict[int, dict[str, float]] = field(default_factory=dict)
    # Scores on data the fit never saw, shown in the card: {"dataset", "metric", "value"} and optionally
    # "interval" ([low, high]) and "target". They describe the direction, so they are not in its fingerprint.
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    library_version: str = field(default_factory=_library_version)
    # Where the artifact was loaded from (not saved): a local folder or a Hub repo id, and its commit.
    source: str | None = field(default=None, compare=False)
    source_revision: str | None = field(default=None, compare=False)

    def __new__(cls, *args: Any, **kwargs: Any) -> SafetyDirection:
        """No mixin config (a ``config.json`` of the init arguments): the config is ``direction_config.json``."""
        return object.__new__(cls)

    def __post_init__(self) -> None:
        self.vectors = {
            int(k): v.detach().to(torch.float32).cpu().reshape(-1) for k, v in self.vectors.items()
        }
        if self.layer not in self.vectors:
            raise ValueError(f"layer {self.layer} has no vector; fitted layers: {sorted(self.vectors)}")
        for k, v in self.vectors.items():
            if v.numel() != self.hidden_size:
                raise ValueError(
                    f"vector of layer {k} has {v.numel()} values, expected hidden_size={self.hidden_size}"
                )
            if not torch.isfinite(v).all():
                raise ValueError(f"vector of layer {k} holds NaN or inf")
            if float(v.norm()) == 0.0:
                raise ValueError(f"vector of layer {k} is all zeros")
        for i, entry in enumerate(self.evaluation):
            missing = {"dataset", "metric", "value"} - set(entry)
            if missing:
                raise ValueError(
                    f"evaluation[{i}] lacks {sorted(missing)}: each entry needs dataset, metric and value"
                )

    @property
    def vector(self) -> torch.Tensor:
        """The unnormalised direction at ``layer``."""
        return self.vectors[self.layer]

    @property
    def unit(self) -> torch.Tensor:
        """The unit direction at ``layer``: margins are projections on it."""
        return self.vector / self.vector.norm()

    @property
    def name(self) -> str:
        """How to name the direction in records and cards: its Hub id, a shipped direction's name, a local folder's
        name (``./<name>`` when a shipped direction has that name), or its model."""
        name = public_name(self.source)
        if name is None:
            return f"a direction on {self.model_id}"
        shipped = SHIPPED_DIRECTIONS.get(name)
        if shipped is not None and not _same_folder(str(self.source), shipped):
            return f"./{name}"
        return name

    def project(self, states: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Safety scores (fp64) of pooled states read at ``layer`` (default: the direction's layer)."""
        return project(states, self.vectors[self.layer if layer is None else layer])

    def select_layer(self, layer: int) -> SafetyDirection:
        """A copy that scores with another fitted layer (Python-style index)."""
        return replace(self, layer=normalize_layer(layer, self.num_layers))

    def config_dict(self) -> dict[str, Any]:
        """The JSON config: everything but the vectors and the load source."""
        data = asdict(self)
        for key in ("vectors", "source", "source_revision"):
            data.pop(key)
        data["layers"] = sorted(self.vectors)
        data["layer_scores"] = {str(k): v for k, v in sorted(self.layer_scores.items())}
        return {"format_version": FORMAT_VERSION, **data, "sign_convention": SIGN_CONVENTION}

    def fingerprint(self) -> str:
        """A stable hash of the vectors and config (not of the legend-hf version that wrote them): the
        direction's identity in provenance records and `datasets` cache fingerprints."""
        config = {k: v for k, v in self.config_dict().items() if k not in ("library_version", "evaluation")}
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for k in sorted(self.vectors):
            digest.update(self.vectors[k].numpy().tobytes())
        return digest.hexdigest()[:32]

    def record(self, *, model_id: str | None = None, **fields_: Any) -> AnnotationRecord:
        """The provenance record of margins from this direction (``model_id``: another model than the recorded
        one); ``fields_`` set the others (how the model ran, the scale), over the direction's own settings."""
        record = AnnotationRecord(
            direction=self.name,
            direction_revision=self.source_revision,
            direction_fingerprint=self.fingerprint(),
            model_id=public_name(model_id or self.model_id) or "",
            model_revision=self.model_revision if model_id is None else None,
            layer=self.layer,
            num_layers=self.num_layers,
            pooling=self.pooling,
            template=self.template,
            method=self.method,
            max_length=self.max_length,
            library_version=__version__,
        )
        return replace(record, **fields_)

    def generate_model_card(self, *, repo_id: str | None = None, license: str | None = None) -> ModelCard:  # type: ignore[override]
        """The artifact's model card (README.md, the mixin's hook), rendered from :meth:`config_dict`: ``repo_id``
        names the artifact in the usage snippets (default: where it was loaded from)."""
        config = self.config_dict()
        return direction_card(
            config,
            fingerprint=self.fingerprint(),
            repo_id=repo_id or (self.source if is_hub_id(self.source) else None),
            license=license,
            plot=layer_plot(config),
        )

    def check_model(self, model: torch.nn.Module, *, check_model_id: bool = True) -> None:
        """Raise before any compute if ``model`` cannot host this direction; warn on another model id."""
        config = model.config
        hidden = getattr(config, "hidden_size", None)
        if hidden != self.hidden_size or num_layers(model) != self.num_layers:
            raise InputError(
                f"direction fitted on {self.model_id!r} (hidden_size={self.hidden_size}, "
                f"{self.num_layers} layers) cannot be used with {getattr(config, '_name_or_path', '?')!r} "
                f"(hidden_size={hidden}, {num_layers(model)} layers)"
            )
        name = str(getattr(config, "_name_or_path", "") or "")
        if check_model_id and name and self.model_id and _short(name) != _short(self.model_id):
            warnings.warn(
                f"direction was fitted on {self.model_id!r} but the model in use is {name!r}; margins are only "
                "meaningful on the same model (silence with RuntimeOptions(check_model_id=False), or --no_check_model_id)",
                DirectionModelWarning,
                stacklevel=3,
            )

    # ----- persistence -------------------------------------------------------------------------------

    # ----- persistence: huggingface_hub's ModelHubMixin, through its two hooks --------------------------------

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | os.PathLike[str], *, card: bool = True, **mixin_kwargs: Any
    ) -> Any:
        """The mixin's ``save_pretrained``: ``direction.safetensors`` and ``direction_config.json``
        (:meth:`_save_pretrained`), then the card (README.md, :meth:`generate_model_card`;
        ``model_card_kwargs={"repo_id": ...}`` names the artifact in its snippets) and the per-layer plot it shows.
        ``card=False`` writes the two files only. Returns the folder (with ``push_to_hub=True``, the commit)."""
        path = Path(save_directory)
        if not card:
            path.mkdir(parents=True, exist_ok=True)
            self._save_pretrained(path)
            return path
        pushed = super().save_pretrained(path, **mixin_kwargs)
        write_layer_plot(self.config_dict(), path)
        return pushed or path

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's hook: the vectors (safetensors, string metadata) and the JSON config. A card and plot an
        earlier save left are removed (the mixin keeps an existing README.md)."""
        from safetensors.torch import save_file

        tensors = {f"layer_{k}": v.contiguous() for k, v in self.vectors.items()}
        metadata = {
            "format": "pt",
            "format_version": str(FORMAT_VERSION),
            "layer": str(self.layer),
            "model_id": self.model_id,
            "library": "legend-hf",
        }
        save_file(tensors, str(save_directory / WEIGHTS_NAME), metadata=metadata)
        config = json.dumps(self.config_dict(), indent=2, ensure_ascii=False)
        (save_directory / CONFIG_NAME).write_text(config + "\n")
        for stale in ("README.md", LAYER_PLOT_NAME):
            (save_directory / stale).unlink(missing_ok=True)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> SafetyDirection:
        """Load from a local folder, a shipped direction's name (``smv-smollm2``, ``smv-gemma3-270m``), else from
        a Hub repo (``owner/name``) through ``hf_hub_download`` (cache and offline aware).

        A local folder wins over a shipped direction of the same name, with a warning, and records name it
        ``./<name>``. A name that looks like a path, or has no ``owner/``, is never sent to the Hub; errors name
        the folder, or the repo, revision and file, and say what to do. (The mixin's own ``from_pretrained`` would
        send shipped names to the Hub and look for a ``config.json`` first: this one decides where to read, then
        calls the mixin's hook :meth:`_from_pretrained`.)
        """
        ref = str(pretrained_model_name_or_path)
        path = Path(ref).expanduser()
        # A direction that ships with legend-hf, unless a local folder has its name.
        if ref in SHIPPED_DIRECTIONS:
            if path.exists() and not _same_folder(path, SHIPPED_DIRECTIONS[ref]):
                warnings.warn(
                    f"{ref}: loading the local folder {ref}/, not the shipped direction of that name; its records "
                    f"name it ./{ref} (pass ./{ref} to load it without this warning, or rename the folder to use "
                    "the shipped one)",
                    stacklevel=2,
                )
            else:
                path = SHIPPED_DIRECTIONS[ref]
        if path.is_file():
            raise FileNotFoundError(
                f"{ref} is a file: pass the direction's folder (the one holding {WEIGHTS_NAME} and {CONFIG_NAME})"
            )
        if not path.is_dir() and (looks_local(ref) or "/" not in ref):
            near = difflib.get_close_matches(path.name, SHIPPED_DIRECTIONS, n=1)
            raise FileNotFoundError(
                f"{ref}: no such direction folder, and not a Hub repo id (owner/name); "
                + (f"did you mean {near[0]}? " if near else "")
                + f"The shipped directions are {', '.join(SHIPPED_DIRECTIONS)}"
            )
        return cls._from_pretrained(
            model_id=str(path) if path.is_dir() else ref,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | os.PathLike[str] | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        **model_kwargs: Any,
    ) -> SafetyDirection:
        """A local folder (safetensors and JSON only: a folder of pickles is refused), or both files of a Hub repo
        at one resolved commit (a push in between cannot mix two versions), as :meth:`from_pretrained` resolved."""
        path = Path(model_id)
        if path.is_dir():
            _refuse_pickles(path)
            direction = cls._load(path / CONFIG_NAME, path / WEIGHTS_NAME)
            direction.source = str(path.resolve())
            return direction
        (config_file, weights_file), commit = download(
            model_id,
            [CONFIG_NAME, WEIGHTS_NAME],
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
            missing_hint=f"not a legend-hf direction (it needs {CONFIG_NAME} and {WEIGHTS_NAME})",
        )
        direction = cls._load(config_file, weights_file)
        direction.source, direction.source_revision = model_id, commit
        return direction

    @classmethod
    def _load(cls, config_file: Path, weights_file: Path) -> SafetyDirection:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: not a legend-hf direction folder")
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{config_file} is not valid JSON ({e})") from e
        version = config.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise InputError(
                f"{config_file} has format_version {version!r}; this legend-hf reads version {FORMAT_VERSION} "
                "(upgrade legend-hf to read newer artifacts)"
            )
        if not weights_file.is_file():
            raise FileNotFoundError(f"{weights_file} not found next to {config_file.name}")
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(
                f"{weights_file} is not a valid safetensors file ({e}); re-save the direction"
            ) from e
        vectors: dict[int, torch.Tensor] = {}
        for key, tensor in tensors.items():
            if not re.fullmatch(r"layer_\d+", key):
                raise InputError(f"{weights_file}: unexpected tensor {key!r} (expected layer_<index>)")
            if not torch.isfinite(tensor).all():
                raise InputError(f"{weights_file}: tensor {key!r} holds NaN or inf")
            vectors[int(key.split("_")[1])] = tensor
        layers = config.pop("layers", None)
        if layers is not None and sorted(layers) != sorted(vectors):
            raise InputError(
                f"{weights_file} holds layers {sorted(vectors)} but {config_file.name} lists {layers}"
            )
        config.pop("sign_convention", None)
        config["layer_scores"] = {int(k): v for k, v in config.get("layer_scores", {}).items()}
        for k, scores in config["layer_scores"].items():
            names = sorted(set(scores) - LAYER_SCORES)
            if names:
                raise InputError(
                    f"{config_file}: layer_scores[{k}] has unknown scores {names} (expected {sorted(LAYER_SCORES)}; "
                    "legend-hf 0.1 wrote accuracy/auc: load and re-save the artifact with legend-hf 0.2)"
                )
        known = {f for f in cls.__dataclass_fields__ if f not in ("vectors", "source", "source_revision")}
        unknown = set(config) - known
        if unknown:
            raise InputError(f"{config_file}: unknown fields {sorted(unknown)}")
        try:
            return cls(vectors=vectors, **config)
        except (TypeError, ValueError) as e:
            raise InputError(f"{config_file} / {weights_file.name}: {e}") from e

    def push_to_hub(  # type: ignore[override]
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload legend-hf safety direction",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """The mixin's ``push_to_hub`` (what :meth:`save_pretrained` writes, in one commit) to the branch
        ``revision``, which is created first when it does not exist (the mixin's alone would fail with a 404).

        Returns the ``CommitInfo``: ``commit_url``, and with ``create_pr`` the ``pr_url`` and ``pr_revision``.
        """
        from huggingface_hub import HfApi

        if revision is not None and not revision.startswith("refs/pr/"):
            api = HfApi(token=token)
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return super().push_to_hub(
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            branch=revision,
            create_pr=create_pr,
            model_card_kwargs={"repo_id": repo_id},
        )

    def __repr__(self) -> str:
        return (
            f"SafetyDirection(model_id={self.model_id!r}, layer={self.layer}/{self.num_layers}, "
            f"method={self.method!r}, pooling={self.pooling!r}, template={self.template[:40]!r}, "
            f"layers={sorted(self.vectors)})"
        )


def _same_folder(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _short(model_id: str) -> str:
    return model_id.rstrip("/").split("/")[-1].lower()


def _refuse_pickles(path: Path) -> None:
    if (path / WEIGHTS_NAME).is_file():
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _UNSAFE_SUFFIXES)
    if pickles:
        raise InputError(
            f"{path} has no {WEIGHTS_NAME} but {pickles}: legend-hf loads only safetensors and JSON "
            "(never pickles); convert the vectors with safetensors.torch.save_file"
        )
