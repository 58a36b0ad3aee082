"""Complexity-Aware Sampling (CAS): a small conditional VAE that predicts where classification
is hard, and the voxel selection it drives.

Training target (:func:`complexity_target`): for the voxels whose classification we evaluated,
``1 - p(true class)`` (how likely the voxel is wrong; the paper instead ranks them within the
patch, which orders them alike but says nothing across patches), spread to a dense map by a
normalised Gaussian convolution (σ in voxels). The public reference code ranked by ``-|cos|``,
which calls a confidently wrong voxel easy, and wrote its target with D and W swapped; here the
target is built by flat-index scatter in the ``(D, H, W)`` frame of the CT, so the frames agree
by construction (tested).

At inference the decoder, fed the prior mean ``z = 0`` and the CT, gives the complexity heatmap
shown to users (1 = hard / uncertain, 0 = easy).

Example::

    cas = ComplexityVAE(CASConfig())
    heatmap = cas.sample(ct)                                   # (B, 1, D, H, W) in [0, 1]
    picks = select_voxels(heatmap, "cas", ratio=0.1, oversampling=2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from voila.model.config import CASConfig


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, padding=1),
        nn.InstanceNorm3d(out_channels, affine=True),
        nn.LeakyReLU(0.1, inplace=True),
    )


class ComplexityVAE(nn.Module):
    """Conditional VAE at full resolution (stride 1 everywhere).

    Encoder: ``heatmap ⊕ CT`` ``(B, 2, D, H, W)`` → per-voxel Gaussian latent ``(B, L, D, H, W)``.
    Decoder: ``z ⊕ CT`` ``(B, L + 1, D, H, W)`` → heatmap ``(B, 1, D, H, W)`` through a sigmoid.
    """

    def __init__(self, config: CASConfig) -> None:
        super().__init__()
        channels = list(config.channels)
        self.latent_dim = config.latent_dim
        encoder, previous = [], 2
        for c in channels:
            encoder.append(_conv_block(previous, c))
            previous = c
        self.encoder = nn.Sequential(*encoder)
        self.to_mean = nn.Conv3d(previous, config.latent_dim, 1)
        self.to_log_variance = nn.Conv3d(previous, config.latent_dim, 1)
        decoder, previous = [], config.latent_dim + 1
        for c in reversed(channels):
            decoder.append(_conv_block(previous, c))
            previous = c
        self.decoder = nn.Sequential(*decoder, nn.Conv3d(previous, 1, 1))

    def encode(self, heatmap: torch.Tensor, ct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(torch.cat([heatmap, ct], dim=1))
        return self.to_mean(hidden), self.to_log_variance(hidden).clamp(-20.0, 20.0)

    def decode(self, z: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(torch.cat([z, ct], dim=1)))

    def forward(
        self, target: torch.Tensor, ct: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct ``target``; returns ``(reconstruction, mean, log_variance)``."""
        mean, log_variance = self.encode(target, ct)
        z = mean + torch.randn_like(mean) * (0.5 * log_variance).exp()
        return self.decode(z, ct), mean, log_variance

    def sample(self, ct: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Heatmap ``(B, 1, D, H, W)`` for CT ``(B, 1, D, H, W)``; ``z = 0`` when deterministic."""
        if not deterministic:
            z = torch.randn((ct.shape[0], self.latent_dim, *ct.shape[2:]), dtype=ct.dtype, device=ct.device)
            return self.decode(z, ct)
        # z = 0: the first convolution sees only the CT channel (no all-zero latent tensor in memory)
        first, rest = self.decoder[0], self.decoder[1:]
        conv = first[0]
        hidden = F.conv3d(ct, conv.weight[:, self.latent_dim :], conv.bias, padding=conv.padding)
        for layer in list(first)[1:]:
            hidden = layer(hidden)
        return torch.sigmoid(rest(hidden))


def gaussian_smooth(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, D, H, W)`` with σ in voxels (zero padding)."""
    if sigma <= 0:
        return volume
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=volume.dtype, device=volume.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = volume.shape[1]
    out = volume
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        weight = kernel.view(shape).repeat(channels, 1, 1, 1, 1)
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(out, weight, padding=tuple(padding), groups=channels)
    return out


@torch.no_grad()
def complexity_target(
    true_class_probability: torch.Tensor,
    indices: torch.Tensor,
    spatial_shape: tuple[int, int, int],
    sigma: float = 1.0,
    kind: str = "error",
    known: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense complexity target ``(B, 1, D, H, W)`` in [0, 1].

    ``true_class_probability`` ``(B, S)``: the softmax probability of each evaluated voxel's true
    class; ``indices`` ``(B, S)``: their flat indices into ``D·H·W`` (C order); ``known`` ``(B, S)``:
    which of them lie in the annotated region (the others carry no value). ``kind="error"``:
    the value is ``1 - p(true class)``; ``kind="rank"`` (the paper's): rank 0 (least confident) →
    1, last → 0. Then a normalised Gaussian convolution fills the gaps.
    """
    batch, count = true_class_probability.shape
    voxels = spatial_shape[0] * spatial_shape[1] * spatial_shape[2]
    if kind == "rank":
        order = true_class_probability.argsort(dim=1)  # ascending confidence: hardest first
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(count, device=order.device).expand(batch, count))
        values = 1.0 - ranks.float() / max(count - 1, 1)
    else:
        values = (1.0 - true_class_probability.float()).clamp(0.0, 1.0)
    sparse = torch.zeros(batch, voxels, device=indices.device)
    weight = torch.zeros(batch, voxels, device=indices.device)
    present = torch.ones_like(values) if known is None else known.float()
    sparse.scatter_(1, indices, values * present)
    weight.scatter_(1, indices, present)
    sparse = sparse.view(batch, 1, *spatial_shape)
    weight = weight.view(batch, 1, *spatial_shape)
    numerator, denominator = gaussian_smooth(sparse, sigma), gaussian_smooth(weight, sigma)
    return torch.where(
        denominator > 1e-6, numerator / denominator.clamp_min(1e-6), torch.zeros_like(numerator)
    )


@dataclass
class VoxelSelection:
    """Flat voxel indices ``(B, K)`` for the classification loss and ``(B, S)`` (S ≥ K) whose
    confidence builds the CAS target."""

    loss_indices: torch.Tensor
    target_indices: torch.Tensor


def select_voxels(
    heatmap: torch.Tensor | None,
    mode: str,
    ratio: float,
    oversampling: int,
    spatial_shape: tuple[int, int, int],
    batch: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> VoxelSelection:
    """Choose the voxels that carry the classification loss.

    - ``cas``: the K = ratio·V most complex voxels of ``heatmap`` carry the loss; the CAS target is
      built from them plus n·K voxels drawn uniformly from the rest (anti-self-loop).
    - ``random``: K uniform voxels carry the loss; the target uses them plus n·K more.
    - ``none``: every voxel carries the loss and builds the target.
    """
    voxels = spatial_shape[0] * spatial_shape[1] * spatial_shape[2]
    if mode == "none":
        every = torch.arange(voxels, device=device).expand(batch, voxels)
        return VoxelSelection(every, every)
    k = max(1, min(voxels, int(round(ratio * voxels))))
    extra = min(voxels - k, oversampling * k)
    scores = torch.rand(batch, voxels, generator=generator, device="cpu").to(device)
    if mode == "cas":
        if heatmap is None:
            raise ValueError("CAS sampling needs a heatmap")
        loss_indices = heatmap.reshape(batch, voxels).topk(k, dim=1).indices
    elif mode == "random":
        loss_indices = scores.topk(k, dim=1).indices
    else:
        raise ValueError(f"unknown sampling mode {mode!r}")
    if extra == 0:
        return VoxelSelection(loss_indices, loss_indices)
    scores.scatter_(1, loss_indices, -1.0)  # uniform extras come from the voxels not yet picked
    extra_indices = scores.topk(extra, dim=1).indices
    return VoxelSelection(loss_indices, torch.cat([loss_indices, extra_indices], dim=1))
