"""``voila demo [--out DIR]``: segment the bundled real CT with the shipped model (``make demo``).

Writes labelmap, heatmap, sidecar and preview PNG, prints where they are and the volumes, and
compares with the bundled TotalSegmentator reference labels.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_PROMPTS = ("liver", "spleen", "left kidney", "right kidney", "aorta")
REFERENCE = "SampleData/totalseg-example/example_seg_fast_force_split.nii.gz"


SUMMARY = "segment the bundled sample CT with the shipped demo model"
DESCRIPTION = (
    "Segment the bundled real CT with the shipped demo model: labelmap, heatmap, "
    "sidecar and preview PNG, with Dice against the bundled reference labels."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from voila.device import DEVICE_HELP, device_argument

    parser.add_argument("--out", default="demo_output", help="output folder (created; default demo_output)")
    parser.add_argument("--device", default="auto", type=device_argument, help=DEVICE_HELP)


def reference_dice(result) -> dict[str, float]:
    """Dice of each prompt with a vocabulary structure against the bundled reference labelmap
    (TotalSegmentator's output on the same CT, label i = TotalSegmentator class i)."""
    import numpy as np

    from voila.data.io import read_image
    from voila.evaluate.metrics import dice
    from voila.resources import resource_path
    from voila.vocabulary import Vocabulary

    reference, _ = read_image(resource_path(REFERENCE))
    vocabulary = Vocabulary.load()
    scores = {}
    for p in result.prompts:
        if p.structure and p.structure in vocabulary:
            truth = reference == vocabulary[p.structure].label
            scores[p.prompt] = float(dice(result.labelmap == p.label, truth)) if truth.any() else float("nan")
    return {k: float(np.round(v, 3)) for k, v in scores.items()}


def run(args: argparse.Namespace) -> int:
    from voila.errors import OutputError
    from voila.infer.pipeline import segment_file, sidecar_path
    from voila.resources import SAMPLE_CT, resource_path

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"cannot create the demo folder {out}: {error.strerror}; choose another --out"
        ) from None
    labelmap, heatmap, preview = (
        out / "example_ct_voila.nii.gz",
        out / "example_ct_heatmap.nii.gz",
        out / "example_ct_preview.png",
    )
    started = time.perf_counter()
    ct = resource_path(SAMPLE_CT)
    print(f"VOILA demo: segmenting {ct.name} (bundled real CT, 3 mm) for {', '.join(DEMO_PROMPTS)}")
    result = segment_file(
        ct, labelmap, DEMO_PROMPTS, heatmap_path=heatmap, preview_path=preview, device=args.device
    )
    print(result.table())
    scores = reference_dice(result)
    print("Dice against the bundled TotalSegmentator labels (the demo model was trained on this CT,")
    print("so this shows that the pipeline works, not how well VOILA generalises):")
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(f"\nlabelmap: {labelmap.resolve()}\nheatmap:  {heatmap.resolve()}")
    print(f"sidecar:  {sidecar_path(labelmap).resolve()}\npreview:  {preview.resolve()}")
    print(f"done in {time.perf_counter() - started:.0f} s (segmentation {result.seconds:.0f} s)")
    return 0
