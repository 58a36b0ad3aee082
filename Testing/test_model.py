"""The VOILA network: shapes, sizes, losses by hand, the CAS frame, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from voila.model.cas import ComplexityVAE, complexity_target, select_voxels
from voila.model.config import CASConfig, load_preset
from voila.model.losses import marginal_cross_entropy, voxel_f1_loss
from voila.model.voila import VoilaModel
from voila.model.voxel_encoder import VoxelEncoder


def unit(rows: int, dim: int = 512, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=-1)


@pytest.mark.parametrize("shape", [(32, 32, 32), (20, 28, 36), (17, 23, 31)])
def test_voxel_encoder_gives_one_token_per_input_voxel_for_any_patch_size(shape):
    encoder = VoxelEncoder(load_preset("tiny"))
    tokens = encoder(torch.randn(1, 1, *shape))
    assert tokens.shape == (1, 32, *shape)


@pytest.mark.parametrize("shape", [(32, 32, 32), (24, 40, 16), (17, 23, 31)])
def test_neck_fusing_before_the_last_upsampling_equals_fusing_at_full_resolution(shape):
    """The fast path (fuse at half resolution, upsample once) is the same arithmetic."""
    torch.manual_seed(0)
    encoder = VoxelEncoder(load_preset("tiny")).eval()
    with torch.no_grad():
        features = encoder.backbone(torch.randn(1, 1, *shape))
        for feature in features:  # uneven magnitudes, so that a wrong branch weight would show
            feature.mul_(torch.rand_like(feature) * 3)
        fast = encoder.neck(features, shape)
        reference = encoder.neck.forward_full_resolution(features, shape)
    assert fast.shape == reference.shape == (1, 32, *shape)
    assert torch.allclose(fast, reference, atol=1e-5), float((fast - reference).abs().max())


def test_model_forward_gives_unit_tokens_and_a_heatmap_in_unit_range():
    model = VoilaModel(load_preset("tiny")).eval()
    with torch.no_grad():
        tokens, heatmap = model(torch.randn(2, 1, 24, 24, 24))
    assert tokens.shape == (2, 32, 24, 24, 24)
    assert torch.allclose(tokens.norm(dim=1), torch.ones(2, 24, 24, 24), atol=1e-5)
    assert heatmap.shape == (2, 1, 24, 24, 24)
    assert float(heatmap.min()) >= 0.0 and float(heatmap.max()) <= 1.0


def test_paper_preset_has_the_papers_parameter_count():
    count = VoilaModel(load_preset("paper")).trainable_parameters()
    assert 6.4e6 * 0.95 <= count <= 6.4e6 * 1.05, count


def test_tiny_preset_is_under_half_a_million_and_small_lies_between():
    tiny = VoilaModel(load_preset("tiny")).trainable_parameters()
    small = VoilaModel(load_preset("small")).trainable_parameters()
    paper = VoilaModel(load_preset("paper")).trainable_parameters()
    assert tiny < 0.5e6 < small < paper


def test_cas_network_is_lightweight():
    cas = ComplexityVAE(CASConfig())
    assert sum(p.numel() for p in cas.parameters()) < 100_000


def test_logit_scale_starts_at_one_over_tau_and_is_clamped_at_100():
    model = VoilaModel(load_preset("tiny"))
    assert math.isclose(float(model.head.scale().detach()), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.head.logit_scale.fill_(10.0)
    assert float(model.head.scale()) == 100.0


def test_cross_entropy_matches_a_hand_computed_value():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    target = torch.tensor([0, 2])
    annotated = torch.ones(2, 3, dtype=torch.bool)
    expected = 0.5 * (
        -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1)) - math.log(math.exp(3) / (2 + math.exp(3)))
    )
    assert math.isclose(float(marginal_cross_entropy(logits, target, annotated)), expected, rel_tol=1e-6)


def test_background_of_a_partially_labelled_case_may_be_any_unannotated_structure():
    # class 2 is not annotated for this case: a voxel labelled 0 may be class 2, so the loss uses
    # p(background) + p(class 2) and never pushes the voxel away from class 2.
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    annotated = torch.tensor([[True, True, False]])
    z = 1 + math.exp(1) + math.exp(2)
    expected = -math.log((1 + math.exp(2)) / z)
    assert math.isclose(
        float(marginal_cross_entropy(logits, torch.tensor([0]), annotated)), expected, rel_tol=1e-6
    )


def test_f1_loss_matches_a_hand_computed_value():
    # two classes; softmax probabilities chosen through logits = log(p)
    p = torch.tensor([[0.1, 0.9], [0.6, 0.4], [0.2, 0.8]])
    target = torch.tensor([1, 0, 1])
    annotated = torch.ones(3, 2, dtype=torch.bool)
    tp = 0.9 + 0.8
    f1 = (2 * tp + 1e-5) / ((0.9 + 0.4 + 0.8) + 2 + 1e-5)
    assert math.isclose(float(voxel_f1_loss(p.log(), target, annotated)), 1 - f1, rel_tol=1e-5)


def test_f1_loss_ignores_classes_a_case_does_not_annotate():
    p = torch.tensor([[0.2, 0.5, 0.3]])
    annotated = torch.tensor([[True, True, False]])
    # renormalised over annotated classes: p1 = 0.5 / 0.7
    expected = 1 - (2 * 0.5 / 0.7 + 1e-5) / (0.5 / 0.7 + 1 + 1e-5)
    loss = voxel_f1_loss(p.log(), torch.tensor([1]), annotated)
    assert math.isclose(float(loss), expected, rel_tol=1e-5)


def test_cas_target_peaks_where_classification_is_hard_in_the_cts_own_frame():
    shape = (12, 16, 20)  # D, H, W all different, hard region far from the centre on every axis
    d, h, w = torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij")
    hard = (d >= 1) & (d <= 3) & (h >= 10) & (h <= 13) & (w >= 14) & (w <= 18)
    noise = torch.rand(1, hard.numel(), generator=torch.Generator().manual_seed(0)) * 0.01
    confidence = torch.where(hard, 0.05, 0.95).reshape(1, -1) + noise
    indices = torch.arange(hard.numel())[None]
    for kind in ("error", "rank"):
        target = complexity_target(confidence, indices, shape, sigma=1.0, kind=kind)
        assert target.shape == (1, 1, *shape)
        peak = torch.tensor(divmod_3d(int(target.argmax()), shape))
        assert bool(hard[tuple(peak)]), f"{kind} target peaks at {peak.tolist()}, outside the hard region"
    # ranks spread the easy voxels evenly over [0, 1): their mean is about 0.5
    ranked = complexity_target(confidence, indices, shape, sigma=1.0, kind="rank")
    assert float(ranked[0, 0][hard].mean()) > 0.7 > 0.55 > float(ranked[0, 0][~hard].mean())
    # the error target says how likely a voxel is wrong: easy voxels near 0.05, wherever they are;
    # the 3 x 4 x 5 hard block (0.95 wrong) keeps over half of it through the smoothing (sigma 1)
    error = complexity_target(confidence, indices, shape, sigma=1.0, kind="error")
    assert float(error[0, 0][~hard].mean()) < 0.1 and float(error[0, 0][hard].mean()) > 0.5


def divmod_3d(flat: int, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    d, rest = divmod(flat, shape[1] * shape[2])
    h, w = divmod(rest, shape[2])
    return d, h, w


def test_confidently_wrong_voxels_rank_as_hardest():
    confidence = torch.tensor([[0.9, 0.001, 0.5, 0.99]])  # voxel 1 is confidently wrong
    target = complexity_target(confidence, torch.arange(4)[None], (1, 1, 4), sigma=0.0, kind="rank")
    assert target.flatten().tolist() == pytest.approx([1 / 3, 1.0, 2 / 3, 0.0])
    error = complexity_target(confidence, torch.arange(4)[None], (1, 1, 4), sigma=0.0, kind="error")
    assert error.flatten().tolist() == pytest.approx([0.1, 0.999, 0.5, 0.01])


def test_cas_selects_the_most_complex_voxels_plus_uniform_extras():
    shape = (8, 8, 8)
    heatmap = torch.zeros(1, 1, *shape)
    heatmap[0, 0, 1, 6, 3] = 1.0
    selection = select_voxels(heatmap, "cas", ratio=0.01, oversampling=2, spatial_shape=shape, batch=1)
    k = round(0.01 * 512)
    assert selection.loss_indices.shape == (1, k)
    assert 1 * 64 + 6 * 8 + 3 in selection.loss_indices[0].tolist()
    assert selection.target_indices.shape == (1, 3 * k)
    assert len(set(selection.target_indices[0].tolist())) == 3 * k  # extras never repeat CAS picks


def test_sampling_modes_random_and_none():
    shape = (6, 6, 6)
    random = select_voxels(None, "random", 0.1, 2, shape, batch=2)
    assert random.loss_indices.shape == (2, round(0.1 * 216))
    none = select_voxels(None, "none", 0.1, 2, shape, batch=1)
    assert none.loss_indices.shape == (1, 216)


def synthetic_ct(seed: int = 0, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Two blobs in noise: class 1 bright, class 2 dark, on a mid-grey body."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*(torch.arange(size).float() for _ in range(3)), indexing="ij"))
    centre1 = torch.randint(6, size - 6, (3,), generator=generator).float()
    centre2 = torch.randint(6, size - 6, (3,), generator=generator).float()
    labels = torch.zeros(size, size, size, dtype=torch.long)
    labels[((grid - centre1[:, None, None, None]) ** 2).sum(0) < 16] = 1
    labels[((grid - centre2[:, None, None, None]) ** 2).sum(0) < 9] = 2
    ct = torch.tensor([0.0, 1.5, -1.5])[labels] + 0.3 * torch.randn(size, size, size, generator=generator)
    return ct[None, None], labels[None]


def test_tiny_model_loss_falls_on_a_synthetic_ct_within_a_few_steps():
    torch.manual_seed(0)
    model = VoilaModel(load_preset("tiny"))
    features = unit(2)
    annotated = torch.ones(1, 3, dtype=torch.bool)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for step in range(25):
        ct, labels = synthetic_ct(seed=step % 4)
        losses = model.losses(ct, labels, features, annotated, generator=torch.Generator().manual_seed(step))
        optimiser.zero_grad()
        losses.total.backward()
        optimiser.step()
        history.append(float(losses.cross_entropy + losses.f1))
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.6 * first, history


# -- the cross-attention fusion ---------------------------------------------------------------------
def test_context_tokens_are_block_means_with_partial_blocks_at_the_edges():
    from voila.model.interaction import context_tokens

    tokens = torch.randn(2, 4, 10, 9, 5)
    context = context_tokens(tokens.half(), stride=4)  # blocks 3 × 3 × 2
    assert context.shape == (2, 18, 4) and context.dtype == torch.float32
    grid = context.transpose(1, 2).reshape(2, 4, 3, 3, 2)
    edge = tokens.half().float()[:, :, 8:, 8:, 4:].mean(dim=(2, 3, 4))  # a 2 × 1 × 1 corner block
    assert torch.allclose(grid[:, :, 2, 2, 1], edge, atol=1e-6)
    first = tokens.half().float()[:, :, :4, :4, :4].mean(dim=(2, 3, 4))
    assert torch.allclose(grid[:, :, 0, 0, 0], first, atol=1e-6)
    small = torch.randn(1, 4, 3, 2, 5)  # a volume smaller than one block is one context token
    assert torch.allclose(context_tokens(small, stride=8)[0, 0], small[0].mean(dim=(1, 2, 3)), atol=1e-6)


def test_the_fusion_starts_closed_then_gives_each_image_its_own_class_embeddings():
    config = load_preset("tiny")
    config.fusion = True
    torch.manual_seed(0)
    model = VoilaModel(config, text_dim=512, num_classes=4)
    embeddings = model.class_embeddings(unit(3))
    images = F.normalize(torch.randn(2, config.token_dim, 16, 16, 16), dim=1)
    assert torch.allclose(model.fuse(embeddings, images), embeddings.expand(2, -1, -1), atol=1e-6)
    with torch.no_grad():
        model.fusion.gate.fill_(1.0)
    fused = model.fuse(embeddings, images)
    assert fused.shape == (2, 4, config.token_dim)
    assert torch.allclose(fused.norm(dim=-1), torch.ones(2, 4), atol=1e-5)
    assert not torch.allclose(fused[0], fused[1], atol=1e-3)  # two images, two sets of embeddings
    # one encoded volume (float16, no batch) gets the embeddings of the same image in a batch
    single = model.fuse(embeddings, images[1].half())
    assert single.shape == (4, config.token_dim)
    assert torch.allclose(single, model.fuse(embeddings, images[1:].half().float())[0], atol=1e-5)
    # the per-image embeddings classify that image's voxels in the training loss
    logits = model.logits(images.flatten(2).transpose(1, 2), fused)
    assert logits.shape == (2, 16**3, 4)
    assert torch.allclose(logits[1], model.logits(images[1].flatten(1).t(), fused[1]), atol=1e-5)


def test_the_fusion_learns_from_the_training_loss():
    config = load_preset("tiny")
    config.fusion = True
    torch.manual_seed(0)
    model = VoilaModel(config, text_dim=512, num_classes=3)
    labels = torch.randint(0, 3, (1, 16, 16, 16))
    losses = model.losses(torch.randn(1, 1, 16, 16, 16), labels, unit(2), torch.ones(1, 3, dtype=torch.bool))
    losses.total.backward()
    assert float(model.fusion.gate.grad.abs()) > 0  # the closed gate opens by gradient


def test_the_fusion_needs_the_language_head():
    from voila.errors import ConfigError
    from voila.model.config import ModelConfig

    values = load_preset("tiny").to_dict()
    with pytest.raises(ConfigError, match="language head"):
        ModelConfig.from_dict(dict(values, fusion=True, head="linear"))
