"""The segmentation engine behind ``voila segment`` and the Slicer module.

Example::

    segmenter = Segmenter.load()                 # the shipped demo model, loaded once
    result = segmenter.segment(ct, affine, ["liver", "left kidney", "aorta"])
    result.labelmap          # on the input grid: 0 = background, i = prompts[i - 1]
    result.heatmap           # complexity in [0, 1] on the input grid (1 = hard)
    result.prompts[0].volume_ml
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from voila import device
from voila.data.geometry import voxel_spacing, voxel_volume_ml
from voila.data.io import check_ct
from voila.data.preprocess import PreprocessingConfig, preprocess_volume, resample_to_grid
from voila.device import autocast_dtype, resolve_device
from voila.errors import InputImageError, InsufficientMemoryError, VoilaError
from voila.infer.results import PromptResult, SegmentationResult
from voila.infer.sliding_window import broken_model_error, predict_grid
from voila.model.model_file import LoadedModel, load_model
from voila.model.text_encoder import TextEncoder
from voila.prompts import ResolvedPrompt, resolve_prompts
from voila.vocabulary import DEFAULT_TEMPLATE, Vocabulary, class_sentence

# A prompt is "found" only if its region is at least this large and this confident.
MIN_VOLUME_ML = 0.1
CONFIDENCE_FLOOR = 0.5
# An open-vocabulary prompt whose region would otherwise mostly belong to a known structure is
# not reported as found: it would be that organ under another name.
STOLEN_FRACTION = 0.5
BYTES_PER_MODEL_VOXEL = 4 * 34 + 8 * 3 + 4 * 3  # token buffer, labels/runner-up, confidence, image


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
        encoder = self.card["text_encoder"]
        self.text_cache.set_encoder_factory(
            lambda: TextEncoder(encoder["model_name"], encoder.get("pretrained"), device="cpu")
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

    def class_embeddings(self, resolved: Sequence[ResolvedPrompt]) -> torch.Tensor:
        """Every trained class plus the prompts the model was not trained on: ``(N, M)``."""
        names = self.classes[1:] + [p.text_class for p in resolved if not p.trained]
        features = self.text_cache.features(
            [class_sentence(n, self.vocabulary, self.template) for n in names]
        )
        with torch.no_grad():
            embeddings = self.model.class_embeddings(features.to(self.device)).float()
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

    def segment(
        self,
        image: np.ndarray,
        affine: np.ndarray,
        prompts: Sequence[str],
        heatmap: bool = True,
        progress: Callable[[float], None] | None = None,
        cancel: threading.Event | None = None,
        overlap: float = 0.5,
    ) -> SegmentationResult:
        """Segment ``image`` ``[i, j, k]`` (voxel→RAS ``affine``) for ``prompts``.

        ``progress`` receives the fraction done (0..1, mostly windows); ``cancel`` stops the run
        between windows with :class:`voila.Cancelled`. Raises :class:`voila.VoilaError`
        subclasses for unusable input.
        """
        started = time.perf_counter()
        image = np.asarray(image)
        affine = np.asarray(affine, dtype=np.float64)
        if not 0 <= overlap < 1:
            raise InputImageError(f"overlap must be in [0, 1), got {overlap}")
        notes = check_ct(image, affine)
        resolved, duplicate_notes = self.resolve_prompts(prompts)
        notes += duplicate_notes
        needed, available = self.estimate_memory(image.shape, affine), device.available_memory_bytes()
        if available is not None and needed > available:
            raise InsufficientMemoryError(
                f"this volume needs about {device.format_bytes(needed)} of memory but "
                f"{device.format_bytes(available)} are available; crop the volume to the region of "
                "interest or use a larger machine"
            )
        embeddings = self.class_embeddings(resolved)

        with self._lock:
            grid = preprocess_volume(image, affine, self.preprocessing)
            report = (lambda f: progress(0.02 + 0.93 * f)) if progress else None
            if progress:
                progress(0.02)
            prediction = predict_grid(
                self.model,
                embeddings,
                grid.image,
                self.patch_size,
                overlap=overlap,
                device=self.device,
                amp_dtype=autocast_dtype(self.device),
                progress=report,
                cancel=cancel,
                heatmap=heatmap,
            )
        results, grid_labels = self._prompt_results(resolved, prediction, grid.affine)
        labelmap = resample_to_grid(grid_labels, grid.affine, image.shape, affine, order=0)
        voxel_ml = voxel_volume_ml(affine)
        counts = np.bincount(labelmap.ravel(), minlength=len(results) + 1)
        for result in results:
            result.voxels = int(counts[result.label])
            result.volume_ml = round(result.voxels * voxel_ml, 3)
        heat = None
        if prediction.heatmap is not None:
            heat = resample_to_grid(prediction.heatmap.numpy(), grid.affine, image.shape, affine, order=1)
            heat = np.clip(heat, 0.0, 1.0).astype(np.float32, copy=False)
        if progress:
            progress(1.0)
        return SegmentationResult(
            labelmap=labelmap,
            heatmap=heat,
            affine=affine,
            prompts=results,
            model={
                "file": self.model_path.name,
                "preset": self.card.get("preset"),
                "description": self.card.get("description", ""),
                "spacing_mm": list(self.preprocessing.spacing),
            },
            seconds=time.perf_counter() - started,
            warnings=notes,
        )

    def _prompt_results(
        self,
        resolved: Sequence[ResolvedPrompt],
        prediction,
        grid_affine: np.ndarray,
    ) -> tuple[list[PromptResult], np.ndarray]:
        """Per-prompt statistics on the model grid and the model-grid label map of found prompts."""
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
            elif not p.trained:
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
