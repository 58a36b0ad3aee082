"""The training configuration, declared once: every setting's section, type, default, range and help.

:data:`SETTINGS` is the only declaration. From it come the :class:`TrainConfig` fields, the
``voila train`` flags (grouped by section in ``--help``), the conversion and
range checks of YAML and flag values, and the sectioned ``config.yaml`` a run folder keeps.
Sections: ``model`` (architecture, grid, text encoder, sampling), ``data`` (datasets, patches,
augmentation), ``optim`` (schedule and optimiser) and ``run`` (devices, time box, outputs).

A YAML file may be flat (``lr: 1e-3``) or sectioned (``optim: {lr: 1e-3}``). Everything is checked
before any data is read, so a typo fails in a second, not after an hour::

    config = load_train_config("train.yaml", overrides={"epochs": 5, "device": "cpu"})
    config.data, config.preset, config.lr, config.sections()["optim"]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from voila.device import AMP_CHOICES, DEVICE_HELP, check_device_name
from voila.errors import ConfigError

PathLike = Union[str, "os.PathLike[str]"]

DEMO_INTENDED_USE = "Research use only. Not for clinical decisions."
SECTIONS = ("model", "data", "optim", "run")
_SECTION_TITLES = {
    "model": "model (architecture, grid, text encoder, voxel sampling)",
    "data": "data (datasets, patches, augmentation)",
    "optim": "optimisation (schedule, optimiser)",
    "run": "run (device, time box, outputs)",
}
# Value kinds: how YAML and flag values are read.
_KINDS = ("int", "float", "bool", "str", "paths", "sizes", "lengths")
_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "paths": list, "sizes": list, "lengths": list}


@dataclass(frozen=True)
class Setting:
    """One training setting.

    ``kind``: ``int``, ``float``, ``bool``, ``str``, ``paths`` (a list of paths), ``sizes`` (1 or 3
    whole numbers) or ``lengths`` (1 or 3 positive numbers, mm). ``low``/``high``: the allowed range
    (``low_open`` excludes ``low`` itself). ``nullable``: None is a valid value (e.g. "the preset's").
    ``flag``: the command-line spelling; ``""`` derives ``--the-name``, None keeps the setting to
    YAML and Python (and a bool's flag is ``--name`` to switch on or ``--no-name`` to switch off,
    from its default).
    """

    name: str
    section: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    nullable: bool = False
    flag: str | None = ""
    metavar: str | None = None

    def __post_init__(self) -> None:
        assert self.section in SECTIONS and self.kind in _KINDS, self

    @property
    def annotation(self) -> Any:
        kind = _TYPES[self.kind]
        return Optional[kind] if self.nullable else kind

    @property
    def flags(self) -> list[str]:
        if self.flag is None:
            return []
        if self.flag:
            return [self.flag]
        words = self.name.replace("_", "-")
        if self.kind == "bool":
            return [f"--no-{words}" if self.default else f"--{words}"]
        return [f"--{words}"]

    def default_value(self) -> Any:
        return list(self.default) if isinstance(self.default, (list, tuple)) else self.default


SETTINGS: tuple[Setting, ...] = (
    # -- model ----------------------------------------------------------------------------------
    Setting("preset", "model", "str", "small", "model preset: paper, small, tiny, or a preset YAML file"),
    Setting(
        "spacing",
        "model",
        "lengths",
        (1.5, 1.5, 1.5),
        "model grid spacing in mm (1 or 3 numbers; default 1.5)",
        low=0,
        low_open=True,
        metavar="MM",
    ),
    Setting(
        "patch_size",
        "model",
        "sizes",
        None,
        "training/inference patch in voxels (1 or 3 sizes; default: the preset's)",
        low=8,
        nullable=True,
        metavar="N",
    ),
    Setting(
        "sampling",
        "model",
        "str",
        None,
        "voxels that carry the loss: cas (the paper), random, or none (all); default: the preset's",
        choices=("cas", "random", "none"),
        nullable=True,
    ),
    Setting(
        "sampling_ratio",
        "model",
        "float",
        None,
        "share of a patch's voxels the loss uses (K)",
        low=0,
        high=1,
        low_open=True,
        nullable=True,
        flag=None,
    ),
    Setting(
        "oversampling",
        "model",
        "int",
        None,
        "uniform extra voxels per CAS pick (n, anti-self-loop)",
        low=0,
        nullable=True,
        flag=None,
    ),
    Setting(
        "text_pretrained",
        "model",
        "str",
        "preset",
        "open_clip weights tag of the text encoder ('preset': the preset's; 'none': random weights, offline)",
        nullable=True,
    ),
    Setting(
        "text_adapters",
        "model",
        "bool",
        False,
        "a learned vector per class added to its text embedding (self-adaptive text adapters on the frozen CLIP)",
    ),
    Setting(
        "fusion",
        "model",
        "bool",
        False,
        "cross-attention fusion: class embeddings attend to the image's voxel tokens before classifying",
    ),
    Setting("base", "model", "str", None, "the model file fine-tuning starts from", nullable=True, flag=None),
    # -- data -----------------------------------------------------------------------------------
    Setting(
        "data",
        "data",
        "paths",
        (),
        "dataset folders or datalist .json files (layout detected)",
        metavar="PATH",
    ),
    Setting(
        "val_fraction",
        "data",
        "float",
        0.1,
        "share of cases held out when no dataset names a validation split",
        low=0,
        high=0.99,
        flag=None,
    ),
    Setting(
        "foreground_oversampling",
        "data",
        "float",
        0.33,
        "share of patches centred on a labelled voxel",
        low=0,
        high=1,
        flag=None,
    ),
    Setting("augment", "data", "bool", True, "random patches only: no rotations, zoom or intensity changes"),
    Setting(
        "mirror",
        "data",
        "bool",
        False,
        "also flip patches head-feet and front-back (off by default: after RAS reorientation a mirrored "
        "patch shows anatomy no scan has; left-right is never flipped)",
    ),
    Setting(
        "structures",
        "data",
        "paths",
        (),
        "learn only these of the datasets' labels (vocabulary names or the datasets' own; default: all)",
        metavar="NAME",
    ),
    Setting(
        "annotated_region",
        "data",
        "str",
        "file",
        "which voxels of a case are annotated: 'file' (all, or the case's annotated-region mask: "
        "<case>/annotated.nii.gz, a datalist's \"annotated\", nnU-Net's 'ignore' label) or 'slices' "
        "(also only the slices that hold a label: for cases labelled on some slices)",
        choices=("file", "slices"),
    ),
    Setting(
        "keep_base",
        "data",
        "str",
        "pseudo-labels",
        "fine-tuning: how the base model's structures are kept where the new cases do not label them: "
        "'pseudo-labels' (the base model's own predictions as their labels) or 'none'",
        choices=("pseudo-labels", "none"),
    ),
    Setting(
        "cache", "data", "str", "memory", "where preprocessed cases are kept", choices=("memory", "disk")
    ),
    Setting("num_workers", "data", "int", 0, "data-loading worker processes", low=0),
    # -- optim ----------------------------------------------------------------------------------
    Setting("epochs", "optim", "int", 100, "epochs to train", low=1),
    Setting(
        "steps_per_epoch",
        "optim",
        "int",
        250,
        "optimiser steps per epoch, whatever the number of cases (nnU-Net's 250; null in YAML: one pass)",
        low=1,
        nullable=True,
    ),
    Setting("batch_size", "optim", "int", 2, "patches per micro-batch and process", low=1),
    Setting("accumulate", "optim", "int", 1, "gradient accumulation steps per optimiser step", low=1),
    Setting(
        "lr", "optim", "float", 1e-3, "Adam learning rate (default 1e-3, the paper's)", low=0, low_open=True
    ),
    Setting("weight_decay", "optim", "float", 0.0, "Adam weight decay", low=0, flag=None),
    Setting("warmup_epochs", "optim", "float", 0.0, "linear warm-up length in epochs", low=0),
    Setting(
        "schedule",
        "optim",
        "str",
        "constant",
        "learning-rate schedule after warm-up",
        choices=("constant", "cosine"),
    ),
    Setting(
        "trainable",
        "optim",
        "str",
        "all",
        "what learns: 'all', or 'neck' (parameter-efficient: the voxel encoder's backbone is frozen but its "
        "last stage; the neck, the text projection, adapters and CAS learn)",
        choices=("all", "neck"),
    ),
    Setting(
        "encoder_lr",
        "optim",
        "float",
        1.0,
        "learning rate of the voxel encoder's backbone, as a factor of --lr (e.g. 0.1 when fine-tuning)",
        low=0,
        low_open=True,
    ),
    Setting("seed", "optim", "int", 0, "random seed (data order, augmentation, initialisation)"),
    # -- run ------------------------------------------------------------------------------------
    Setting("out", "run", "str", "runs/voila", "run folder (checkpoints, metrics, pictures, model)"),
    Setting("device", "run", "str", "auto", DEVICE_HELP),
    Setting("amp", "run", "str", "auto", "mixed precision on CUDA", choices=AMP_CHOICES),
    Setting(
        "val_windows",
        "run",
        "int",
        8,
        "windows (centred on labelled structures) a validation during training scores; the full "
        "sliding-window validation runs once, on the exported model (0: full every time)",
        low=0,
    ),
    Setting("val_every", "run", "int", 1, "validate every N epochs", low=1),
    Setting(
        "calibration",
        "run",
        "str",
        "validation",
        "the review map's calibration (model card): 'validation' fits it on the whole held-out "
        "validation cases at export (none when validating on training cases), or a JSON file "
        '{"calibration": {"x": [...], "y": [...]}, "fitted_on": "..."} fitted elsewhere '
        "(e.g. by Testing/benchmarks/bench_heatmap.py on patients a model of the same recipe never saw)",
        metavar="validation|FILE",
    ),
    Setting(
        "val_overlap",
        "run",
        "float",
        0.5,
        "sliding-window overlap of validation",
        low=0,
        high=0.95,
        flag=None,
    ),
    Setting(
        "max_minutes",
        "run",
        "float",
        None,
        "stop cleanly (checkpoint, validation, export) after this many minutes",
        low=0,
        low_open=True,
        nullable=True,
    ),
    Setting(
        "checkpoint_every", "run", "int", 0, "also checkpoint every N optimiser steps inside an epoch", low=0
    ),
    Setting(
        "export", "run", "str", None, "model file to write (default: OUT/model.safetensors)", nullable=True
    ),
    Setting("resume", "run", "bool", False, "continue the run in --out"),
    Setting(
        "deterministic",
        "run",
        "bool",
        True,
        "deterministic cuDNN kernels (bit-exact resume on GPU too; slower)",
        flag=None,
    ),
    Setting("description", "run", "str", "", "what the model is, for its card", flag=None),
    Setting("intended_use", "run", "str", DEMO_INTENDED_USE, "intended use, for the model card", flag=None),
    Setting(
        "notes", "run", "str", "", "free text for the model card (e.g. how the data was prepared)", flag=None
    ),
    Setting("command", "run", "str", "", "the command line that started the run (model card)", flag=None),
)
SETTING = {setting.name: setting for setting in SETTINGS}


def _to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _sections(self) -> dict[str, dict[str, Any]]:
    """The settings grouped by section (the layout of a run folder's ``config.yaml``)."""
    values = self.to_dict()
    return {
        section: {s.name: values[s.name] for s in SETTINGS if s.section == section} for section in SECTIONS
    }


def _out_dir(self) -> Path:
    return Path(self.out)


def _export_path(self) -> Path:
    return Path(self.export) if self.export else self.out_dir / "model.safetensors"


def _text_pretrained_tag(self, preset_tag: str | None) -> str | None:
    """The open_clip ``pretrained`` tag to use: the preset's unless overridden; ``none`` → None."""
    if self.text_pretrained in (None, "preset"):
        return preset_tag
    if str(self.text_pretrained).lower() in ("none", "null", "random", ""):
        return None
    return str(self.text_pretrained)


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [
        (s.name, s.annotation, field(default_factory=s.default_value))
        if isinstance(s.default, (list, tuple))
        else (s.name, s.annotation, field(default=s.default))
        for s in SETTINGS
    ],
    namespace={
        "__doc__": "Every setting of a training run (fields: :data:`SETTINGS`); the paper's defaults.",
        "__module__": __name__,
        "to_dict": _to_dict,
        "sections": _sections,
        "out_dir": property(_out_dir),
        "export_path": property(_export_path),
        "text_pretrained_tag": _text_pretrained_tag,
    },
)


