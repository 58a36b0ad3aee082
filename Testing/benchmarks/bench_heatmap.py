"""Where the model is wrong: does a map find the wrong voxels, and is it calibrated?

For each (model, CT it was not trained on): every voxel of the body on the model grid is right or
wrong against the reference labels (the model's trained classes; other structures count as
background). Maps scored: the CAS complexity heatmap, ``1 - p`` (p: the winning class's softmax
probability), the margin ``1 - (p1 - p2)``, the entropy over the competing classes (normalised
by log N), and the mean of CAS and ``1 - p``; with ``--trained-on`` (the CT each model was trained
on) also the intensity novelty (how rare the voxel's intensity was for its class among the reference
labels of that CT, as a model's card keeps it) and its mean with ``1 - p``. The review map the
product shows: with ``--trained-on``, the joint table of ``1 - p`` and novelty, else ``1 - p``
through the isotonic table (``voila.infer.review``), each fitted on the *other* pairs (held out
from the pair it is scored on); ``review_map_other_ct``: the joint table fitted only on pairs
scored on the other CT. Per map: the area under the ROC curve for finding the wrong voxels, and
the precision among the top 5 % of voxels. Calibration of ``1 - p`` and of the review map as a
probability of being wrong: expected calibration error (10 bins) and a reliability diagram. Per
structure: the predicted Dice (``structure_quality``) against the real one. Pictures:
``results/heatmap_reliability.png``, ``results/heatmap_<pair>.png``.

It also writes ``results/heatmap_calibration.json``: the tables fitted on all pairs together (each
a model on a patient it never saw), in the form ``voila train --calibration FILE`` takes, so a model
trained on all the patients with the same recipe ships a calibration measured on unseen patients;
and ``results/heatmap_calibration_<model>_on_<ct>.json`` per pair, for that very model
(``voila.training.export.recalibrated`` puts one into a model's card).

    python Testing/benchmarks/bench_heatmap.py --pair MODEL_A lidc --pair MODEL_B sample
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import benchlib
import numpy as np
import real_cts
import torch
from real_cts import CTS
from scipy.stats import rankdata
from voila.data.io import read_image
from voila.data.preprocess import preprocess_volume, resample_to_grid
from voila.evaluate.metrics import dice
from voila.infer.review import (
    IntensityProfile,
    fit_calibration,
    fit_joint_calibration,
    review_map,
    structure_quality,
)
from voila.infer.segmenter import Segmenter
from voila.infer.sliding_window import encode_grid
from voila.vocabulary import Vocabulary

RESULTS = Path(__file__).resolve().parent / "results"


def model_name(path: Path) -> str:
    """A run's folder name for ``<run>/model.safetensors``, else the file's stem."""
    path = Path(path)
    return path.parent.name if path.stem == "model" else path.stem


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    ranks = rankdata(score)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_top(score: np.ndarray, positive: np.ndarray, share: float = 0.05) -> float:
    count = max(1, int(round(share * len(score))))
    top = np.argpartition(-score, count - 1)[:count]
    return float(positive[top].mean())


def expected_calibration_error(probability: np.ndarray, positive: np.ndarray, bins: int = 10):
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probability, edges) - 1, 0, bins - 1)
    error, curve = 0.0, []
    for b in range(bins):
        inside = which == b
        if inside.any():
            mean_p, observed = float(probability[inside].mean()), float(positive[inside].mean())
            error += inside.mean() * abs(mean_p - observed)
            curve.append((mean_p, observed, int(inside.sum())))
    return float(error), curve


@torch.no_grad()
def score_pair(model_path: Path, ct_name: str) -> dict:
    segmenter = Segmenter.load(model_path, device="cpu")
    ct, affine = read_image(CTS[ct_name][0])
    reference, _ = read_image(CTS[ct_name][1])
    grid = preprocess_volume(ct, affine, segmenter.preprocessing)
    shape = tuple(grid.image.shape[1:])
    started = time.perf_counter()
    encoded = encode_grid(segmenter.model, grid.image, segmenter.patch_size, overlap=0.5, heatmap=True)
    resolved, _ = segmenter.resolve_prompts(segmenter.classes[1:])
    embeddings = segmenter.class_embeddings(resolved, encoded.tokens)
    tokens = encoded.tokens.reshape(encoded.tokens.shape[0], -1).t().float()
    probabilities = torch.cat(
        [segmenter.model.logits(chunk, embeddings).softmax(-1) for chunk in tokens.split(1 << 17)]
    )[:, : len(segmenter.classes)]  # the trained classes compete, as when a user asks for all of them
    top = probabilities.topk(2, dim=-1)
    winner = top.indices[:, 0].numpy()
    p1, p2 = top.values[:, 0].numpy(), top.values[:, 1].numpy()
    entropy = (
        -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1) / np.log(len(segmenter.classes))
    ).numpy()
    seconds = time.perf_counter() - started
    vocabulary = Vocabulary.load()
    to_class = np.zeros(int(reference.max()) + 1, dtype=np.int64)
    for index, name in enumerate(segmenter.classes[1:], start=1):
        if name in vocabulary and vocabulary[name].label <= reference.max():
            to_class[vocabulary[name].label] = index
    truth = resample_to_grid(to_class[reference], affine, shape, grid.affine, order=0).ravel()
    threshold = segmenter.preprocessing.normalise(-500.0)
    body = grid.image[0].numpy().ravel() > threshold
    wrong = (winner != truth)[body]
    cas = encoded.heatmap.numpy().ravel()[body]
    maps = {
        "cas": cas,
        "one_minus_p": (1 - p1)[body],
        "margin": (1 - (p1 - p2))[body],
        "entropy": entropy[body],
        "cas_and_one_minus_p": 0.5 * (cas + (1 - p1)[body]),
    }
    return {
        "model": model_path,
        "ct": ct_name,
        "shape": shape,
        "maps": maps,
        "wrong": wrong,
        "body": body,
        "winner": winner,
        "truth": truth,
        "probabilities": probabilities,
        "classes": segmenter.classes,
        "grid_image": grid.image[0].numpy(),
        "grid_affine": grid.affine,
        "preprocessing": segmenter.preprocessing,
        "encode_seconds": seconds,
    }


def add_novelty(pair: dict, trained: dict) -> None:
    """Adds the maps ``novelty`` and ``novelty_and_one_minus_p`` (their mean) to ``pair`` (in
    place). Novelty as the product computes it (:class:`voila.infer.review.IntensityProfile`):
    how rare a voxel's intensity is for the class it was given, against the profile of the
    reference labels of the CT the model was trained on (``trained``: that CT's
    :func:`score_pair`; a model's card holds the profile of its training cases). A
    contrast-enhanced kidney labelled background by a model that saw only unenhanced scans scores
    high, however confident the model is."""
    profile = IntensityProfile(trained["classes"])
    preprocessing = trained["preprocessing"]
    seen = trained["grid_image"].ravel()[trained["body"]]
    profile.add(profile.bins(seen, preprocessing), trained["truth"][trained["body"]])
    bins = profile.bins(pair["grid_image"], preprocessing)
    shape = pair["shape"]
    novelty = profile.novelty_map(bins, pair["winner"].reshape(shape), pair["body"].reshape(shape))
    novelty = novelty.ravel()[pair["body"]]
    pair["maps"]["novelty"] = novelty
    pair["maps"]["novelty_and_one_minus_p"] = 0.5 * (novelty + pair["maps"]["one_minus_p"])


def review_maps(pairs: list[dict]) -> None:
    """Each pair's review map as the product shows it, with its tables fitted on the *other* pairs
    (held out from the pair it is scored on): ``pair["table"]`` (1 - p) and, with novelty,
    ``pair["joint"]``; ``pair["review"]`` the map (joint where there is a novelty). With novelty
    also ``maps["review_map_other_ct"]``: the joint table fitted only on pairs scored on the other
    CT (no patient in common with the pair it is scored on)."""
    for number, pair in enumerate(pairs):
        others = [p for i, p in enumerate(pairs) if i != number] or pairs
        pair["table"] = fit_calibration(
            np.concatenate([p["maps"]["one_minus_p"] for p in others]),
            np.concatenate([p["wrong"] for p in others]),
        )
        pair["joint"] = None
        review = {"calibration": pair["table"]}
        if "novelty" in pair["maps"]:
            pair["joint"] = joint_of(others)
            review["joint"] = pair["joint"]
            strict = [p for p in others if p["ct"] != pair["ct"]]
            if strict:
                pair["maps"]["review_map_other_ct"] = review_map(
                    1 - pair["maps"]["one_minus_p"], {"joint": joint_of(strict)}, pair["maps"]["novelty"]
                )
        pair["review"] = review_map(1 - pair["maps"]["one_minus_p"], review, pair["maps"].get("novelty"))


def joint_of(pairs: list[dict]) -> dict:
    return fit_joint_calibration(
        np.concatenate([p["maps"]["one_minus_p"] for p in pairs]),
        np.concatenate([p["maps"]["novelty"] for p in pairs]),
        np.concatenate([p["wrong"] for p in pairs]),
    )


def structure_rows(pair: dict) -> list[dict]:
    shape, body = pair["shape"], pair["body"]
    q = np.zeros(np.prod(shape), dtype=np.float32)
    q[body] = pair["review"]
    q = q.reshape(shape)
    winner, truth = pair["winner"].reshape(shape), pair["truth"].reshape(shape)
    second = pair["probabilities"].topk(2, dim=-1).indices[:, 1].numpy().reshape(shape)
    rows = []
    for index, name in enumerate(pair["classes"][1:], start=1):
        mine = winner == index
        if not (truth == index).any() and not mine.any():
            continue
        quality = structure_quality(mine, q, (second == index) & ~mine)
        rows.append(
            {
                "structure": name,
                "dice": round(float(dice(mine, truth == index)), 4),
                "predicted_dice": quality.predicted_dice,
                "review_share": quality.review_share,
                "check": quality.check,
            }
        )
    return rows


def pictures(pairs: list[dict], calibration: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 5))
    raw_axis, calibrated_axis = figure.subplots(1, 2)
    for pair, curves in zip(pairs, calibration):
        label = f"{model_name(pair['model'])} on {pair['ct']}"
        for axis, key in ((raw_axis, "raw"), (calibrated_axis, "calibrated")):
            points = curves[key]
            axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    for axis, title in (
        (raw_axis, "1 - p as P(wrong), raw"),
        (calibrated_axis, "the review map, tables fitted on the other pairs"),
    ):
        axis.plot([0, 1], [0, 1], "k--", lw=0.8)
        axis.set_xlabel("predicted probability of being wrong")
        axis.set_ylabel("observed share wrong")
        axis.set_title(title)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(RESULTS / "heatmap_reliability.png", dpi=100)

    for pair in pairs:

        def volume(values, pair=pair):
            full = np.zeros(np.prod(pair["shape"]), dtype=np.float32)
            full[pair["body"]] = values
            return full.reshape(pair["shape"])

        wrong = volume(pair["wrong"].astype(np.float32))
        k = int(np.argmax(wrong.sum(axis=(0, 1))))
        kind = "1 - p & novelty" if pair["joint"] else "calibrated 1 - p"
        panels = [
            ("CT", pair["grid_image"][:, :, k], "gray", None),
            ("wrong voxels (reference)", wrong[:, :, k], "Reds", (0, 1)),
            ("CAS complexity", volume(pair["maps"]["cas"])[:, :, k], "magma", (0, 1)),
            ("1 - p", volume(pair["maps"]["one_minus_p"])[:, :, k], "magma", (0, 1)),
            (f"review map ({kind})", volume(pair["review"])[:, :, k], "magma", (0, 1)),
        ]
        figure = Figure(figsize=(20, 4.6))
        for axis, (title, image, cmap, limits) in zip(figure.subplots(1, len(panels)), panels):
            shown = axis.imshow(
                image.T,
                origin="lower",
                cmap=cmap,
                **({} if limits is None else dict(vmin=limits[0], vmax=limits[1])),
            )
            axis.invert_xaxis()  # patient's right on the left
            axis.set_title(title)
            axis.axis("off")
            if limits is not None:
                figure.colorbar(shown, ax=axis, fraction=0.046)
        name = f"{model_name(pair['model'])}_on_{pair['ct']}"
        figure.suptitle(f"{name}: axial slice {k} of the model grid")
        figure.tight_layout()
        figure.savefig(RESULTS / f"heatmap_{name}.png", dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=2, action="append", metavar=("MODEL", "CT"), required=True,
                        help=f"a model file and the CT it was NOT trained on ({', '.join(CTS)})")  # fmt: skip
    parser.add_argument("--trained-on", action="append", choices=list(CTS), default=[],
                        help="the CT each pair's model was trained on, in the pairs' order: adds the "
                        "intensity-novelty maps")  # fmt: skip
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = benchlib.machine()
    benchlib.print_machine(info)
    real_cts.require(*(ct for _, ct in args.pair))
    pairs = [score_pair(Path(model), ct) for model, ct in args.pair]
    if args.trained_on:
        if len(args.trained_on) != len(pairs):
            parser.error("give --trained-on once per --pair, or not at all")
        for pair, ct in zip(pairs, args.trained_on):
            add_novelty(pair, score_pair(pair["model"], ct))
    review_maps(pairs)
    rows, results, calibration = [], [], []
    for pair in pairs:
        name = f"{model_name(pair['model'])} on {pair['ct']}"
        scores = {m: auroc(v, pair["wrong"]) for m, v in pair["maps"].items()}
        top = {m: precision_at_top(v, pair["wrong"]) for m, v in pair["maps"].items()}
        raw_ece, raw_curve = expected_calibration_error(pair["maps"]["one_minus_p"], pair["wrong"])
        calibrated = pair["review"]  # what the product shows
        scores["review_map"] = auroc(calibrated, pair["wrong"])
        top["review_map"] = precision_at_top(calibrated, pair["wrong"])
        cal_ece, cal_curve = expected_calibration_error(calibrated, pair["wrong"])
        calibration.append({"raw": raw_curve, "calibrated": cal_curve})
        structures = structure_rows(pair)
        results.append(
            {
                "pair": name,
                "error_rate": float(pair["wrong"].mean()),
                "auroc": scores,
                "precision_top5": top,
                "ece_one_minus_p": raw_ece,
                "ece_calibrated": cal_ece,
                "calibration_table": pair["table"],
                "joint_table": pair["joint"],
                "structures": structures,
                "encode_seconds": pair["encode_seconds"],
            }
        )
        for m in [*pair["maps"], "review_map"]:
            rows.append([name, m, f"{scores[m]:.3f}", f"{top[m]:.3f}"])
        print(
            f"{name}: wrong voxels {pair['wrong'].mean():.3f}; ECE of 1 - p {raw_ece:.3f}, calibrated {cal_ece:.3f}"
        )
        for s in structures:
            print(
                f"  {s['structure']:<24} Dice {s['dice']:.3f}  predicted {s['predicted_dice']:.3f}  check {s['check']}"
            )
    benchlib.print_table(["pair", "map", "AUROC (wrong voxels)", "precision, top 5 %"], rows)
    pictures(pairs, calibration)
    pooled = {
        "calibration": fit_calibration(
            np.concatenate([p["maps"]["one_minus_p"] for p in pairs]),
            np.concatenate([p["wrong"] for p in pairs]),
        ),
        **({"joint": joint_of(pairs)} if all("novelty" in p["maps"] for p in pairs) else {}),
        "fitted_on": "bench_heatmap: "
        + "; ".join(f"{model_name(p['model'])} on {p['ct']} (not trained on it)" for p in pairs),
    }
    (RESULTS / "heatmap_calibration.json").write_text(json.dumps(pooled, indent=1) + "\n", encoding="utf-8")
    for p in pairs:
        own = {
            "calibration": fit_calibration(p["maps"]["one_minus_p"], p["wrong"]),
            **({"joint": joint_of([p])} if "novelty" in p["maps"] else {}),
            "fitted_on": f"bench_heatmap: {model_name(p['model'])} on {p['ct']} (not trained on it), "
            f"{len(p['wrong'])} body voxels",
        }
        path = RESULTS / f"heatmap_calibration_{model_name(p['model'])}_on_{p['ct']}.json"
        path.write_text(json.dumps(own, indent=1) + "\n", encoding="utf-8")
    benchlib.write_results("heatmap", {"machine": info, "results": results})


if __name__ == "__main__":
    main()
