"""``python -m voila.training.sample_dataset OUT``: the bundled sample CT as a TotalSegmentator-layout dataset.

Writes ``OUT/example/ct.nii.gz`` (the full ``example_ct.nii.gz``, 3 mm) and one mask per
TotalSegmentator class in ``OUT/example/segmentations/<name>.nii.gz``, exported from the
``example_seg_fast_force_split.nii.gz`` label map (label ``i`` = TotalSegmentator class ``i``,
names from ``Resources/Terminology/totalsegmentator_classes.json``). Every class gets a mask, empty
where the structure is absent, because the label map annotates all of them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from voila.data.io import atomic_path, read_image, write_volume
from voila.errors import DatasetError
from voila.resources import SAMPLE_CT, resource_path

SAMPLE_LABELMAP = "SampleData/totalseg-example/example_seg_fast_force_split.nii.gz"
CLASS_NAMES = "Terminology/totalsegmentator_classes.json"
CASE = "example"


def write_sample_dataset(out: str | Path, structures: list[str] | None = None) -> Path:
    """Write the dataset under ``out`` and return ``out``; existing files are replaced.

    ``structures`` (TotalSegmentator names) limits which masks are written: the others are then
    simply not annotated in this dataset (not background), as in any partially labelled dataset.
    """
    out = Path(out)
    case = out / CASE
    segmentations = case / "segmentations"
    segmentations.mkdir(parents=True, exist_ok=True)
    ct_path = resource_path(SAMPLE_CT)
    with atomic_path(case / "ct.nii.gz") as partial:
        shutil.copyfile(ct_path, partial)
    labelmap, affine = read_image(resource_path(SAMPLE_LABELMAP))
    names = json.loads(resource_path(CLASS_NAMES).read_text(encoding="utf-8"))
    unknown = sorted(set(structures or ()) - set(names.values()))
    if unknown:
        raise DatasetError(f"unknown TotalSegmentator structure names {unknown}; see {CLASS_NAMES}")
    for value, name in sorted(names.items(), key=lambda item: int(item[0])):
        if structures and name not in structures:
            continue
        mask = (labelmap == int(value)).astype(np.uint8)
        write_volume(segmentations / f"{name}.nii.gz", mask, affine, reference_path=ct_path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m voila.training.sample_dataset",
        description="Export the bundled sample CT and its label map as a TotalSegmentator-layout dataset.",
    )
    parser.add_argument("out", help="folder to write (OUT/example/ct.nii.gz + segmentations/)")
    parser.add_argument("--structures", nargs="+", metavar="NAME", help="write only these structures' masks")
    args = parser.parse_args(argv)
    root = write_sample_dataset(args.out, args.structures)
    print(f"wrote {root / CASE} (train with: voila train --data {root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
