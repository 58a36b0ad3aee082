"""Training cost of the voxel sampling: step time and peak memory at equal patch for CAS (0.1),
random (0.1) and no sampling (full-voxel loss), and wall-clock to a fixed held-out Dice.

The paper claims faster *convergence*, not a cheaper step (CAS adds a VAE pass per step): this
benchmark measures both and says which holds here. Every run is voila's own trainer
(:mod:`trainer_runs`), so the step times are the trainer's (data loading included). Step time and
peak RSS come from one child process per mode (the CLIP features are computed once by the parent
and handed over as a file through the ``encode_class_texts`` hook, so the child's peak is the
training's); convergence runs in this process, training in epochs of ``--val-every`` steps and
validating after each (validation time is not counted), until the mean held-out Dice reaches
``--dice`` or the training time reaches ``--cap`` seconds (the ``on_validation`` hook stops it).

    python Testing/benchmarks/bench_training.py [--size 32] [--dice 0.8] [--cap 240]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import benchlib
import torch
import trainer_runs as tr

MODES = (("cas", "CAS 0.1"), ("random", "random 0.1"), ("none", "no sampling"))


def child(mode: str, features_path: str, data: str, size: int, steps: int, device: str, out: str) -> None:
    config = tr.bench_config(Path(data), Path(out), size, 2 + steps, sampling=mode, device=device)
    trainer = tr.BenchTrainer(config, features_file=Path(features_path))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.run()
    timed = trainer.step_seconds[2:]
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


def converge(data: Path, features_path: Path, mode: str, args, device: str, out: Path) -> dict:
    config = tr.bench_config(
        data, out, args.size, args.max_steps, sampling=mode, val_every=args.val_every, device=device
    )
    trainer = tr.BenchTrainer(
        config, features_file=features_path, stop_at_dice=args.dice, cap_seconds=args.cap
    )
    print(f"  {mode}:", flush=True)
    trainer.run()
    curve = [{key: point[key] for key in ("step", "train_s", "dice")} for point in trainer.curve]
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
    parser.add_argument("--max-steps", type=int, default=2000, help="steps per mode at most (besides --cap)")
    parser.add_argument(
        "--child", nargs=7, metavar=("MODE", "FEATURES", "DATA", "SIZE", "STEPS", "DEVICE", "OUT")
    )
    args = parser.parse_args()
    if args.child:
        mode, features_path, data, size, steps, device, out = args.child
        child(mode, features_path, data, int(size), int(steps), device, out)
        return

    info = benchlib.machine()
    benchlib.print_machine(info)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    steps = []
    convergence = []
    device = devices[-1]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        data = tr.write_phantoms(folder / "data", args.n_train, 2, args.size, args.spacing)
        features_path = tr.save_class_features(data, folder / "features.pt")
        for device_name in devices:
            for mode, _ in MODES:
                print(f"step time, {mode}, {device_name} ...", flush=True)
                out = folder / f"steps-{mode}-{device_name}"
                arguments = [__file__, "--child", mode, str(features_path), str(data), str(args.size)]
                steps.append(benchlib.run_child([*arguments, str(args.timed_steps), device_name, str(out)]))
        for mode, _ in MODES:
            print(
                f"convergence, {mode}, {device} (to Dice {args.dice}, cap {args.cap:.0f} s) ...", flush=True
            )
            convergence.append(converge(data, features_path, mode, args, device, folder / f"converge-{mode}"))

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
        title=f"tiny preset, batch 2, {args.size}^3 phantoms at {args.spacing} mm, seed {tr.SEED}",
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
