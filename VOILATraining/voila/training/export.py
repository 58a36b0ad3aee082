"""The end of a run: the model file and the training record in its card.

The record says what the model is without opening the run folder: the command that made it
(and the commands that resumed it), the resolved settings by section, the data (datasets, case
counts, skipped cases), how far it trained, and how it validated.

    record = training_record(config, data, model_config, totals, exported_weights="best (epoch 40, ...)")
    export_model(config.export_path, built, record, config, data, model_config)
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voila.model.config import ModelConfig
from voila.model.factory import BuiltModel
from voila.model.model_file import save_model

RANDOM_TEXT_WEIGHTS = (
    "none: open_clip architecture with deterministic random weights (pretrained=None, seed 0)"
)


@dataclass
class RunTotals:
    """How far a run got (all sessions of it together)."""

    epochs_completed: int
    optimizer_steps: int
    steps_per_epoch: int
    minutes: float
    processes: int
    device: str
    amp: str
    commands: list[str] = field(default_factory=list)
    best_dice: float = -1.0
    best_epoch: int = -1  # 0-based; -1: never validated
    best_scores: dict[str, float] = field(default_factory=dict)
    final_dice: float | None = None  # the exported model on whole validation cases (None: not run)
    final_scores: dict[str, float] = field(default_factory=dict)


def training_record(
    config,
    data,
    model_config: ModelConfig,
    totals: RunTotals,
    exported_weights: str,
    spacing: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The card's ``training`` entry (see the module docstring). ``spacing``: the model grid's
    (default the run's setting; fine-tuning trains on its base's grid, whatever the setting)."""
    import voila

    validated = totals.best_epoch >= 0
    spacing = [float(v) for v in (spacing if spacing is not None else config.spacing)]
    settings = config.sections()
    for key in ("command", "description", "intended_use", "notes"):
        settings["run"].pop(key, None)
    settings["model"].update(
        patch_size=list(model_config.patch_size), sampling=asdict(model_config.sampling), spacing=spacing
    )
    summary = (
        f"{model_config.name} preset, {len(data.train_indices)} training case(s) from "
        f"{len(data.datasets)} dataset(s), {totals.epochs_completed} epoch(s) x {totals.steps_per_epoch} steps, "
        f"{model_config.sampling.mode} sampling, {spacing[0]:g} mm grid; "
        + (
            f"best validation mean Dice {totals.best_dice:.3f} (epoch {totals.best_epoch + 1}"
            + (f", {config.val_windows} windows" if config.val_windows else "")
            + ")"
            + (
                f", {totals.final_dice:.3f} on whole validation cases"
                if totals.final_dice is not None
                else ""
            )
            + (" on the training cases" if data.validating_on_training_cases else "")
            if validated
            else "not validated"
        )
    )
    return {
        "command": totals.commands[0] if totals.commands else config.command,
        "resumed_with": totals.commands[1:],
        "summary": summary,
        "notes": config.notes,
        "settings": settings,
        "datasets": data.datasets,
        "train_cases": len(data.train_indices),
        "val_cases": len(data.val_indices),
        "validated_on_training_cases": data.validating_on_training_cases,
        "skipped_cases": [{"case": case, "reason": reason} for case, reason in data.skipped],
        "epochs_completed": totals.epochs_completed,
        "optimizer_steps": totals.optimizer_steps,
        "steps_per_epoch": totals.steps_per_epoch,
        "processes": totals.processes,
        "device": totals.device,
        "amp": totals.amp,
        "text_encoder_weights": model_config.text_encoder.pretrained or RANDOM_TEXT_WEIGHTS,
        "exported_weights": exported_weights,
        "val_mean_dice": round(totals.best_dice, 4) if validated else None,
        "val_dice": {name: round(value, 4) for name, value in totals.best_scores.items()},
        "val_windows": config.val_windows,
        "final_val_mean_dice": None if totals.final_dice is None else round(totals.final_dice, 4),
        "final_val_dice": {name: round(value, 4) for name, value in totals.final_scores.items()},
        "minutes": round(totals.minutes, 2),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "voila_version": voila.__version__,
        "torch_version": torch.__version__,
    }


def default_description(data, model_config: ModelConfig) -> str:
    names = ", ".join(d["name"] for d in data.datasets)
    return (
        f"VOILA ({model_config.name} preset) trained with `voila train` on {names} "
        f"({len(data.train_indices)} training cases, {len(data.class_names) - 1} structures)"
    )


