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


class SemanticFPNNeck(nn.Module):
    """Brings each stage to full resolution (one up-block per factor of 2) and fuses by a 1³ conv.

    Input: the backbone's feature list; output ``(B, token_dim, D, H, W)`` at the input size.
    """

    def __init__(self, in_channels: list[int], strides: list[int], channels: int, token_dim: int, norm: str):
        super().__init__()
        self.branches = nn.ModuleList()
        for c, stride in zip(in_channels, strides):
            steps = int(round(math.log2(stride)))
            blocks = [UpsampleBlock(c if i == 0 else channels, channels, norm) for i in range(steps)]
            self.branches.append(nn.Sequential(*blocks))
        self.fuse = nn.Conv3d(channels * len(in_channels), token_dim, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int, int]) -> torch.Tensor:
        # fuse(concat(maps)) == bias + sum_i W_i · map_i: adding each branch's share as soon as it
        # exists keeps one full-resolution map alive instead of all four (same weights, same result)
        width = self.fuse.in_channels // len(self.branches)
        out = None
        for index, (branch, feature) in enumerate(zip(self.branches, features)):
            x = branch(feature)
            if tuple(x.shape[2:]) != tuple(size):  # odd input sizes: align to the exact input grid
                x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
            weight = self.fuse.weight[:, index * width : (index + 1) * width]
            share = F.conv3d(x, weight, self.fuse.bias if index == 0 else None)
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
