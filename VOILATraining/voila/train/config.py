"""The training configuration: one flat YAML mapping, validated up front with actionable messages.

Command-line flags override the YAML; :func:`load_train_config` merges both and checks every key,
type, range and path before any data is read, so a typo fails in a second, not after an hour.

Example::

    config = load_train_config("train.yaml", overrides={"epochs": 5, "device": "cpu"})
    config.data, config.preset, config.out
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from voila.errors import ConfigError

PathLike = Union[str, "os.PathLike[str]"]

DEMO_INTENDED_USE = "Research use only. Not for clinical decisions."


@dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are the paper's where it gives one."""

    data: list[str] = field(default_factory=list)  # dataset folders or datalist JSON files
    preset: str = "small"  # model preset name or YAML path
    out: str = "runs/voila"
    epochs: int = 100
    steps_per_epoch: int | None = None  # None: one pass over the training cases
    batch_size: int = 2
    accumulate: int = 1  # gradient accumulation steps per optimiser step
    patch_size: list[int] | None = None  # None: the preset's
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 1.5])  # model grid, mm
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    schedule: str = "constant"  # constant | cosine
    seed: int = 0
    sampling: str | None = None  # cas | random | none; None: the preset's (cas)
    sampling_ratio: float | None = None
    oversampling: int | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto | bf16 | fp16 | none (CUDA only)
    val_every: int = 1  # epochs
    val_overlap: float = 0.5
    val_fraction: float = 0.1  # held out when no dataset names a validation split
    max_minutes: float | None = None
    foreground_oversampling: float = 0.33
    augment: bool = True
    mirror: bool = False  # head-feet / front-back flips, never left-right (voila.data.transforms)
    num_workers: int = 0
    cache: str = "memory"  # memory | disk: where the preprocessed cases are kept
    text_pretrained: str | None = "preset"  # "preset": the preset's tag; "none": random weights
    checkpoint_every: int = 0  # optimiser steps between mid-epoch checkpoints (0: each epoch only)
    export: str | None = None  # model file path; None: <out>/model.safetensors
    description: str = ""
    intended_use: str = DEMO_INTENDED_USE
    notes: str = ""  # free text recorded in the model card (e.g. how the data was prepared)
    deterministic: bool = True  # deterministic cuDNN kernels (bit-exact resume on GPU too; slower)
    resume: bool = False
    command: str = ""  # the command line that started the run (for the model card)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def export_path(self) -> Path:
        return Path(self.export) if self.export else self.out_dir / "model.safetensors"

    def text_pretrained_tag(self, preset_tag: str | None) -> str | None:
        """The open_clip ``pretrained`` tag to use: the preset's unless overridden; ``none`` → None."""
        if self.text_pretrained in (None, "preset"):
            return preset_tag
        if str(self.text_pretrained).lower() in ("none", "null", "random", ""):
            return None
        return str(self.text_pretrained)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_CHOICES = {
    "schedule": ("constant", "cosine"),
    "sampling": ("cas", "random", "none"),
    "amp": ("auto", "bf16", "fp16", "none"),
    "cache": ("memory", "disk"),
}


