"""Give a demo model the review map's calibration measured on patients never trained on.

``bench_heatmap.py`` scores models on CTs they were not trained on and fits the calibration table on
their errors (``results/heatmap_calibration.json``: all its pairs pooled; with ``--trained-on`` it
also holds the joint table of ``1 - p`` and intensity novelty); this script copies ``--model`` with
those tables, the structures' places and the classes' intensity profile (from the CTs it was
trained on, ``--trained-on``) in its card. The shipped demo is trained on both real CTs, so its
tables come from the pairs of BENCHMARKS.md §7, among them the same recipe trained on one CT and
scored on the other, both ways (``--calibration-of MODEL`` takes instead the tables a training run
fitted at export on its whole validation case):

    python Testing/benchmarks/bench_heatmap.py --pair runs/cross/sample_to_lidc/model.safetensors lidc \
        --pair runs/cross/lidc_to_sample/model.safetensors sample --pair runs/demo_onect.safetensors lidc \
        --pair runs/demo-recipe-sample/model.safetensors lidc --pair runs/demo-recipe-lidc/model.safetensors sample \
        --trained-on sample --trained-on lidc --trained-on sample --trained-on sample --trained-on lidc
    python Testing/benchmarks/calibrate_demo.py --model runs/voila-demo-both/model.safetensors \
        --trained-on sample lidc --out runs/voila_demo_calibrated.safetensors
    cp runs/voila_demo_calibrated.safetensors Resources/Models/voila_demo.safetensors
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from real_cts import CTS, datalist
from voila.model.model_file import read_model_card
from voila.resources import DEMO_MODEL, resources_dir
from voila.training.export import recalibrated

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--calibration", type=Path, default=RESULTS / "heatmap_calibration.json", help="bench_heatmap's table"
    )
    parser.add_argument("--calibration-of", type=Path, help="use the review calibration in this model's card")
    parser.add_argument("--model", type=Path, default=resources_dir() / DEMO_MODEL)
    parser.add_argument("--trained-on", nargs="+", default=["sample"], choices=list(CTS))
    parser.add_argument("--out", type=Path, required=True, help="the new model file (must not exist)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        calibration = args.calibration
        if args.calibration_of is not None:
            review = read_model_card(args.calibration_of).get("review") or {}
            if not review.get("calibration"):
                raise SystemExit(f"{args.calibration_of} has no review calibration in its card")
            calibration = Path(folder) / "calibration.json"
            fitted_on = f"the same recipe's {args.calibration_of}: {review.get('fitted_on', '')}"
            tables = {key: review[key] for key in ("calibration", "joint") if review.get(key)}
            calibration.write_text(json.dumps({**tables, "fitted_on": fitted_on}))
        trained_on = datalist(Path(folder) / "trained_on.json", list(args.trained_on))
        path = recalibrated(args.model, calibration, [str(trained_on)], args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
