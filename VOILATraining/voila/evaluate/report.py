"""Evaluation results: per-case rows, per-class means, and the files they are written to.

``write_report(report, out_dir)`` writes, each atomically:

- ``metrics_per_case.csv`` — ``case, class, dice, nsd, hd95_mm, ref_voxels, pred_voxels``; a class
  absent from a case's reference has no row; ``hd95_mm`` is ``nan`` when nothing was predicted;
- ``summary.md`` — one table row per class (mean Dice, NSD, HD95, cases, missed) and the mean over
  classes;
- ``summary.json`` — the same numbers (``null`` for undefined) plus the conventions used;
- ``boxplots.png`` — Dice and NSD per class (horizontal boxes when there are many classes).
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from voila.data.io import atomic_path
from voila.errors import OutputError
from voila.outputs import OutputSet

GENERATOR = "voila evaluate"

CONVENTIONS = (
    "DeepMind surface-distance conventions: surfel-area-weighted surface distances in mm on the "
    "voxel-boundary (marching-cubes) surface; NSD = fraction of both surfaces' area within the "
    "tolerance; HD95 = larger directed area-weighted 95th percentile. TotalSegmentator protocol: "
    "classes absent from a case's reference are excluded; an empty prediction scores Dice 0 and "
    "NSD 0 and is left out of HD95 (counted as missed); per-class means over cases, then the mean "
    "over classes."
)

CSV_COLUMNS = ("case", "class", "dice", "nsd", "hd95_mm", "ref_voxels", "pred_voxels")


@dataclass(frozen=True)
class CaseClassResult:
    """One class in one case whose reference is not empty. ``hd95_mm`` is NaN if nothing was predicted."""

    case: str
    class_name: str
    dice: float
    nsd: float
    hd95_mm: float
    ref_voxels: int
    pred_voxels: int


@dataclass(frozen=True)
class ClassSummary:
    """Means of one class over the cases whose reference contains it.

    ``hd95_mm`` averages the ``n_cases - n_missed`` cases with a prediction (NaN if none).
    """

    name: str
    dice: float
    nsd: float
    hd95_mm: float
    n_cases: int
    n_missed: int


@dataclass(frozen=True)
class EvaluationReport:
    """Everything one evaluation found; ``classes`` lists the scored classes in reference order."""

    rows: tuple[CaseClassResult, ...]
    classes: tuple[ClassSummary, ...]
    not_scored: tuple[str, ...]
    cases: tuple[str, ...]
    tolerance_mm: float
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[CaseClassResult],
        class_order: Sequence[str],
        tolerance_mm: float,
        cases: Sequence[str],
        warnings: Sequence[str] = (),
    ) -> EvaluationReport:
        by_class: dict[str, list[CaseClassResult]] = {}
        for row in rows:
            by_class.setdefault(row.class_name, []).append(row)
        summaries, not_scored = [], []
        for name in class_order:
            own = by_class.get(name, [])
            if not own:
                not_scored.append(name)
                continue
            summaries.append(
                ClassSummary(
                    name=name,
                    dice=float(np.mean([row.dice for row in own])),
                    nsd=float(np.mean([row.nsd for row in own])),
                    hd95_mm=_nanmean([row.hd95_mm for row in own]),
                    n_cases=len(own),
                    n_missed=sum(1 for row in own if row.pred_voxels == 0),
                )
            )
        return cls(
            tuple(rows),
            tuple(summaries),
            tuple(not_scored),
            tuple(cases),
            float(tolerance_mm),
            tuple(warnings),
        )

    @property
    def mean_dice(self) -> float:
        """Mean over classes of the per-class mean Dice (NaN if no class was scored)."""
        return _nanmean([c.dice for c in self.classes])

    @property
    def mean_nsd(self) -> float:
        return _nanmean([c.nsd for c in self.classes])

    @property
    def mean_hd95_mm(self) -> float:
        """Mean over the classes that have an HD95 (at least one case with a prediction)."""
        return _nanmean([c.hd95_mm for c in self.classes])

    def to_dict(self) -> dict:
        """JSON-ready summary; undefined numbers are ``None``."""
        return {
            "written_by": GENERATOR,
            "tolerance_mm": self.tolerance_mm,
            "conventions": CONVENTIONS,
            "n_cases": len(self.cases),
            "cases": list(self.cases),
            "mean": {
                "dice": _json_number(self.mean_dice),
                "nsd": _json_number(self.mean_nsd),
                "hd95_mm": _json_number(self.mean_hd95_mm),
                "n_classes": len(self.classes),
            },
            "classes": {
                c.name: {key: _json_number(value) for key, value in asdict(c).items() if key != "name"}
                for c in self.classes
            },
            "not_scored": list(self.not_scored),
            "warnings": list(self.warnings),
        }

    def markdown(self) -> str:
        """The summary table: one row per class, then the mean over classes."""
        tolerance = f"{self.tolerance_mm:g}"
        lines = [
            f"| class | Dice | NSD @ {tolerance} mm | HD95 (mm) | cases | missed |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for c in self.classes:
            lines.append(
                f"| {c.name} | {_fmt(c.dice)} | {_fmt(c.nsd)} | {_fmt(c.hd95_mm, 2)} | {c.n_cases} | {c.n_missed} |"
            )
        lines.append(
            f"| **mean over {len(self.classes)} classes** | **{_fmt(self.mean_dice)}** | "
            f"**{_fmt(self.mean_nsd)}** | **{_fmt(self.mean_hd95_mm, 2)}** | {len(self.cases)} | |"
        )
        text = "\n".join(lines) + "\n"
        if self.not_scored:
            shown = ", ".join(self.not_scored[:15]) + (" ..." if len(self.not_scored) > 15 else "")
            text += (
                f"\n{len(self.not_scored)} class(es) absent from every reference case, not scored: {shown}\n"
            )
        return text

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in self.rows:
            writer.writerow(
                [
                    row.case,
                    row.class_name,
                    f"{row.dice:.6f}",
                    f"{row.nsd:.6f}",
                    "nan" if math.isnan(row.hd95_mm) else f"{row.hd95_mm:.4f}",
                    row.ref_voxels,
                    row.pred_voxels,
                ]
            )
        return buffer.getvalue()


REPORT_FILES = {
    "csv": "metrics_per_case.csv",
    "markdown": "summary.md",
    "json": "summary.json",
    "boxplots": "boxplots.png",
}


def report_outputs(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike] = ()) -> OutputSet:
    """The report's files as one :class:`~voila.outputs.OutputSet`: an existing report is replaced
    only when its ``summary.json`` says ``voila evaluate`` wrote it."""
    out_dir = Path(out_dir)
    try:
        earlier = json.loads((out_dir / REPORT_FILES["json"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    ours = isinstance(earlier, dict) and earlier.get("written_by") == GENERATOR
    outputs = OutputSet(
        GENERATOR, inputs=inputs, owns=lambda path: ours and path.name in REPORT_FILES.values()
    )
    for what, name in REPORT_FILES.items():
        outputs.add(out_dir / name, f"report {what}")
    return outputs


def create_report_folder(out_dir: str | os.PathLike) -> None:
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"cannot create the report folder {out_dir}: {error.strerror or error}; choose another folder"
        ) from None


def write_report(
    report: EvaluationReport, out_dir: str | os.PathLike, outputs: OutputSet | None = None
) -> dict[str, Path]:
    """Write the CSV, markdown, JSON and box plots into ``out_dir`` (created if needed), together
    or not at all (:mod:`voila.outputs`)."""
    out_dir = Path(out_dir)
    if outputs is None:
        create_report_folder(out_dir)
        outputs = report_outputs(out_dir)
        outputs.check()
    summary = (
        f"# VOILA evaluation\n\n{len(report.cases)} case(s), NSD tolerance {report.tolerance_mm:g} mm.\n\n"
        f"{report.markdown()}\n{CONVENTIONS}\n"
    )
    texts = {
        "csv": report.csv_text(),
        "markdown": summary,
        "json": json.dumps(report.to_dict(), indent=2) + "\n",
    }
    files = {what: out_dir / name for what, name in REPORT_FILES.items()}
    with outputs.writing() as temporary:
        for what, text in texts.items():
            temporary[files[what]].write_text(text, encoding="utf-8")
        write_boxplots(report, temporary[files["boxplots"]], atomic=False)
    return files


def write_boxplots(report: EvaluationReport, path: str | os.PathLike, atomic: bool = True) -> Path:
    """Box plots of the per-case Dice and NSD of every class; horizontal when there are many classes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [c.name for c in report.classes]
    horizontal = len(names) > 8
    panels = (("Dice", "dice"), (f"NSD @ {report.tolerance_mm:g} mm", "nsd"))
    if horizontal:
        figure = Figure(figsize=(11, max(3.0, 0.26 * len(names) + 1.5)))
    else:
        figure = Figure(figsize=(max(6.0, 1.2 * len(names) + 2), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=horizontal)
    for ax, (title, attribute) in zip(axes, panels):
        by_class: dict[str, list[float]] = {name: [] for name in names}
        for row in report.rows:
            by_class.setdefault(row.class_name, []).append(getattr(row, attribute))
        values = [by_class[name] for name in names]
        if names:
            ax.boxplot(values, widths=0.6, flierprops={"markersize": 3}, **_orientation(ax, horizontal))
        ticks = list(range(1, len(names) + 1))
        if horizontal:
            ax.set_yticks(ticks, names, fontsize=7)
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(len(names) + 0.5, 0.5)  # first class at the top, like the table
            ax.grid(axis="x", alpha=0.3)
        else:
            ax.set_xticks(ticks, names, rotation=45, ha="right", fontsize=8)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(axis="y", alpha=0.3)
        ax.set_title(title)
    figure.suptitle(f"{len(report.cases)} case(s), {len(names)} class(es)")
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) if atomic else contextlib.nullcontext(path) as partial:
        figure.savefig(partial, format="png", dpi=110)
    return path


def _orientation(ax, horizontal: bool) -> dict:
    # matplotlib 3.10 replaced ``vert`` by ``orientation``; Slicer may ship an older one.
    if "orientation" in inspect.signature(ax.boxplot).parameters:
        return {"orientation": "horizontal" if horizontal else "vertical"}
    return {"vert": not horizontal}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _json_number(value: float | int) -> float | int | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: float, digits: int = 4) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"
