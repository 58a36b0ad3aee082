"""Run every benchmark with its default settings, one after another (``make -C VOILATraining bench``).

Each script prints its table and writes ``Testing/benchmarks/results/<name>.json``; copy the
figures into ``BENCHMARKS.md`` with the command and the machine. Timings are only meaningful when
nothing else loads the CPU (this script warns when a VOILA training run is going on).

    python Testing/benchmarks/run_all.py [--only prompt_scaling,memory]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import benchlib

BENCHMARKS = ("prompt_scaling", "memory", "vs_nnunet", "training", "ablation", "train_phantoms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    args = parser.parse_args()
    chosen = [name for name in args.only.split(",") if name]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    busy = benchlib.training_processes()
    if busy:
        print("WARNING: VOILA training is running on this machine; timings will be distorted:")
        print("\n".join(f"  {line}" for line in busy))
    outcome = {}
    for name in chosen:
        script = benchlib.BENCH_DIR / f"bench_{name}.py"
        print(f"\n=== {name}: {script.relative_to(benchlib.REPO)} ===", flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, str(script)])
        outcome[name] = (code, time.perf_counter() - started)
    print("\nsummary:")
    for name, (code, seconds) in outcome.items():
        print(f"  {name:<15} {'ok' if code == 0 else f'FAILED (exit {code})':<16} {seconds / 60:.1f} min")
    return 0 if all(code == 0 for code, _ in outcome.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
