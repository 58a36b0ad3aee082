"""Files in, files out: read a CT, segment it, write every output atomically.

The one file pipeline, used by ``voila segment``, ``voila demo`` and batch scripts::

    result = segment_file("ct.nii.gz", "seg.nii.gz", ["liver", "spleen"],
                          heatmap_path="heat.nii.gz", preview_path="seg.png")

Outputs: the labelmap (NIfTI or NRRD) on the input grid, its JSON sidecar (``seg.json``: label →
prompt, structure, SNOMED code, colour, confidence, voxels, ml), and optionally the heatmap volume
and a preview PNG. Outputs follow :mod:`voila.outputs`: checked before any work, written to
temporary files, renamed into place together, so a failed run leaves nothing behind and nothing
the user had is ever replaced.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from voila.outputs import OutputSet

PathLike = Union[str, "os.PathLike[str]"]
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


GENERATOR = "voila segment"


def sidecar_path(output: PathLike) -> Path:
    """``seg.nii.gz`` → ``seg.json`` beside it."""
    output = Path(output)
    name = output.name
    for suffix in LABEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return output.with_name(name[: -len(suffix)] + ".json")
    return output.with_name(name + ".json")


def earlier_outputs(sidecar: Path) -> set[str] | None:
    """The files (real paths) an earlier ``voila segment`` recorded in ``sidecar``; None when
    ``sidecar`` is not a VOILA sidecar (a user's JSON, e.g. BIDS metadata, or missing)."""
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("written_by") == GENERATOR:
        names = dict(record.get("outputs") or {}).values()
    elif {"labels", "model", "shape", "affine"} <= set(record):  # sidecars of voila 0.1
        names = [Path(str(name)).name for name in (record.get("output"), record.get("heatmap_file")) if name]
    else:
        return None
    known = {os.path.realpath(sidecar.parent / str(name)) for name in names if name}
    return known | {os.path.realpath(sidecar)}


def segment_file(
    input_path: PathLike,
    output: PathLike,
    prompts: Sequence[str] | str,
    model: PathLike | None = None,
    heatmap_path: PathLike | None = None,
    preview_path: PathLike | None = None,
    heatmap_kind: str = "review",
    device: str = "auto",
    overlap: float = 0.5,
    series_uid: str | None = None,
    show_progress: bool = True,
    segmenter=None,
    points=None,
    boxes=None,
    scan: str = "full",
):
    """Read ``input_path``, segment ``prompts``, write the outputs; returns the
    :class:`~voila.infer.segmenter.SegmentationResult`. ``segmenter``: an already loaded one
    (kept warm by batch callers), else ``model`` is loaded on ``device``. ``points``, ``boxes``
    and ``scan``: see :meth:`~voila.infer.segmenter.Segmenter.segment`. The heatmap
    (``heatmap_kind``: ``review`` or ``complexity``) is computed only when it is written or previewed.

    Before any work, every output is checked by :class:`voila.outputs.OutputSet`: none may be the
    input, the model, another output, a folder, or an existing file that an earlier ``voila
    segment`` did not write (its sidecar lists what it wrote).
    """
    from tqdm import tqdm

    from voila.data.io import read_image, write_volume
    from voila.infer.preview import write_preview
    from voila.infer.segmenter import Segmenter

    output = Path(output)
    sidecar = sidecar_path(output)
    earlier = earlier_outputs(sidecar) or set()
    outputs = OutputSet(
        GENERATOR,
        inputs=[input_path, model or getattr(segmenter, "model_path", None)],
        owns=lambda path: os.path.realpath(path) in earlier,
    )
    outputs.add(output, "labelmap", LABEL_SUFFIXES)
    if heatmap_path:
        outputs.add(heatmap_path, "heatmap", LABEL_SUFFIXES)
    if preview_path:
        outputs.add(preview_path, "preview", (".png",))
    outputs.add(sidecar, "sidecar")  # last: a complete sidecar means a complete run
    outputs.check()

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
        result = segmenter.segment(
            image,
            affine,
            prompts,
            heatmap=heatmap_kind if (heatmap_path or preview_path) else None,
            progress=progress,
            overlap=overlap,
            points=points,
            boxes=boxes,
            scan=scan,
        )
    finally:
        bar.close()
    record = dict(
        result.to_dict(),
        written_by=GENERATOR,
        input=str(input_path),
        output=str(output),
        outputs={what.what: _relative(what.path, sidecar.parent) for what in outputs.outputs},
    )
    if heatmap_path:
        record["heatmap_file"] = str(heatmap_path)
    with outputs.writing() as temporary:
        write_volume(temporary[output], result.labelmap, affine, atomic=False)
        if heatmap_path:
            write_volume(temporary[Path(heatmap_path)], result.heatmap, affine, atomic=False)
        if preview_path:
            title = f"VOILA — {Path(str(input_path)).name}"
            write_preview(temporary[Path(preview_path)], image, affine, result, title=title, atomic=False)
        with open(temporary[sidecar], "w", encoding="utf-8") as stream:
            json.dump(record, stream, indent=2, ensure_ascii=False)
    return result


def _relative(path: Path, folder: Path) -> str:
    try:
        return os.path.relpath(path, folder)
    except ValueError:  # another drive (Windows)
        return str(Path(path).resolve())
