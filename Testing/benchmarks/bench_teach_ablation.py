"""The teaching parts ablated: text adapters, cross-attention fusion, parameter-efficient training.

The pulmonary artery/vein paper teaches a frozen-CLIP model new vessels with learnable text adapters,
a cross-attention fusion of text and image features, and half-labelled CTs. Here each part is a
switch of ``voila.finetune``, and every arm teaches the shipped demo model (or ``--base``) the same
four structures it does not know (:data:`NEW`: pancreas, L1 vertebra, left and right autochthonous
back muscles) from the two real CTs, **contoured on every ``--every``-th axial slice only** — the
half-labelled case: an ``annotated.nii.gz`` per CT marks those slices, so the slices between them
are "not annotated", not "absent" — time-boxed at ``--minutes`` on the CPU, same seed and data.
Arms (:data:`ARMS`): fine-tuning's defaults; + text adapters; + fusion; both; the parameter-efficient
mode (encoder frozen but its last stage); and the training defaults' learning rates instead of
fine-tuning's cautious ones.

Scored per arm: Dice of each new structure on the **slices no run was shown** (the other
``every - 1`` of each ``every``; the same two patients: this measures filling in what the user did
not contour, not other patients), on the input grid; and the base's own structures on both CTs
before → after (the forgetting measure, ``bench_teach_openkbp.base_structures``).

    python Testing/benchmarks/bench_teach_ablation.py [--minutes 12] [--every 4] [--arms baseline fusion ...]
        [--reuse]

``--reuse`` scores the arms' models of an earlier run again (``runs/teach-ablation/ARM``) instead
of teaching them anew; steps and training minutes come from each model's card. The results file
keeps the arms a run does not name (each with its own command and date).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import benchlib
import nibabel as nib
import numpy as np
import real_cts
from bench_teach_openkbp import base_structures, teach
from voila.data.io import read_image, write_volume
from voila.evaluate.metrics import dice
from voila.infer.segmenter import Segmenter
from voila.model.model_file import read_model_card
from voila.vocabulary import Vocabulary

NEW = ("pancreas", "vertebrae_L1", "autochthon_left", "autochthon_right")
# arm → the fine-tuning settings that make it (everything else: voila.finetune's defaults)
ARMS = {
    "baseline": {},
    "text_adapters": {"text_adapters": True},
    "fusion": {"fusion": True},
    "adapters+fusion": {"text_adapters": True, "fusion": True},
    "neck": {"trainable": "neck"},
    # the training defaults instead of the cautious fine-tuning ones (lr 3e-4, encoder at 0.1×)
    "full_speed": {"lr": 1e-3, "encoder_lr": 1.0},
}
RUNS = Path(__file__).resolve().parents[2] / "runs" / "teach-ablation"


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis that runs head-feet."""
    codes = nib.aff2axcodes(affine)
    return codes.index("S") if "S" in codes else codes.index("I")


def contoured_slices(shape, affine: np.ndarray, every: int) -> np.ndarray:
    """Bool ``shape``: the axial slices a user contoured (every ``every``-th, from the first)."""
    axis = axial_axis(affine)
    region = np.zeros(shape, bool)
    index = [slice(None)] * 3
    index[axis] = slice(0, None, every)
    region[tuple(index)] = True
    return region


def write_half_labelled(folder: Path, vocabulary: Vocabulary, every: int) -> None:
    """Each real CT as a case in the TotalSegmentator layout: the CT, masks of :data:`NEW` on the
    contoured slices only, and ``annotated.nii.gz`` marking those slices."""
    for name, (ct_path, labels_path) in real_cts.CTS.items():
        case = folder / name
        (case / "segmentations").mkdir(parents=True)
        (case / "ct.nii.gz").symlink_to(ct_path)
        labels, affine = read_image(labels_path)
        region = contoured_slices(labels.shape, affine, every)
        write_volume(case / "annotated.nii.gz", region.astype(np.uint8), affine)
        for structure in NEW:
            mask = (labels == vocabulary.match(structure).label) & region
            write_volume(case / "segmentations" / f"{structure}.nii.gz", mask.astype(np.uint8), affine)


