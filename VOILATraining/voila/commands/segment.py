"""``voila segment INPUT --prompt TEXT ... -o OUT``: segment a CT from structure names."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from voila.errors import OutputError

LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "segment",
        help="segment a CT from structure names",
        description="Segment a CT (NIfTI, NRRD or a DICOM series folder) from the structures you name. "
        "Writes a labelmap on the input grid and OUT.json (label -> prompt, structure, SNOMED code, "
        "colour, confidence, voxels, ml, found).",
    )
    parser.add_argument("input", help="CT: .nii/.nii.gz/.nrrd file or a DICOM series folder")
    parser.add_argument("-m", "--model", help="VOILA .safetensors model (default: the shipped demo model)")
    parser.add_argument(
        "-p",
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="a structure to segment (repeat for several; commas also separate)",
    )
    parser.add_argument("-o", "--output", required=True, help="labelmap to write (.nii.gz, .nii or .nrrd)")
    parser.add_argument("--heatmap", metavar="HEAT", help="also write the complexity heatmap volume here")
    parser.add_argument("--preview", metavar="PNG", help="also write a preview picture here")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5)"
    )
    parser.add_argument("--series-uid", help="DICOM SeriesInstanceUID when the folder holds several series")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def split_prompts(values: Sequence[str]) -> list[str]:
    """``--prompt "liver, spleen" --prompt aorta`` → ["liver", "spleen", "aorta"]."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def sidecar_path(output: Path) -> Path:
    """``seg.nii.gz`` → ``seg.json`` beside it."""
    name = output.name
    for suffix in LABEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return output.with_name(name[: -len(suffix)] + ".json")
    return output.with_name(name + ".json")


def check_output(path: Path, what: str, suffixes: Sequence[str]) -> None:
    if not path.name.lower().endswith(tuple(suffixes)):
        raise OutputError(f"{what} {path} must end in {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise OutputError(f"the folder {path.parent} for the {what} does not exist; create it first")


def run_segmentation(
    input_path: str | Path,
    output: str | Path,
    prompts: Sequence[str],
    model: str | Path | None = None,
    heatmap_path: str | Path | None = None,
    preview_path: str | Path | None = None,
    device: str = "auto",
    overlap: float = 0.5,
    series_uid: str | None = None,
    show_progress: bool = True,
    segmenter=None,
):
    """Read, segment, write: every output or none (temporary files renamed at the very end)."""
    from tqdm import tqdm

    from voila.data.io import atomic_path, read_image, write_volume
    from voila.infer.preview import write_preview
    from voila.infer.segmenter import Segmenter

    output = Path(output)
    check_output(output, "labelmap", LABEL_SUFFIXES)
    if heatmap_path:
        check_output(Path(heatmap_path), "heatmap", LABEL_SUFFIXES)
    if preview_path:
        check_output(Path(preview_path), "preview", (".png",))
    image, affine = read_image(input_path, series_uid=series_uid)
    segmenter = segmenter or Segmenter.load(model, device=device)
    bar = tqdm(
        total=100,
        unit="%",
        desc="segmenting",
        disable=not show_progress,
        file=sys.stderr,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
    )

    def progress(fraction: float) -> None:
        bar.update(round(fraction * 100) - bar.n)

    try:
        result = segmenter.segment(image, affine, prompts, heatmap=True, progress=progress, overlap=overlap)
    finally:
        bar.close()
    sidecar = dict(result.to_dict(), input=str(input_path), output=str(output))
    with contextlib.ExitStack() as stack:
        # all outputs go to temporary files first; they are renamed only if every write succeeded
        write_volume(stack.enter_context(atomic_path(output)), result.labelmap, affine)
        if heatmap_path:
            write_volume(stack.enter_context(atomic_path(heatmap_path)), result.heatmap, affine)
            sidecar["heatmap_file"] = str(heatmap_path)
        if preview_path:
            write_preview(
                stack.enter_context(atomic_path(preview_path)),
                image,
                affine,
                result,
                title=f"VOILA — {Path(str(input_path)).name}",
            )
        with open(stack.enter_context(atomic_path(sidecar_path(output))), "w", encoding="utf-8") as stream:
            json.dump(sidecar, stream, indent=2, ensure_ascii=False)
    return result


def format_table(result) -> str:
    lines = [f"{'label':>5}  {'prompt':<24} {'structure':<22} {'ml':>9} {'confidence':>10}  found"]
    for p in result.prompts:
        lines.append(
            f"{p.label:>5}  {p.prompt[:24]:<24} {(p.structure or 'open vocabulary')[:22]:<22} "
            f"{p.volume_ml:>9.1f} {p.confidence:>10.2f}  {'yes' if p.found else 'NOT FOUND: ' + p.note}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = run_segmentation(
        args.input,
        args.output,
        split_prompts(args.prompt),
        model=args.model,
        heatmap_path=args.heatmap,
        preview_path=args.preview,
        device=args.device,
        overlap=args.overlap,
        series_uid=args.series_uid,
        show_progress=not args.quiet,
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(format_table(result))
    print(f"labelmap: {args.output}\nsidecar:  {sidecar_path(Path(args.output))}")
    if args.heatmap:
        print(f"heatmap:  {args.heatmap}")
    if args.preview:
        print(f"preview:  {args.preview}")
    return 0
