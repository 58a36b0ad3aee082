"""``voila evaluate``: Dice, NSD and HD95 of predictions against references.

voila evaluate --pred predictions/ --ref TotalSegmentator_v2/ -o report/
voila evaluate --pred ct_seg.nii.gz --ref s0011/segmentations --classes liver spleen
voila evaluate --pred seg.nii.gz --ref ref.nii.gz --classes 1=liver 2=spleen --tolerance-mm 2
"""

from __future__ import annotations

import argparse
import sys

from voila.errors import InputImageError

EPILOG = """\
PATH is a labelmap file, a folder of labelmap files (one per case, matched by file name), or a
TotalSegmentator folder of per-structure masks (<root>/<case>/segmentations/<name>.nii.gz, one
<case>/ folder, or one folder of <name>.nii.gz masks). Labelmap values are named by the sidecar
<labelmap>.json that 'voila segment' writes, else by --classes LABEL=NAME, else by the
TotalSegmentator class indices. Prediction and reference must be on the same voxel grid.

Metrics follow DeepMind's surface-distance conventions (surfel-area-weighted distances in mm on
the voxel-boundary surface); results follow the TotalSegmentator protocol: classes absent from a
case's reference are skipped, a missed class scores Dice 0 and NSD 0 and is left out of HD95,
classes are averaged over cases and then over classes."""


SUMMARY = "score predicted segmentations against references (Dice, NSD, HD95)"
DESCRIPTION = (
    "Score predicted segmentations against references: Dice, normalised surface "
    "Dice and HD95 per class and case, with a summary table, CSV, JSON and box plots."
)
PARSER_OPTIONS = {"epilog": EPILOG, "formatter_class": argparse.RawDescriptionHelpFormatter}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, metavar="PATH", help="the predicted segmentation(s)")
    parser.add_argument("--ref", required=True, metavar="PATH", help="the reference segmentation(s)")
    parser.add_argument(
        "--classes",
        nargs="+",
        metavar="CLASS",
        help="classes to score (default: every class both sides name); LABEL=NAME pairs "
        "(1=liver 2=spleen) instead name the values of labelmaps without a sidecar JSON",
    )
    parser.add_argument(
        "--tolerance-mm",
        type=float,
        default=3.0,
        metavar="MM",
        help="surface distance counted as agreement by NSD (default: 3)",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="REPORT_DIR",
        help="write metrics_per_case.csv, summary.md, summary.json and boxplots.png here",
    )


def run(args: argparse.Namespace) -> int:
    from voila.evaluate import evaluate

    report = evaluate(
        args.pred,
        args.ref,
        classes=parse_classes(args.classes),
        tolerance_mm=args.tolerance_mm,
        out_dir=args.output,
        progress=_print_progress if sys.stderr.isatty() else None,
    )
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(report.markdown(), end="")
    if args.output:
        print(f"report written to {args.output}")
    return 0


def parse_classes(items: list[str] | None) -> list[str] | dict[int, str] | None:
    """``["liver", "spleen"]`` stays a list; ``["1=liver", "2=spleen"]`` becomes ``{1: "liver", 2: "spleen"}``."""
    if not items:
        return None
    pairs = [item for item in items if "=" in item]
    if not pairs:
        return list(items)
    if len(pairs) != len(items):
        raise InputImageError(
            "--classes mixes names and LABEL=NAME pairs; give either names (liver spleen) or pairs (1=liver 2=spleen)"
        )
    names: dict[int, str] = {}
    for item in items:
        value, _, name = item.partition("=")
        if not value.strip().isdigit() or not name.strip():
            raise InputImageError(
                f"--classes {item!r} is not LABEL=NAME with an integer label (e.g. 1=liver)"
            )
        if int(value) in names:
            raise InputImageError(f"--classes names label {int(value)} twice; give each label once")
        names[int(value)] = name.strip()
    return names


def _print_progress(fraction: float) -> None:
    end = "\n" if fraction >= 1 else ""
    print(f"\revaluating: {fraction:4.0%}", end=end, file=sys.stderr, flush=True)