def load_train_config(
    source: PathLike | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Build a :class:`TrainConfig` from a YAML file or a dict, then apply ``overrides`` (flags).

    Overrides whose value is ``None`` are ignored (an absent flag). Relative ``data`` paths in a
    YAML file (and ``out``, ``export``) are resolved against the file's folder. Raises :class:`ConfigError` with the key
    and what to do for an unknown key, a wrong type, a value out of range or a missing path.
    """
    values: dict[str, Any] = {}
    base: Path | None = None
    if isinstance(source, dict):
        values = dict(source)
    elif source is not None:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"training configuration {path} does not exist; check the path")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path} must hold a mapping of settings (key: value), not a {type(loaded).__name__}"
            )
        values, base = loaded, path.parent
        if "data" in values:
            values["data"] = [str(_resolve(base, p)) for p in _as_list(values["data"], "data")]
        for key in ("out", "export"):
            if isinstance(values.get(key), str):
                values[key] = str(_resolve(base, values[key]))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown training setting {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; known settings: {', '.join(sorted(_FIELDS))}"
        )
    converted = {key: _convert(key, value) for key, value in values.items()}
    config = TrainConfig(**converted)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Range and path checks (the dataset contents are checked when the data is read)."""
    if not config.data:
        raise ConfigError("no training data given; pass --data PATH (a dataset folder or datalist .json)")
    for path in config.data:
        if not Path(path).exists():
            raise ConfigError(f"training data {path} does not exist; check the --data path")
    positive = ("epochs", "batch_size", "accumulate", "val_every")
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(config, key)}")
    if config.steps_per_epoch is not None and config.steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch must be at least 1, got {config.steps_per_epoch}")
    if not (config.lr > 0 and config.lr == config.lr):
        raise ConfigError(f"lr must be a positive number, got {config.lr}")
    if config.weight_decay < 0 or config.warmup_epochs < 0:
        raise ConfigError("weight_decay and warmup_epochs must be >= 0")
    if config.patch_size is not None:
        if len(config.patch_size) != 3 or min(config.patch_size) < 8:
            raise ConfigError(f"patch_size must be 3 sizes of at least 8 voxels, got {config.patch_size}")
    if len(config.spacing) != 3 or min(config.spacing) <= 0:
        raise ConfigError(f"spacing must be 1 or 3 positive numbers (mm), got {config.spacing}")
    if config.sampling_ratio is not None and not 0 < config.sampling_ratio <= 1:
        raise ConfigError(f"sampling_ratio must be in (0, 1], got {config.sampling_ratio}")
    if config.oversampling is not None and config.oversampling < 0:
        raise ConfigError(f"oversampling must be >= 0, got {config.oversampling}")
    if not 0 <= config.val_overlap < 1:
        raise ConfigError(f"val_overlap must be in [0, 1), got {config.val_overlap}")
    if not 0 <= config.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    if not 0 <= config.foreground_oversampling <= 1:
        raise ConfigError(f"foreground_oversampling must be in [0, 1], got {config.foreground_oversampling}")
    if config.max_minutes is not None and config.max_minutes <= 0:
        raise ConfigError(f"max_minutes must be positive, got {config.max_minutes}")
    if config.num_workers < 0 or config.checkpoint_every < 0:
        raise ConfigError("num_workers and checkpoint_every must be >= 0")
    device = config.device
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    for key, choices in _CHOICES.items():
        value = getattr(config, key)
        if value is not None and value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, not {value!r}")


def _convert(key: str, value: Any) -> Any:
    """Coerce YAML / flag values to the field's type, or explain what is expected."""
    default = _FIELDS[key].default
    if default is dataclasses.MISSING:
        default = _FIELDS[key].default_factory()  # type: ignore[misc]
    kind = _FIELDS[key].type
    try:
        if key == "data":
            return [str(p) for p in _as_list(value, key)]
        if key == "spacing":
            items = _as_list(value, key)
            spacing = [float(s) for s in items]
            return spacing * 3 if len(spacing) == 1 else spacing
        if key == "patch_size":
            items = _as_list(value, key)
            sizes = [int(s) for s in items]
            return sizes * 3 if len(sizes) == 1 else sizes
        if value is None:
            if "None" in str(kind):
                return None
            raise ValueError("a value is required")
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if "int" in str(kind) and "float" not in str(kind):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected a whole number")
            return int(value)
        if "float" in str(kind):
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if "str" in str(kind):
            if isinstance(value, (dict, list)):
                raise ValueError("expected text")
            return str(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"training setting {key!r} has an invalid value {value!r} ({error})") from None
    return value


def _as_list(value: Any, key: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, int, float, os.PathLike)):
        return [value]
    raise ConfigError(f"training setting {key!r} must be a value or a list, not {type(value).__name__}")


def _resolve(base: Path, path: Any) -> Path:
    candidate = Path(str(path)).expanduser()
    return candidate if candidate.is_absolute() else base / candidate
