"""The review map: where a segmentation deserves a second look, with a meaning a person can read.

A value ``v`` of the review map means: on held-out patients, about ``v`` of the voxels that got this
value were labelled wrongly. It is a calibrated function of the model's own uncertainty, ``1 - p``
for the winning class ``p`` — measured to find the wrong voxels far better than the CAS complexity
heatmap (BENCHMARKS.md, "Where the model is wrong") — through an isotonic (monotone) table fitted on
validation data and stored in the model card. A model without a table shows ``1 - p`` itself,
which is what the table would be if the model were calibrated.

**What the model has not seen** (BENCHMARKS.md §7): much of a model's error on a new patient is
*confident* — a contrast-filled aorta or kidney that the model, trained on unenhanced scans, calls
background without doubt; ``1 - p`` cannot see it. So the card also keeps each class's **intensity
profile** (the share of its voxels in each 25 HU bin, from the training cases' labels) and the
review map is a **joint table** ``P(wrong | 1 - p, intensity novelty)`` where the novelty of a voxel
is how rare its intensity was for the class it was given (``1 - density / the class's densest
bin``, averaged over a 3³ block of the model grid, 0 outside the body). The table is fitted like
the one-dimensional one and kept non-decreasing in both (more doubt, or a more foreign intensity,
never means less likely wrong). A card without a profile or joint table shows calibrated ``1 - p``
as before.

Per structure, the same table gives an expected quality: the predicted Dice of the structure's
region from the probabilities that its voxels are right and that nearby voxels should have been
its; below :data:`CHECK_BELOW` the structure is flagged "check this structure". A structure whose
centre lies far, left-right or front-back, from where it lay in the training data is flagged too (an
implausible place, such as a liver found in the heart). Head-feet is not checked: where a structure
lies along the body depends on how much of the body the scan covers.

The model card's ``review`` entry holds both::

    {"calibration": {"x": [...], "y": [...]} or null, "fitted_on": "what the table was fitted on",
     "joint": {"doubt": [edges], "novelty": [edges], "wrong": [[...], ...]} (optional),
     "intensity": {"hu": [low, high, step], "density": {class name: [share per bin]}} (optional),
     "places": {class name: {"mean": [lr, ap], "spread": [lr, ap]}}}

    table = fit_calibration(1 - probability, wrong)          # at training time, on held-out data
    review = review_map(probability, {"calibration": table})  # at inference, per voxel
    profile = IntensityProfile.from_card(card["review"]["intensity"], classes)
    review = review_map(probability, card["review"], profile.novelty_map(bins, winner))
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voila.errors import ConfigError

# Structures whose predicted Dice is below this are flagged for checking.
CHECK_BELOW = 0.7
# Knots of a stored calibration table (fewer: smaller cards, plenty for a monotone curve).
TABLE_POINTS = 32
# A structure's centre this many standard deviations (per axis, body-normalised) from where it
# lay in training is an implausible place; the spread is at least MIN_SPREAD of the body.
PLACE_TOLERANCE = 3.0
MIN_SPREAD = 0.08
# The axes (world RAS) a place is checked on: left-right and front-back.
PLACE_AXES = (0, 1)
PLACE_AXIS_NAMES = ("left-right", "front-back")
# At most this many voxels (a random sample) fit a calibration table.
CALIBRATION_SAMPLE = 2_000_000
# The intensity profile's bins: Hounsfield units from the body threshold up, 25 HU wide (plus one
# bin below and one above).
PROFILE_HU = (-500.0, 1500.0, 25.0)
# The most bins a stored profile may have (a voxel's bin is kept in one byte).
PROFILE_MAX_BINS = 256
# The intensity novelty is averaged over blocks of this many voxels per axis (model grid).
NOVELTY_BLOCK = 3
# Bins per axis of a joint table (quantiles of the fitting data), and the most a card may hold.
JOINT_BINS = 12
JOINT_MAX_BINS = 64
# Share of the raw score mixed into a calibrated value, so that the review map rises wherever
# ``1 - p`` rises: a table's flat steps would tie voxels the model ranks apart (BENCHMARKS.md §7:
# the AUROC of a table with steps fell 0.04 below that of 1 - p). It moves a value by at most this.
TIE_BREAK = 0.01


def fit_calibration(
    score: np.ndarray, wrong: np.ndarray, points: int = TABLE_POINTS
) -> dict[str, list[float]]:
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
    # one knot per pooled block, at its weighted centre: a curve that rises between the blocks
    # instead of a staircase (interpolated isotonic regression)
    starts = np.flatnonzero(np.r_[True, np.diff(y) != 0])
    sizes = np.add.reduceat(weight, starts)
    x = np.add.reduceat(x * weight, starts) / sizes
    y = y[starts]
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
    """Per-voxel probability of being wrong (float32, [0, 1]); the score itself without a table.

    Strictly increasing in ``score`` (the table, with :data:`TIE_BREAK` of the score mixed in):
    the map orders voxels exactly as the model's own uncertainty does."""
    score = np.clip(np.asarray(score, dtype=np.float32), 0.0, 1.0)
    if not table:
        return score
    share = np.interp(score, table["x"], table["y"])
    return ((1.0 - TIE_BREAK) * share + TIE_BREAK * score).astype(np.float32)


