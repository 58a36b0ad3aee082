"""Whole-volume prediction on the model grid: MONAI sliding windows, bounded memory.

The windows' *unit voxel tokens* (M = 32 channels) and the CAS heatmap are blended with MONAI's
Gaussian weighting. Cosine logits are linear in the voxel token, so the logits of the blended
token equal the blended logits of the windows: blending 33 channels gives the same argmax as
blending N class maps, for any N. Logits, argmax and confidence are then computed in chunks, so
no ``(N, D, H, W)`` float map ever exists and the cost hardly depends on the number of classes.

Used by inference (:mod:`voila.infer.segmenter`) and by validation during training.

Example::

    prediction = predict_grid(model, class_embeddings, image, patch_size=(128, 128, 128))
    prediction.labels        # (D, H, W) int64, row index into class_embeddings
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from monai.inferers import sliding_window_inference

from voila.errors import Cancelled, ModelFileError

# Buffers above this size are kept in float16 (halves the memory of a large CT; the blended
# tokens are in [-1, 1], well within float16's precision for an argmax).
HALF_PRECISION_BUFFER_BYTES = 1 << 30
CHUNK_VOXELS = 1 << 18


@dataclass
class GridPrediction:
    """Model-grid results: ``labels`` int64 ``(D, H, W)`` (row of ``class_embeddings``),
    ``probability`` float32 ``(D, H, W)`` (softmax probability of the winning class),
    ``runner_up`` int64 ``(D, H, W)`` (second-best row) and ``heatmap`` float32 ``(D, H, W)``
    in [0, 1] or None."""

    labels: torch.Tensor
    probability: torch.Tensor
    runner_up: torch.Tensor
    heatmap: torch.Tensor | None


def broken_model_error(what: str) -> ModelFileError:
    """NaN/Inf out of the network: a broken model, never a clinical "not found"."""
    return ModelFileError(
        f"the model gave NaN or infinite {what} for this image: the model file is broken (or the "
        "computation overflowed on this device); check it with `voila info MODEL`, use the original "
        "file, or run on the CPU (--device cpu)"
    )


def count_windows(image_size: Sequence[int], patch_size: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's scan visits (its own interval rule)."""
    total = 1
    for size, roi in zip(image_size, patch_size):
        roi = min(roi, size)
        interval = max(int(roi * (1 - overlap)), 1)
        total *= 1 if roi >= size else math.ceil((size - roi) / interval) + 1
    return total


def blending_dtype(channels: int, spatial_size: Sequence[int]) -> torch.dtype:
    """float16 for a blending buffer of ``channels`` maps that would exceed
    :data:`HALF_PRECISION_BUFFER_BYTES` in float32, else float32."""
    voxels = math.prod(int(n) for n in spatial_size)
    return torch.float16 if channels * voxels * 4 > HALF_PRECISION_BUFFER_BYTES else torch.float32


