"""Steering a result: re-prompting from a kept encoding, zoom-out-zoom-in, and clicks.

With the shipped demo model (or ``--model``), on the bundled CT (``sample``) and on LIDC-IDRI-0001
(``lidc``, ``Testing/benchmarks/data``); the shipped model was trained on both, the one-CT model it
replaced on the bundled CT only:

- **re-prompt**: seconds of a full run (network + answer) against answering new prompts from the
  encoding the first run kept (what Slicer's worker and ``Segmenter.encode`` do);
- **zoom**: ``scan="zoom"`` (a thin pass finds each structure, full windows only there) against
  ``scan="full"``: seconds, and Dice of each against the reference labels and against each other;
- **clicks**: a simulated user, for each structure: one *inside* point at the reference structure's
  deepest voxel, then one *outside* point at the deepest voxel of the largest wrongly included
  region; Dice against the reference after each, and the seconds each click takes to answer.

    python Testing/benchmarks/bench_interactive.py [--model M] [--cts sample lidc] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import benchlib
import numpy as np
import real_cts
from real_cts import CTS
from scipy import ndimage
from voila.data.io import read_image
from voila.evaluate.metrics import dice
from voila.infer.segmenter import Segmenter
from voila.vocabulary import Vocabulary

STRUCTURES = ("liver", "spleen", "left kidney", "right kidney", "aorta")
ZOOM_PROMPTS = (("liver",), ("liver", "spleen", "left kidney"))


def reference_masks(ct_name: str, vocabulary: Vocabulary) -> dict[str, np.ndarray]:
    """The reference mask ``[i, j, k]`` of each of :data:`STRUCTURES` on the CT's own grid."""
    labels, _ = read_image(CTS[ct_name][1])
    masks = {}
    for prompt in STRUCTURES:
        entry = vocabulary.match(prompt)
        masks[prompt] = labels == entry.label
    return masks


def deepest_point(mask: np.ndarray, affine: np.ndarray) -> tuple[float, float, float]:
    """World RAS (mm) of the voxel of ``mask`` farthest from its boundary."""
    depth = ndimage.distance_transform_edt(mask)
    index = np.unravel_index(int(np.argmax(depth)), mask.shape)
    return tuple(float(v) for v in (affine @ [*index, 1.0])[:3])


def prompt_mask(result, prompt: str) -> np.ndarray:
    found = next(p for p in result.prompts if p.prompt == prompt)
    return result.labelmap == found.label if found.found else np.zeros(result.labelmap.shape, bool)


def reprompt_rows(segmenter, ct, affine, repeats: int) -> dict:
    full = [segmenter.segment(ct, affine, ["liver"], heatmap=None).seconds for _ in range(repeats)]
    started = time.perf_counter()
    encoding = segmenter.encode(ct, affine)
    encode_seconds = time.perf_counter() - started
    answers = {}
    for prompts in (["spleen"], list(STRUCTURES)):
        seconds, _ = benchlib.median_seconds(lambda p=prompts: encoding.segment(p, heatmap=None), repeats)
        answers[", ".join(prompts)] = seconds
    return {
        "full_run_seconds": float(np.median(full)),
        "encode_seconds": encode_seconds,
        "answer_seconds": answers,
        "encoding": encoding,
    }


def zoom_rows(segmenter, ct, affine, references) -> list[dict]:
    rows = []
    for prompts in ZOOM_PROMPTS:
        full = segmenter.segment(ct, affine, list(prompts), heatmap=None, scan="full")
        zoom = segmenter.segment(ct, affine, list(prompts), heatmap=None, scan="zoom")
        rows.append(
            {
                "prompts": list(prompts),
                "full_seconds": full.seconds,
                "zoom_seconds": zoom.seconds,
                "dice_full": {p: dice(prompt_mask(full, p), references[p]) for p in prompts},
                "dice_zoom": {p: dice(prompt_mask(zoom, p), references[p]) for p in prompts},
                "zoom_vs_full": {p: dice(prompt_mask(zoom, p), prompt_mask(full, p)) for p in prompts},
            }
        )
    return rows