def check_table(table: Any, where: str) -> dict[str, list[float]]:
    """A calibration table as stored (``{"x", "y"}``: increasing scores in [0, 1], shares in
    [0, 1], at most 1000 knots), or :class:`~voila.errors.ConfigError` saying what is wrong."""
    try:
        x = [float(v) for v in table["x"]]
        y = [float(v) for v in table["y"]]
    except (TypeError, KeyError, ValueError):
        raise ConfigError(f'{where}: a calibration table is {{"x": [...], "y": [...]}} of numbers') from None
    ok = 1 <= len(x) == len(y) <= 1000 and all(0 <= v <= 1 for v in x + y)
    if not ok or any(b < a for a, b in zip(x, x[1:])) or any(b < a for a, b in zip(y, y[1:])):
        raise ConfigError(
            f"{where}: the calibration table needs 1-1000 knots, x and y non-decreasing within [0, 1]"
        )
    return {"x": x, "y": y}


def load_calibration(path: str | os.PathLike) -> dict[str, Any]:
    """A calibration file ``{"calibration": table, "fitted_on": "...", "joint": table (optional)}``
    (JSON, at most 1 MB)."""
    path = Path(path)
    try:
        if path.stat().st_size > 1 << 20:
            raise ConfigError(f"calibration file {path} is over 1 MB; it holds one small table")
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"calibration {path}: {error}; give 'validation' or a JSON calibration file"
        ) from None
    if not isinstance(content, dict) or "calibration" not in content:
        raise ConfigError(f"calibration file {path} has no 'calibration' table")
    entry = {
        "calibration": check_table(content["calibration"], str(path)),
        "fitted_on": str(content.get("fitted_on", path.name))[:500],
    }
    if content.get("joint") is not None:
        entry["joint"] = check_joint_table(content["joint"], str(path))
    return entry


def review_map(
    probability: np.ndarray, review: Mapping[str, Any] | None, novelty: np.ndarray | None = None
) -> np.ndarray:
    """The review map from the winning class's probability ``p`` (any shape) and the card's
    ``review`` entry: the joint table of ``1 - p`` and the intensity ``novelty`` (same shape) where
    the card has one and the novelty is given, else calibrated ``1 - p``."""
    doubt = 1.0 - np.asarray(probability, dtype=np.float32)
    review = review or {}
    if review.get("joint") and novelty is not None:
        return apply_joint_calibration(doubt, novelty, review["joint"])
    return apply_calibration(doubt, review.get("calibration"))


def fit_joint_calibration(
    doubt: np.ndarray, novelty: np.ndarray, wrong: np.ndarray, bins: int = JOINT_BINS
) -> dict[str, Any]:
    """``P(wrong | doubt, novelty)`` on a grid of quantile bins, non-decreasing along both, as
    ``{"doubt": edges, "novelty": edges, "wrong": rows}`` for :func:`apply_joint_calibration`.
    Each cell starts from one voxel at the overall share (sparse cells lean to it)."""
    doubt = np.asarray(doubt, dtype=np.float64).ravel()
    novelty = np.asarray(novelty, dtype=np.float64).ravel()
    wrong = np.asarray(wrong, dtype=np.float64).ravel()
    quantiles = np.linspace(0, 1, bins + 1)[1:-1]
    edges = [np.unique(np.quantile(values, quantiles)) for values in (doubt, novelty)]
    rows, columns = (np.digitize(values, e) for values, e in zip((doubt, novelty), edges))
    count = np.ones((len(edges[0]) + 1, len(edges[1]) + 1))
    hits = np.full_like(count, wrong.mean())
    np.add.at(count, (rows, columns), 1.0)
    np.add.at(hits, (rows, columns), wrong)
    rate = _isotonic_2d(hits / count, count)
    return {
        "doubt": [float(v) for v in edges[0]],
        "novelty": [float(v) for v in edges[1]],
        "wrong": [[round(float(v), 5) for v in row] for row in rate],
    }


