"""Teach the demo model head-and-neck organs from a few OpenKBP patients; score them on others.

For each number of patients (``--patients 1 2 4 8``): ``voila.finetune`` of the shipped demo model
(or ``--base``) on the first *n* OpenKBP training patients (sorted by number), time-boxed at
``--minutes`` on the CPU, learning the dataset's organs under their own CamelCase names
(``LeftParotid``, ...: free text for the model). Each taught model then segments the last
``--test`` patients, which no run trained on, with those names as prompts: Dice per organ on the
input grid, only where the patient's organ was contoured (a missing file is "not contoured").
Then the base's own structures before and after, on the two real CTs (``bench_demo_model``'s
scoring): the forgetting measure.

    python Testing/benchmarks/bench_teach_openkbp.py --openkbp PATH/openkbp [--patients 1 2 4 8]
        [--minutes 5] [--test 8] [--setting text_adapters=true --setting trainable=neck ...]

``--setting KEY=VALUE`` adds a fine-tuning setting to every run (the ablation of the paper's parts:
``text_adapters=true``, ``trainable=neck``); runs and results are named after them.

OpenKBP (168 patients, MIT; ``Testing/benchmarks/data/README.md`` says where it comes from) is not
in the repository: 128 MB.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np
import real_cts
from bench_demo_model import demo_prompts
from bench_demo_model import score as score_real_ct
from voila.data.io import read_image
from voila.evaluate.metrics import dice
from voila.infer.segmenter import Segmenter
from voila.training.finetune import finetune
from voila.vocabulary import Vocabulary

ORGANS = ("Brainstem", "SpinalCord", "LeftParotid", "RightParotid", "Esophagus", "Larynx", "Mandible")
RUNS = Path(__file__).resolve().parents[2] / "runs" / "teach-openkbp"


def patients(openkbp: Path) -> list[Path]:
    """The dataset's patients, ``pt_N`` sorted by N."""
    found = [p for p in openkbp.iterdir() if re.fullmatch(r"pt_\d+", p.name) and (p / "ct.nii.gz").exists()]
    if not found:
        raise SystemExit(
            f"no OpenKBP patients (pt_N/ct.nii.gz) in {openkbp}; give --openkbp the dataset folder"
        )
    return sorted(found, key=lambda p: int(p.name[3:]))


def contours(case: Path, organ: str) -> bool:
    """Whether the clinicians contoured ``organ`` on ``case`` (no file: not contoured)."""
    return (case / "segmentations" / f"{organ}.nii.gz").exists()


def teach(
    base: Path, data: Path, structures: list[str], minutes: float, out: Path, settings: dict
) -> tuple[Path, float]:
    """A model taught ``structures`` from the dataset ``data`` with the extra fine-tuning
    ``settings``, time-boxed at ``minutes`` on the CPU; seconds taken."""
    started = time.perf_counter()
    model = finetune(
        base,
        {
            "data": [str(data)],
            "structures": list(structures),
            "out": str(out),
            "max_minutes": minutes,
            "device": "cpu",
            **settings,
        },
        progress_bar=True,
    )
    return model, time.perf_counter() - started


def teach_patients(
    base: Path, cases: list[Path], minutes: float, out: Path, settings: dict
) -> tuple[Path, float]:
    """:func:`teach` the organs contoured on ``cases`` (through a folder of links to them)."""
    with tempfile.TemporaryDirectory() as folder:
        for case in cases:
            (Path(folder) / case.name).symlink_to(case, target_is_directory=True)
        organs = [o for o in ORGANS if any(contours(case, o) for case in cases)]
        return teach(base, Path(folder), organs, minutes, out, settings)


def score_openkbp(model: Path, cases: list[Path]) -> dict[str, list[float]]:
    """Dice of each organ on each test case that contours it."""
    segmenter = Segmenter.load(model, device="cpu")
    per_organ: dict[str, list[float]] = {organ: [] for organ in ORGANS}
    for case in cases:
        ct, affine = read_image(case / "ct.nii.gz")
        contoured = [o for o in ORGANS if contours(case, o)]
        result = segmenter.segment(ct, affine, contoured, heatmap=None)
        for organ, found in zip(contoured, result.prompts):
            reference = read_image(case / "segmentations" / f"{organ}.nii.gz")[0] > 0
            predicted = result.labelmap == found.label if found.found else np.zeros(reference.shape, bool)
            per_organ[organ].append(dice(predicted, reference))
    return per_organ


def base_structures(model: Path, vocabulary: Vocabulary, base: Path | None = None) -> dict[str, float]:
    """Mean Dice of the ``base``'s abdominal structures (default: ``model``'s) on each real CT, as
    ``model`` segments them (a structure taught on top of the base is not among them)."""
    segmenter = Segmenter.load(model, device="cpu")
    prompts = demo_prompts(base or model, vocabulary)
    return {ct: score_real_ct(segmenter, ct, vocabulary, prompts)["mean"] for ct in real_cts.CTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--openkbp", type=Path, required=True, help="the OpenKBP folder (pt_N/...)")
    parser.add_argument("--base", type=Path, default=benchlib.DEMO_MODEL)
    parser.add_argument("--patients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--minutes", type=float, default=5.0, help="time box of each teaching run")
    parser.add_argument("--test", type=int, default=8, help="patients scored (the last ones)")
    parser.add_argument(
        "--setting", action="append", default=[], metavar="KEY=VALUE", help="a fine-tuning setting"
    )
    args = parser.parse_args()
    settings = {}
    for item in args.setting:
        key, _, value = item.partition("=")
        settings[key] = {"true": True, "false": False}.get(value.lower(), value)
    suffix = "".join(f"-{k}-{v}" for k, v in settings.items())
    info = benchlib.machine()
    benchlib.print_machine(info)
    real_cts.require(*real_cts.CTS)
    every = patients(args.openkbp)
    if max(args.patients) + args.test > len(every):
        raise SystemExit(
            f"{len(every)} patients: too few for {max(args.patients)} taught and {args.test} scored"
        )
    held_out = every[-args.test :]
    vocabulary = Vocabulary.load()
    before = base_structures(args.base, vocabulary)
    rows, results = [], []
    for count in args.patients:
        out = RUNS / f"n{count}{suffix}"
        if out.exists():
            raise SystemExit(f"{out} exists from an earlier run; move it away first")
        model, seconds = teach_patients(args.base, every[:count], args.minutes, out, settings)
        organs = score_openkbp(model, held_out)
        after = base_structures(model, vocabulary, args.base)
        means = {o: float(np.mean(v)) for o, v in organs.items() if v}
        results.append(
            {
                "patients": count,
                "settings": settings,
                "minutes": seconds / 60,
                "dice": organs,
                "mean_dice": means,
                "base_before": before,
                "base_after": after,
            }
        )
        rows.append(
            [count, f"{seconds / 60:.1f}", f"{np.mean(list(means.values())):.3f}"]
            + [f"{means[o]:.3f}" if o in means else "—" for o in ORGANS]
            + [" / ".join(f"{before[c]:.3f} → {after[c]:.3f}" for c in real_cts.CTS)]
        )
    benchlib.print_table(
        ["patients", "minutes", "mean", *ORGANS, f"base structures ({' / '.join(real_cts.CTS)})"],
        rows,
        title=f"taught from OpenKBP, scored on {', '.join(p.name for p in held_out)}",
    )
    benchlib.write_results(
        f"teach_openkbp{suffix}",
        {"machine": info, "held_out": [p.name for p in held_out], "results": results},
    )


if __name__ == "__main__":
    main()
