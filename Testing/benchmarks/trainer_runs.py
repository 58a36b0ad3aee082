"""Benchmark training runs through voila's own trainer, on synthetic phantoms.

There is one training loop, :class:`voila.training.loop.Trainer`; the benchmarks change only what
they compare, through its hooks: :meth:`~voila.training.loop.Trainer.build_model_config` (the head:
language or linear), the ``sampling`` setting (CAS / random / none),
:meth:`~voila.training.loop.Trainer.encode_class_texts` (CLIP features read from a file, so a
child process's peak memory is the training's, not open_clip's) and
:meth:`~voila.training.loop.Trainer.on_validation` (record a held-out Dice curve; stop at a target
or a training-time cap). Phantoms: :func:`voila.data.phantoms.write_phantom_dataset` in the
TotalSegmentator layout, whole phantoms as patches, no augmentation, the same seed, data and order
for every arm.

Example::

    data = write_phantoms(folder / "data", n_train=8, n_val=2, size=32, spacing=3.0)
    trainer = BenchTrainer(bench_config(data, folder / "cas", size=32, steps=40, sampling="cas"))
    trainer.run(); trainer.curve[-1]["dice"]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from voila.data.phantoms import write_phantom_dataset
from voila.training.config import load_train_config
from voila.training.loop import Trainer
from voila.training.validation import ValidationResult

SEED = 0
LEARNING_RATE = 1e-3


def write_phantoms(root: Path, n_train: int, n_val: int, size: int, spacing: float, seed: int = SEED) -> Path:
    """``n_train + n_val`` phantoms of ``size³`` voxels; the last ``n_val`` are held out (meta.csv)."""
    total = n_train + n_val
    return write_phantom_dataset(
        root, total, shape=(size,) * 3, spacing=(spacing,) * 3, seed=seed, val_fraction=n_val / total
    )


def bench_config(
    data: Path,
    out: Path,
    size: int,
    steps: int,
    sampling: str = "cas",
    val_every: int | None = None,
    **settings: Any,
):
    """The benchmark recipe: ``tiny``, whole phantoms as patches, batch 2, Adam 1e-3, no augmentation;
    ``steps`` optimiser steps in epochs of ``val_every`` steps (validation after each)."""
    every = val_every or steps
    values = {
        "data": [str(data)],
        "out": str(out),
        "preset": "tiny",
        "spacing": [float(_spacing(data))] * 3,
        "patch_size": [size] * 3,
        "sampling": sampling,
        "batch_size": 2,
        "lr": LEARNING_RATE,
        "steps_per_epoch": every,
        "epochs": max(1, -(-steps // every)),
        "augment": False,
        "foreground_oversampling": 0.0,
        "text_pretrained": "none",
        "seed": SEED,
        "val_overlap": 0.5,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "command": "benchmark",
    }
    values.update(settings)
    return load_train_config(values)


def save_class_features(data: Path, path: Path, preset: str = "tiny") -> Path:
    """The CLIP features of the dataset's class sentences, as the trainer encodes them, in a file
    (for :class:`BenchTrainer`'s ``features_file``)."""
    from voila.data.preprocess import PreprocessingConfig
    from voila.model.config import load_preset
    from voila.model.text_encoder import TextEncoder
    from voila.training.data import TrainingData
    from voila.vocabulary import Vocabulary

    spacing = (_spacing(data),) * 3
    prepared = TrainingData.prepare([data], PreprocessingConfig(spacing=spacing), Vocabulary.load())
    encoder = TextEncoder(load_preset(preset).text_encoder.model_name, pretrained=None)
    torch.save(encoder.encode(prepared.class_texts), path)
    return path


class BenchTrainer(Trainer):
    """The trainer with the benchmark's hooks: head, CLIP features from a file, a Dice curve and
    an optional stop at ``stop_at_dice`` or after ``cap_seconds`` of training steps."""

    def __init__(
        self,
        config,
        head: str = "language",
        features_file: Path | None = None,
        stop_at_dice: float | None = None,
        cap_seconds: float | None = None,
    ) -> None:
        super().__init__(config, progress_bar=False)
        self.head = head
        self.features_file = features_file
        self.stop_at_dice = stop_at_dice
        self.cap_seconds = cap_seconds
        self.curve: list[dict[str, Any]] = []
        self.step_seconds: list[float] = []
        self.losses: list[float] = []

    def build_model_config(self):
        config = super().build_model_config()
        config.head = self.head
        return config

    def encode_class_texts(self) -> torch.Tensor:
        if self.features_file is not None:
            return torch.load(self.features_file, weights_only=True)  # a plain tensor: never unpickle code
        return super().encode_class_texts()

    def train_step(self, batches) -> dict[str, float]:
        """The trainer's step, timed (data loading included, as a user's step is)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        losses = super().train_step(batches)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - started)
        self.losses.append(losses["loss"])
        return losses

    def on_validation(self, result: ValidationResult) -> None:
        self.curve.append(
            {
                "step": self.global_step,
                "train_s": sum(self.step_seconds),
                "dice": result.mean,
                "per_class": result.per_class,
            }
        )
        print(
            f"  step {self.global_step}, {sum(self.step_seconds):.0f} s, Dice {result.mean:.3f}", flush=True
        )
        reached = self.stop_at_dice is not None and result.mean >= self.stop_at_dice
        capped = self.cap_seconds is not None and sum(self.step_seconds) >= self.cap_seconds
        if reached or capped:
            self.stop_event.set()


def _spacing(data: Path) -> float:
    from voila.data.geometry import voxel_spacing
    from voila.data.io import read_image

    first = sorted(p for p in data.iterdir() if p.is_dir())[0]
    return float(voxel_spacing(read_image(first / "ct.nii.gz")[1])[0])
