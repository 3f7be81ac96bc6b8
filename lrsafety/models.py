"""Model presets and one loader for a preset name, a Hub id or a local checkpoint folder.

``load_model`` returns the nnsight-wrapped model, its tokenizer (left padding, pad token set)
and a ``ModelSpec`` with the facts later notebooks need: the family, the number of decoder
layers, the residual width and the layer the paper uses for gates and interventions.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lrsafety import standins

logger = logging.getLogger("lrsafety")


@dataclass(frozen=True)
class ModelPreset:
    """A named model: where its weights come from and the layer the paper analyses."""

    name: str
    hub_id: str | None
    family: str
    dtype: str
    paper_layer: int
    is_standin: bool = False
    # Notebook parameters that suit this model by default (the runner merges user values over them).
    default_parameters: dict[str, Any] = field(default_factory=dict)


# Stand-ins run on a 2-core CPU, so their default run extracts the first 64 prompts of every
# cell (enough for the largest recalibration budget), generates for the first 16, and sweeps
# three steering strengths.
_STANDIN_DEFAULTS = {
    "prompts_per_cell": 64,
    "generation_prompts_per_cell": 16,
    "max_new_tokens": 24,
    "sweep_lambdas": [0.0, 1.0, 2.0],
}

PRESETS: dict[str, ModelPreset] = {
    "qwen2.5-7b-instruct": ModelPreset("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", "qwen2", "bfloat16", 15),
    "gemma-2-9b-it": ModelPreset("gemma-2-9b-it", "google/gemma-2-9b-it", "gemma2", "bfloat16", 20),
    "llama-3.1-8b-instruct": ModelPreset(
        "llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", "llama", "bfloat16", 10
    ),
    "tiny-qwen2": ModelPreset("tiny-qwen2", None, "qwen2", "float32", 2, True, _STANDIN_DEFAULTS),
    "tiny-llama": ModelPreset("tiny-llama", None, "llama", "float32", 2, True, _STANDIN_DEFAULTS),
    "tiny-gemma2": ModelPreset("tiny-gemma2", None, "gemma2", "float32", 2, True, _STANDIN_DEFAULTS),
}

DEFAULT_MODEL = "tiny-qwen2"

_FAMILY_BY_MODEL_TYPE = {"qwen2": "qwen2", "llama": "llama", "gemma2": "gemma2"}
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """Facts about a loaded model that the rest of the package reads."""

    name: str
    source: str
    family: str
    n_layers: int
    d_model: int
    paper_layer: int
    dtype: str
    is_standin: bool
    remote: bool
    revision: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """An nnsight-wrapped model with its tokenizer and spec."""

    model: Any
    tokenizer: Any
    spec: ModelSpec

    @property
    def layers(self):
        """The decoder blocks, indexable as ``layers[i]`` inside an nnsight trace."""
        return self.model.model.layers

    @property
    def device(self) -> torch.device:
        return next(self.model._module.parameters()).device


def resolve_preset(name: str) -> ModelPreset | None:
    """Return the preset of a name (case-insensitive), or None for Hub ids and paths."""
    return PRESETS.get(name.lower())


def default_parameters(name: str) -> dict[str, Any]:
    """Return the notebook parameter defaults of a model name (empty for non-presets)."""
    preset = resolve_preset(name)
    return dict(preset.default_parameters) if preset else {}


def load_model(
    name: str,
    *,
    dtype: str | None = None,
    device_map: str | None = None,
    remote: bool | str = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    paper_layer: int | None = None,
) -> LoadedModel:
    """Load a model by preset name, Hub id or local folder and wrap it for nnsight.

    Stand-in presets are built into the local cache on first use and then loaded from that
    folder exactly like a downloaded checkpoint. With ``remote=True`` the weights stay on NDIF:
    only the config is read here, from the Hub id. ``remote="local"`` loads the weights here,
    because it simulates the NDIF round trip in this process. ``paper_layer`` defaults to the
    preset's layer, or to the middle layer for other models.
    """
    from nnsight import TransformersModel
    from transformers import AutoConfig, AutoTokenizer

    from lrsafety.remote import normalize_remote

    runs_on_ndif = normalize_remote(remote) is True
    preset = resolve_preset(name)
    if preset is not None and preset.is_standin:
        if runs_on_ndif:
            raise ValueError(
                f"{name} is a stand-in built on this machine; NDIF serves only Hub models. "
                "Use a Hub preset such as 'llama-3.1-8b-instruct' with remote=True."
            )
        source = str(standins.build_standin(preset.name))
    elif preset is not None:
        source = preset.hub_id
    else:
        source = _check_source(name)

    if dtype is not None:
        dtype_name = dtype
    elif preset is not None:
        dtype_name = preset.dtype
    else:
        dtype_name = "bfloat16" if torch.cuda.is_available() else "float32"
    torch_dtype = _torch_dtype(dtype_name)

    config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    family = _FAMILY_BY_MODEL_TYPE.get(config.model_type)
    if family is None:
        logger.warning(
            "Model type %r is not one of the tested families (qwen2, llama, gemma2); "
            "layer access assumes model.model.layers.",
            config.model_type,
        )
        family = config.model_type

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    model_kwargs: dict[str, Any] = {"dtype": torch_dtype, "revision": revision, "trust_remote_code": trust_remote_code}
    if family == "gemma2":
        # Soft-capping of attention logits is only implemented by eager attention.
        model_kwargs["attn_implementation"] = "eager"
    if not runs_on_ndif:
        # A local folder has no Hub pipeline tag to infer the task from.
        model_kwargs["task"] = "text-generation"
        model_kwargs["dispatch"] = True
        if device_map is None and torch.cuda.is_available():
            device_map = "auto"
        if device_map is not None:
            model_kwargs["device_map"] = device_map

    model = TransformersModel(source, tokenizer=tokenizer, **model_kwargs)
    tokenizer.padding_side = "left"

    n_layers = int(config.num_hidden_layers)
    if paper_layer is not None:
        layer = paper_layer
    elif preset is not None:
        layer = preset.paper_layer
    else:
        layer = n_layers // 2
    if not 0 <= layer < n_layers:
        raise ValueError(f"paper layer {layer} is out of range for {name} with {n_layers} layers")

    spec = ModelSpec(
        name=preset.name if preset else name,
        source=source,
        family=family,
        n_layers=n_layers,
        d_model=int(config.hidden_size),
        paper_layer=layer,
        dtype=dtype_name,
        is_standin=bool(preset and preset.is_standin),
        remote=runs_on_ndif,
        revision=revision,
    )
    loaded = LoadedModel(model=model, tokenizer=tokenizer, spec=spec)
    _validate_layout(loaded)
    logger.info(
        "Loaded %s (%s, %d layers, width %d, paper layer %d, %s)",
        spec.name, spec.family, spec.n_layers, spec.d_model, spec.paper_layer, spec.dtype,
    )
    if spec.is_standin:
        logger.warning(standins.STANDIN_WARNING)
    return loaded


def describe_model(name: str) -> dict[str, Any]:
    """Describe a model without loading its weights (for ``model.json`` in the run folder).

    Reads only a config already on disk (a local folder or the Hub cache), so it never waits on
    the network; otherwise the preset's facts are returned with ``n_layers``/``d_model`` None.
    Notebooks that load the model rewrite ``model.json`` with the full spec.
    """
    from transformers import AutoConfig

    preset = resolve_preset(name)
    if preset is not None and preset.is_standin:
        source = str(standins.build_standin(preset.name))
    elif preset is not None:
        source = preset.hub_id
    else:
        source = _check_source(name)
    description: dict[str, Any] = {
        "name": preset.name if preset else name,
        "source": source,
        "family": preset.family if preset else None,
        "n_layers": None,
        "d_model": None,
        "paper_layer": preset.paper_layer if preset else None,
        "dtype": preset.dtype if preset else None,
        "is_standin": bool(preset and preset.is_standin),
        "standin_warning": standins.STANDIN_WARNING if preset and preset.is_standin else None,
    }
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        logger.info("Config of %s not readable here (%s); describing it from the preset only", name, error)
        return description
    description["family"] = _FAMILY_BY_MODEL_TYPE.get(config.model_type, config.model_type)
    description["n_layers"] = int(config.num_hidden_layers)
    description["d_model"] = int(config.hidden_size)
    if description["paper_layer"] is None:
        description["paper_layer"] = description["n_layers"] // 2
    return description


def _check_source(name: str) -> str:
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json; point at a saved transformers checkpoint")
        return str(path)
    if _HUB_ID_PATTERN.match(name):
        return name
    raise ValueError(
        f"model {name!r} is neither a preset ({', '.join(PRESETS)}), an existing folder, "
        "nor a Hub id of the form 'organisation/name'"
    )


def _torch_dtype(name: str) -> torch.dtype:
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    try:
        return choices[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(choices)}") from None


def _validate_layout(loaded: LoadedModel) -> None:
    # Every step reads and writes model.model.layers[i].output; check that path once at load time.
    try:
        n_blocks = len(loaded.model._module.model.layers)
    except AttributeError as error:
        raise TypeError(
            f"{loaded.spec.name}: expected decoder blocks at model.model.layers ({error}); "
            "this architecture is not supported"
        ) from None
    if n_blocks != loaded.spec.n_layers:
        raise ValueError(f"{loaded.spec.name}: invalid checkpoint, the config lists {loaded.spec.n_layers} layers but the model has {n_blocks}")


def ndif_settings_present() -> bool:
    """Return True when an NDIF API key is set in the environment."""
    return bool(os.environ.get("NDIF_API_KEY"))
