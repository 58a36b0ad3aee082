"""A model's quality on the real CTs: Dice per structure on each CT's own grid, each row marked
with whether the model was trained on that CT (``--seen``: a model card names its datasets, not
their images), so a figure on a patient it never saw is never confused with one on its training data.

    python Testing/benchmarks/bench_demo_model.py --seen sample lidc     # the shipped demo model
    python Testing/benchmarks/bench_demo_model.py --model A.safetensors --seen sample

Prompts: those of the abdominal structures of ``real_cts.ABDOMINAL_PROMPTS`` the model was trained
on (its card's classes); a structure a CT does not show is left out of that CT's mean.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import benchlib
import numpy as np
import real_cts
from real_cts import ABDOMINAL_PROMPTS, CTS
from voila.data.io import read_image
from voila.evaluate.metrics import dice
from voila.infer.segmenter import Segmenter
from voila.model.model_file import read_model_card
from voila.vocabulary import Vocabulary


def score(segmenter: Segmenter, ct_name: str, vocabulary: Vocabulary, prompts: list[str]) -> dict:
    ct, affine = read_image(CTS[ct_name][0])
    labels, _ = read_image(CTS[ct_name][1])
    started = time.perf_counter()
    result = segmenter.segment(ct, affine, prompts, heatmap=None)
    seconds = time.perf_counter() - started
    per_structure = {}
    for found in result.prompts:
        reference = labels == vocabulary.match(found.prompt).label
        if not reference.any():
            continue  # the CT does not show it
        predicted = result.labelmap == found.label if found.found else np.zeros(reference.shape, bool)
        per_structure[found.prompt] = float(dice(predicted, reference))
    return {"dice": per_structure, "mean": float(np.mean(list(per_structure.values()))), "seconds": seconds}


def demo_prompts(model: Path, vocabulary: Vocabulary) -> list[str]:
    """The abdominal prompts of :data:`real_cts.ABDOMINAL_PROMPTS` that ``model`` was trained on."""
    classes = set(read_model_card(model)["classes"])
    return [p for p in ABDOMINAL_PROMPTS if vocabulary.match(p).name in classes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=benchlib.DEMO_MODEL)
    parser.add_argument("--cts", nargs="+", default=list(CTS), choices=list(CTS))
    parser.add_argument("--seen", nargs="*", default=[], choices=list(CTS), help="the CTs it was trained on")
    args = parser.parse_args()
    info = benchlib.machine()
    benchlib.print_machine(info)
    real_cts.require(*args.cts)
    vocabulary = Vocabulary.load()
    rows, results = [], []
    segmenter = Segmenter.load(args.model, device="cpu")
    prompts = demo_prompts(args.model, vocabulary)
    for ct_name in args.cts:
        scored = score(segmenter, ct_name, vocabulary, prompts)
        seen = ct_name in args.seen
        results.append({"ct": ct_name, "trained_on_it": seen, **scored})
        rows.append(
            [ct_name, "yes" if seen else "**no**", f"{scored['mean']:.3f}"]
            + [f"{scored['dice'][p]:.3f}" if p in scored["dice"] else "—" for p in prompts]
        )
    benchlib.print_table(["CT", "trained on it", "mean", *prompts], rows, title=str(args.model))
    name = args.model.parent.name if args.model.stem == "model" else args.model.stem
    benchlib.write_results(f"demo_model_{name}", {"machine": info, "model": str(args.model),
                           "description": read_model_card(args.model).get("description", ""), "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
