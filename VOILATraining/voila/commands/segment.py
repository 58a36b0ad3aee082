"""``voila segment INPUT --prompt TEXT ... -o OUT``: segment a CT from structure names."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUMMARY = "segment a CT from structure names"
DESCRIPTION = (
    "Segment a CT (NIfTI, NRRD or a DICOM series folder) from the structures you name. "
    "Writes a labelmap on the input grid and OUT.json (label -> prompt, structure, SNOMED code, "
    "colour, confidence, voxels, ml, found, predicted Dice, check flag)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from voila.device import DEVICE_HELP, device_argument
    from voila.infer.results import HEATMAP_KINDS
    from voila.infer.segmenter import SCANS

    parser.add_argument("input", help="CT: .nii/.nii.gz/.nrrd file or a DICOM series folder")
    parser.add_argument("-m", "--model", help="VOILA .safetensors model (default: the shipped demo model)")
    parser.add_argument(
        "-p",
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="a structure to segment (repeat for several; commas, semicolons and line breaks also separate)",
    )
    parser.add_argument("-o", "--output", required=True, help="labelmap to write (.nii.gz, .nii or .nrrd)")
    parser.add_argument(
        "--heatmap", metavar="HEAT", help="also write the heatmap volume here (--heatmap-kind says which)"
    )
    parser.add_argument(
        "--heatmap-kind",
        choices=HEATMAP_KINDS,
        default="review",
        help="review (default): a value v means about v of such voxels were wrong on patients the model "
        "never saw (calibrated, see README 'Reading the heatmap'); complexity: the raw CAS complexity map",
    )
    parser.add_argument("--preview", metavar="PNG", help="also write a preview picture here")
    parser.add_argument("--device", default="auto", type=device_argument, help=DEVICE_HELP)
    parser.add_argument(
        "--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5)"
    )
    parser.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="PROMPT: R,A,S",
        help="a click on the structure PROMPT, world RAS mm as Slicer shows them (repeatable; any name works)",
    )
    parser.add_argument(
        "--exclude-point",
        action="append",
        default=[],
        metavar="PROMPT: R,A,S",
        help="a click on what PROMPT must not include (repeatable)",
    )
    parser.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="PROMPT: R1,A1,S1,R2,A2,S2",
        help="keep PROMPT inside this box (two opposite corners, RAS mm); only its windows are computed",
    )
    parser.add_argument(
        "--scan",
        choices=SCANS,
        default="full",
        help="full (default): every window; zoom: a fast pass finds the structures, then full quality "
        "only there (faster for a few small structures; see BENCHMARKS.md); auto: zoom for a few prompts "
        "on a large volume without heatmap",
    )
    parser.add_argument("--series-uid", help="DICOM SeriesInstanceUID when the folder holds several series")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from voila.infer.pipeline import segment_file, sidecar_path
    from voila.prompts import boxes_from_arguments, points_from_arguments

    result = segment_file(
        args.input,
        args.output,
        prompts=args.prompt,
        model=args.model,
        heatmap_path=args.heatmap,
        heatmap_kind=args.heatmap_kind,
        preview_path=args.preview,
        device=args.device,
        overlap=args.overlap,
        series_uid=args.series_uid,
        show_progress=not args.quiet,
        points=points_from_arguments(args.point, args.exclude_point),
        boxes=boxes_from_arguments(args.box),
        scan=args.scan,
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(result.table())
    checked = [p for p in result.prompts if p.found and p.check]
    if checked:
        print(
            f"check: {', '.join(p.prompt for p in checked)} (expected quality low or found in an implausible "
            "place; look at them before use)"
        )
    print(f"labelmap: {args.output}\nsidecar:  {sidecar_path(Path(args.output))}")
    if args.heatmap:
        print(f"heatmap:  {args.heatmap}")
    if args.preview:
        print(f"preview:  {args.preview}")
    return 0
