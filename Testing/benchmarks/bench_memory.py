"""Peak memory (RSS) and seconds to segment a large CT on the CPU (target: ≤ 4 GB).

The CT is synthetic: a :mod:`voila.data.phantoms` phantom of 128×128×100 voxels at
3.2×3.2×4.0 mm, repeated 4× along every axis to 512×512×400 int16 voxels at 0.8×0.8×1.0 mm (a
typical abdominal CT). The model is built for all 117 vocabulary structures at 1.5 mm with
untrained weights (memory and compute do not depend on training). The parent writes the CT
(``.npy``) and the model file; a fresh child process loads both and runs
``Segmenter.segment`` with all 117 prompts, so the child's peak RSS is exactly the cost of a
user's run (no CLIP weights: the prompts' embeddings travel in the model file).

    python Testing/benchmarks/bench_memory.py [--preset paper] [--overlap 0.25]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np
import torch

TARGET_GB = 4.0
SHAPE = (512, 512, 400)
SPACING = (0.8, 0.8, 1.0)
REPEAT = 4


def write_ct(folder: Path) -> tuple[Path, Path]:
    from voila.data.phantoms import make_phantom

    coarse_shape = tuple(n // REPEAT for n in SHAPE)
    coarse_spacing = tuple(s * REPEAT for s in SPACING)
    ct, _, coarse_affine = make_phantom(coarse_shape, coarse_spacing, seed=0)
    ct = ct.repeat(REPEAT, axis=0).repeat(REPEAT, axis=1).repeat(REPEAT, axis=2)
    assert ct.shape == SHAPE and ct.dtype == np.int16
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = coarse_affine[:3, 3] - (np.asarray(coarse_spacing) - np.asarray(SPACING)) / 2
    np.save(folder / "ct.npy", ct)
    np.save(folder / "affine.npy", affine)
    return folder / "ct.npy", folder / "affine.npy"


def build_model(folder: Path, preset: str) -> Path:
    from voila.data.preprocess import PreprocessingConfig
    from voila.model.config import load_preset
    from voila.model.factory import create_model
    from voila.model.model_file import save_model
    from voila.vocabulary import Vocabulary

    torch.manual_seed(0)
    vocabulary = Vocabulary.load()
    built = create_model(
        load_preset(preset), vocabulary.names, vocabulary, PreprocessingConfig(), text_pretrained=None
    )
    return save_model(folder / f"{preset}_117.safetensors", built.model, built.card, built.text_cache)


def child(model_path: str, ct_path: str, affine_path: str, overlap: float, device: str) -> None:
    from voila.infer.segmenter import Segmenter
    from voila.vocabulary import Vocabulary

    stages = {"after_imports": benchlib.own_peak_rss_bytes()}
    segmenter = Segmenter.load(model_path, device=device)
    stages["after_model"] = benchlib.own_peak_rss_bytes()
    image, affine = np.load(ct_path), np.load(affine_path)
    stages["after_ct"] = benchlib.own_peak_rss_bytes()
    prompts = [s.display_name for s in Vocabulary.load().structures]
    done = {"last": -1.0}

    def progress(fraction: float) -> None:
        if fraction - done["last"] >= 0.1 or fraction >= 1.0:
            done["last"] = fraction
            print(f"{fraction:5.0%}  {time.perf_counter() - started:6.1f} s", flush=True)

    windows = {"count": 0}
    segmenter.model.voxel_encoder.register_forward_hook(
        lambda *_: windows.__setitem__("count", windows["count"] + 1)
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = segmenter.segment(image, affine, prompts, heatmap=True, overlap=overlap, progress=progress)
    seconds = time.perf_counter() - started
    stages["after_segment"] = benchlib.own_peak_rss_bytes()
    benchlib.child_report(
        {
            "seconds": seconds,
            "stages_peak_rss_bytes": stages,
            "labelmap_dtype": str(result.labelmap.dtype),
            "found": sum(p.found for p in result.prompts),
            "windows": windows["count"],
            "gpu_max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="paper | small | tiny")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--child", nargs=5, metavar=("MODEL", "CT", "AFFINE", "OVERLAP", "DEVICE"))
    args = parser.parse_args()
    if args.child:
        model, ct, affine, overlap, device = args.child
        child(model, ct, affine, float(overlap), device)
        return

    info = benchlib.machine()
    benchlib.print_machine(info)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows, results = [], []
    with tempfile.TemporaryDirectory() as folder:
        ct_path, affine_path = write_ct(Path(folder))
        model_path = build_model(Path(folder), args.preset)
        for device in devices:
            print(
                f"segmenting {SHAPE} int16 at {SPACING} mm, preset {args.preset}, overlap {args.overlap}, {device}"
            )
            measured = benchlib.run_child(
                [
                    __file__,
                    "--child",
                    str(model_path),
                    str(ct_path),
                    str(affine_path),
                    str(args.overlap),
                    device,
                ]
            )
            measured["device"] = device
            results.append(measured)
            gpu = measured["gpu_max_memory_allocated_bytes"]
            rows.append(
                [
                    device,
                    args.preset,
                    args.overlap,
                    measured["windows"],
                    f"{measured['seconds']:.1f}",
                    f"{benchlib.gib(measured['peak_rss_bytes']):.2f}",
                    f"{measured['peak_rss_bytes'] / 1e9:.2f}",
                    f"{benchlib.gib(measured['sampled_peak_rss_bytes']):.2f}",
                    f"{benchlib.gib(gpu):.2f}" if gpu is not None else "-",
                    "yes"
                    if measured["peak_rss_bytes"] <= TARGET_GB * 1e9
                    else "NO",  # decimal GB: the stricter
                ]
            )
    if not torch.cuda.is_available():
        rows.append(["cuda", args.preset, args.overlap, "", benchlib.NO_GPU, "", "", "", "", ""])
    benchlib.print_table(
        [
            "device",
            "preset",
            "overlap",
            "windows",
            "s / CT",
            "peak RSS (GiB)",
            "peak RSS (GB)",
            "psutil peak (GiB)",
            "GPU max alloc (GiB)",
            f"<= {TARGET_GB} GB",
        ],
        rows,
        title=f"Segmenting a {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} int16 CT ({SPACING} mm), 117 prompts, model grid 1.5 mm",
    )
    benchlib.write_results(
        "memory",
        {
            "machine": info,
            "ct": {
                "shape": SHAPE,
                "dtype": "int16",
                "spacing_mm": SPACING,
                "source": "phantom 128x128x100 repeated 4x",
            },
            "preset": args.preset,
            "overlap": args.overlap,
            "prompts": 117,
            "target": f"peak RSS <= {TARGET_GB} GB (decimal: {TARGET_GB * 1e9:.0f} bytes)",
            "results": results,
            "gpu": None if torch.cuda.is_available() else benchlib.NO_GPU,
            "python": sys.version.split()[0],
        },
    )


if __name__ == "__main__":
    main()
