"""The review map: where a segmentation deserves a second look, with a meaning a person can read.

A value ``v`` of the review map means: on held-out patients, about ``v`` of the voxels that got this
value were labelled wrongly. It is a calibrated function of the model's own uncertainty, ``1 - p``
for the winning class ``p`` — measured to find the wrong voxels far better than the CAS complexity
heatmap (BENCHMARKS.md, "Where the model is wrong") — through an isotonic (monotone) table fitted on
validation data and stored in the model card. A model without a table shows ``1 - p`` itself,
which is what the table would be if the model were calibrated.

Per structure, the same table gives an expected quality: the predicted Dice of the structure's
region from the probabilities that its voxels are right and that nearby voxels should have been
its; below :data:`CHECK_BELOW` the structure is flagged "check this structure". A structure whose
centre lies far from where it lay in the training data is flagged too (an implausible place, such
as a liver found in the heart).

    table = fit_calibration(1 - probability, wrong)          # at training time, on held-out data
    review = apply_calibration(1 - probability, table)       # at inference, per voxel
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Structures whose predicted Dice is below this are flagged for checking.
CHECK_BELOW = 0.7
# Knots of a stored calibration table (fewer: smaller cards, plenty for a monotone curve).
TABLE_POINTS = 32
# A structure's centre this many standard deviations (per axis, body-normalised) from where it
# lay in training is an implausible place; the spread is at least MIN_SPREAD of the body.
PLACE_TOLERANCE = 3.0
MIN_SPREAD = 0.08


def fit_calibration(score: np.ndarray, wrong: np.ndarray, points: int = TABLE_POINTS) -> dict[str, list[float]]:
    """An isotonic map from ``score`` (higher: more likely wrong) to the observed share of wrong
    voxels (pool-adjacent-violators on score-sorted bins), as ``{"x": [...], "y": [...]}`` knots
    for :func:`apply_calibration`."""
    score = np.asarray(score, dtype=np.float64).ravel()
    wrong = np.asarray(wrong, dtype=np.float64).ravel()
    order = np.argsort(score, kind="stable")
    bins = np.array_split(order, min(points * 8, len(order)))  # fine bins, then PAV merges them
    x = np.array([score[b].mean() for b in bins if len(b)])
    y = np.array([wrong[b].mean() for b in bins if len(b)])
    weight = np.array([len(b) for b in bins if len(b)], dtype=np.float64)
    y = _pool_adjacent_violators(y, weight)
    keep = np.unique(np.linspace(0, len(x) - 1, min(points, len(x))).round().astype(int))
    return {"x": [float(v) for v in x[keep]], "y": [float(v) for v in y[keep]]}


def _pool_adjacent_violators(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence nearest ``values`` in weighted least squares."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values, weights):
        blocks.append([float(value), float(weight), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean_b, weight_b, count_b = blocks.pop()
            mean_a, weight_a, count_a = blocks.pop()
            total = weight_a + weight_b
            blocks.append([(mean_a * weight_a + mean_b * weight_b) / total, total, count_a + count_b])
    return np.concatenate([np.full(int(count), mean) for mean, _, count in blocks])


def apply_calibration(score: np.ndarray, table: Mapping[str, Sequence[float]] | None) -> np.ndarray:
    """Per-voxel probability of being wrong (float32, [0, 1]); the score itself without a table."""
    score = np.asarray(score, dtype=np.float32)
    if not table:
        return np.clip(score, 0.0, 1.0)
    return np.interp(score, table["x"], table["y"]).astype(np.float32)


@dataclass
class StructureQuality:
    """Expected quality of one structure's result: ``predicted_dice`` in [0, 1], ``review_share``
    (share of its voxels the review map marks above 0.5), ``check`` and why."""

    predicted_dice: float
    review_share: float
    check: bool
    reason: str


def structure_quality(
    mine: np.ndarray,
    wrong_probability: np.ndarray,
    runner_up_is_mine: np.ndarray,
    centre: np.ndarray | None = None,
    expected_place: Mapping[str, Sequence[float]] | None = None,
) -> StructureQuality:
    """Predicted Dice of a structure from the review map on the model grid.

    ``mine``: its voxels; ``wrong_probability``: the calibrated map; ``runner_up_is_mine``: voxels
    that went to another class with this structure second (those are its voxels with probability
    about ``wrong_probability``). Expected true positives ``Σ_mine (1 - q)``, expected missed
    ``Σ_runner-up (q)``: Dice ≈ 2 TP / (|mine| + TP + missed). ``centre`` / ``expected_place``:
    the structure's body-normalised centre and the training data's ``{"mean", "spread"}``.
    """
    count = int(mine.sum())
    if count == 0:
        return StructureQuality(0.0, 0.0, False, "")
    q_mine = wrong_probability[mine]
    true_positive = float((1.0 - q_mine).sum())
    missed = float(wrong_probability[runner_up_is_mine].sum())
    predicted = 2.0 * true_positive / max(count + true_positive + missed, 1e-9)
    share = float((q_mine > 0.5).mean())
    reasons = []
    if predicted < CHECK_BELOW:
        reasons.append(f"predicted Dice {predicted:.2f} below {CHECK_BELOW}")
    if centre is not None and expected_place:
        mean = np.asarray(expected_place["mean"], dtype=np.float64)
        spread = np.maximum(np.asarray(expected_place["spread"], dtype=np.float64), MIN_SPREAD)
        distance = np.abs(np.asarray(centre, dtype=np.float64) - mean) / spread
        if float(distance.max()) > PLACE_TOLERANCE:
            axis = "left-right front-back head-feet".split()[int(distance.argmax())]
            reasons.append(f"found far from where it lies in the training data ({axis})")
    return StructureQuality(round(predicted, 4), round(share, 4), bool(reasons), "; ".join(reasons))


def body_normalised_centre(mask: np.ndarray, body: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
    """Centre of ``mask`` in world RAS, as a fraction (0..1 per axis) of the body's world extent."""
    if not mask.any() or not body.any():
        return None

    def world(points: np.ndarray) -> np.ndarray:
        return (np.asarray(affine)[:3, :3] @ points.T).T + np.asarray(affine)[:3, 3]

    centre = world(np.argwhere(mask).mean(axis=0, keepdims=True))[0]
    corners = world(np.array([np.argwhere(body).min(0), np.argwhere(body).max(0)], dtype=float))
    low, high = corners.min(0), corners.max(0)
    return (centre - low) / np.maximum(high - low, 1e-6)
