"""Fit the training patch to a time box on a CPU.

The presets' patches are sized for a GPU (96³ for ``small``: about 55 s per optimiser step on two
CPU cores), so ``voila train --max-minutes 10`` on a laptop made a handful of steps. When the run
has a time box, runs on the CPU, and the user did not choose a patch, :func:`plan_patch` measures
optimiser steps of the run's own architecture (a fresh network: the run's weights and random
streams are untouched) and picks the largest cube patch, in steps of :data:`PATCH_STEP` voxels
from the preset's down to :data:`SMALLEST_PATCH`, with which one epoch fits in the box. The choice
is logged, kept in the checkpoint (a resumed run keeps it) and in the model card (inference uses
the same windows). ``--patch-size`` always wins; on a GPU the preset's patch is kept, and
fine-tuning keeps its base's patch (the inference window of a model the user already has).

Example::

    patch = plan_patch(model_config, class_count=118, text_dim=512, batch_size=2,
                       seconds=480, steps=250)   # e.g. [32, 32, 32] for 'small' on 2 cores
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from voila.model.config import ModelConfig
from voila.model.voila import VoilaModel

PATCH_STEP = 16
SMALLEST_PATCH = 32
TIMED_STEPS = 2  # after one warm-up step
SHARE_OF_BOX = 0.85  # the rest: validations, checkpoints, data loading


@dataclass(frozen=True)
class PatchPlan:
    patch_size: list[int]
    seconds_per_step: float  # measured at ``patch_size``
    steps_in_box: int  # what the box holds at that speed
    measured: dict[int, float]  # edge → seconds per step, every size measured


def candidate_edges(preset_patch: list[int]) -> list[int]:
    """Cube edges to try, largest first: the preset's smallest edge, then down in
    :data:`PATCH_STEP` steps to :data:`SMALLEST_PATCH`."""
    top = max(min(preset_patch), SMALLEST_PATCH)
    edges = [top]
    edge = (top - 1) // PATCH_STEP * PATCH_STEP
    while edge >= SMALLEST_PATCH:
        edges.append(edge)
        edge -= PATCH_STEP
    return edges


def seconds_per_step(
    model: VoilaModel, class_features: torch.Tensor, batch_size: int, edge: int, timed: int = TIMED_STEPS
) -> float:
    """Mean seconds of ``timed`` optimiser steps (after one warm-up) of ``model`` on random
    ``(batch_size, 1, edge, edge, edge)`` patches labelled with every class. ``model`` learns:
    pass a throwaway network."""
    classes = class_features.shape[0] + 1
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    generator = torch.Generator().manual_seed(edge)
    ct = torch.randn((batch_size, 1, edge, edge, edge), generator=generator)
    labels = torch.randint(0, classes, (batch_size, edge, edge, edge), generator=generator)
    annotated = torch.ones((batch_size, classes), dtype=torch.bool)
    model.train()
    times = []
    for _ in range(timed + 1):
        started = time.monotonic()
        losses = model.losses(ct, labels, class_features, annotated, generator=generator)
        losses.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.monotonic() - started)
    return sum(times[1:]) / timed


def plan_patch(
    model_config: ModelConfig,
    class_count: int,
    text_dim: int,
    batch_size: int,
    seconds: float,
    steps: int,
) -> PatchPlan:
    """The largest cube patch (edge from :func:`candidate_edges`) whose measured step time lets
    ``steps`` optimiser steps fit in ``SHARE_OF_BOX`` × ``seconds``; the smallest edge when none
    does, measured on a fresh network of ``model_config`` (the run's is never touched). Sizes are estimated from the smallest one's time (cubic in the edge), then the
    chosen one is measured; a candidate slower than estimated gives way to the next smaller."""
    budget = SHARE_OF_BOX * max(seconds, 0.0) / max(steps, 1)
    edges = candidate_edges(list(model_config.patch_size))
    smallest = edges[-1]
    with torch.random.fork_rng(devices=[]):  # the run's random streams stay where they were
        probe = VoilaModel(model_config, text_dim, class_count)
        features = torch.randn((class_count - 1, text_dim), generator=torch.Generator().manual_seed(0))
        measured = {smallest: seconds_per_step(probe, features, batch_size, smallest)}
        for edge in edges[:-1]:
            estimate = measured[smallest] * (edge / smallest) ** 3
            if estimate > budget:
                continue
            measured[edge] = seconds_per_step(probe, features, batch_size, edge)
            if measured[edge] <= budget:
                break
    chosen = next((edge for edge in edges if edge in measured and measured[edge] <= budget), smallest)
    speed = measured[chosen]
    patch = list(model_config.patch_size) if chosen == edges[0] else [chosen] * 3
    return PatchPlan(patch, speed, int(SHARE_OF_BOX * seconds / speed), measured)