def add_arguments(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """Add a flag for every setting that has one, grouped by section; absent flags stay None."""
    for section in SECTIONS:
        group = parser.add_argument_group(_SECTION_TITLES[section])
        for setting in SETTINGS:
            if setting.section != section or not setting.flags or setting.name in exclude:
                continue
            options: dict[str, Any] = {"dest": setting.name, "default": None, "help": setting.help}
            if setting.kind == "bool":
                options["action"] = "store_false" if setting.default else "store_true"
            elif setting.kind == "paths":
                options.update(nargs="+", action="extend", metavar=setting.metavar)
            elif setting.kind in ("sizes", "lengths"):
                options.update(
                    nargs="+", type=int if setting.kind == "sizes" else float, metavar=setting.metavar
                )
            else:
                options["type"] = _TYPES[setting.kind]
                if setting.choices:
                    options["choices"] = setting.choices
            group.add_argument(*setting.flags, **options)


def overrides_from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (flags left out are not overrides), and the command
    itself (``args.argv``, set by :func:`voila.cli.main`) as the run's recorded ``command``."""
    given = {s.name: getattr(args, s.name) for s in SETTINGS if getattr(args, s.name, None) is not None}
    if getattr(args, "argv", None) is not None:
        given["command"] = "voila " + " ".join(shlex.quote(str(a)) for a in args.argv)
    return given


def load_train_config(
    source: PathLike | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Build a :class:`TrainConfig` from a YAML file or a dict, then apply ``overrides`` (flags).

    Overrides whose value is ``None`` are ignored (an absent flag). Relative ``data``, ``out`` and
    ``export`` paths in a YAML file are resolved against the file's folder. Raises
    :class:`ConfigError` with the key and what to do for an unknown key, a wrong type, a value out
    of range or a missing path.
    """
    values: dict[str, Any] = {}
    if isinstance(source, dict):
        values = _flatten(dict(source), "the configuration")
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
        values = _flatten(loaded, str(path))
        base = path.parent
        if "data" in values:
            values["data"] = [str(_resolve(base, p)) for p in _as_list(values["data"], "data")]
        for key in ("out", "export"):
            if isinstance(values.get(key), str):
                values[key] = str(_resolve(base, values[key]))
        if isinstance(values.get("calibration"), str) and values["calibration"] != "validation":
            values["calibration"] = str(_resolve(base, values["calibration"]))  # a file next to the YAML
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    unknown = sorted(set(values) - set(SETTING))
    if unknown:
        raise ConfigError(
            f"unknown training setting {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; known settings: {', '.join(sorted(SETTING))}"
        )
    config = TrainConfig(**{key: _convert(SETTING[key], value) for key, value in values.items()})
    validate(config)
    return config


def setting_names(source: PathLike | dict[str, Any] | None) -> set[str]:
    """The settings a YAML file or dict gives (flat or by section), without checking them."""
    if source is None:
        return set()
    if isinstance(source, dict):
        return set(_flatten(dict(source), "the configuration"))
    try:
        loaded = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return set()  # load_train_config says what is wrong with it
    return set(_flatten(loaded, str(source))) if isinstance(loaded, dict) else set()


def validate(config: TrainConfig) -> None:
    """Every setting's declared range and choices, then what ties settings to the world (paths,
    devices). The dataset contents are checked when the data is read."""
    for setting in SETTINGS:
        _check_range(setting, getattr(config, setting.name))
    if not config.data:
        raise ConfigError("no training data given; pass --data PATH (a dataset folder or datalist .json)")
    for path in config.data:
        if not Path(path).exists():
            raise ConfigError(f"training data {path} does not exist; check the --data path")
    check_device_name(config.device)
    if config.calibration != "validation":
        from voila.infer.review import load_calibration

        load_calibration(config.calibration)


def _flatten(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Sectioned settings (``optim: {lr: ...}``) as one flat mapping; flat ones pass through."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            for name, item in value.items():
                setting = SETTING.get(name)
                if setting is not None and setting.section != key:
                    raise ConfigError(
                        f"{where}: the setting {name!r} belongs in section {setting.section!r}, not {key!r}"
                    )
                flat[name] = item
        else:
            flat[key] = value
    return flat


def _check_range(setting: Setting, value: Any) -> None:
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    if setting.kind in ("sizes", "lengths") and len(values) != 3:
        raise ConfigError(f"{setting.name} must be 1 or 3 numbers, got {value}")
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        below = setting.low is not None and (item <= setting.low if setting.low_open else item < setting.low)
        above = setting.high is not None and item > setting.high
        if below or above or item != item:
            low = "" if setting.low is None else f"{'>' if setting.low_open else '>='} {setting.low:g}"
            high = "" if setting.high is None else f"<= {setting.high:g}"
            raise ConfigError(
                f"{setting.name} must be {' and '.join(t for t in (low, high) if t)}, got {value}"
            )
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{setting.name} must be one of {', '.join(setting.choices)}, not {value!r}")


def _convert(setting: Setting, value: Any) -> Any:
    """Coerce a YAML / flag value to the setting's kind, or explain what is expected."""
    key, kind = setting.name, setting.kind
    try:
        if value is None:
            if setting.nullable:
                return None
            raise ValueError("a value is required")
        if kind == "paths":
            return [str(p) for p in _as_list(value, key)]
        if kind in ("sizes", "lengths"):
            numbers = [_number(item, whole=kind == "sizes") for item in _as_list(value, key)]
            return numbers * 3 if len(numbers) == 1 else numbers
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if kind in ("int", "float"):
            return _number(value, whole=kind == "int")
        if isinstance(value, (dict, list)):
            raise ValueError("expected text")
        return str(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"training setting {key!r} has an invalid value {value!r} ({error})") from None


def _number(value: Any, whole: bool) -> int | float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    if whole:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected a whole number")
        return int(value)
    return float(value)


def _as_list(value: Any, key: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, int, float, os.PathLike)):
        return [value]
    raise ConfigError(f"training setting {key!r} must be a value or a list, not {type(value).__name__}")


def _resolve(base: Path, path: Any) -> Path:
    candidate = Path(str(path)).expanduser()
    return candidate if candidate.is_absolute() else base / candidate
