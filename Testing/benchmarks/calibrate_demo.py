"""Give the shipped demo model the review map's calibration measured on a patient it never saw.

The demo model was trained on the bundled CT only, so LIDC-IDRI-0001 (``../shared/data``) is unseen:
``bench_heatmap.py`` scores it there and fits the calibration table on its errors; this script
copies the model with that table and the structures' places (from the bundled CT) in its card.

    python Testing/benchmarks/bench_heatmap.py --pair Resources/Models/voila_demo.safetensors lidc ...
    python Testing/benchmarks/calibrate_demo.py --out runs/voila_demo_calibrated.safetensors
    mv runs/voila_demo_calibrated.safetensors Resources/Models/voila_demo.safetensors
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from real_cts import datalist
from voila.resources import DEMO_MODEL, resources_dir
from voila.training.export import recalibrated

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--calibration", type=Path, default=RESULTS / "heatmap_calibration_voila_demo_on_lidc.json"
    )
    parser.add_argument("--out", type=Path, required=True, help="the new model file (must not exist)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        trained_on = datalist(Path(folder) / "sample.json", ["sample"])
        path = recalibrated(resources_dir() / DEMO_MODEL, args.calibration, [str(trained_on)], args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