def blend_windows(
    image: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    patch_size: Sequence[int],
    overlap: float,
    buffer_dtype: torch.dtype,
    device: torch.device,
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """MONAI sliding windows over ``image`` ``(1, D, H, W)`` with Gaussian blending: ``(C, D, H, W)``.

    ``predictor`` maps windows ``(B, 1, *patch_size)`` (on ``device``) to ``(B, C, *patch_size)``
    in ``buffer_dtype``; the blended result is kept on the CPU. The one blending rule for VOILA
    and for the benchmarks' baselines, so both see identical windows and weights.
    """
    return sliding_window_inference(
        image[None].to(buffer_dtype),
        roi_size=tuple(int(p) for p in patch_size),
        sw_batch_size=sw_batch_size,
        predictor=predictor,
        overlap=overlap,
        mode="gaussian",
        padding_mode="constant",
        cval=float(image.min()),
        sw_device=device,
        device=torch.device("cpu"),
    )[0]


def top_two(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``(V, N)`` → winning class ``(V,)``, its softmax probability ``(V,)`` and the
    runner-up ``(V,)`` (the winner again when N = 1).

    Two max passes and one exp pass over a shifted copy: no softmax map and no sort (``topk``),
    which made this step a sixth of a 117-prompt segmentation on the CPU.
    """
    best, winner = logits.max(dim=-1)
    if logits.shape[-1] == 1:
        return winner, torch.ones_like(best), winner
    shifted = logits - best[:, None]
    shifted.scatter_(1, winner[:, None], float("-inf"))
    runner_up = shifted.argmax(dim=-1)
    # softmax of the winner = 1 / Σ exp(l - max) = 1 / (1 + Σ over the others)
    probability = 1.0 / (1.0 + shifted.exp_().sum(dim=-1))
    return winner, probability, runner_up


Region = tuple  # tuple[slice, slice, slice] of the model grid


@dataclass
class GridEncoding:
    """Blended voxel tokens of a ``region`` of the model grid: ``tokens`` float16 ``(M, d, h, w)``
    and ``heatmap`` float32 ``(d, h, w)`` in [0, 1] (or None), on the CPU. float16 halves the
    memory of keeping a volume encoded; the tokens are in [-1, 1], where float16 resolves 1e-3."""

    tokens: torch.Tensor
    heatmap: torch.Tensor | None
    region: Region
    windows: int

    @property
    def nbytes(self) -> int:
        heat = 0 if self.heatmap is None else self.heatmap.numel() * self.heatmap.element_size()
        return self.tokens.numel() * self.tokens.element_size() + heat


def full_region(shape: Sequence[int]) -> Region:
    return tuple(slice(0, int(n)) for n in shape)


@torch.no_grad()
def encode_grid(
    model: torch.nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: Callable[[float], None] | None = None,
    cancel: threading.Event | None = None,
    heatmap: bool = True,
    sw_batch_size: int = 1,
    region: Region | None = None,
) -> GridEncoding:
    """Voxel tokens (and the CAS heatmap) of a preprocessed CT ``image`` ``(1, D, H, W)``, by MONAI
    sliding windows with Gaussian blending; only the windows of ``region`` (default: all) run.

    ``progress`` is called with the fraction of windows done; ``cancel`` is checked between windows
    (raises :class:`voila.Cancelled`).
    """
    device = torch.device(device)
    patch_size = tuple(int(p) for p in patch_size)
    region = region or full_region(image.shape[1:])
    image = image[(slice(None), *region)]
    spatial = tuple(image.shape[1:])
    token_dim = int(model.config.token_dim)
    buffer_dtype = blending_dtype(token_dim + 2, spatial)
    total = count_windows(spatial, patch_size, overlap)
    done = 0

    def predictor(window: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if cancel is not None and cancel.is_set():
            raise Cancelled("segmentation cancelled")
        window = window.to(device=device, dtype=torch.float32)
        # (B, M + 1, ...) in the buffer's precision, filled in place: no float32 concatenation
        blended_channels = torch.zeros(
            (window.shape[0], token_dim + 1, *window.shape[2:]), dtype=buffer_dtype, device=device
        )
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if heatmap:
                tokens, complexity = model(window)
                blended_channels[:, token_dim:] = complexity
                del complexity
            else:  # the CAS decoder is about 40 % of a window's cost: skip it when no heatmap is wanted
                tokens = model.voxel_tokens(window)
            blended_channels[:, :token_dim] = tokens
        del tokens
        done += window.shape[0]
        if progress is not None:
            progress(min(done / total, 1.0))
        return blended_channels

    blended = blend_windows(image, predictor, patch_size, overlap, buffer_dtype, device, sw_batch_size)
    tokens = blended[:token_dim].to(torch.float16)
    if not bool(torch.isfinite(tokens).all()):
        raise broken_model_error("voxel tokens")
    complexity = None
    if heatmap:
        complexity = blended[token_dim].float()
        if not bool(torch.isfinite(complexity).all()):
            raise broken_model_error("complexity heatmap")
        complexity.clamp_(0, 1)
    return GridEncoding(tokens, complexity, region, total)


@torch.no_grad()
def classify_tokens(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    class_embeddings: torch.Tensor,
    device: str | torch.device = "cpu",
    cancel: threading.Event | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens ``(M, ...)`` against class embeddings ``(N, M)`` in chunks: winning row, its
    probability and the runner-up, each shaped like the tokens' spatial part. One ``(V × M) ·
    (M × N)`` product per chunk: no ``(N, ...)`` map ever exists, and a class more costs a row."""
    device = torch.device(device)
    spatial = tuple(tokens.shape[1:])
    flat = tokens.reshape(tokens.shape[0], -1)
    voxels = flat.shape[1]
    embeddings = class_embeddings.to(device=device, dtype=torch.float32)
    labels = torch.empty(voxels, dtype=torch.int64)
    probability = torch.empty(voxels, dtype=torch.float32)
    runner_up = torch.empty(voxels, dtype=torch.int64)
    for start in range(0, voxels, CHUNK_VOXELS):
        if cancel is not None and cancel.is_set():
            raise Cancelled("segmentation cancelled")
        chunk = flat[:, start : start + CHUNK_VOXELS].t().to(device=device, dtype=torch.float32)
        winner, winner_probability, second = top_two(model.logits(chunk, embeddings).float())
        end = start + chunk.shape[0]
        labels[start:end] = winner.cpu()
        probability[start:end] = winner_probability.cpu()
        runner_up[start:end] = second.cpu()
    return labels.view(spatial), probability.view(spatial), runner_up.view(spatial)


@torch.no_grad()
def predict_grid(
    model: torch.nn.Module,
    class_embeddings: torch.Tensor,
    image: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    device: str | torch.device = "cpu",
    **encoding: Any,
) -> GridPrediction:
    """Segment a preprocessed CT ``image`` ``(1, D, H, W)`` on the model grid:
    :func:`encode_grid` then :func:`classify_tokens` against ``class_embeddings`` ``(N, M)``
    (row 0 background; fused with the image's tokens when the model has the cross-attention
    fusion). ``encoding``: :func:`encode_grid`'s other settings (``amp_dtype``, ``progress``,
    ``cancel``, ``heatmap``, ``sw_batch_size``)."""
    encoded = encode_grid(model, image, patch_size, overlap, device, **encoding)
    embeddings = model.fuse(class_embeddings.to(device), encoded.tokens)
    labels, probability, runner_up = classify_tokens(
        model, encoded.tokens, embeddings, device, encoding.get("cancel")
    )
    return GridPrediction(labels, probability, runner_up, encoded.heatmap)
