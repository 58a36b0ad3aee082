"""The segmentation engine behind ``voila segment`` and the Slicer module.

Example::

    segmenter = Segmenter.load()                 # the shipped demo model, loaded once
    result = segmenter.segment(ct, affine, ["liver", "left kidney", "aorta"])
    result.labelmap          # on the input grid: 0 = background, i = prompts[i - 1]
    result.heatmap           # the review map on the input grid: about v of voxels valued v are wrong
    result.prompts[0].volume_ml, result.prompts[0].predicted_dice, result.prompts[0].check
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy import ndimage

from voila import device
from voila.data.geometry import voxel_spacing, voxel_volume_ml
from voila.data.io import check_ct
from voila.data.preprocess import PreprocessingConfig, preprocess_volume
from voila.device import autocast_dtype, resolve_device
from voila.errors import InputImageError, InsufficientMemoryError, PromptError, VoilaError
from voila.infer.encoding import Box, Point, VolumeEncoding, region_of_boxes
from voila.infer.results import PromptResult, SegmentationResult, heatmap_kind
from voila.infer.review import IntensityProfile, body_mask
from voila.infer.sliding_window import broken_model_error, classify_tokens, count_windows, encode_grid
from voila.model.model_file import LoadedModel, load_model
from voila.model.text_encoder import TextEncoder, text_encoder_id
from voila.prompts import ResolvedPrompt, resolve_prompts, split_prompts
from voila.vocabulary import DEFAULT_TEMPLATE, Vocabulary, class_key, class_sentence

# A prompt is "found" only if its region is at least this large and this confident.
MIN_VOLUME_ML = 0.1
CONFIDENCE_FLOOR = 0.5
# An open-vocabulary prompt whose region would otherwise mostly belong to a known structure is
# not reported as found: it would be that organ under another name.
STOLEN_FRACTION = 0.5
BYTES_PER_MODEL_VOXEL = 4 * 34 + 8 * 3 + 4 * 3  # token buffer, labels/runner-up, confidence, image
SCANS = ("full", "zoom", "auto")
# Zoom-out-zoom-in: the window overlap of the fast pass, and the margin around what it finds.
ZOOM_OUT_OVERLAP = 0.0
ZOOM_MARGIN_MM = 15.0
# "auto" zooms for at most this many prompts, on volumes of at least this many full-scan windows.
AUTO_ZOOM_MAX_PROMPTS = 5
AUTO_ZOOM_MIN_WINDOWS = 8


class Segmenter:
    """A loaded model, kept warm: load once, segment many volumes with any prompts."""

    def __init__(self, loaded: LoadedModel, device: torch.device, model_path: Path) -> None:
        self.model = loaded.model
        self.card = loaded.card
        self.text_cache = loaded.text_cache
        self.device = device
        self.model_path = model_path
        self.vocabulary = Vocabulary.from_dict(self.card["vocabulary"])
        # Colours are presentation: the installed vocabulary's (Slicer's terminology colours) win
        # over those a model file was exported with, so Slicer, previews and sidecars agree.
        self.colors = {s.name: tuple(s.color) for s in self.vocabulary}
        with contextlib.suppress(VoilaError):
            self.colors.update({s.name: tuple(s.color) for s in Vocabulary.load()})
        self.preprocessing = PreprocessingConfig.from_dict(self.card["preprocessing"])
        self.classes: list[str] = list(self.card["classes"])
        self.template = self.card.get("prompt_template", DEFAULT_TEMPLATE)
        self.patch_size = tuple(self.card["model"]["patch_size"])
        # The review map's calibration and where structures lay in training (voila.infer.review).
        self.review: dict[str, Any] = dict(self.card.get("review") or {})
        # The classes' intensity profile, where the review map is the joint table (else None).
        self.intensity_profile = (
            IntensityProfile.from_card(self.review["intensity"], self.classes)
            if self.review.get("joint") and self.review.get("intensity")
            else None
        )
        encoder = self.card["text_encoder"]
        self.text_cache.set_encoder_factory(
            lambda: TextEncoder(encoder["model_name"], encoder.get("pretrained"), device="cpu"),
            encoder_id=text_encoder_id(encoder["model_name"], encoder.get("pretrained")),
        )
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_path: str | os.PathLike | None = None, device: str = "auto") -> Segmenter:
        """Load a model file (``None``: the shipped demo model) onto ``device`` (auto/cpu/cuda)."""
        if model_path is None:
            from voila.resources import DEMO_MODEL, resource_path

            model_path = resource_path(DEMO_MODEL)
        torch_device = resolve_device(device)
        loaded = load_model(model_path, device=torch_device)
        return cls(loaded, torch_device, Path(model_path))

    # -- prompts -----------------------------------------------------------------------------
    def resolve_prompts(self, prompts) -> tuple[list[ResolvedPrompt], list[str]]:
        """:func:`voila.prompts.resolve_prompts` against this model's vocabulary and classes."""
        return resolve_prompts(prompts, self.vocabulary, self.classes)

    def prompt_rows(self, resolved: Sequence[ResolvedPrompt]) -> list[int]:
        """The row of the class-embedding matrix each prompt owns: its trained class's, or one of
        the rows appended after the classes for prompts the model was not trained on."""
        rows, extra = [], 0
        for p in resolved:
            if p.trained:
                rows.append(self.classes.index(p.class_name))
            else:
                rows.append(len(self.classes) + extra)
                extra += 1
        return rows

    def class_embeddings(self, resolved: Sequence[ResolvedPrompt], tokens: torch.Tensor) -> torch.Tensor:
        """Every trained class plus the prompts the model was not trained on: ``(N, M)``, for the
        volume whose voxel tokens are ``tokens`` ``(M, D, H, W)`` (a model with the cross-attention
        fusion fits its class embeddings to them)."""
        names = self.classes[1:] + [p.text_class for p in resolved if not p.trained]
        features = self.text_cache.features(
            [class_sentence(n, self.vocabulary, self.template) for n in names]
        )
        with torch.no_grad():
            embeddings = self.model.class_embeddings(features.to(self.device)).float()
            embeddings = self.model.fuse(embeddings, tokens).float()
        if not bool(torch.isfinite(embeddings).all()):
            raise broken_model_error("class embeddings")
        return embeddings

    # -- segmentation ------------------------------------------------------------------------
    def estimate_memory(self, shape: Sequence[int], affine: np.ndarray) -> int:
        """Bytes the run needs, estimated from the model-grid size (before cropping)."""
        spacing = voxel_spacing(affine)
        model_voxels = float(np.prod(np.asarray(shape) * spacing / np.asarray(self.preprocessing.spacing)))
        input_voxels = float(np.prod(shape))
        return int(model_voxels * BYTES_PER_MODEL_VOXEL + input_voxels * (4 + 4 + 2))

    def model_summary(self) -> dict[str, Any]:
        """What a result's sidecar says about the model."""
        return {
            "file": self.model_path.name,
            "preset": self.card.get("preset"),
            "description": self.card.get("description", ""),
            "spacing_mm": list(self.preprocessing.spacing),
        }

    def encode(
        self,
        image: np.ndarray,
        affine: np.ndarray,
        heatmap: bool = False,
        progress: Callable[[float], None] | None = None,
        cancel: threading.Event | None = None,
        overlap: float = 0.5,
        within: Sequence[Box] | None = None,
        zoom_prompts: Sequence[str] | None = None,
    ) -> VolumeEncoding:
        """Run the network once over ``image`` ``[i, j, k]`` (voxel→RAS ``affine``): its voxel
        tokens (float16) on the model grid, and the CAS complexity heatmap if ``heatmap``.

        ``within``: world boxes; only the windows covering them (plus half a patch of context)
        run. ``zoom_prompts``: zoom-out-zoom-in (:meth:`zoom_out`) finds these structures first
        and encodes only where they are. ``progress`` receives the fraction done (0..1, mostly
        windows); ``cancel`` stops the run between windows with :class:`voila.Cancelled`.
        """
        started = time.perf_counter()
        image, affine, notes = self._checked(image, affine, overlap)
        with self._lock:
            grid = preprocess_volume(image, affine, self.preprocessing)
            shape = tuple(grid.image.shape[1:])
            if zoom_prompts:
                within = self.zoom_out(grid, zoom_prompts, cancel)
            region = None
            if within:
                margin = [p // 2 for p in self.patch_size]
                region = region_of_boxes(grid.affine, shape, within, margin)
                if region is None:
                    raise PromptError("the boxes lie outside the image; draw them on the structures")
            encoded = self._encode_grid(grid.image, heatmap, progress, cancel, overlap, region)
        return VolumeEncoding(
            self,
            shape,
            grid.affine,
            encoded,
            tuple(image.shape),
            affine,
            notes,
            time.perf_counter() - started,
            body=body_mask(grid.image[0].numpy(), self.preprocessing),
            intensity_bins=None
            if self.intensity_profile is None
            else self.intensity_profile.bins(grid.image[0].numpy(), self.preprocessing),
        )

    def segment(
        self,
        image: np.ndarray,
        affine: np.ndarray,
        prompts: Sequence[str] | str,
        heatmap: bool | str | None = "review",
        progress: Callable[[float], None] | None = None,
        cancel: threading.Event | None = None,
        overlap: float = 0.5,
        points: dict[str, Sequence[Point]] | None = None,
        boxes: dict[str, Box] | None = None,
        scan: str = "full",
    ) -> SegmentationResult:
        """Segment ``image`` ``[i, j, k]`` (voxel→RAS ``affine``) for ``prompts``: exactly
        ``encode(...).segment(prompts, points, boxes)``, with only the windows that matter run
        when every prompt has a box, or with ``scan="zoom"``.

        ``scan``: ``full`` (every window), ``zoom`` (zoom-out-zoom-in: a fast pass finds each
        prompted structure's extent, then the full-quality windows run only there) or ``auto``
        (zoom when it pays off: a few prompts, a large volume, no heatmap). ``heatmap``: ``review``
        (or True), ``complexity`` or None (:meth:`VolumeEncoding.segment`).
        """
        started = time.perf_counter()
        if scan not in SCANS:
            raise PromptError(f"scan must be one of {', '.join(SCANS)}, not {scan!r}")
        names = split_prompts(prompts) if prompts else []
        boxed = dict(boxes or {})
        keys = {class_key(b, self.vocabulary) for b in boxed}
        every_prompt_boxed = (
            bool(boxed) and not points and all(class_key(n, self.vocabulary) in keys for n in names)
        )
        within = list(boxed.values()) if every_prompt_boxed else None
        zoom = None
        if (
            within is None
            and not points
            and self._zoom_pays_off(scan, image, affine, names, heatmap, overlap)
        ):
            zoom = names
        complexity = heatmap_kind(heatmap) == "complexity"
        encoding = self.encode(image, affine, complexity, progress, cancel, overlap, within, zoom)
        result = encoding.segment(names, points, boxes, heatmap=heatmap)
        result.seconds = time.perf_counter() - started
        if progress:
            progress(1.0)
        return result

    def _zoom_pays_off(self, scan, image, affine, names, heatmap, overlap: float) -> bool:
        if scan == "zoom":
            return bool(names)
        if scan != "auto" or heatmap or not names or len(names) > AUTO_ZOOM_MAX_PROMPTS:
            return False
        spacing = voxel_spacing(affine)
        grid = np.asarray(np.shape(image)) * spacing / np.asarray(self.preprocessing.spacing)
        return count_windows(grid, self.patch_size, overlap) >= AUTO_ZOOM_MIN_WINDOWS

    def zoom_out(self, grid, prompts: Sequence[str], cancel=None) -> list[Box] | None:
        """The zoom-out of zoom-out-zoom-in: the network over the model grid in windows that do not
        overlap (about an eighth of a full scan's windows at overlap 0.5), and the world box of
        every prompted structure it finds, widened by :data:`ZOOM_MARGIN_MM`. None (scan
        everything) when a prompt is not found there.

        SegVol zooms out by resizing the volume to its input; VOILA's convolutional network is
        trained at one spacing and misses small structures on a grid 2× coarser (the demo model
        finds no left kidney there; BENCHMARKS.md), so its zoom-out keeps the grid and thins the
        windows instead.
        """
        resolved, _ = self.resolve_prompts(prompts)
        coarse = self._encode_grid(grid.image, False, None, cancel, ZOOM_OUT_OVERLAP, None)
        labels, _, _ = classify_tokens(
            self.model, coarse.tokens, self.class_embeddings(resolved, coarse.tokens), self.device
        )
        boxes = []
        for row in self.prompt_rows(resolved):
            # the largest connected part: stray voxels at the seams of non-overlapping windows would
            # otherwise stretch the box over the whole volume
            components, count = ndimage.label((labels == row).numpy(), structure=np.ones((3, 3, 3), bool))
            if count == 0:
                return None
            sizes = np.bincount(components.ravel())[1:]
            where = np.argwhere(components == int(sizes.argmax()) + 1)
            if len(where) * voxel_volume_ml(grid.affine) < MIN_VOLUME_ML:
                return None
            corners = np.stack([where.min(0), where.max(0)]).astype(float)
            world = (grid.affine @ np.hstack([corners, np.ones((2, 1))]).T).T[:, :3]
            boxes.append((world.min(0) - ZOOM_MARGIN_MM, world.max(0) + ZOOM_MARGIN_MM))
        return boxes

    def _checked(self, image, affine, overlap: float):
        image = np.asarray(image)
        affine = np.asarray(affine, dtype=np.float64)
        if not 0 <= overlap < 1:
            raise InputImageError(f"overlap must be in [0, 1), got {overlap}")
        notes = check_ct(image, affine)
        needed, available = self.estimate_memory(image.shape, affine), device.available_memory_bytes()
        if available is not None and needed > available:
            raise InsufficientMemoryError(
                f"this volume needs about {device.format_bytes(needed)} of memory but "
                f"{device.format_bytes(available)} are available; crop the volume to the region of "
                "interest or use a larger machine"
            )
        return image, affine, notes

    def _encode_grid(self, grid_image, heatmap, progress, cancel, overlap, region):
        report = (lambda f: progress(0.02 + 0.93 * f)) if progress else None
        if progress:
            progress(0.02)
        return encode_grid(
            self.model,
            grid_image,
            self.patch_size,
            overlap=overlap,
            device=self.device,
            amp_dtype=autocast_dtype(self.device),
            progress=report,
            cancel=cancel,
            heatmap=heatmap,
            region=region,
        )

    def _prompt_results(
        self,
        resolved: Sequence[ResolvedPrompt],
        prediction,
        grid_affine: np.ndarray,
        clicked: set[str] = frozenset(),
    ) -> tuple[list[PromptResult], np.ndarray]:
        """Per-prompt statistics on the model grid and the model-grid label map of found prompts.
        ``clicked``: keys of prompts the user placed points for (their region is what was clicked,
        so it is never called another structure's)."""
        label_dtype = np.uint8 if len(resolved) < 256 else np.uint16
        row_to_label = torch.zeros(len(self.classes) + len(resolved) + 1, dtype=torch.int64)
        for label, row in enumerate(self.prompt_rows(resolved), start=1):
            row_to_label[row] = label
        grid_labels = row_to_label[prediction.labels].flatten()
        grid_ml = voxel_volume_ml(grid_affine)
        trained_rows = torch.zeros(len(row_to_label), dtype=torch.bool)
        trained_rows[1 : len(self.classes)] = True
        # voxels and summed confidence of every label in one pass each (not one pass per prompt)
        counts = torch.bincount(grid_labels, minlength=len(resolved) + 1)
        confidence_sums = torch.bincount(
            grid_labels, weights=prediction.probability.flatten().double(), minlength=len(resolved) + 1
        )
        keep = torch.arange(len(resolved) + 1)  # label -> label, or 0 for a prompt not found
        results = []
        for label, p in enumerate(resolved, start=1):
            voxels = int(counts[label])
            confidence = float(confidence_sums[label] / voxels) if voxels else 0.0
            structure = p.structure
            note, found = "", True
            if voxels * grid_ml < MIN_VOLUME_ML:
                found, note = False, "no region found in this image"
            elif confidence < CONFIDENCE_FLOOR:
                found, note = False, f"confidence {confidence:.2f} below the floor {CONFIDENCE_FLOOR}"
            elif not p.trained and p.key not in clicked:
                runner_up = prediction.runner_up.flatten()[grid_labels == label]
                stolen = trained_rows[runner_up]
                if float(stolen.float().mean()) > STOLEN_FRACTION:
                    name = self.classes[int(torch.mode(runner_up[stolen]).values)]
                    known = self.vocabulary[name].display_name if name in self.vocabulary else name
                    found = False
                    note = (
                        f"its region is mostly what the model knows as {known!r}; "
                        f"ask for {known!r} if that is what you mean"
                    )
            if not found:
                keep[label] = 0
            elif p.key in clicked:
                note = "from your points" + (
                    "" if p.trained else "; the model was not trained on this structure"
                )
            elif not p.trained:
                note = "open vocabulary: the model was not trained on this structure; check the result"
            results.append(
                PromptResult(
                    label=label,
                    prompt=p.prompt,
                    structure=structure.name if structure else None,
                    key=p.key,
                    display_name=p.display_name,
                    open_vocabulary=structure is None,
                    trained=p.trained,
                    snomed=dict(structure.terminology) if structure else None,
                    snomed_code=structure.snomed_code if structure else None,
                    color=self.colors.get(structure.name, p.color) if structure else p.color,
                    confidence=round(confidence, 4),
                    voxels=0,
                    volume_ml=0.0,
                    found=found,
                    note=note,
                )
            )
        grid_labels = keep.to(torch.int32)[grid_labels].view(prediction.labels.shape)
        return results, grid_labels.numpy().astype(label_dtype)


warnings.filterwarnings("ignore", message=".*Using a non-tuple sequence.*")
