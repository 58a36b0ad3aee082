"""Small, seeded training runs on synthetic phantoms for the training and ablation benchmarks.

The loop calls :meth:`voila.model.voila.VoilaModel.losses` directly (Adam, fixed seed, whole
phantoms as patches, no augmentation), so two runs differ only in what is compared: the voxel
sampling (``cas`` / ``random`` / ``none``) or the head (``language`` / ``linear``). Phantoms go
through voila's one deterministic preprocessing; held-out Dice comes from
:func:`voila.infer.sliding_window.predict_grid` and :func:`voila.evaluate.metrics.dice`.

Example::

    data = PhantomData.create(n_train=8, n_val=2, size=32, spacing=3.0)
    features = class_features(data.classes)
    run = TrainingRun(build_model("tiny", "language", data), data, features, sampling="cas", seed=0)
    run.steps(50)
    run.validation_dice()
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

SEED = 0
LEARNING_RATE = 1e-3


@dataclass
class Case:
    image: torch.Tensor  # (1, D, H, W) float32 on the model grid
    labels: torch.Tensor  # (D, H, W) int64, 0 = background, i = classes[i]
    masks: dict[str, np.ndarray]  # reference masks by structure name


@dataclass
class PhantomData:
    train: list[Case]
    val: list[Case]
    classes: list[str]  # foreground names, in label order
    spacing: float
    size: int

    @classmethod
    def create(cls, n_train: int, n_val: int, size: int, spacing: float, seed: int = SEED) -> PhantomData:
        """Phantoms ``size³`` at ``spacing`` mm; validation phantoms use seeds the training never sees."""
        from voila.data.phantoms import STRUCTURES, make_phantom
        from voila.data.preprocess import PreprocessingConfig, deterministic_transforms, to_metatensor

        classes = list(STRUCTURES)
        preprocess = deterministic_transforms(
            PreprocessingConfig(spacing=(spacing,) * 3), label_keys=["label"], crop_foreground=False
        )

        def case(number: int) -> Case:
            ct, masks, affine = make_phantom((size,) * 3, (spacing,) * 3, seed=number)
            labels = np.zeros(ct.shape, dtype=np.int16)
            for index, name in enumerate(classes, start=1):
                labels[masks[name]] = index
            out = preprocess(
                {
                    "image": to_metatensor(ct.astype(np.float32), affine),
                    "label": to_metatensor(labels, affine),
                }
            )
            return Case(
                out["image"].as_tensor().float().contiguous(),
                out["label"].as_tensor()[0].long().contiguous(),
                masks,
            )

        train = [case(seed * 1000 + n) for n in range(n_train)]
        val = [case(seed * 1000 + 500 + n) for n in range(n_val)]
        return cls(train, val, classes, spacing, size)


def class_features(classes: list[str]) -> torch.Tensor:
    """CLIP features ``(N - 1, F)`` of the classes' prompt sentences (open_clip ViT-B-32, random weights)."""
    from voila.model.factory import class_prompt_text
    from voila.model.text_encoder import TextEncoder
    from voila.vocabulary import Vocabulary

    vocabulary = Vocabulary.load()
    encoder = TextEncoder("ViT-B-32", pretrained=None)
    return encoder.encode([class_prompt_text(name, vocabulary) for name in classes])


def build_model(preset: str, head: str, data: PhantomData, seed: int = SEED):
    from voila.model.config import load_preset
    from voila.model.voila import VoilaModel

    config = load_preset(preset)
    config.head = head
    config.patch_size = [data.size] * 3
    torch.manual_seed(seed)
    return VoilaModel(config, text_dim=512, num_classes=len(data.classes) + 1)


class TrainingRun:
    """One seeded training run; ``steps`` trains, ``validation_dice`` measures held-out Dice."""

    def __init__(
        self,
        model,
        data: PhantomData,
        features: torch.Tensor,
        sampling: str,
        seed: int = SEED,
        batch_size: int = 2,
        device: str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.data = data
        self.features = features.to(self.device)
        self.sampling = sampling
        self.batch_size = batch_size
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE)
        self.order = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.amp = torch.bfloat16 if self.device.type == "cuda" else None
        self.annotated = torch.ones(batch_size, len(data.classes) + 1, dtype=torch.bool, device=self.device)
        self.step_seconds: list[float] = []
        self.losses: list[float] = []

    def steps(self, count: int) -> None:
        self.model.train()
        for _ in range(count):
            picks = self.order.choice(len(self.data.train), size=self.batch_size, replace=False)
            ct = torch.stack([self.data.train[i].image for i in picks]).to(self.device)
            labels = torch.stack([self.data.train[i].labels for i in picks]).to(self.device)
            started = time.perf_counter()
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                losses = self.model.losses(
                    ct,
                    labels,
                    self.features,
                    self.annotated,
                    sampling=self.sampling,
                    generator=self.generator,
                )
            self.optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            self.optimizer.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.step_seconds.append(time.perf_counter() - started)
            self.losses.append(float(losses.total.detach()))

    @torch.no_grad()
    def validation_dice(self) -> dict[str, float]:
        """Mean Dice over the validation phantoms per structure, and ``mean`` over structures."""
        from voila.evaluate.metrics import dice
        from voila.infer.sliding_window import predict_grid

        self.model.eval()
        embeddings = self.model.class_embeddings(self.features).float()
        scores: dict[str, list[float]] = {name: [] for name in self.data.classes}
        for case in self.data.val:
            labels = predict_grid(
                self.model,
                embeddings,
                case.image,
                [self.data.size] * 3,
                overlap=0.5,
                device=self.device,
                amp_dtype=self.amp,
                heatmap=False,
            ).labels.numpy()
            for index, name in enumerate(self.data.classes, start=1):
                value = dice(labels == index, case.masks[name])
                if not np.isnan(value):
                    scores[name].append(value)
        per_class = {name: float(np.mean(v)) for name, v in scores.items() if v}
        per_class["mean"] = float(np.mean(list(per_class.values())))
        return per_class
