"""The VOILA network: voxel encoder + voxel–language head + CAS, and its training losses.

Example::

    model = VoilaModel(load_preset("tiny"), text_dim=512)
    tokens, heatmap = model(ct)                 # (B, 32, D, H, W) unit tokens, (B, 1, D, H, W)
    losses = model.losses(ct, labels, class_features, annotated)
    losses.total.backward()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from voila.model.cas import ComplexityVAE, complexity_target, select_voxels
from voila.model.config import ModelConfig
from voila.model.interaction import (
    CrossAttentionFusion,
    LinearClassificationHead,
    VoxelLanguageHead,
    context_tokens,
)
from voila.model.losses import kl_divergence, marginal_cross_entropy, voxel_f1_loss
from voila.model.voxel_encoder import VoxelEncoder


@dataclass
class VoilaLosses:
    """Scalar losses of one step and the maps behind them (for the paper's Fig. 4 view)."""

    total: torch.Tensor
    cross_entropy: torch.Tensor
    f1: torch.Tensor
    cas_mse: torch.Tensor
    cas_kld: torch.Tensor
    cas_prior: torch.Tensor
    heatmap: torch.Tensor  # (B, 1, D, H, W) CAS prediction used for sampling (detached)
    target: torch.Tensor  # (B, 1, D, H, W) complexity target

    def scalars(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "ce": float(self.cross_entropy.detach()),
            "f1": float(self.f1.detach()),
            "cas_mse": float(self.cas_mse.detach()),
            "cas_kld": float(self.cas_kld.detach()),
            "cas_prior": float(self.cas_prior.detach()),
        }


class VoilaModel(nn.Module):
    """``num_classes`` (background included) is needed only by the linear-head ablation."""

    def __init__(self, config: ModelConfig, text_dim: int = 512, num_classes: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.text_dim = text_dim
        self.voxel_encoder = VoxelEncoder(config)
        if config.head == "linear":
            if not num_classes:
                raise ValueError("the linear head needs num_classes")
            self.head: nn.Module = LinearClassificationHead(num_classes, config.token_dim)
        else:
            adapters = (num_classes or 1) - 1 if config.text_adapters else 0
            if config.text_adapters and not num_classes:
                raise ValueError("text adapters need num_classes")
            self.head = VoxelLanguageHead(text_dim, config.token_dim, adapters)
        self.fusion = CrossAttentionFusion(config.token_dim) if config.fusion else None
        self.cas = ComplexityVAE(config.cas)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def voxel_tokens(self, ct: torch.Tensor) -> torch.Tensor:
        """CT ``(B, 1, D, H, W)`` → unit voxel tokens ``(B, M, D, H, W)``."""
        return F.normalize(self.voxel_encoder(ct), dim=1)

    def class_embeddings(self, class_features: torch.Tensor) -> torch.Tensor:
        """Foreground CLIP features ``(N - 1, F)`` → class embeddings ``(N, M)`` (background first)."""
        return self.head.class_embeddings(class_features)

    def fuse(self, class_embeddings: torch.Tensor, voxel_tokens: torch.Tensor) -> torch.Tensor:
        """The class embeddings ``(N, M)`` for the image(s) whose voxel tokens are ``(B, M, D, H,
        W)``: with the cross-attention fusion, each image's own ``(B, N, M)``; without it,
        ``class_embeddings`` unchanged. Tokens ``(M, D, H, W)`` (one encoded volume, any float
        type, any device) give ``(N, M)``."""
        if self.fusion is None:
            return class_embeddings
        single = voxel_tokens.dim() == 4
        context = context_tokens(voxel_tokens[None] if single else voxel_tokens)
        fused = self.fusion(class_embeddings, context.to(class_embeddings.device))
        return fused[0] if single else fused

    def logits(self, voxel_tokens: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """Unit tokens ``(..., M)`` → logits ``(..., N)`` (embeddings ``(N, M)``, or ``(B, N, M)``
        against tokens ``(B, K, M)``)."""
        return self.head.logits(voxel_tokens, class_embeddings)

    def forward(self, ct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: unit voxel tokens ``(B, M, D, H, W)`` and the complexity heatmap ``(B, 1, D, H, W)``."""
        # the heatmap first, so that the CAS decoder's full-resolution maps are freed before the
        # tokens exist (lower peak memory per window)
        heatmap = self.cas.sample(ct, deterministic=True)
        return self.voxel_tokens(ct), heatmap

    def losses(
        self,
        ct: torch.Tensor,
        labels: torch.Tensor,
        class_features: torch.Tensor,
        annotated: torch.Tensor,
        sampling: str | None = None,
        generator: torch.Generator | None = None,
    ) -> VoilaLosses:
        """Training losses for CT ``(B, 1, D, H, W)``, labels ``(B, D, H, W)`` (class indices,
        0 = background, ``N``: outside the case's annotated region, no loss), foreground CLIP
        features ``(N - 1, F)`` and ``annotated`` ``(B, N)``."""
        cfg = self.config
        mode = sampling or cfg.sampling.mode
        batch, shape = ct.shape[0], tuple(ct.shape[2:])
        volume_tokens = self.voxel_tokens(ct)
        embeddings = self.fuse(self.class_embeddings(class_features), volume_tokens)  # (N | B×N, M)
        tokens = volume_tokens.flatten(2)  # (B, M, V)

        with torch.no_grad():
            heatmap = self.cas.sample(ct, deterministic=False) if mode == "cas" else None
        selection = select_voxels(
            heatmap, mode, cfg.sampling.ratio, cfg.sampling.oversampling, shape, batch, ct.device, generator
        )
        flat_labels = labels.reshape(batch, -1)

        def gather(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            picked = tokens.gather(2, indices[:, None, :].expand(-1, tokens.shape[1], -1))
            return self.logits(picked.transpose(1, 2), embeddings), flat_labels.gather(1, indices)

        logits, target = gather(selection.loss_indices)  # (B, K, N), (B, K)
        ignore = annotated.shape[1]  # label value of voxels outside the annotated region
        row_annotated = annotated[:, None, :].expand(-1, logits.shape[1], -1).reshape(-1, logits.shape[-1])
        logits_2d, target_1d = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        known = target_1d < ignore
        if bool(known.all()):
            cross_entropy = marginal_cross_entropy(logits_2d, target_1d, row_annotated)
            f1 = voxel_f1_loss(logits_2d, target_1d, row_annotated)
        elif bool(known.any()):
            cross_entropy = marginal_cross_entropy(logits_2d[known], target_1d[known], row_annotated[known])
            f1 = voxel_f1_loss(logits_2d[known], target_1d[known], row_annotated[known])
        else:  # a patch wholly outside the annotated region teaches nothing
            cross_entropy = f1 = logits.sum() * 0.0

        with torch.no_grad():
            if selection.target_indices is selection.loss_indices:
                target_logits, target_labels = logits.detach(), target
            else:
                target_logits, target_labels = gather(selection.target_indices)
            target_annotated = annotated[:, None, :].expand(-1, target_logits.shape[1], -1)
            probabilities = target_logits.float().masked_fill(~target_annotated, float("-inf")).softmax(-1)
            unknown = target_labels >= ignore
            true_probability = probabilities.gather(2, target_labels.clamp(max=ignore - 1)[..., None])[..., 0]
            complexity = complexity_target(
                true_probability,
                selection.target_indices,
                shape,
                cfg.cas.target_sigma,
                cfg.cas.target,
                known=None if not bool(unknown.any()) else ~unknown,
            )

        reconstruction, mean, log_variance = self.cas(complexity, ct)
        cas_mse = F.mse_loss(reconstruction, complexity)
        cas_kld = kl_divergence(mean, log_variance)
        total = cross_entropy + f1 + cas_mse + cfg.cas.kld_weight * cas_kld
        cas_prior = torch.zeros((), device=ct.device)
        if cfg.cas.prior_weight > 0:  # the heatmap users see is drawn from z = 0: teach that path
            cas_prior = F.mse_loss(self.cas.sample(ct, deterministic=True), complexity)
            total = total + cfg.cas.prior_weight * cas_prior
        blank = torch.zeros_like(complexity)
        return VoilaLosses(
            total,
            cross_entropy,
            f1,
            cas_mse,
            cas_kld,
            cas_prior,
            heatmap if heatmap is not None else blank,
            complexity,
        )