def _isotonic_2d(rate: np.ndarray, weight: np.ndarray, rounds: int = 20) -> np.ndarray:
    """``rate`` made non-decreasing along both axes: weighted isotonic fits of the rows and the
    columns in turn, then a running maximum along each (which keeps both orders exactly)."""
    rate = rate.copy()
    for _ in range(rounds):
        for i in range(rate.shape[0]):
            rate[i] = _pool_adjacent_violators(rate[i], weight[i])
        for j in range(rate.shape[1]):
            rate[:, j] = _pool_adjacent_violators(rate[:, j], weight[:, j])
    return np.maximum.accumulate(np.maximum.accumulate(rate, axis=0), axis=1)


def apply_joint_calibration(doubt: np.ndarray, novelty: np.ndarray, table: Mapping[str, Any]) -> np.ndarray:
    """Per-voxel probability of being wrong (float32, [0, 1]) from the joint table, with
    :data:`TIE_BREAK` of ``doubt`` mixed in (voxels of one cell keep the model's order)."""
    doubt = np.clip(np.asarray(doubt, dtype=np.float32), 0.0, 1.0)
    novelty = np.clip(np.asarray(novelty, dtype=np.float32), 0.0, 1.0)
    rate = np.asarray(table["wrong"], dtype=np.float32)
    share = rate[np.digitize(doubt, table["doubt"]), np.digitize(novelty, table["novelty"])]
    return ((1.0 - TIE_BREAK) * share + TIE_BREAK * doubt).astype(np.float32)


def check_joint_table(table: Any, where: str) -> dict[str, Any]:
    """A joint table as stored, or :class:`~voila.errors.ConfigError` saying what is wrong."""
    try:
        doubt = [float(v) for v in table["doubt"]]
        novelty = [float(v) for v in table["novelty"]]
        size = (len(doubt) + 1, len(novelty) + 1)
        ok = max(size) <= JOINT_MAX_BINS + 1 and len(table["wrong"]) == size[0]
        wrong = [[float(v) for v in row] for row in table["wrong"]] if ok else []
    except (TypeError, KeyError, ValueError):
        raise ConfigError(
            f'{where}: a joint table is {{"doubt": [...], "novelty": [...], "wrong": [[...]]}} of numbers'
        ) from None
    ok = ok and all(len(row) == size[1] for row in wrong)
    values = [*doubt, *novelty, *(v for row in wrong for v in row)]
    ok = ok and all(0 <= v <= 1 for v in values)
    ok = ok and all(b >= a for e in (doubt, novelty) for a, b in zip(e, e[1:]))
    if not ok:
        raise ConfigError(
            f"{where}: the joint table needs at most {JOINT_MAX_BINS} increasing edges per axis within "
            "[0, 1] and one share in [0, 1] per cell"
        )
    return {"doubt": doubt, "novelty": novelty, "wrong": wrong}