def click_rows(encoding, affine, references) -> list[dict]:
    rows = []
    for prompt in STRUCTURES:
        reference = references[prompt]
        if not reference.any():
            continue
        before = prompt_mask(encoding.segment([prompt], heatmap=None), prompt)
        inside = [(deepest_point(reference, affine), True)]
        started = time.perf_counter()
        one = prompt_mask(encoding.segment([prompt], points={prompt: inside}, heatmap=None), prompt)
        one_seconds = time.perf_counter() - started
        row = {
            "structure": prompt,
            "dice_text": dice(before, reference),
            "dice_inside_click": dice(one, reference),
            "inside_click_seconds": one_seconds,
        }
        extra, count = ndimage.label(one & ~reference)
        if count:
            largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(extra), extra, range(1, count + 1))))
            clicks = [*inside, (deepest_point(extra == largest, affine), False)]
            started = time.perf_counter()
            two = prompt_mask(encoding.segment([prompt], points={prompt: clicks}, heatmap=None), prompt)
            row["outside_click_seconds"] = time.perf_counter() - started
            row["dice_inside_and_outside_click"] = dice(two, reference)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cts", nargs="+", default=list(CTS), choices=list(CTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=benchlib.DEMO_MODEL, help="model file (default: the shipped demo)")
    args = parser.parse_args()
    info = benchlib.machine()
    benchlib.print_machine(info)
    real_cts.require(*args.cts)
    segmenter = Segmenter.load(args.model, device="cpu")
    vocabulary = Vocabulary.load()
    results = {}
    for name in args.cts:
        ct, affine = read_image(CTS[name][0])
        references = reference_masks(name, vocabulary)
        reprompt = reprompt_rows(segmenter, ct, affine, args.repeats)
        encoding = reprompt.pop("encoding")
        clicks = click_rows(encoding, affine, references)
        zoom = zoom_rows(segmenter, ct, affine, references)
        results[name] = {"shape": list(ct.shape), "reprompt": reprompt, "zoom": zoom, "clicks": clicks}
        benchlib.print_table(
            ["what", "seconds"],
            [
                ["full run, liver", f"{reprompt['full_run_seconds']:.2f}"],
                ["encode", f"{reprompt['encode_seconds']:.2f}"],
            ]
            + [[f"answer from the encoding: {k}", f"{v:.3f}"] for k, v in reprompt["answer_seconds"].items()],
            title=f"re-prompt on {name} {ct.shape}",
        )
        benchlib.print_table(
            ["prompts", "full s", "zoom s", "Dice full", "Dice zoom", "zoom vs full"],
            [
                [
                    ", ".join(r["prompts"]),
                    f"{r['full_seconds']:.1f}",
                    f"{r['zoom_seconds']:.1f}",
                    " ".join(f"{v:.3f}" for v in r["dice_full"].values()),
                    " ".join(f"{v:.3f}" for v in r["dice_zoom"].values()),
                    " ".join(f"{v:.3f}" for v in r["zoom_vs_full"].values()),
                ]
                for r in zoom
            ],
            title=f"zoom-out-zoom-in on {name}",
        )
        benchlib.print_table(
            ["structure", "Dice text", "+ inside click", "+ outside click", "s per click"],
            [
                [
                    r["structure"],
                    f"{r['dice_text']:.3f}",
                    f"{r['dice_inside_click']:.3f}",
                    f"{r.get('dice_inside_and_outside_click', float('nan')):.3f}",
                    f"{r['inside_click_seconds']:.2f}",
                ]
                for r in clicks
            ],
            title=f"clicks on {name}",
        )
    benchlib.write_results("interactive", {"machine": info, "results": results})


if __name__ == "__main__":
    main()
