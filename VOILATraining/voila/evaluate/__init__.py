"""Score predicted segmentations against references: Dice, NSD and HD95 per class and case.

Metric conventions are DeepMind's ``surface-distance`` ones (see :mod:`voila.evaluate.metrics`):
surfel-area-weighted distances in mm between the surfaces on the voxel boundaries, NSD at
``tolerance_mm`` (default 3 mm), HD95 as the larger directed area-weighted 95th percentile.

Aggregation follows the TotalSegmentator protocol:

- a class whose reference is empty in a case is excluded from that case, whatever was predicted;
- a class present in the reference but not predicted scores Dice 0 and NSD 0; its HD95 is
  undefined, so it is left out of the HD95 means and counted as ``missed`` instead;
- each class is averaged over its cases, then the classes are averaged (macro mean).

Prediction and reference must be on the same voxel grid (shape and geometry); nothing is resampled.

>>> report = evaluate("predictions/", "TotalSegmentator_v2/", tolerance_mm=3.0, out_dir="report/")
>>> report.mean_dice, report.classes[0].name, report.classes[0].nsd
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Callable, Union

from voila.data.geometry import voxel_spacing
from voila.errors import InputImageError
from voila.evaluate.metrics import compute_metrics
from voila.evaluate.report import (
    CaseClassResult,
    ClassSummary,
    EvaluationReport,
    create_report_folder,
    report_outputs,
    write_report,
)
from voila.evaluate.sources import (
    CaseFiles,
    LoadedCase,
    Naming,
    check_same_grid,
    defined_names,
    discover_cases,
)

__all__ = ["CaseClassResult", "ClassSummary", "EvaluationReport", "evaluate", "write_report"]

PathLike = Union[str, "os.PathLike[str]"]


def evaluate(
    pred: PathLike,
    ref: PathLike,
    classes: Sequence[str] | Mapping[int, str] | None = None,
    tolerance_mm: float = 3.0,
    out_dir: PathLike | None = None,
    progress: Callable[[float], None] | None = None,
) -> EvaluationReport:
    """Evaluate the prediction(s) at ``pred`` against the reference(s) at ``ref``.

    ``pred`` and ``ref`` are labelmap files, folders of labelmaps (matched by case file name) or
    TotalSegmentator-layout folders of per-structure masks (see :mod:`voila.evaluate.sources`).
    ``classes`` is either the class names to score (default: every class both sides name) or a
    ``{label value: name}`` mapping that names the values of labelmaps without a sidecar JSON
    (and scores exactly those classes). ``out_dir``, if given, receives ``metrics_per_case.csv``,
    ``summary.md``, ``summary.json`` and ``boxplots.png``. ``progress`` gets the fraction done.
    """
    if not (isinstance(tolerance_mm, (int, float)) and math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise InputImageError(f"the NSD tolerance must be a number of mm >= 0, got {tolerance_mm!r}")
    label_names = dict(classes) if isinstance(classes, Mapping) else None
    outputs = None
    if out_dir is not None:  # checked before any work: the report never replaces what it did not write
        create_report_folder(out_dir)
        outputs = report_outputs(out_dir, inputs=[pred, ref])
        outputs.check()
    naming = Naming(label_names)
    pred_cases, ref_cases = discover_cases(pred, naming), discover_cases(ref, naming)
    pairs = _pair_cases(
        pred_cases,
        ref_cases,
        by_name=_folder_of_labelmaps(pred, pred_cases) and _folder_of_labelmaps(ref, ref_cases),
    )

    if label_names is not None:
        selected: list[str] | None = list(dict.fromkeys(naming.label_names.values()))
    elif classes is not None:
        selected = list(dict.fromkeys(naming.canonical(name) for name in classes))
        if not selected:
            raise InputImageError("--classes was given without any class name; name at least one class")
    else:
        selected = None

    ref_names: list[str] = []
    for _, ref_files in pairs:
        ref_names.extend(n for n in defined_names(ref_files, naming) if n not in ref_names)
    pred_names = {n for pred_files, _ in pairs for n in defined_names(pred_files, naming)}
    class_order = _class_order(selected, ref_names, pred_names)

    rows: list[CaseClassResult] = []
    warnings: list[str] = []
    for index, (pred_files, ref_files) in enumerate(pairs):
        ref_case = LoadedCase(ref_files, naming)
        pred_case = LoadedCase(pred_files, naming)
        for case in (pred_case, ref_case):
            if case.unnamed_values:
                shown = ", ".join(str(v) for v in case.unnamed_values[:8])
                more = f" and {len(case.unnamed_values) - 8} more" if len(case.unnamed_values) > 8 else ""
                warnings.append(
                    f"{case.files.location.name} holds label values with no name ({shown}{more}); they were "
                    "not scored: name them in its sidecar JSON or with --classes LABEL=NAME"
                )
        check_same_grid(
            pred_files.location,
            pred_case.shape,
            pred_case.affine,
            ref_files.location,
            ref_case.shape,
            ref_case.affine,
        )
        spacing = tuple(float(v) for v in voxel_spacing(ref_case.affine))
        for name in class_order:
            if name in ref_case.class_names:
                rows.extend(_score_class(ref_files.name, name, pred_case, ref_case, spacing, tolerance_mm))
        if progress is not None:
            progress((index + 1) / len(pairs))

    report = EvaluationReport.from_rows(rows, class_order, tolerance_mm, [r.name for _, r in pairs], warnings)
    if out_dir is not None:
        write_report(report, out_dir, outputs)
    return report


def _score_class(
    case: str,
    name: str,
    pred_case: LoadedCase,
    ref_case: LoadedCase,
    spacing: tuple[float, float, float],
    tolerance_mm: float,
) -> list[CaseClassResult]:
    ref_region = ref_case.region(name)
    if ref_region is None:  # reference absent: excluded, whatever the prediction
        return []
    pred_region = pred_case.region(name)
    region = ref_region
    if pred_region is not None:
        region = tuple(
            slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(ref_region, pred_region)
        )
    metrics = compute_metrics(
        pred_case.mask(name, region), ref_case.mask(name, region), spacing, tolerance_mm
    )
    hd95_mm = metrics.hd95_mm if math.isfinite(metrics.hd95_mm) else float("nan")
    return [
        CaseClassResult(
            case, name, metrics.dice, metrics.nsd, hd95_mm, metrics.ref_voxels, metrics.pred_voxels
        )
    ]


def _folder_of_labelmaps(path: PathLike, cases: list[CaseFiles]) -> bool:
    """A folder whose files are cases (one labelmap each): its cases are matched by file name."""
    return Path(path).is_dir() and all(case.labelmap is not None for case in cases)


def _pair_cases(
    pred_cases: list[CaseFiles], ref_cases: list[CaseFiles], by_name: bool
) -> list[tuple[CaseFiles, CaseFiles]]:
    """Prediction and reference cases by name; one case each side is paired as given unless both
    sides are folders of labelmaps (then the names must agree, as for many cases)."""
    if len(pred_cases) == 1 and len(ref_cases) == 1 and not by_name:
        return [(pred_cases[0], ref_cases[0])]
    by_name = {case.name: case for case in ref_cases}
    missing = [case.name for case in pred_cases if case.name not in by_name]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputImageError(
            f"no reference for predicted case(s) {shown}; name each prediction like its reference case "
            f"(reference cases: {', '.join(sorted(by_name)[:5])}{' ...' if len(by_name) > 5 else ''})"
        )
    return [(case, by_name[case.name]) for case in pred_cases]


def _class_order(selected: list[str] | None, ref_names: list[str], pred_names: set[str]) -> list[str]:
    if selected is not None:
        unknown = [name for name in selected if name not in ref_names]
        if unknown:
            raise InputImageError(
                f"class(es) {', '.join(unknown)} are not named in the reference; "
                f"choose among: {', '.join(ref_names[:20])}{' ...' if len(ref_names) > 20 else ''}"
            )
        return selected
    common = [name for name in ref_names if name in pred_names]
    if not common:
        raise InputImageError(
            "the prediction and the reference name no class in common; check the sidecar JSON of the "
            "prediction or name the labels with --classes 1=liver 2=spleen ..."
        )
    return common
