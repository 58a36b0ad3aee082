"""Voxel–language interaction: classify every voxel by cosine similarity to text embeddings.

Voxel tokens and projected text tokens live in one M-dimensional space (M = 32), both
L2-normalised; ``logits = exp(logit_scale) · cos(voxel, text)``. Class 0 is background with its
own learned embedding. The cost of one more class is one more row of an ``(N, M)`` matrix.

The optional cross-attention fusion (the pulmonary artery/vein paper's) lets every class
embedding look at the image before it classifies: it attends to the image's voxel tokens, averaged
over blocks of :data:`CONTEXT_STRIDE`³ voxels (a training patch's, or at inference the whole encoded
volume's), and moves toward what it finds.

Example::

    head = VoxelLanguageHead(text_dim=512, token_dim=32)
    embeddings = head.class_embeddings(clip_features)          # (N_fg, 512) -> (N_fg + 1, 32)
    logits = head.logits(voxel_tokens, embeddings)              # (..., 32) -> (..., N_fg + 1)
    fused = CrossAttentionFusion(32)(embeddings, context_tokens(tokens))   # (B, N_fg + 1, 32)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

MAX_LOGIT_SCALE = 100.0
# Edge (voxels of the model grid) of the blocks whose mean token is one context token of the
# fusion: a 128³ training patch gives 16³ context tokens, a 300 × 300 × 200 volume about 28,000.
CONTEXT_STRIDE = 8
FUSION_HEADS = 4


class VoxelLanguageHead(nn.Module):
    """``adapters``: the number of trained foreground classes that get a learned vector added to
    their projected text embedding (0: none). Rows beyond them (prompts the model was not trained
    on) are the plain projection: an adapter belongs to a class, not to the text encoder."""

    def __init__(self, text_dim: int, token_dim: int = 32, adapters: int = 0) -> None:
        super().__init__()
        self.text_projection = nn.Linear(text_dim, token_dim)
        self.background_embedding = nn.Parameter(torch.randn(token_dim) / math.sqrt(token_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.text_adapters = nn.Parameter(torch.zeros(adapters, token_dim)) if adapters else None

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def class_embeddings(self, text_features: torch.Tensor) -> torch.Tensor:
        """CLIP features of the foreground classes ``(N_fg, F)`` → unit embeddings ``(N_fg + 1, M)``,
        background first."""
        projected = self.text_projection(text_features.to(self.text_projection.weight.dtype))
        if self.text_adapters is not None:
            count = min(len(self.text_adapters), len(projected))
            projected = torch.cat([projected[:count] + self.text_adapters[:count], projected[count:]])
        return F.normalize(torch.cat([self.background_embedding[None], projected]), dim=-1)

    def logits(self, voxel_tokens: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """Unit voxel tokens ``(..., M)`` and unit class embeddings ``(N, M)`` (or one set per image,
        ``(B, N, M)`` against tokens ``(B, K, M)``) → logits ``(..., N)``."""
        return self.scale() * voxel_tokens @ class_embeddings.transpose(-1, -2)


def context_tokens(tokens: torch.Tensor, stride: int = CONTEXT_STRIDE) -> torch.Tensor:
    """Voxel tokens ``(B, M, D, H, W)`` (any float type) → the fusion's context ``(B, K, M)``
    float32: the mean token of every ``stride``³ block (edge blocks over the voxels they have),
    ``K = ⌈D/s⌉·⌈H/s⌉·⌈W/s⌉``. Pooled ``stride`` slices at a time, so a whole volume's float16
    tokens are never copied to float32 at once; differentiable (training passes the patch's)."""
    slabs = []
    for start in range(0, tokens.shape[2], stride):
        slab = tokens[:, :, start : start + stride].float()
        kernel = (slab.shape[2], min(stride, slab.shape[3]), min(stride, slab.shape[4]))
        slabs.append(F.avg_pool3d(slab, kernel, ceil_mode=True))
    return torch.cat(slabs, dim=2).flatten(2).transpose(1, 2)


class CrossAttentionFusion(nn.Module):
    """Class embeddings attend to an image's context tokens: ``e' = normalise(e + g ·
    Attention(LN(e), LN(c), LN(c)))`` (multi-head, :data:`FUSION_HEADS`). The gate ``g`` starts at
    0, so a model that gains the fusion (a fine-tune of a base without it) answers exactly as
    before until training opens it."""

    def __init__(self, token_dim: int = 32, heads: int = FUSION_HEADS) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(token_dim)
        self.context_norm = nn.LayerNorm(token_dim)
        self.attention = nn.MultiheadAttention(token_dim, heads, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, class_embeddings: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Unit class embeddings ``(N, M)`` and context ``(B, K, M)`` → unit ``(B, N, M)``, one
        set of class embeddings per image."""
        context = context.to(class_embeddings.dtype)
        queries = self.query_norm(class_embeddings).expand(context.shape[0], -1, -1)
        keys = self.context_norm(context)
        attended, _ = self.attention(queries, keys, keys, need_weights=False)
        return F.normalize(class_embeddings + self.gate * attended, dim=-1)


class LinearClassificationHead(nn.Module):
    """The paper's "w/o V-L interaction" ablation: a plain linear classifier over a fixed class list.

    It ignores the text features except for their count; it cannot segment unseen prompts. It keeps
    the language head's learnable logit scale, so the ablation changes only the V-L interaction
    (unit tokens times a plain linear layer would start with logits too flat to learn quickly).
    """

    def __init__(self, num_classes: int, token_dim: int = 32) -> None:
        super().__init__()
        self.classifier = nn.Linear(token_dim, num_classes)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def class_embeddings(self, text_features: torch.Tensor) -> torch.Tensor:
        if text_features.shape[0] + 1 != self.classifier.out_features:
            raise ValueError(
                f"linear head was built for {self.classifier.out_features} classes, "
                f"got {text_features.shape[0] + 1}"
            )
        return self.classifier.weight

    def logits(self, voxel_tokens: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        return scale * (voxel_tokens @ class_embeddings.t() + self.classifier.bias)
