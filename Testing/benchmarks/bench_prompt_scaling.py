"""Seconds to segment the bundled CT with 1, 10 and 117 prompts (target: 117 prompts ≤ 1.2× one).

Models: the shipped demo model when it exists, and always a ``tiny`` model built for all 117
vocabulary structures (untrained weights; timing does not depend on training), so every one of
the 117 prompts is a trained class. Prompts are the vocabulary's display names in vocabulary
order. Each figure is the median of ``--repeats`` runs after one warm-up run of
``Segmenter.segment`` (preprocessing, sliding windows, per-prompt statistics, resampling back
to the input grid, heatmap).

    python Testing/benchmarks/bench_prompt_scaling.py [--repeats 3] [--spacing 3.0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import benchlib
import torch

PROMPT_COUNTS = (1, 10, 117)
TARGET_RATIO = 1.2


def build_vocabulary_model(folder: Path, spacing: float) -> Path:
    """A ``tiny`` model for all 117 vocabulary structures at ``spacing`` mm (random CLIP weights)."""
    from voila.data.preprocess import PreprocessingConfig
    from voila.model.config import load_preset
    from voila.model.factory import create_model
    from voila.model.model_file import save_model
    from voila.vocabulary import Vocabulary

    torch.manual_seed(0)
    vocabulary = Vocabulary.load()
    built = create_model(
        load_preset("tiny"),
        vocabulary.names,
        vocabulary,
        PreprocessingConfig(spacing=(spacing,) * 3),
        text_pretrained=None,
        description="untrained tiny model for all 117 vocabulary structures (benchmark)",
    )
    return save_model(folder / "tiny_117.safetensors", built.model, built.card, built.text_cache)


def measure_model(
    label: str, model_path: Path, device: str, prompts: list[str], repeats: int, overlap: float
) -> dict:
    from voila.data.io import read_image
    from voila.infer.segmenter import Segmenter

    segmenter = Segmenter.load(model_path, device=device)
    image, affine = read_image(benchlib.SAMPLE_CT)
    rows = []
    for count in PROMPT_COUNTS:
        chosen = prompts[:count]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def run(chosen=chosen):
            result = segmenter.segment(image, affine, chosen, heatmap=True, overlap=overlap)
            if device == "cuda":
                torch.cuda.synchronize()
            return result

        median, times = benchlib.median_seconds(run, repeats, warmup=1)
        row = {
            "prompts": count,
            "median_s": round(median, 3),
            "runs_s": [round(t, 3) for t in times],
            "trained_prompts": sum(1 for p in segmenter.resolve_prompts(chosen)[0] if p.trained),
        }
        if device == "cuda":
            row["gpu_max_memory_allocated_gib"] = benchlib.gib(torch.cuda.max_memory_allocated())
        rows.append(row)
        print(
            f"  {label} [{device}] {count:>3} prompts: median {median:.2f} s  runs {row['runs_s']}",
            flush=True,
        )
    ratio = rows[-1]["median_s"] / rows[0]["median_s"]
    return {
        "model": label,
        "file": model_path.name,
        "device": device,
        "amp": "bf16/fp16 autocast (Segmenter default on CUDA)" if device == "cuda" else "none (fp32)",
        "classes_in_model": len(segmenter.classes) - 1,
        "model_spacing_mm": list(segmenter.preprocessing.spacing),
        "patch_size": list(segmenter.patch_size),
        "overlap": overlap,
        "rows": rows,
        "ratio_117_over_1": round(ratio, 3),
        "meets_target": ratio <= TARGET_RATIO,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spacing", type=float, default=3.0, help="model grid (mm) of the 117-class model")
    parser.add_argument("--overlap", type=float, default=0.5)
    args = parser.parse_args()

    from voila.vocabulary import Vocabulary

    info = benchlib.machine()
    benchlib.print_machine(info)
    prompts = [s.display_name for s in Vocabulary.load().structures]
    assert len(prompts) == 117, f"the vocabulary has {len(prompts)} structures, expected 117"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    with tempfile.TemporaryDirectory() as folder:
        models = []
        if benchlib.DEMO_MODEL.is_file():
            models.append(("demo model", benchlib.DEMO_MODEL))
        else:
            print(f"{benchlib.DEMO_MODEL.name} is not there yet: measuring the 117-class model only")
        models.append(("tiny, 117 classes", build_vocabulary_model(Path(folder), args.spacing)))
        for device in devices:
            for label, path in models:
                results.append(measure_model(label, path, device, prompts, args.repeats, args.overlap))

    table = []
    for r in results:
        seconds = {row["prompts"]: row["median_s"] for row in r["rows"]}
        table.append(
            [
                r["model"],
                r["device"],
                r["classes_in_model"],
                f"{r['model_spacing_mm'][0]:g} mm",
                *(f"{seconds[c]:.2f}" for c in PROMPT_COUNTS),
                f"{r['ratio_117_over_1']:.3f}x",
                "yes" if r["meets_target"] else "NO",
            ]
        )
    if not torch.cuda.is_available():
        for label, _ in models:
            table.append([label, "cuda", "", "", benchlib.NO_GPU, "", "", "", ""])
    benchlib.print_table(
        [
            "model",
            "device",
            "classes",
            "grid",
            "1 prompt (s)",
            "10 (s)",
            "117 (s)",
            "117/1",
            f"<= {TARGET_RATIO}x",
        ],
        table,
        title=f"Segmenting {benchlib.SAMPLE_CT.name}: median of {args.repeats} after a warm-up",
    )
    benchlib.write_results(
        "prompt_scaling",
        {
            "machine": info,
            "target": f"117 prompts <= {TARGET_RATIO}x the seconds of 1 prompt",
            "results": results,
            "gpu": None if torch.cuda.is_available() else benchlib.NO_GPU,
        },
    )


if __name__ == "__main__":
    main()
