"""Voxel encoder: a 3-D bottleneck ResNet and a semantic-FPN neck that yields one token per voxel.

Convolutions rather than attention: a voxel's class depends mostly on its neighbourhood. The deep
stages use dilation instead of stride (DeepLab-style) so that small structures keep resolution;
the neck brings every stage back to full input resolution and fuses them.

Example::

    encoder = VoxelEncoder(load_preset("tiny"))
    tokens = encoder(torch.randn(2, 1, 48, 48, 48))     # (2, 32, 48, 48, 48)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from voila.model.config import ModelConfig


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Instance norm suits the small 3-D batches of CT training; group norm is the alternative."""
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"unknown norm {kind!r}")


class Bottleneck3d(nn.Module):
    """1³ reduce → 3³ (strided or dilated) → 1³ expand ×4, with a residual connection."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int, norm: str) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv3d(in_channels, planes, 1, bias=False)
        self.norm1 = norm_layer(norm, planes)
        self.conv2 = nn.Conv3d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.norm2 = norm_layer(norm, planes)
        self.conv3 = nn.Conv3d(planes, out_channels, 1, bias=False)
        self.norm3 = norm_layer(norm, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                norm_layer(norm, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        out = F.relu(self.norm2(self.conv2(out)), inplace=True)
        out = self.norm3(self.conv3(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet3d(nn.Module):
    """Stride-2 7³ stem (no max-pool) and bottleneck stages; returns every stage's feature map.

    Input ``(B, C_in, D, H, W)``; output a list of ``(B, 4·w·2^s, D/r_s, H/r_s, W/r_s)`` where
    ``w`` is the stem width and ``r_s`` the cumulative stride of stage ``s``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cfg = config.voxel_encoder
        self.stem = nn.Sequential(
            nn.Conv3d(cfg.in_channels, cfg.stem_width, 7, stride=2, padding=3, bias=False),
            norm_layer(cfg.norm, cfg.stem_width),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.ModuleList()
        self.out_channels: list[int] = []
        self.strides: list[int] = []
        in_channels, stride_so_far = cfg.stem_width, 2
        for index, (blocks, stride, dilation) in enumerate(
            zip(cfg.stage_blocks, cfg.stage_strides, cfg.stage_dilations)
        ):
            planes = cfg.stem_width * 2**index
            layers = []
            for block in range(blocks):
                layers.append(
                    Bottleneck3d(in_channels, planes, stride if block == 0 else 1, dilation, cfg.norm)
                )
                in_channels = planes * Bottleneck3d.expansion
            self.stages.append(nn.Sequential(*layers))
            stride_so_far *= stride
            self.out_channels.append(in_channels)
            self.strides.append(stride_so_far)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class UpsampleBlock(nn.Sequential):
    """3³ conv → norm → ReLU → ×2 trilinear upsampling."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
        )

    def before_upsampling(self, x: torch.Tensor) -> torch.Tensor:
        """conv → norm → ReLU only: ``(B, C_in, d, h, w)`` → ``(B, C_out, d, h, w)``."""
        for layer in list(self)[:-1]:
            x = layer(x)
        return x


class SemanticFPNNeck(nn.Module):
    """Brings each stage to full resolution (one up-block per factor of 2) and fuses by a 1³ conv.

    Input: the backbone's feature list; output ``(B, token_dim, D, H, W)`` at the input size.

    The 1³ fusion and the trilinear upsampling are both linear, and the interpolation weights sum
    to one (so the bias passes unchanged): fusing *before* the last ×2 upsampling of every branch
    and upsampling the fused ``token_dim`` channels once is the same arithmetic on an eighth of the
    voxels. That is what :meth:`forward` does whenever the branches meet at the same half-resolution
    size (any input divisible by the backbone's total stride, e.g. every sliding window); other
    sizes take the branch-by-branch path, :meth:`forward_full_resolution`.
    """

    def __init__(self, in_channels: list[int], strides: list[int], channels: int, token_dim: int, norm: str):
        super().__init__()
        self.branches = nn.ModuleList()
        for c, stride in zip(in_channels, strides):
            steps = int(round(math.log2(stride)))
            if steps < 1:
                raise ValueError(f"every backbone stage needs a stride >= 2 (got {stride})")
            blocks = [UpsampleBlock(c if i == 0 else channels, channels, norm) for i in range(steps)]
            self.branches.append(nn.Sequential(*blocks))
        self.fuse = nn.Conv3d(channels * len(in_channels), token_dim, 1)

    def _fuse_share(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Branch ``index``'s part of the 1³ fusion (the bias is added once, with branch 0)."""
        width = self.fuse.in_channels // len(self.branches)
        weight = self.fuse.weight[:, index * width : (index + 1) * width]
        return F.conv3d(x, weight, self.fuse.bias if index == 0 else None)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int, int]) -> torch.Tensor:
        # every branch up to half resolution: (B, channels, D/2, H/2, W/2) when the sizes agree
        half_resolution = [branch[:-1](f) for branch, f in zip(self.branches, features)]
        if len({tuple(x.shape[2:]) for x in half_resolution}) != 1:
            return self._full_resolution(half_resolution, size)
        fused = None
        for index, branch in enumerate(self.branches):
            share = self._fuse_share(index, branch[-1].before_upsampling(half_resolution[index]))
            half_resolution[index] = None
            fused = share if fused is None else fused.add_(share)
        out = F.interpolate(fused, scale_factor=2, mode="trilinear", align_corners=False)
        if tuple(out.shape[2:]) != tuple(size):  # odd input sizes: align to the exact input grid
            out = F.interpolate(out, size=size, mode="trilinear", align_corners=False)
        return out

    def forward_full_resolution(
        self, features: list[torch.Tensor], size: tuple[int, int, int]
    ) -> torch.Tensor:
        """Every branch to full resolution, then fused, one branch at a time (the reference path)."""
        return self._full_resolution([branch[:-1](f) for branch, f in zip(self.branches, features)], size)

    def _full_resolution(
        self, half_resolution: list[torch.Tensor], size: tuple[int, int, int]
    ) -> torch.Tensor:
        out = None
        for index, branch in enumerate(self.branches):
            x = branch[-1](half_resolution[index])
            half_resolution[index] = None  # free the half-resolution map as soon as it is used
            if tuple(x.shape[2:]) != tuple(size):
                x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
            share = self._fuse_share(index, x)
            del x
            out = share if out is None else out.add_(share)
        return out


class VoxelEncoder(nn.Module):
    """CT patch ``(B, 1, D, H, W)`` → voxel tokens ``(B, token_dim, D, H, W)`` (not normalised)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = ResNet3d(config)
        self.neck = SemanticFPNNeck(
            self.backbone.out_channels,
            self.backbone.strides,
            config.neck_channels,
            config.token_dim,
            config.voxel_encoder.norm,
        )

    def forward(self, ct: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(ct), tuple(ct.shape[2:]))
