"""What a segmentation gives: per-prompt results and the label map / heatmap on the input grid.

Plain data (numpy and the standard library only), so a GUI process can hold and read results
that a worker process computed without importing PyTorch (:mod:`voila.worker`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np


@dataclass
class PromptResult:
    """What one prompt gave. ``structure`` is the vocabulary name (None for free text); ``key``
    what the prompt is matched by (:func:`voila.vocabulary.class_key`)."""

    label: int
    prompt: str
    structure: str | None
    key: str
    display_name: str
    open_vocabulary: bool
    trained: bool
    snomed: dict[str, Any] | None
    snomed_code: str | None
    color: tuple[int, int, int]
    confidence: float
    voxels: int
    volume_ml: float
    found: bool
    note: str = ""
    predicted_dice: float | None = None  # expected quality from the review map's calibration
    check: bool = False  # "check this structure": low predicted Dice or an implausible place
    check_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["color"] = list(self.color)
        return values

    @property
    def status(self) -> str:
        """``found``, ``CHECK: why`` or ``NOT FOUND: why`` (tables, legends, Slicer)."""
        if not self.found:
            return "NOT FOUND: " + self.note
        return "CHECK: " + self.check_reason if self.check else "found"


# What a heatmap volume holds, by kind (the sidecar and the Slicer module say it in these words).
HEATMAP_KINDS = {
    "review": (
        "review map: a value v means that about v of the voxels with that value were labelled wrongly "
        "on patients the model was not trained on (calibrated from 1 - the winning class's probability and, "
        "where the model file has them, how foreign each voxel's intensity is to the class it was given)"
    ),
    "complexity": (
        "CAS complexity in [0, 1]: where the model's complexity decoder expects hard voxels (the map that "
        "steers VOILA's training sampling; it is not calibrated and finds errors less well than the review map)"
    ),
}


def heatmap_kind(value: bool | str | None) -> str | None:
    """``True`` → ``review`` (the map the product shows), ``False``/``None`` → None, or a kind."""
    if value is None or value is False:
        return None
    if value is True:
        return "review"
    if value not in HEATMAP_KINDS:
        raise ValueError(f"heatmap must be one of {', '.join(HEATMAP_KINDS)}, not {value!r}")
    return str(value)


@dataclass
class SegmentationResult:
    """``labelmap`` uint8/uint16 and ``heatmap`` float32 (or None), both on the input grid;
    ``heatmap_kind``: what the heatmap is (:data:`HEATMAP_KINDS`); ``calibration``: what the
    review map's calibration was fitted on."""

    labelmap: np.ndarray
    heatmap: np.ndarray | None
    affine: np.ndarray
    prompts: list[PromptResult]
    model: dict[str, Any]
    seconds: float
    warnings: list[str] = field(default_factory=list)
    heatmap_kind: str | None = None
    calibration: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON sidecar: label → prompt, structure, SNOMED code, colour, confidence, voxels, ml,
        predicted Dice and the "check this structure" flag."""
        return {
            "labels": [p.to_dict() for p in self.prompts],
            "model": self.model,
            "shape": list(self.labelmap.shape),
            "affine": np.asarray(self.affine).tolist(),
            "seconds": round(self.seconds, 2),
            "warnings": list(self.warnings),
            "heatmap_kind": self.heatmap_kind,
            "heatmap": HEATMAP_KINDS.get(self.heatmap_kind or "", "none computed"),
            "review_calibration": self.calibration,
        }

    def table(self) -> str:
        """One line per prompt: label, prompt, structure, ml, confidence, predicted Dice, and
        found / CHECK (with why) / NOT FOUND (with why)."""
        lines = [
            f"{'label':>5}  {'prompt':<24} {'structure':<22} {'ml':>9} {'confidence':>10} {'pred. Dice':>10}  result"
        ]
        for p in self.prompts:
            predicted = "-" if p.predicted_dice is None or not p.found else f"{p.predicted_dice:.2f}"
            lines.append(
                f"{p.label:>5}  {p.prompt[:24]:<24} {(p.structure or 'open vocabulary')[:22]:<22} "
                f"{p.volume_ml:>9.1f} {p.confidence:>10.2f} {predicted:>10}  {p.status}"
            )
        return "\n".join(lines)

    @classmethod
    def from_dict(
        cls, values: dict[str, Any], labelmap: np.ndarray, heatmap: np.ndarray | None
    ) -> SegmentationResult:
        """The inverse of :meth:`to_dict` (with the arrays that travel beside it)."""
        known = {f.name for f in fields(PromptResult)}
        prompts = [
            PromptResult(**dict({k: v for k, v in entry.items() if k in known}, color=tuple(entry["color"])))
            for entry in values["labels"]
        ]
        return cls(
            labelmap=labelmap,
            heatmap=heatmap,
            affine=np.asarray(values["affine"], dtype=np.float64),
            prompts=prompts,
            model=dict(values.get("model", {})),
            seconds=float(values.get("seconds", 0.0)),
            warnings=list(values.get("warnings", [])),
            heatmap_kind=values.get("heatmap_kind"),
            calibration=str(values.get("review_calibration", "")),
        )
