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

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["color"] = list(self.color)
        return values


@dataclass
class SegmentationResult:
    """``labelmap`` uint8/uint16 and ``heatmap`` float32 (or None), both on the input grid."""

    labelmap: np.ndarray
    heatmap: np.ndarray | None
    affine: np.ndarray
    prompts: list[PromptResult]
    model: dict[str, Any]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON sidecar: label → prompt, structure, SNOMED code, colour, confidence, voxels, ml."""
        return {
            "labels": [p.to_dict() for p in self.prompts],
            "model": self.model,
            "shape": list(self.labelmap.shape),
            "affine": np.asarray(self.affine).tolist(),
            "seconds": round(self.seconds, 2),
            "warnings": list(self.warnings),
            "heatmap": "CAS complexity in [0, 1]: 1 = the model found the region hard / uncertain",
        }

    def table(self) -> str:
        """One line per prompt: label, prompt, structure, ml, confidence, found (or why not)."""
        lines = [f"{'label':>5}  {'prompt':<24} {'structure':<22} {'ml':>9} {'confidence':>10}  found"]
        for p in self.prompts:
            lines.append(
                f"{p.label:>5}  {p.prompt[:24]:<24} {(p.structure or 'open vocabulary')[:22]:<22} "
                f"{p.volume_ml:>9.1f} {p.confidence:>10.2f}  {'yes' if p.found else 'NOT FOUND: ' + p.note}"
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
        )
