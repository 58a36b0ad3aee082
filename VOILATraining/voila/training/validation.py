"""Validation during training: sliding-window prediction of held-out cases, Dice per structure.

Each validation case goes through the same :func:`voila.infer.sliding_window.predict_grid` as
inference, on the model grid it was prepared on; a structure counts for a case only where the
case annotates it (partial labels).

    result = validate_cases(model, features, data.cases, data.val_indices, data.class_names,
                            patch_size=(96, 96, 96), overlap=0.5, device=device)
    result.mean, result.per_class["liver"]
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from voila.evaluate.metrics import dice
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
) -> ValidationResult:
    """Dice of every annotated structure of the cases at ``indices`` (:class:`PreparedCase`s).

    The first case is kept as a picture (with its CAS heatmap). ``model`` is left in eval mode;
    the caller switches it back to training.
    """
    started = time.monotonic()
    model.eval()
    embeddings = model.class_embeddings(class_features).float()
    per_class: dict[int, list[float]] = {c: [] for c in range(1, len(class_names))}
    picture = None
    for index in indices:
        case = cases[index]
        image, label = case.volumes()
        prediction = predict_grid(
            model,
            embeddings,
            image.as_tensor(),
            patch_size,
            overlap=overlap,
            device=device,
            amp_dtype=amp_dtype,
            heatmap=picture is None,
        )
        predicted = prediction.labels.numpy()
        reference = label.as_tensor()[0].numpy().astype(np.int64)
        for c in range(1, len(class_names)):
            if bool(case.annotated[c]):
                score = dice(predicted == c, reference == c)
                if not math.isnan(score):
                    per_class[c].append(score)
        if picture is None:
            heatmap = prediction.heatmap.numpy() if prediction.heatmap is not None else None
            picture = ValidationPicture(
                f"{case.dataset}/{case.case_id}", image.as_tensor()[0].numpy(), reference, predicted, heatmap
            )
    scores = {class_names[c]: float(np.mean(v)) for c, v in per_class.items() if v}
    mean = float(np.mean(list(scores.values()))) if scores else float("nan")
    return ValidationResult(mean, scores, time.monotonic() - started, picture)
