"""The paper's Table 3 in miniature: held-out Dice on phantoms after equal training budgets for
CAS / random / no voxel sampling, and the language head versus a plain linear head.

Every arm is one run of voila's own trainer (:mod:`trainer_runs`: the ``sampling`` setting, or the
``build_model_config`` hook for the head) with the same ``tiny`` network, seed, phantoms, order
and number of steps; only the compared setting changes. Held-out Dice: the trainer's validation
(:func:`voila.training.validation.validate_cases`) on validation phantoms (seeds the training
never sees), mean over the 10 phantom structures. Budgets are small so the whole run fits in minutes on 2 CPU cores: the
figures rank the settings at an early stage of training, they do not reproduce the paper's
converged numbers.

    python Testing/benchmarks/bench_ablation.py [--steps 40] [--size 32] [--spacing 3.0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import benchlib
import torch
import trainer_runs as tr

# (row, sampling, head, the paper's Ts-v2 Dice for that row)
ARMS = (
    ("CAS 0.1 (VOILA)", "cas", "language", 92.1),
    ("random 0.1", "random", "language", 91.5),
    ("no sampling", "none", "language", 86.0),
    ("CAS 0.1, w/o V-L interaction (linear head)", "cas", "linear", 88.1),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", type=int, default=32, help="phantom edge in voxels (= the patch)")
    parser.add_argument("--spacing", type=float, default=3.0, help="phantom voxel size in mm")
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-val", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()

    info = benchlib.machine()
    benchlib.print_machine(info)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        data = tr.write_phantoms(Path(folder) / "data", args.n_train, args.n_val, args.size, args.spacing)
        for number, (row, sampling, head, paper) in enumerate(ARMS):
            print(f"{row}: {args.steps} steps ...", flush=True)
            config = tr.bench_config(
                data,
                Path(folder) / f"arm{number}",
                args.size,
                args.steps,
                sampling=sampling,
                preset=args.preset,
                batch_size=args.batch_size,
            )
            trainer = tr.BenchTrainer(config, head=head)
            trainer.run()
            scores = dict(trainer.curve[-1]["per_class"], mean=trainer.curve[-1]["dice"])
            results.append(
                {
                    "row": row,
                    "sampling": sampling,
                    "head": head,
                    "steps": args.steps,
                    "train_seconds": sum(trainer.step_seconds),
                    "final_loss": trainer.losses[-1],
                    "val_dice": scores,
                    "paper_ts_v2_dice": paper,
                }
            )
            print(f"  mean Dice {scores['mean']:.3f}, training {sum(trainer.step_seconds):.0f} s", flush=True)
    total = time.perf_counter() - started
    benchlib.print_table(
        ["setting", "held-out Dice (mean of 10)", "train s", "final loss", "paper Ts-v2 Dice"],
        [
            [
                r["row"],
                f"{r['val_dice']['mean']:.3f}",
                f"{r['train_seconds']:.0f}",
                f"{r['final_loss']:.3f}",
                r["paper_ts_v2_dice"],
            ]
            for r in results
        ],
        title=(
            f"{args.preset} preset, {args.size}^3 phantoms at {args.spacing} mm, {args.n_train} train / "
            f"{args.n_val} held-out, {args.steps} steps x batch {args.batch_size}, seed {tr.SEED}, {device}; "
            f"whole run {total / 60:.1f} min"
        ),
    )
    benchlib.write_results(
        "ablation",
        {
            "machine": info,
            "device": device,
            "settings": vars(args),
            "seed": tr.SEED,
            "total_minutes": total / 60,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
