"""Training cost of the voxel sampling: step time and peak memory at equal patch for CAS (0.1),
random (0.1) and no sampling (full-voxel loss), and wall-clock to a fixed held-out Dice.

The paper claims faster *convergence*, not a cheaper step (CAS adds a VAE pass per step): this
benchmark measures both and says which holds here. Step time and peak RSS come from one child
process per mode (the CLIP features are computed once by the parent and handed over as a file,
so the child's peak is the training's); convergence runs in this process, training in blocks of
``--val-every`` steps and validating after each (validation time is not counted), until the mean
held-out Dice reaches ``--dice`` or the training time reaches ``--cap`` seconds.

    python Testing/benchmarks/bench_training.py [--size 32] [--dice 0.8] [--cap 240]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import benchlib
import phantom_training as pt
import torch

MODES = (("cas", "CAS 0.1"), ("random", "random 0.1"), ("none", "no sampling"))


def child(mode: str, features_path: str, size: int, spacing: float, steps: int, device: str) -> None:
    data = pt.PhantomData.create(4, 0, size, spacing)
    features = torch.load(features_path, weights_only=True)  # a plain tensor: never unpickle code
    run = pt.TrainingRun(pt.build_model("tiny", "language", data), data, features, mode, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run.steps(2 + steps)
    timed = run.step_seconds[2:]
    benchlib.child_report(
        {
            "mode": mode,
            "device": device,
            "steps_timed": steps,
            "median_step_s": statistics.median(timed),
            "iterations_per_s": 1.0 / statistics.median(timed),
            "gpu_max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        }
    )


def converge(data: pt.PhantomData, features: torch.Tensor, mode: str, args, device: str) -> dict:
    run = pt.TrainingRun(pt.build_model("tiny", "language", data), data, features, mode, device=device)
    curve = []
    while sum(run.step_seconds) < args.cap:
        run.steps(args.val_every)
        score = run.validation_dice()["mean"]
        curve.append({"step": len(run.step_seconds), "train_s": sum(run.step_seconds), "dice": score})
        print(
            f"  {mode}: step {len(run.step_seconds)}, {sum(run.step_seconds):.0f} s, Dice {score:.3f}",
            flush=True,
        )
        if score >= args.dice:
            break
    reached = next((point for point in curve if point["dice"] >= args.dice), None)
    return {
        "mode": mode,
        "reached": reached is not None,
        "seconds_to_dice": reached["train_s"] if reached else None,
        "steps_to_dice": reached["step"] if reached else None,
        "best_dice": max(point["dice"] for point in curve),
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="phantom and patch edge in voxels")
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--timed-steps", type=int, default=5)
    parser.add_argument("--dice", type=float, default=0.8, help="held-out mean Dice to reach")
    parser.add_argument("--cap", type=float, default=240.0, help="training seconds per mode at most")
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument(
        "--child", nargs=6, metavar=("MODE", "FEATURES", "SIZE", "SPACING", "STEPS", "DEVICE")
    )
    args = parser.parse_args()
    if args.child:
        mode, features_path, size, spacing, steps, device = args.child
        child(mode, features_path, int(size), float(spacing), int(steps), device)
        return

    info = benchlib.machine()
    benchlib.print_machine(info)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    data = pt.PhantomData.create(args.n_train, 2, args.size, args.spacing)
    features = pt.class_features(data.classes)
    steps = []
    with tempfile.TemporaryDirectory() as folder:
        features_path = Path(folder) / "features.pt"
        torch.save(features, features_path)
        for device in devices:
            for mode, _ in MODES:
                print(f"step time, {mode}, {device} ...", flush=True)
                arguments = [__file__, "--child", mode, str(features_path), str(args.size), str(args.spacing)]
                steps.append(benchlib.run_child([*arguments, str(args.timed_steps), device]))
    device = devices[-1]
    convergence = []
    for mode, _ in MODES:
        print(f"convergence, {mode}, {device} (to Dice {args.dice}, cap {args.cap:.0f} s) ...", flush=True)
        convergence.append(converge(data, features, mode, args, device))

    rows = []
    for mode, label in MODES:
        for s in (s for s in steps if s["mode"] == mode):
            c = next(c for c in convergence if c["mode"] == mode) if s["device"] == device else None
            gpu = s["gpu_max_memory_allocated_bytes"]
            rows.append(
                [
                    label,
                    s["device"],
                    f"{s['median_step_s']:.2f}",
                    f"{s['iterations_per_s']:.2f}",
                    f"{benchlib.gib(s['peak_rss_bytes']):.2f}",
                    f"{benchlib.gib(gpu):.2f}" if gpu is not None else "-",
                    (
                        f"{c['seconds_to_dice']:.0f} s ({c['steps_to_dice']} steps)"
                        if c["reached"]
                        else f"not within {args.cap:.0f} s"
                    )
                    if c
                    else "-",
                    f"{c['best_dice']:.3f}" if c else "-",
                ]
            )
    if not torch.cuda.is_available():
        rows.append(["all", "cuda", benchlib.NO_GPU, "", "", "", "", ""])
    benchlib.print_table(
        [
            "sampling",
            "device",
            "s / step",
            "it / s",
            "peak RSS (GiB)",
            "GPU max alloc (GiB)",
            f"to Dice {args.dice}",
            "best Dice",
        ],
        rows,
        title=f"tiny preset, batch 2, {args.size}^3 phantoms at {args.spacing} mm, seed {pt.SEED}",
    )
    by_mode = {c["mode"]: c for c in convergence}
    step_of = {s["mode"]: s["median_step_s"] for s in steps if s["device"] == device}
    cheaper_step = step_of["cas"] < step_of["none"]
    faster = by_mode["cas"]["reached"] and (
        not by_mode["none"]["reached"]
        or by_mode["cas"]["seconds_to_dice"] < by_mode["none"]["seconds_to_dice"]
    )
    verdict = (
        f"CAS step {'cheaper' if cheaper_step else 'dearer'} than a full-voxel step "
        f"({step_of['cas']:.2f} vs {step_of['none']:.2f} s); CAS "
        + ("reached" if by_mode["cas"]["reached"] else "did not reach")
        + f" Dice {args.dice} "
        + ("first" if faster else "(not first)" if by_mode["cas"]["reached"] else f"within {args.cap:.0f} s")
    )
    print(f"\n{verdict}")
    benchlib.write_results(
        "training",
        {
            "machine": info,
            "settings": {k: v for k, v in vars(args).items() if k != "child"},
            "step_time": steps,
            "convergence": convergence,
            "verdict": verdict,
            "gpu": None if torch.cuda.is_available() else benchlib.NO_GPU,
        },
    )


if __name__ == "__main__":
    main()
