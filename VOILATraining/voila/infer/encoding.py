"""A volume encoded once: its voxel tokens, then any prompt — text, clicks, boxes — in about a second.

VOILA classifies every voxel token by cosine similarity to class embeddings, so once a volume's
32-d tokens exist, a new prompt is one matrix product over them. :meth:`Segmenter.encode` runs the
network; :meth:`VolumeEncoding.segment` answers prompts from the stored tokens, and
:meth:`Segmenter.segment` is exactly ``encode(...).segment(...)``.

Clicks use VOILA's own space (rule in ``VOILATraining/DESIGN.md``): the tokens around a positive
click that the text alone left out, averaged and normalised, are a prototype of what the user
means; the prompt's embedding becomes ``normalize(w · text + prototype)`` with ``w = 1`` for a
class the model was trained on and ``w = 0.25`` for free text (its CLIP embedding was never aligned
with the voxel tokens), so a click plus any name segments the clicked thing. A free-text click on
a structure the model was trained on, and that the run does not ask for by name, takes that
structure's voxels under the user's name. A positive click on what the text already found changes
no embedding: it only picks that region. Free text without points never takes the voxels of a
trained structure the run asks for: a structure's result does not depend on the text beside it.
Each negative click adds a competing "not this" embedding (its own prototype) that counts as
background within :data:`NEGATIVE_CLICK_RADIUS_MM` of the click and nearer to it than to any
positive click: an edit where the user clicked, never a change of the whole structure nor of what
a positive click holds. The prompt keeps only the connected region(s) holding its positive
clicks. A box keeps the prompt's result inside it.

>>> encoding = segmenter.encode(ct, affine)                       # seconds to minutes
>>> encoding.segment(["liver"]).prompts[0].volume_ml             # about a second
>>> encoding.segment(["tumour"], points={"tumour": [((12.5, -80.0, 310.0), True)]})
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from voila.data.geometry import box_region, inside_box, voxel_of, voxel_volume_ml
from voila.data.preprocess import resample_to_grid
from voila.errors import PromptError
from voila.infer.results import SegmentationResult, heatmap_kind
from voila.infer.review import body_normalised_centre, review_map, structure_quality
from voila.infer.sliding_window import GridEncoding, GridPrediction, classify_tokens
from voila.prompts import ResolvedPrompt, split_prompts
from voila.vocabulary import class_key

# Weight of the text embedding beside a click's prototype: full for a trained class, little for free
# text, whose CLIP embedding the model never aligned with voxel tokens.
TEXT_WEIGHT_TRAINED = 1.0
TEXT_WEIGHT_FREE_TEXT = 0.25
# Half-width (voxels) of the neighbourhood whose tokens make a click's prototype.
PROTOTYPE_RADIUS = 1
# A negative click's "not this" competes only this close to it (mm): a click on a leak removes the
# leak, not every voxel that looks like it (BENCHMARKS.md §9: unbounded, one negative click on a
# liver's boundary leak took the whole liver).
NEGATIVE_CLICK_RADIUS_MM = 25.0

Point = tuple[Sequence[float], bool]  # ((R, A, S) in mm, positive)
Box = tuple[Sequence[float], Sequence[float]]  # two opposite corners (R, A, S) in mm


@dataclass
class VolumeEncoding:
    """A volume's voxel tokens on the model grid (a region of it, for boxes or zoom), with what
    is needed to put results back on the input grid.

    ``grid_shape``/``grid_affine``: the model grid; ``encoded``: its tokens (float16) and CAS
    complexity heatmap (if asked); ``input_shape``/``input_affine``: the input grid; ``warnings``:
    the input's; ``body``: the body on the model grid (bool ``grid_shape``; where structures are
    placed relative to, for the "check this structure" flag); ``intensity_bins``: each model-grid
    voxel's bin of the model's intensity profile (uint8 ``grid_shape``; for the review map's
    novelty, None when the model has no joint table).
    """

    segmenter: Any
    grid_shape: tuple[int, int, int]
    grid_affine: np.ndarray
    encoded: GridEncoding
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    body: np.ndarray | None = None
    intensity_bins: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """Memory the encoding holds (tokens, heatmap, body mask, intensity bins)."""
        return self.encoded.nbytes + sum(
            int(a.nbytes) for a in (self.body, self.intensity_bins) if a is not None
        )

    def segment(
        self,
        prompts: Sequence[str] | str,
        points: Mapping[str, Sequence[Point]] | None = None,
        boxes: Mapping[str, Box] | None = None,
        heatmap: bool | str | None = "review",
    ) -> SegmentationResult:
        """Segment ``prompts`` from the stored tokens (no network pass).

        ``points``: ``{prompt: [((R, A, S), positive), ...]}`` in world RAS mm (Slicer's world
        coordinates); ``boxes``: ``{prompt: ((R1, A1, S1), (R2, A2, S2))}``. A prompt named only
        in ``points`` or ``boxes`` is added to the prompts. ``heatmap``: the heatmap to put on the
        input grid: ``review`` (or True; the calibrated review map), ``complexity`` (the stored CAS
        heatmap; the volume must have been encoded with it) or None. Every found prompt gets its
        predicted Dice and "check this structure" flag whatever the heatmap.
        """
        started = time.perf_counter()
        kind = heatmap_kind(heatmap)
        if kind == "complexity" and self.encoded.heatmap is None:
            raise PromptError(
                "this volume was encoded without the complexity heatmap; encode it with heatmap=True"
            )
        segmenter = self.segmenter
        names = split_prompts(prompts) if prompts else []
        for extra in (*(points or {}), *(boxes or {})):
            if extra not in names:
                names.append(extra)
        resolved, notes = segmenter.resolve_prompts(names)
        spatial_points = _by_prompt(points or {}, resolved, segmenter.vocabulary, "point")
        spatial_boxes = _by_prompt(boxes or {}, resolved, segmenter.vocabulary, "box")
        embeddings = segmenter.class_embeddings(resolved, self.encoded.tokens)
        rows = segmenter.prompt_rows(resolved)
        clicks = self._click_voxels(resolved, spatial_points)
        region = self.encoded.region
        answer = classify_tokens(segmenter.model, self.encoded.tokens, embeddings, device=segmenter.device)
        if clicks:
            answer, embeddings = self._classify_with_clicks(embeddings, resolved, rows, clicks, answer)
        labels, probability, runner_up = self._trained_structures_first(
            answer, embeddings, resolved, rows, clicks
        )
        winner = labels.clone()  # every class's voxels, before those nobody asked for are dropped
        for p, row in zip(resolved, rows):
            mine = labels == row
            if p.key in spatial_boxes:
                mine &= torch.from_numpy(inside_box(self.grid_affine, region, spatial_boxes[p.key]))
            if p.key in clicks:
                mine = _keep_clicked_regions(mine, clicks[p.key], region)
            labels[(labels == row) & ~mine] = 0
            labels[mine] = row
        prediction = GridPrediction(
            *(
                _on_grid(values, region, self.grid_shape, fill)
                for values, fill in ((labels, 0), (probability, 1.0), (runner_up, 0))
            ),
            heatmap=None,
        )
        results, grid_labels = segmenter._prompt_results(
            resolved, prediction, self.grid_affine, clicked=set(clicks)
        )
        review = review_map(prediction.probability.numpy(), segmenter.review, self._novelty(winner, region))
        self._assess(results, resolved, rows, grid_labels, review, prediction.runner_up.numpy())
        labelmap = resample_to_grid(
            grid_labels, self.grid_affine, self.input_shape, self.input_affine, order=0
        )
        for result in results:  # a box holds on the input grid too (its voxels, not the model's)
            if result.key in spatial_boxes and result.found:
                _clip_to_box(labelmap, result.label, self.input_affine, spatial_boxes[result.key])
        counts = np.bincount(labelmap.ravel(), minlength=len(results) + 1)
        voxel_ml = voxel_volume_ml(self.input_affine)
        for result in results:
            result.voxels = int(counts[result.label])
            result.volume_ml = round(result.voxels * voxel_ml, 3)
        heat = None
        if kind is not None:
            grid_heat = (
                review
                if kind == "review"
                else _on_grid(self.encoded.heatmap, region, self.grid_shape, 0.0).numpy()
            )
            heat = resample_to_grid(grid_heat, self.grid_affine, self.input_shape, self.input_affine, order=1)
            heat = np.clip(heat, 0.0, 1.0).astype(np.float32, copy=False)
        return SegmentationResult(
            labelmap=labelmap,
            heatmap=heat,
            affine=self.input_affine,
            prompts=results,
            model=segmenter.model_summary(),
            seconds=time.perf_counter() - started,
            warnings=[*self.warnings, *notes],
            heatmap_kind=kind,
            calibration=str(
                segmenter.review.get("fitted_on") or "not calibrated: the review map shows 1 - p"
            ),
        )

    def _novelty(self, winner: torch.Tensor, region) -> np.ndarray | None:
        """Regional intensity novelty on the model grid (:class:`voila.infer.review.IntensityProfile`)
        of each voxel for the row it was given (``winner``, region shape): rows past the trained
        classes (free text) and voxels outside the encoded region get 0. None without a profile."""
        profile = self.segmenter.intensity_profile
        if profile is None or self.intensity_bins is None:
            return None
        placed = _on_grid(winner, region, self.grid_shape, -1).numpy()
        return profile.novelty_map(self.intensity_bins, placed, self.body)

    def _assess(self, results, resolved, rows, grid_labels, review, runner_up) -> None:
        """Each found prompt's predicted Dice and "check this structure" flag (in place), from the
        review map ``review`` and the runner-up rows on the model grid; a trained structure is also
        checked against where it lay in the training data."""
        places = self.segmenter.review.get("places") or {}
        for result, p, row in zip(results, resolved, rows):
            if not result.found:
                continue
            mine = grid_labels == result.label
            centre = None if self.body is None else body_normalised_centre(mine, self.body, self.grid_affine)
            quality = structure_quality(
                mine,
                review,
                (runner_up == row) & ~mine,
                centre,
                places.get(p.class_name) if p.trained else None,
            )
            result.predicted_dice, result.check, result.check_reason = (
                quality.predicted_dice,
                quality.check,
                quality.reason,
            )

    # -- clicks --------------------------------------------------------------------------------
    def _click_voxels(
        self, resolved: Sequence[ResolvedPrompt], points: Mapping[str, Sequence[Point]]
    ) -> dict[str, list[tuple[tuple[int, int, int], bool]]]:
        """Each prompt's clicks as model-grid voxels inside the encoded region."""
        clicks: dict[str, list[tuple[tuple[int, int, int], bool]]] = {}
        region = self.encoded.region
        for p in resolved:
            for position, positive in points.get(p.key, ()):
                voxel = voxel_of(self.grid_affine, self.grid_shape, position)
                inside = voxel is not None and all(s.start <= v < s.stop for v, s in zip(voxel, region))
                if not inside:
                    raise PromptError(
                        f"the point {tuple(round(float(c), 1) for c in position)} (R, A, S mm) for "
                        f"{p.prompt!r} lies outside the image{' part that was encoded' if voxel else ''}; "
                        "place it on the structure"
                    )
                clicks.setdefault(p.key, []).append((voxel, bool(positive)))
        for key, placed in clicks.items():
            if not any(positive for _, positive in placed):
                prompt = next(p.prompt for p in resolved if p.key == key)
                raise PromptError(
                    f"{prompt!r} has only excluding points; add at least one point on the structure"
                )
        return clicks

    def _prototype(self, voxels: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Unit mean of the tokens around the given voxels ``(M,)``."""
        tokens, region = self.encoded.tokens, self.encoded.region
        gathered = []
        for voxel in voxels:
            local = [v - s.start for v, s in zip(voxel, region)]
            window = tuple(
                slice(max(0, c - PROTOTYPE_RADIUS), min(n, c + PROTOTYPE_RADIUS + 1))
                for c, n in zip(local, tokens.shape[1:])
            )
            gathered.append(tokens[(slice(None), *window)].float().reshape(tokens.shape[0], -1))
        mean = torch.cat(gathered, dim=1).mean(dim=1)
        return torch.nn.functional.normalize(mean, dim=0)

    def _trained_answer(self, embeddings: torch.Tensor):
        """Winning row, probability and runner-up ``(region shape)`` among the trained classes only."""
        segmenter = self.segmenter
        trained = embeddings[: len(segmenter.classes)]
        return classify_tokens(segmenter.model, self.encoded.tokens, trained, device=segmenter.device)

    def _trained_structures_first(self, answer, embeddings, resolved, rows, clicks):
        """``answer`` where free-text prompts without points yield every voxel that a requested
        trained structure wins among the trained classes: a structure's voxels never depend on the
        free text asked beside it (a free-text row may still take background and the voxels of
        trained classes nobody asked for)."""
        free = [row for p, row in zip(resolved, rows) if not p.trained and p.key not in clicks]
        requested = [row for p, row in zip(resolved, rows) if p.trained]
        if not free or not requested:
            return answer
        trained_answer = self._trained_answer(embeddings)
        yields = torch.isin(answer[0], torch.tensor(free)) & torch.isin(
            trained_answer[0], torch.tensor(requested)
        )
        return tuple(torch.where(yields, kept, given) for kept, given in zip(trained_answer, answer))

    def _classify_with_clicks(self, embeddings, resolved, rows, clicks, text_answer):
        """The answer ``(region shape)`` once the clicks apply, and the embeddings it used.

        A positive click the text left out: on a free-text prompt, where the model's trained
        classes give a structure that this run does not ask for, the prompt takes that structure
        (the user named what the model knows); otherwise it pulls the prompt's embedding towards
        the click's prototype. Then each negative click's "not this" row counts as background
        within :data:`NEGATIVE_CLICK_RADIUS_MM` of it and nearer to it than to any positive click."""
        embeddings = embeddings.clone()
        requested = set(rows)
        trained_answer = None
        adopted: dict[int, int] = {}  # trained row -> the free-text prompt row that takes its voxels
        silent: set[int] = set()  # free-text rows that only take adopted structures
        pulled, negatives = False, []
        for p, row in zip(resolved, rows):
            if p.key not in clicks:
                continue
            missed, took = [], False
            for voxel, positive in clicks[p.key]:
                local = self._local(voxel)
                if not positive or int(text_answer[0][local]) == row:
                    continue
                if not p.trained:
                    if trained_answer is None:
                        trained_answer = self._trained_answer(embeddings)
                    known = int(trained_answer[0][local])
                    if known != 0 and known not in requested and adopted.setdefault(known, row) == row:
                        took = True
                        continue
                missed.append(voxel)
            if missed:
                pulled = True
                weight = TEXT_WEIGHT_TRAINED if p.trained else TEXT_WEIGHT_FREE_TEXT
                prototype = self._prototype(missed).to(embeddings)
                embeddings[row] = torch.nn.functional.normalize(weight * embeddings[row] + prototype, dim=0)
            elif took:
                silent.add(row)
            negatives += [voxel for voxel, positive in clicks[p.key] if not positive]
        answer = self._classify(embeddings, adopted, silent) if pulled or adopted else text_answer
        if negatives:
            not_this = torch.stack([self._prototype([v]) for v in negatives]).to(embeddings)
            edited = self._classify(embeddings, adopted, silent, not_this)
            positives = [voxel for placed in clicks.values() for voxel, positive in placed if positive]
            near = torch.from_numpy(self._near(negatives, NEGATIVE_CLICK_RADIUS_MM, unless_nearer=positives))
            answer = tuple(torch.where(near, e, kept) for e, kept in zip(edited, answer))
        return answer, embeddings

    def _classify(self, embeddings, adopted, silent, not_this=None):
        """Winning row, probability and runner-up ``(region shape)`` over ``embeddings`` without the
        ``silent`` rows, with each ``adopted`` trained row's voxels given to its prompt's row and
        the ``not_this`` rows counted as background."""
        keep = [row for row in range(embeddings.shape[0]) if row not in silent]
        matrix = embeddings[keep]
        if not_this is not None:
            matrix = torch.cat([matrix, not_this])
            keep += [0] * not_this.shape[0]
        row_of = torch.tensor(keep)
        for known, row in adopted.items():
            row_of[row_of == known] = row
        segmenter = self.segmenter
        labels, probability, runner_up = classify_tokens(
            segmenter.model, self.encoded.tokens, matrix, device=segmenter.device
        )
        return row_of[labels], probability, row_of[runner_up]

    def _local(self, voxel: tuple[int, int, int]) -> tuple[int, int, int]:
        """A model-grid voxel's index in the encoded region."""
        return tuple(v - s.start for v, s in zip(voxel, self.encoded.region))

    def _near(self, voxels: Sequence[tuple[int, int, int]], radius_mm: float, unless_nearer=()) -> np.ndarray:
        """``(region shape)`` bool: the encoded region's voxels within ``radius_mm`` of any of
        ``voxels`` and nearer to them than to any of the ``unless_nearer`` voxels."""
        return self._squared_mm(voxels) < np.minimum(radius_mm**2 + 1e-6, self._squared_mm(unless_nearer))

    def _squared_mm(self, voxels: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """``(region shape)``: squared distance (mm²) of each voxel of the encoded region to the
        nearest of ``voxels`` (infinite without any)."""
        region = self.encoded.region
        spacing = np.linalg.norm(self.grid_affine[:3, :3], axis=0)
        axes = np.meshgrid(*(np.arange(s.start, s.stop) for s in region), indexing="ij", sparse=True)
        nearest = np.full(tuple(s.stop - s.start for s in region), np.inf)
        for voxel in voxels:
            nearest = np.minimum(
                nearest, sum(((axis - v) * d) ** 2 for axis, v, d in zip(axes, voxel, spacing))
            )
        return nearest


def _by_prompt(
    values: Mapping[str, Any], resolved: Sequence[ResolvedPrompt], vocabulary, what: str
) -> dict[str, Any]:
    """``{prompt text: value}`` keyed by the resolved prompt's key (spelling does not matter)."""
    keyed = {}
    known = {p.key for p in resolved}
    for text, value in values.items():
        key = class_key(" ".join(str(text).split()), vocabulary)
        if key not in known:
            raise PromptError(f"the {what} for {text!r} names no prompt of this run; check its spelling")
        keyed[key] = value
    return keyed


def _keep_clicked_regions(
    mine: torch.Tensor, clicks: Sequence[tuple[tuple[int, int, int], bool]], region
) -> torch.Tensor:
    """The connected parts of ``mine`` (26-neighbourhood) that hold a positive click (the clicked
    voxels always belong); negative clicks are never part of the prompt."""
    mask = mine.numpy().copy()
    local = [(tuple(v - s.start for v, s in zip(voxel, region)), positive) for voxel, positive in clicks]
    for voxel, positive in local:
        mask[voxel] = positive
    components, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    wanted = {int(components[voxel]) for voxel, positive in local if positive} - {0}
    return torch.from_numpy(np.isin(components, sorted(wanted)))


def _clip_to_box(labelmap: np.ndarray, label: int, affine: np.ndarray, box: Box) -> None:
    """Set ``label`` voxels whose centres lie outside the world box to background, in place."""
    where = np.argwhere(labelmap == label)
    if not len(where):
        return
    region = tuple(slice(int(a), int(b) + 1) for a, b in zip(where.min(0), where.max(0)))
    outside = (labelmap[region] == label) & ~inside_box(affine, region, box)
    labelmap[region][outside] = 0


def _on_grid(values: torch.Tensor, region, shape: Sequence[int], fill) -> torch.Tensor:
    """``values`` of an encoded region placed on the whole model grid (``fill`` elsewhere)."""
    if tuple(values.shape) == tuple(int(n) for n in shape):
        return values
    full = torch.full(tuple(int(n) for n in shape), fill, dtype=values.dtype)
    full[region] = values
    return full


def region_of_boxes(affine: np.ndarray, shape: Sequence[int], boxes: Sequence[Box], margin: Sequence[int]):
    """The model-grid region covering every box (widened by ``margin`` voxels), or None when they
    miss the grid."""
    regions = [box_region(affine, shape, box, margin) for box in boxes]
    regions = [r for r in regions if r is not None]
    if not regions:
        return None
    return tuple(slice(min(r[a].start for r in regions), max(r[a].stop for r in regions)) for a in range(3))
