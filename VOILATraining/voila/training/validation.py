"""Validation during training: sliding-window prediction of held-out cases, Dice per structure.

Each validation case goes through the same :func:`voila.infer.sliding_window.predict_grid` as
inference, on the model grid it was prepared on; a structure counts for a case only where the
case annotates it (partial labels).

    result = validate_cases(model, features, data.cases, data.val_indices, data.class_names,
                            patch_size=(96, 96, 96), overlap=0.5, device=device)
    result.mean, result.per_class["liver"]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from voila.infer.sliding_window import predict_grid


@dataclass
class ValidationPicture:
    """What ``validation.png`` shows: one case's CT, reference, prediction and heatmap ``(D, H, W)``."""

    case: str
    ct: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray
    heatmap: np.ndarray | None


@dataclass
class ValidationResult:
    mean: float  # mean over structures of the per-structure mean Dice (NaN when none was scored)
    per_class: dict[str, float]
    seconds: float
    picture: ValidationPicture | None = field(default=None, repr=False)


@torch.no_grad()
def validate_cases(
    model,
    class_features: torch.Tensor,
    cases: Sequence,
    indices: Sequence[int],
    class_names: Sequence[str],
    patch_size: Sequence[int],
    overlap: float,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    windows: int = 0,
    seed: int = 0,
    picture: bool = True,
    calibration=None,
    body_threshold: float = float("-inf"),
) -> ValidationResult:
    """Dice of every annotated structure of the cases at ``indices`` (:class:`PreparedCase`s).

    ``windows`` 0: each case whole, by sliding windows. Otherwise at most ``windows`` windows in
    all (spread over the cases, each centred on a labelled structure, the same ones every time for
    a given ``seed``), scored together: a bounded cost, so that frequent validation of a few-case
    run stays a small share of its time. The first case is kept as a picture (with its CAS
    heatmap; ``picture=False``: none, and no heatmap is computed). ``calibration``: a
    :class:`voila.infer.review.CalibrationSample` that receives each part's winning-class
    probability, wrong voxels and intensity novelty (annotated voxels of the body, image above
    ``body_threshold``).
    ``model`` is left in eval mode; the caller switches it back to training.
    """
    started = time.monotonic()
    model.eval()
    embeddings = model.class_embeddings(class_features).float()
    per_class: dict[int, list[float]] = {c: [] for c in range(1, len(class_names))}
    wants_picture = picture
    picture = None
    per_case = [0] * len(indices)
    for slot in range(windows):
        per_case[slot % max(len(indices), 1)] += 1
    for position, index in enumerate(indices):
        case = cases[index]
        image, label = (volume.as_tensor() for volume in case.volumes())
        if windows and not per_case[position]:
            continue
        parts = (
            _windows(image, label, patch_size, per_case[position], seed + index)
            if windows
            else [(image, label)]
        )
        overlap_sum = np.zeros(len(class_names))  # 2 |prediction ∩ reference| per class, over the parts
        size_sum = np.zeros(len(class_names))  # |prediction| + |reference|
        for part_image, part_label in parts:
            prediction = predict_grid(
                model,
                embeddings,
                part_image,
                patch_size,
                overlap=overlap,
                device=device,
                amp_dtype=amp_dtype,
                heatmap=wants_picture and picture is None,
            )
            predicted_volume = prediction.labels.numpy()
            reference_volume = part_label[0].numpy().astype(np.int64)
            known = reference_volume < len(class_names)  # outside the annotated region: not scored
            predicted, reference = predicted_volume[known], reference_volume[known]
            if calibration is not None:
                scored = known & (part_image[0].numpy() > body_threshold)
                novelty = calibration.novelty_map(part_image[0].numpy(), predicted_volume)
                calibration.add(
                    prediction.probability.numpy()[scored],
                    predicted_volume[scored] != reference_volume[scored],
                    None if novelty is None else novelty[scored],
                )
            both = np.bincount(reference[predicted == reference], minlength=len(class_names))
            overlap_sum += 2 * both[: len(class_names)]
            size_sum += np.bincount(predicted, minlength=len(class_names))[: len(class_names)]
            size_sum += np.bincount(reference, minlength=len(class_names))[: len(class_names)]
            if wants_picture and picture is None:
                heatmap = prediction.heatmap.numpy() if prediction.heatmap is not None else None
                picture = ValidationPicture(
                    f"{case.dataset}/{case.case_id}",
                    part_image[0].numpy(),
                    np.where(known, reference_volume, 0),
                    predicted_volume,
                    heatmap,
                )
        for c in range(1, len(class_names)):
            if bool(case.annotated[c]) and size_sum[c] > 0:  # absent from both: no score (as dice())
                per_class[c].append(float(overlap_sum[c] / size_sum[c]))
    scores = {class_names[c]: float(np.mean(v)) for c, v in per_class.items() if v}
    mean = float(np.mean(list(scores.values()))) if scores else float("nan")
    return ValidationResult(mean, scores, time.monotonic() - started, picture)


def _windows(image: torch.Tensor, label: torch.Tensor, patch_size: Sequence[int], count: int, seed: int):
    """``count`` windows ``[(image (1, p, p, p), label)]`` of a case, each centred on a labelled
    voxel (anywhere when there is none), the same ones for the same ``seed``."""
    generator = np.random.default_rng(seed)
    size = [min(int(p), int(n)) for p, n in zip(patch_size, image.shape[1:])]
    labelled = torch.nonzero(label[0] > 0)
    parts = []
    for _ in range(count):
        if len(labelled):
            centre = labelled[int(generator.integers(len(labelled)))].tolist()
        else:
            centre = [int(generator.integers(n)) for n in image.shape[1:]]
        start = [min(max(c - s // 2, 0), n - s) for c, s, n in zip(centre, size, image.shape[1:])]
        window = (slice(None), *(slice(a, a + s) for a, s in zip(start, size)))
        parts.append((image[window], label[window]))
    return parts