def score_unseen_slices(model: Path, vocabulary: Vocabulary, every: int) -> dict[str, dict[str, float]]:
    """``{ct: {structure: Dice}}`` of the new structures on the slices no run was shown."""
    segmenter = Segmenter.load(model, device="cpu")
    scores = {}
    for name, (ct_path, labels_path) in real_cts.CTS.items():
        ct, affine = read_image(ct_path)
        labels, _ = read_image(labels_path)
        unseen = ~contoured_slices(labels.shape, affine, every)
        result = segmenter.segment(ct, affine, list(NEW), heatmap=None)
        scores[name] = {}
        for structure, found in zip(NEW, result.prompts):
            reference = (labels == vocabulary.match(structure).label) & unseen
            predicted = (result.labelmap == found.label) & unseen if found.found else np.zeros_like(unseen)
            scores[name][structure] = float(dice(predicted, reference))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=benchlib.DEMO_MODEL)
    parser.add_argument("--minutes", type=float, default=12.0, help="time box of each teaching run")
    parser.add_argument("--every", type=int, default=4, help="contour every N-th axial slice")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--reuse", action="store_true", help="score the models of an earlier run again")
    args = parser.parse_args()
    info = benchlib.machine()
    benchlib.print_machine(info)
    real_cts.require(*real_cts.CTS)
    vocabulary = Vocabulary.load()
    for arm in args.arms:
        if args.reuse and not (RUNS / arm / "model.safetensors").is_file():
            raise SystemExit(f"--reuse: {RUNS / arm} has no model.safetensors; teach that arm first")
        if not args.reuse and (RUNS / arm).exists():
            raise SystemExit(f"{RUNS / arm} exists from an earlier run; move it away first (or --reuse it)")
    before = base_structures(args.base, vocabulary)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "half-labelled"
        write_half_labelled(data, vocabulary, args.every)
        for arm in args.arms:
            model = RUNS / arm / "model.safetensors"
            if not args.reuse:
                model, _ = teach(args.base, data, list(NEW), args.minutes, RUNS / arm, dict(ARMS[arm]))
            training = read_model_card(model)["training"]
            new = score_unseen_slices(model, vocabulary, args.every)
            after = base_structures(model, vocabulary, args.base)
            means = {ct: float(np.mean(list(v.values()))) for ct, v in new.items()}
            per_structure = {s: float(np.mean([new[ct][s] for ct in new])) for s in NEW}
            results.append(
                {
                    "arm": arm,
                    "command": benchlib.command_line(),
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                    "settings": ARMS[arm],
                    "steps": training["optimizer_steps"],
                    "training_minutes": training["minutes"],
                    "new_dice_unseen_slices": new,
                    "base_before": before,
                    "base_after": after,
                }
            )
            rows.append(
                [
                    arm,
                    training["optimizer_steps"],
                    f"{training['minutes']:.1f}",
                    f"{np.mean(list(means.values())):.3f}",
                ]
                + [f"{per_structure[s]:.3f}" for s in NEW]
                + [" / ".join(f"{before[c]:.3f} → {after[c]:.3f}" for c in real_cts.CTS)]
            )
            print(rows[-1], flush=True)
    benchlib.print_table(
        [
            "arm",
            "steps",
            "training minutes",
            "new (mean)",
            *NEW,
            f"base structures ({' / '.join(real_cts.CTS)})",
        ],
        rows,
        title=f"taught on every {args.every}th slice of both CTs, scored on the other slices",
    )
    benchlib.write_results(
        "teach_ablation",
        {
            "machine": info,
            "every": args.every,
            "minutes_box": args.minutes,
            "results": with_earlier_arms(results, args.every),
        },
    )


def with_earlier_arms(results: list[dict], every: int) -> list[dict]:
    """``results`` and the arms of the results file this run does not replace (same ``every``), in
    :data:`ARMS` order: teaching one arm again keeps the others' figures."""
    path = benchlib.RESULTS_DIR / "teach_ablation.json"
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    kept = [] if earlier.get("every") != every else earlier.get("results", [])
    merged = {r["arm"]: r for r in kept} | {r["arm"]: r for r in results}
    return [merged[arm] for arm in ARMS if arm in merged]


if __name__ == "__main__":
    main()
