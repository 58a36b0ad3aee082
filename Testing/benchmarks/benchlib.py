"""Shared helpers of the benchmarks: machine description, child processes with measured peak
memory, result files, tables, timing.

Benchmarks are scripts (``bench_*.py``), not tests: pytest never collects them. Each writes
``Testing/benchmarks/results/<name>.json`` with the machine and the exact command.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
RESULTS_DIR = BENCH_DIR / "results"
SAMPLE_CT = REPO / "Resources" / "SampleData" / "totalseg-example" / "example_ct.nii.gz"
DEMO_MODEL = REPO / "Resources" / "Models" / "voila_demo.safetensors"
NO_GPU = "not measured (no GPU in this run)"
# The line a child process prints its measurements on (anything else it prints is passed through).
CHILD_MARKER = "BENCH_RESULT "


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_ram_gb() -> float:
    import psutil

    return round(psutil.virtual_memory().total / 2**30, 1)


def training_processes() -> list[str]:
    """Command lines of VOILA training runs on this machine (they distort timings on shared cores)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        command = " ".join(process.info.get("cmdline") or [])
        if process.info["pid"] != os.getpid() and ("voila train" in command or "voila.train" in command):
            found.append(f"{process.info['pid']}: {command[:200]}")
    return found


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import monai
    import torch

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "ram_gb": total_ram_gb(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "monai": monai.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "training_processes_at_start": training_processes(),
    }
    return info


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *[_relative(a) for a in sys.argv]])


def _relative(argument: str) -> str:
    try:
        return str(Path(argument).resolve().relative_to(REPO)) if Path(argument).exists() else argument
    except ValueError:
        return argument


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """``results/<name>.json`` with the machine, the command and the end-of-run contention check."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **payload,
    }
    payload.setdefault("machine", machine())
    payload["machine"]["training_processes_at_end"] = training_processes()
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")
    print(f"\nresults: {path.relative_to(REPO)}")
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def print_machine(info: dict[str, Any]) -> None:
    print(
        f"machine: {info['nproc']} cores, {info['cpu']}, {info['ram_gb']} GB RAM, torch {info['torch']} "
        f"({info['torch_threads']} threads), MONAI {info['monai']}, GPU: {info['gpu'] or 'none'}"
    )
    if info["training_processes_at_start"]:
        print("WARNING: a VOILA training run shares the CPU; timings are distorted:")
        for line in info["training_processes_at_start"]:
            print(f"  {line}")


def median_seconds(function: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall-clock seconds of ``function`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def run_child(arguments: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python <arguments>`` and return its ``BENCH_RESULT`` JSON plus its peak memory.

    ``peak_rss_bytes`` is the child's high-water RSS ``VmHWM`` (``/proc/self/status``), read by
    the child itself when it reports; ``sampled_peak_rss_bytes`` is the largest RSS psutil saw
    every 50 ms. ``rusage_maxrss_bytes`` (``os.wait4``: this child only, unlike
    ``RUSAGE_CHILDREN``) is kept for reference but is only an upper bound: Linux carries the
    parent's high-water mark into a child across ``exec``, so it never reads below the parent's
    peak at the time of the spawn.
    """
    import psutil

    command = [sys.executable, *arguments]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampled = {"peak": 0}
    finished = threading.Event()

    def sample() -> None:
        try:
            handle = psutil.Process(process.pid)
            while not finished.is_set():
                sampled["peak"] = max(sampled["peak"], handle.memory_info().rss)
                finished.wait(0.05)
        except psutil.Error:
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines: list[str] = []
    started = time.monotonic()
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if not line.startswith(CHILD_MARKER):
            print(f"    [child] {line.rstrip()}", flush=True)
        if timeout is not None and time.monotonic() - started > timeout:
            process.kill()
            break
    _, status, usage = os.wait4(process.pid, 0)
    finished.set()
    sampler.join()
    code = os.waitstatus_to_exitcode(status)
    results = [json.loads(line[len(CHILD_MARKER) :]) for line in lines if line.startswith(CHILD_MARKER)]
    if code != 0 or not results:
        tail = "".join(lines[-20:])
        raise RuntimeError(f"benchmark child {' '.join(arguments)} failed (exit {code}):\n{tail}")
    result = results[-1]
    # Linux reports ru_maxrss in KiB.
    result["rusage_maxrss_bytes"] = usage.ru_maxrss * 1024
    result["peak_rss_bytes"] = result.pop("vm_hwm_bytes", None) or usage.ru_maxrss * 1024
    result["sampled_peak_rss_bytes"] = sampled["peak"]
    return result


def child_report(values: dict[str, Any]) -> None:
    """Called at the end of a child process: hand ``values`` (JSON-ready) and the process's
    high-water RSS to :func:`run_child`."""
    values = dict(values, vm_hwm_bytes=own_peak_rss_bytes())
    print(CHILD_MARKER + json.dumps(values, default=_json_default), flush=True)


def own_peak_rss_bytes() -> int:
    """This process's high-water RSS since its ``exec`` (``VmHWM``; unlike ``ru_maxrss`` it does not
    include the parent's)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gib(value: float) -> float:
    return round(value / 2**30, 3)
