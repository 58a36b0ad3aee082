"""VOILA's losses over sampled voxels, with partial labels handled correctly.

A dataset that does not annotate a structure labels its voxels 0. For such a case the
background target means "background *or* any structure this case does not annotate": the
cross-entropy uses the marginal probability of that set (Shi et al., MedIA 2021), so an
unannotated organ is never pushed towards background. The F1 loss (paper eq. 4, a Dice over
independent voxels) runs over the annotated foreground classes present in the sample.

Shapes: ``logits`` ``(S, N)`` for S sampled voxels and N classes (0 = background); ``target``
``(S,)`` class indices; ``annotated`` ``(S, N)`` bool, True where the voxel's case annotates
the class (column 0 always True).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def marginal_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor
) -> torch.Tensor:
    """Mean over voxels of ``-log p(target)``, where for target 0 the probability is summed over
    background and the classes the voxel's case does not annotate."""
    log_probabilities = logits.float().log_softmax(dim=-1)
    target_set = F.one_hot(target, logits.shape[-1]).bool()
    background = target == 0
    target_set[background] |= ~annotated[background]
    masked = log_probabilities.masked_fill(~target_set, float("-inf"))
    return -torch.logsumexp(masked, dim=-1).mean()


def voxel_f1_loss(
    logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor, smooth: float = 1e-5
) -> torch.Tensor:
    """``1 - mean_c F1_c`` over foreground classes present in ``target`` (annotated by construction).

    ``F1_c = (2·Σ p_c y_c + smooth) / (Σ p_c + Σ y_c + smooth)`` with ``p`` the softmax over the
    voxel's annotated classes plus background (an unannotated class cannot be right or wrong).
    """
    probabilities = logits.float().masked_fill(~annotated, float("-inf")).softmax(dim=-1)
    one_hot = F.one_hot(target, logits.shape[-1]).float()
    present = one_hot[:, 1:].sum(dim=0) > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    p, y = probabilities[:, 1:], one_hot[:, 1:]
    f1 = (2 * (p * y).sum(dim=0) + smooth) / (p.sum(dim=0) + y.sum(dim=0) + smooth)
    return 1.0 - f1[present].mean()


def kl_divergence(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent elements, averaged over the batch (the paper's λ
    = 1e-8 is calibrated for this sum)."""
    per_element = -0.5 * (1 + log_variance - mean.pow(2) - log_variance.exp())
    return per_element.flatten(1).sum(dim=1).mean()