def review_entry(config, data, statistics, calibration=None) -> dict[str, Any]:
    """The card's ``review`` entry (:mod:`voila.infer.review`): the calibration tables fitted on
    the whole validation cases (``calibration``: their :class:`CalibrationSample`) or read from
    the ``calibration`` file, and from the training cases (``statistics``:
    :func:`training_statistics`) where each structure lies and the classes' intensity profile."""
    from voila.infer.review import load_calibration

    if config.calibration != "validation":
        entry = load_calibration(config.calibration)
    elif calibration is not None and calibration.voxels:
        entry = {
            "calibration": calibration.fit(),
            "fitted_on": f"{calibration.cases} whole validation case(s), {calibration.voxels} body voxels",
        }
        joint = calibration.fit_joint()
        if joint is not None:
            entry["joint"] = joint
    else:
        reason = (
            "validation used the training cases"
            if data.validating_on_training_cases
            else "no validation cases"
        )
        entry = {"calibration": None, "fitted_on": f"not calibrated ({reason}): the review map shows 1 - p"}
    entry["places"] = statistics.places
    entry["intensity"] = statistics.profile.to_card()
    return entry


@dataclass
class TrainingStatistics:
    """What the review map keeps of the training cases: ``places`` (the card's ``places``) and
    ``profile`` (the classes' :class:`voila.infer.review.IntensityProfile`)."""

    places: dict[str, dict[str, list[float]]]
    profile: Any


def training_statistics(data, preprocessing, annotated=None) -> TrainingStatistics:
    """One pass over the training cases: the body-normalised centre of each structure in the cases
    that label it (:func:`voila.infer.review.place_statistics`) and each class's intensity profile
    over the body voxels, counted where a case annotates the class (``annotated``: training case
    index → the per-class flags to count; default each case's own, ``case.annotated``)."""
    from voila.infer.review import IntensityProfile, body_mask, body_normalised_centre, place_statistics

    centres: dict[str, list] = {}
    profile = IntensityProfile(data.class_names)
    for index in data.train_indices:
        case = data.cases[index]
        image, label = case.volumes()
        intensities = image[0].numpy()
        body = body_mask(intensities, preprocessing)
        values = label[0].numpy()
        flags = np.asarray(case.annotated if annotated is None else annotated[index], dtype=bool)
        profile.add(profile.bins(intensities[body], preprocessing), values[body], flags)
        affine = np.asarray(image.affine, dtype=np.float64)
        present = np.bincount(values.ravel(), minlength=len(data.class_names) + 1)
        for c in range(1, len(data.class_names)):
            if flags[c] and present[c]:
                centre = body_normalised_centre(values == c, body, affine)
                if centre is not None:
                    centres.setdefault(data.class_names[c], []).append(centre)
    return TrainingStatistics(place_statistics(centres), profile)


def export_model(
    path: Path,
    built: BuiltModel,
    record: dict[str, Any],
    config,
    data,
    model_config: ModelConfig,
    review: dict[str, Any] | None = None,
) -> Path:
    """Write ``built`` (weights already chosen) with its card, training record and ``review``
    entry to ``path``."""
    card = dict(
        built.card,
        review=review or {"calibration": None, "fitted_on": "not calibrated", "places": {}},
        training=record,
        description=config.description or default_description(data, model_config),
        intended_use=config.intended_use,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_model(path, built.model, card, built.text_cache)


def recalibrated(model_path: str | Path, calibration: str | Path, data: list[str], out: str | Path) -> Path:
    """A copy of the model file ``model_path`` at ``out`` whose card's ``review`` entry is
    replaced: the calibration table(s) of the file ``calibration`` (e.g. fitted by
    ``Testing/benchmarks/bench_heatmap.py`` on patients the model never saw), and the structures'
    places and (with a joint table) the classes' intensity profile in ``data`` (the datasets the
    model was trained on). Weights, text cache and the rest of the card are unchanged; ``out``
    must be a new file (the input is never replaced)."""
    from voila.data.preprocess import PreprocessingConfig
    from voila.infer.review import load_calibration
    from voila.model.model_file import load_model
    from voila.training.data import TrainingData
    from voila.vocabulary import Vocabulary

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new file for the recalibrated model")
    loaded = load_model(model_path)
    preprocessing = PreprocessingConfig.from_dict(loaded.card["preprocessing"])
    entry = load_calibration(calibration)
    cases = TrainingData.prepare(
        data,
        preprocessing,
        Vocabulary.load(),
        val_fraction=0.0,
        need_validation_cases=False,
        structures=list(loaded.card["classes"][1:]),
    )
    statistics = training_statistics(cases, preprocessing)
    entry["places"] = statistics.places
    if entry.get("joint"):
        entry["intensity"] = statistics.profile.to_card()
    return save_model(out, loaded.model, dict(loaded.card, review=entry), loaded.text_cache)
