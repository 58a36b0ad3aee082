"""The two real CTs in the repository as training data: datalists for cross-patient runs.

- ``sample``: the bundled abdominal/pelvic CT (``Resources/SampleData/totalseg-example``, 3 mm);
- ``lidc``: LIDC-IDRI-0001, chest and upper abdomen, 0.7 × 0.7 × 2.5 mm (``Testing/benchmarks/data``,
  attribution in its README).

Both carry TotalSegmentator label maps (label ``i`` = class ``i``). :data:`STRUCTURES` are the ones
both show well; the others are background. ``datalist(folder, train=[...], validate=[...])`` writes a
MONAI datalist, so ``voila train --data that.json --structures ...`` trains on some CTs and
validates on the others (cross-patient).

    python Testing/benchmarks/real_cts.py OUT        # writes OUT/{sample,lidc,both}.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCHMARK_DATA = Path(__file__).resolve().parent / "data"
CTS = {
    "sample": (
        REPO / "Resources/SampleData/totalseg-example/example_ct.nii.gz",
        REPO / "Resources/SampleData/totalseg-example/example_seg_fast_force_split.nii.gz",
    ),
    "lidc": (
        BENCHMARK_DATA / "lidc-idri-0001/ct.nii.gz",
        BENCHMARK_DATA / "lidc-idri-0001/totalseg_labels.nii.gz",
    ),
}
# Structures both CTs show with at least ~20 ml (or a whole vertebra), measured from their labels.
STRUCTURES = (
    "liver",
    "spleen",
    "kidney_left",
    "kidney_right",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "pancreas",
    "vertebrae_T12",
    "vertebrae_L1",
    "vertebrae_L2",
    "autochthon_left",
    "autochthon_right",
    "spinal_cord",
)
ABDOMINAL_PROMPTS = (
    "liver",
    "spleen",
    "left kidney",
    "right kidney",
    "aorta",
    "stomach",
    "pancreas",
    "inferior vena cava",
)


def require(*names: str) -> None:
    """Stop with one line when a CT of ``names`` is missing from the checkout (both are in the
    repository: a missing one was deleted or not checked out)."""
    for name in names:
        missing = [str(path) for path in CTS[name] if not path.is_file()]
        if missing:
            raise SystemExit(
                f"the {name} CT is not here ({', '.join(missing)}): restore it with "
                f"`git checkout -- {' '.join(missing)}` or leave this CT out"
            )


def class_names() -> dict[str, str]:
    return json.loads(
        (REPO / "Resources/Terminology/totalsegmentator_classes.json").read_text(encoding="utf-8")
    )


def datalist(path: Path, train: list[str], validate: list[str] = ()) -> Path:
    """A MONAI datalist training on the CTs ``train`` and validating on ``validate``."""
    require(*train, *validate)
    entries = {name: {"image": str(CTS[name][0]), "label": str(CTS[name][1])} for name in CTS}
    labels = {"0": "background", **class_names()}
    content = {
        "name": "+".join(train),
        "labels": labels,
        "training": [entries[name] for name in train],
        "validation": [entries[name] for name in validate],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1), encoding="utf-8")
    return path


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    require(*CTS)
    datalist(out / "sample_to_lidc.json", ["sample"], ["lidc"])
    datalist(out / "lidc_to_sample.json", ["lidc"], ["sample"])
    datalist(out / "both.json", ["sample", "lidc"])
    print(f"wrote datalists to {out}; structures: {' '.join(STRUCTURES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
