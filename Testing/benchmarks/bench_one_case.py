"""A user with one case and ten minutes: does ``voila train`` make hundreds of steps?

Runs, as a user would (issue 15), in a child process:

    voila train --data ONE_CASE --preset small --max-minutes 10 --text-pretrained none --device cpu --out DIR

on the bundled CT exported as a one-case TotalSegmentator dataset (117 structures), then reads the
exported model's card: optimiser steps, minutes, validations and their share of the run, and the
validation Dice (on the training case: with one case there is nothing else to validate on).

    python Testing/benchmarks/bench_one_case.py [--minutes 10] [--preset small]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from voila.model.model_file import read_model_card
from voila.training.sample_dataset import write_sample_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    info = benchlib.machine()
    benchlib.print_machine(info)
    with tempfile.TemporaryDirectory() as folder:
        data = write_sample_dataset(Path(folder) / "one_case")
        out = Path(folder) / "run"
        command = [sys.executable, "-m", "voila", "train", "--data", str(data), "--preset", args.preset,
                   "--max-minutes", f"{args.minutes:g}", "--text-pretrained", "none", "--device", "cpu",
                   "--out", str(out)]  # fmt: skip
        started = time.monotonic()
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - started
        log = (out / "train.log").read_text(encoding="utf-8") if (out / "train.log").is_file() else ""
        if finished.returncode != 0:
            print(finished.stderr[-3000:])
            raise SystemExit(f"voila train failed with exit code {finished.returncode}")
        training = read_model_card(out / "model.safetensors")["training"]
    validation_seconds = sum(
        float(s) for s in re.findall(r"validation after epoch \d+: .*\(([\d.]+) s\)", log)
    )
    validations = len(re.findall(r"validation after epoch", log))
    final_check = re.findall(r"validation of the exported model, whole cases: .*\(([\d.]+) s\)", log)
    plan = re.findall(r"time box: (.*)", log)
    row = {
        "command": " ".join(["voila", *command[3:]]),
        "optimizer_steps": training["optimizer_steps"],
        "training_minutes": training["minutes"],
        "command_minutes": seconds / 60,
        "validations": validations,
        "validation_seconds": validation_seconds,
        "validation_share": validation_seconds / max(seconds, 1e-9),
        "final_check_seconds": float(final_check[0]) if final_check else None,
        "time_box_plan": plan[0] if plan else None,
        "val_mean_dice": training.get("val_mean_dice"),
        "final_val_mean_dice": training.get("final_val_mean_dice"),
    }
    benchlib.print_table(
        [
            "steps",
            "training min",
            "command min",
            "validations",
            "validation share",
            "final whole-case check s",
            "val Dice (training case)",
        ],
        [
            [
                row["optimizer_steps"],
                f"{row['training_minutes']:.1f}",
                f"{row['command_minutes']:.1f}",
                validations,
                f"{row['validation_share']:.1%}",
                row["final_check_seconds"],
                row["final_val_mean_dice"],
            ]
        ],  # fmt: skip
    )
    if plan:
        print(f"time box: {plan[0]}")
    benchlib.write_results("one_case", {"machine": info, "results": row})


if __name__ == "__main__":
    main()
