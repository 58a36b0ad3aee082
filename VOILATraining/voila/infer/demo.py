"""The demo (``make -C VOILATraining demo``): segment the bundled real CT with the shipped model.

Writes labelmap, heatmap, sidecar and preview PNG, prints where they are and the volumes, and
compares with the bundled TotalSegmentator reference labels.

    python -m voila.infer.demo [--out demo_output] [--device auto]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_PROMPTS = ("liver", "spleen", "left kidney", "right kidney", "aorta")
REFERENCE = "SampleData/totalseg-example/example_seg_fast_force_split.nii.gz"


def reference_dice(result, resources: Path) -> dict[str, float]:
    """Dice of each found structure against the bundled reference labelmap (TotalSegmentator's
    output on the same CT, label i = TotalSegmentator class i)."""
    import numpy as np

    from voila.data.io import read_image
    from voila.evaluate.metrics import dice
    from voila.vocabulary import Vocabulary

    reference, _ = read_image(resources / REFERENCE)
    vocabulary = Vocabulary.load()
    scores = {}
    for p in result.prompts:
        if p.structure and p.structure in vocabulary:
            truth = reference == vocabulary[p.structure].label
            scores[p.prompt] = float(dice(result.labelmap == p.label, truth)) if truth.any() else float("nan")
    return {k: float(np.round(v, 3)) for k, v in scores.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voila.infer.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="output folder (created)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)

    from voila.commands.segment import format_table, run_segmentation, sidecar_path
    from voila.errors import VoilaError
    from voila.resources import SAMPLE_CT, resource_path, resources_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labelmap, heatmap, preview = (
        out / "example_ct_voila.nii.gz",
        out / "example_ct_heatmap.nii.gz",
        out / "example_ct_preview.png",
    )
    started = time.perf_counter()
    try:
        ct = resource_path(SAMPLE_CT)
        print(f"VOILA demo: segmenting {ct.name} (bundled real CT, 3 mm) for {', '.join(DEMO_PROMPTS)}")
        result = run_segmentation(
            ct, labelmap, DEMO_PROMPTS, heatmap_path=heatmap, preview_path=preview, device=args.device
        )
    except VoilaError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return error.exit_code
    print(format_table(result))
    scores = reference_dice(result, resources_dir())
    print("Dice against the bundled TotalSegmentator labels (the demo model was trained on this CT,")
    print("so this shows that the pipeline works, not how well VOILA generalises):")
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(f"\nlabelmap: {labelmap.resolve()}\nheatmap:  {heatmap.resolve()}")
    print(f"sidecar:  {sidecar_path(labelmap).resolve()}\npreview:  {preview.resolve()}")
    print(f"done in {time.perf_counter() - started:.0f} s (segmentation {result.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