class IntensityProfile:
    """Per class, the share of its voxels in each intensity bin (:data:`PROFILE_HU`), and the
    intensity novelty of a voxel given a class.

    ``density``: ``(classes, bins)`` shares per row (a row of NaN: no profile; such a class's
    voxels get novelty 0, nothing known against them). Counts start at one per bin."""

    def __init__(self, classes: Sequence[str], hu: Sequence[float] = PROFILE_HU) -> None:
        self.classes = list(classes)
        self.hu = tuple(float(v) for v in hu)
        low, high, step = self.hu
        self.edges = np.arange(low, high + step / 2, step)
        self.counts = np.zeros((len(self.classes), len(self.edges) + 1))
        self.density = np.full(self.counts.shape, np.nan)

    def bins(self, image: np.ndarray, preprocessing) -> np.ndarray:
        """The bin of each voxel (uint8, ``image``'s shape) of a normalised model-grid ``image``:
        the HU edges are normalised as the CT was (``preprocessing.normalise``)."""
        edges = [preprocessing.normalise(float(hu)) for hu in self.edges]
        return np.digitize(np.asarray(image, dtype=np.float32), edges).astype(np.uint8)

    def add(self, bins: np.ndarray, labels: np.ndarray, annotated: Sequence[bool] | None = None) -> None:
        """Count voxels ``bins`` of ``labels`` (class indices; only ``annotated`` classes count)."""
        bins, labels = np.asarray(bins).ravel(), np.asarray(labels).ravel()
        inside = labels < len(self.classes)
        if annotated is not None:
            inside &= np.asarray(annotated, dtype=bool)[np.minimum(labels, len(annotated) - 1)]
        np.add.at(self.counts, (labels[inside], bins[inside].astype(np.intp)), 1.0)
        seen = self.counts.sum(1) > 0
        smoothed = self.counts[seen] + 1.0
        self.density[seen] = smoothed / smoothed.sum(1, keepdims=True)

    def novelty(self, bins: np.ndarray, winner: np.ndarray) -> np.ndarray:
        """``1 - density / the class's densest bin`` (float32, in [0, 1]) of each voxel's bin
        for its class ``winner`` (indices into :attr:`classes`; others get 0)."""
        bins = np.asarray(bins).astype(np.intp)
        winner = np.asarray(winner).astype(np.intp)
        known = (winner >= 0) & (winner < len(self.classes))
        known[known] &= ~np.isnan(self.density[winner[known], 0])
        novelty = np.zeros(winner.shape, dtype=np.float32)
        peak = np.where(np.isnan(self.density), -1.0, self.density).max(axis=1)
        rows = winner[known]
        novelty[known] = 1.0 - self.density[rows, bins[known]] / peak[rows]
        return np.clip(novelty, 0.0, 1.0)

    def novelty_map(self, bins: np.ndarray, winner: np.ndarray, body: np.ndarray | None = None) -> np.ndarray:
        """The regional novelty of a volume (float32, ``bins``' 3-D shape): :meth:`novelty` of
        each voxel averaged over :data:`NOVELTY_BLOCK`³ voxels — a structure whose intensity is
        foreign throughout, not a voxel at a bin's edge (BENCHMARKS.md §7: better on all five
        unseen-patient pairs than the voxel's own, and without its salt-and-pepper). Voxels
        outside ``body`` (bool, same shape: air, lungs, bowel gas; the profiles count the body
        only) count as 0."""
        from scipy.ndimage import uniform_filter

        novelty = self.novelty(bins, winner)
        if body is not None:
            novelty[~np.asarray(body, dtype=bool)] = 0.0
        return uniform_filter(novelty, NOVELTY_BLOCK, mode="nearest")

    def to_card(self) -> dict[str, Any]:
        return {
            "hu": list(self.hu),
            "density": {
                name: [round(float(v), 6) for v in row]
                for name, row in zip(self.classes, self.density)
                if not np.isnan(row[0])
            },
        }

    @classmethod
    def from_card(cls, entry: Mapping[str, Any], classes: Sequence[str]) -> IntensityProfile:
        """The profile of a card's ``intensity`` entry for the model's ``classes`` (in order)."""
        profile = cls(classes, entry["hu"])
        for index, name in enumerate(profile.classes):
            row = entry["density"].get(name)
            if row is not None:
                profile.density[index] = np.asarray(row, dtype=np.float64)
        return profile

    def merged(self, other: IntensityProfile) -> IntensityProfile:
        """This profile, with ``other``'s rows for the classes this one has none of."""
        missing = [i for i, name in enumerate(self.classes) if np.isnan(self.density[i, 0])]
        for index in missing:
            if self.classes[index] in other.classes and other.hu == self.hu:
                self.density[index] = other.density[other.classes.index(self.classes[index])]
        return self


def check_intensity_profile(entry: Any, where: str) -> None:
    """The card's ``intensity`` entry as stored, or :class:`~voila.errors.ConfigError`."""
    try:
        low, high, step = (float(v) for v in entry["hu"])
        bins = int(round((high - low) / step)) + 2 if step > 0 and high > low else 0
        rows = dict(entry["density"])
        ok = 2 < bins <= PROFILE_MAX_BINS and len(rows) <= 10000
        ok = ok and all(
            isinstance(row, list) and len(row) == bins and all(0 <= float(v) <= 1 for v in row)
            for row in rows.values()
        )
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f'{where}: the intensity profile is {{"hu": [low, high, step], "density": {{class: [shares]}}}}, '
            f"at most {PROFILE_MAX_BINS} bins, one share in [0, 1] per bin"
        )


def body_mask(image: np.ndarray, preprocessing) -> np.ndarray:
    """The body on a model grid: voxels of the normalised ``image`` above the preprocessing's
    foreground threshold (-500 HU by default)."""
    return np.asarray(image) > preprocessing.normalise(preprocessing.foreground_threshold)


class CalibrationSample:
    """Collects ``(1 - p, wrong)`` pairs from validation cases (a bounded random sample) and fits
    the table; with an intensity ``profile`` (and the ``preprocessing`` to read intensities) also
    each voxel's regional novelty (:meth:`novelty_map`), for the joint table."""

    def __init__(
        self, limit: int = CALIBRATION_SAMPLE, seed: int = 0, profile: IntensityProfile | None = None,
        preprocessing=None,
    ) -> None:  # fmt: skip
        self.limit, self.rng = limit, np.random.default_rng(seed)
        self.profile, self.preprocessing = profile, preprocessing
        self.scores: list[np.ndarray] = []
        self.wrong: list[np.ndarray] = []
        self.novelty: list[np.ndarray] = []
        self.cases = 0

    def novelty_map(self, image: np.ndarray, winner: np.ndarray) -> np.ndarray | None:
        """The regional novelty of a normalised volume ``image`` given its winning classes
        ``winner`` (same 3-D shape), or None without a profile."""
        if self.profile is None:
            return None
        bins = self.profile.bins(image, self.preprocessing)
        return self.profile.novelty_map(bins, winner, body_mask(image, self.preprocessing))

    def add(self, probability: np.ndarray, wrong: np.ndarray, novelty: np.ndarray | None = None) -> None:
        """One case's winning-class probabilities and wrong-voxel mask (body voxels, flat), and
        their novelty (same voxels; :meth:`novelty_map`)."""
        score = 1.0 - np.asarray(probability, dtype=np.float32).ravel()
        wrong = np.asarray(wrong, dtype=bool).ravel()
        novelty = None if novelty is None else np.asarray(novelty, dtype=np.float32).ravel()
        if len(score) > self.limit:
            keep = self.rng.choice(len(score), self.limit, replace=False)
            score, wrong = score[keep], wrong[keep]
            novelty = None if novelty is None else novelty[keep]
        self.scores.append(score)
        self.wrong.append(wrong)
        if novelty is not None:
            self.novelty.append(novelty)
        self.cases += 1

    def fit_joint(self) -> dict[str, Any] | None:
        """The joint table of ``1 - p`` and novelty, or None without novelties for every case."""
        if not self.voxels or len(self.novelty) != len(self.scores):
            return None
        return fit_joint_calibration(
            np.concatenate(self.scores), np.concatenate(self.novelty), np.concatenate(self.wrong)
        )

    @property
    def voxels(self) -> int:
        return int(sum(len(s) for s in self.scores))

    def fit(self) -> dict[str, list[float]] | None:
        """The calibration table, or None without any voxel."""
        if not self.voxels:
            return None
        return fit_calibration(np.concatenate(self.scores), np.concatenate(self.wrong))


def place_statistics(centres: Mapping[str, Sequence[np.ndarray]]) -> dict[str, dict[str, list[float]]]:
    """``{class: [body-normalised centre (3,), one per case]}`` → the card's ``places``: mean
    and spread (standard deviation, at least :data:`MIN_SPREAD`) on :data:`PLACE_AXES`."""
    places = {}
    for name, values in centres.items():
        if not len(values):
            continue
        stacked = np.asarray(values, dtype=np.float64)[:, PLACE_AXES]
        places[name] = {
            "mean": [round(float(v), 4) for v in stacked.mean(0)],
            "spread": [round(float(max(v, MIN_SPREAD)), 4) for v in stacked.std(0)],
        }
    return places


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
    the structure's body-normalised centre ``(3,)`` and the training data's ``{"mean", "spread"}``
    on :data:`PLACE_AXES`.
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
    if round(predicted, 2) < CHECK_BELOW:  # judged as shown (two decimals): never "0.70 below 0.7"
        reasons.append(f"predicted Dice {predicted:.2f} below {CHECK_BELOW}")
    if centre is not None and expected_place:
        mean = np.asarray(expected_place["mean"], dtype=np.float64)
        spread = np.maximum(np.asarray(expected_place["spread"], dtype=np.float64), MIN_SPREAD)
        distance = np.abs(np.asarray(centre, dtype=np.float64)[list(PLACE_AXES)] - mean) / spread
        if float(distance.max()) > PLACE_TOLERANCE:
            axis = PLACE_AXIS_NAMES[int(distance.argmax())]
            reasons.append(f"found far ({axis}) from where it lay in the training data")
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
