"""Teach a model: fine-tune an existing model file on a few, partly labelled cases.

``voila finetune BASE.safetensors --data PATH ... --out DIR`` (or ``voila.finetune(base, config)``)
starts from the base model's weights, text encoder, vocabulary and preprocessing — all read from
its card, nothing to repeat — keeps every class the base knows, and adds the datasets' new ones
(vocabulary names, or free text such as ``LeftParotid``, which becomes "Left Parotid"). The base
file is only read.

Keeping what the base knows (``keep_base``): where a new case does not label a base structure,
the base model's own confident prediction is its label (pseudo-labels; an unsure one is left out
of the loss), so the base's classes keep being taught on the new images. The backbone learns
more slowly (``encoder_lr``, 0.1 by default here) or not at all but its last stage
(``trainable: neck``). The card records the base (file name and SHA-256), the added classes and
the data.

    path = voila.finetune("demo.safetensors", {"data": ["openkbp"], "out": "runs/hn", "max_minutes": 10})
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch

from voila.data.preprocess import PreprocessingConfig
from voila.errors import ConfigError
from voila.model.config import ModelConfig
from voila.model.download import sha256_of
from voila.model.model_file import LoadedModel, load_model
from voila.model.text_encoder import TextEmbeddingCache, TextEncoder, text_encoder_id
from voila.training.config import load_train_config, setting_names
from voila.training.data import TrainingData
from voila.training.export import RunTotals
from voila.training.loop import Trainer, TrainingProgress
from voila.vocabulary import DEFAULT_TEMPLATE, Vocabulary

LOG = logging.getLogger("voila.train")
PathLike = Union[str, "os.PathLike[str]"]
# Settings the base model's card fixes: asking for others would make a different model.
FIXED_BY_BASE = ("preset", "spacing", "text_pretrained")
# Defaults that suit fine-tuning (a user's settings win).
FINETUNE_DEFAULTS = {"encoder_lr": 0.1, "lr": 3e-4, "epochs": 20}
# A base prediction is a pseudo-label only this confident; less sure voxels carry no loss.
PSEUDO_LABEL_CONFIDENCE = 0.7
PSEUDO_LABEL_OVERLAP = 0.25


class FinetuneTrainer(Trainer):
    """The trainer with the fine-tuning hooks: the base's architecture, preprocessing, vocabulary
    and text cache; its classes first; pseudo-labels; the base recorded in the card. The base's
    patch is kept whatever the time box (it is the taught model's inference window, which the
    user already has); ``--patch-size`` changes it."""

    plans_patch = False

    def __init__(self, config, progress=None, stop=None, progress_bar: bool = True) -> None:
        super().__init__(config, progress=progress, stop=stop, progress_bar=progress_bar)
        if not config.base:
            raise ConfigError("fine-tuning needs the base model file: voila finetune BASE.safetensors ...")
        self.base_path = Path(config.base)
        self.base = load_model(self.base_path)
        self.base_sha256 = sha256_of(self.base_path)
        # case index → the base's classes (indices) its labels got from the base's predictions
        self.pseudo_labelled: dict[int, set[int]] = {}
        for path in (config.export_path, config.out_dir):
            if os.path.realpath(path) == os.path.realpath(self.base_path):
                raise ConfigError(
                    f"{path} is the base model; fine-tuning never overwrites it: choose another --out"
                )

    def build_model_config(self) -> ModelConfig:
        values = self.with_run_settings(self.base.model.config.to_dict())
        values["text_adapters"] = bool(self.config.text_adapters or values.get("text_adapters"))
        values["fusion"] = bool(self.config.fusion or values.get("fusion"))
        return ModelConfig.from_dict(values)

    def build_preprocessing(self) -> PreprocessingConfig:
        return PreprocessingConfig.from_dict(self.base.card["preprocessing"])

    def load_vocabulary(self) -> Vocabulary:
        return Vocabulary.from_dict(self.base.card["vocabulary"])

    def base_model(self) -> LoadedModel:
        return self.base

    def prepare_data(self) -> TrainingData:
        data = super().prepare_data(
            template=self.base.card.get("prompt_template", DEFAULT_TEMPLATE),
            base_classes=self.base.card["classes"],
        )
        if self.config.keep_base == "pseudo-labels":
            self._pseudo_label(data)
        return data

    def encode_class_texts(self) -> torch.Tensor:
        """The base's cached sentences, then the disk cache, then the encoder for new ones."""
        encoder = self.base.card["text_encoder"]
        cache = TextEmbeddingCache(self.base.text_cache.texts, self.base.text_cache.as_tensor())
        cache.set_encoder_factory(
            lambda: TextEncoder(encoder["model_name"], encoder.get("pretrained"), device="cpu"),
            encoder_id=text_encoder_id(encoder["model_name"], encoder.get("pretrained")),
        )
        return cache.features(self.data.class_texts)

    @torch.no_grad()
    def _pseudo_label(self, data: TrainingData) -> None:
        """Label the base's structures a training case does not annotate with the base model's
        confident predictions (on voxels the case calls background), and mark them annotated."""
        from voila.infer.sliding_window import predict_grid

        base_classes = list(self.base.card["classes"])
        model = self.base.model.to(self.device)
        features = self.base.text_cache.features([self.base_sentence(name) for name in base_classes[1:]])
        embeddings = model.class_embeddings(features.to(self.device)).float()
        patch = self.base.card["model"]["patch_size"]
        for index in data.train_indices:
            case = data.cases[index]
            missing = [c for c in range(1, len(base_classes)) if not bool(case.annotated[c])]
            if not missing:
                continue
            image, label = case.volumes()
            prediction = predict_grid(
                model, embeddings, image.as_tensor(), patch, PSEUDO_LABEL_OVERLAP, self.device, heatmap=False
            )
            labels = label.as_tensor()[0].clone()
            predicted = prediction.labels
            for c in missing:
                mine = (predicted == c) & (labels == 0)
                labels[mine & (prediction.probability >= PSEUDO_LABEL_CONFIDENCE)] = c
                labels[mine & (prediction.probability < PSEUDO_LABEL_CONFIDENCE)] = data.ignore_index
                case.annotated[c] = True
            case.replace_label(labels[None])
            self.pseudo_labelled[index] = set(missing)
            LOG.info(
                "pseudo-labels for %s/%s: %s",
                case.dataset,
                case.case_id,
                ", ".join(
                    f"{base_classes[c]} {int((labels == c).sum())}" for c in missing if (labels == c).any()
                )
                or "none of the base's structures found",
            )
        self.base.model.cpu()

    @torch.no_grad()
    def _forgetting(self, after: dict[str, float]) -> dict[str, Any] | None:
        """The forgetting measure: Dice of the base's structures on the whole validation cases,
        by the base model (``before``) and by the fine-tuned one (``after``: ``after`` as given,
        from the final validation), the mean change, and what each structure was scored against
        (``labels``: :func:`label_sources`). None without a final validation."""
        base_classes = list(self.base.card["classes"])
        if not after or not self.data.val_indices:
            return None
        features = self.base.text_cache.features([self.base_sentence(name) for name in base_classes[1:]])
        before = self.validate_model(
            self.base.model.to(self.device),
            features.to(self.device),
            base_classes,
            self.base.card["model"]["patch_size"],
            picture=False,
        ).per_class
        self.base.model.cpu()
        shared = [name for name in before if name in after]
        if not shared:
            return None
        change = float(np.mean([after[name] - before[name] for name in shared]))
        sources = label_sources(
            {i: self.data.cases[i].annotated for i in self.data.val_indices},
            self.pseudo_labelled,
            {name: base_classes.index(name) for name in shared},
        )
        LOG.info(
            "the base's structures on the validation cases: mean Dice %.4f before, %.4f after (%+.4f)%s",
            float(np.mean([before[name] for name in shared])),
            float(np.mean([after[name] for name in shared])),
            change,
            ""
            if all(source == "reference" for source in sources.values())
            else "; scored partly against the base's own predictions (pseudo-labels): agreement "
            "with the base, not accuracy — give a validation case that labels them for that",
        )
        return {
            "before": {name: round(before[name], 4) for name in shared},
            "after": {name: round(after[name], 4) for name in shared},
            "mean_change": round(change, 4),
            "labels": sources,
        }

    def labelled_by_hand(self, index: int) -> torch.Tensor:
        """A case's annotated classes less those its pseudo-labels filled in: the base's own places
        and intensity profile stand for those (a base that "finds" a liver in the neck must not
        teach the card that livers lie there)."""
        flags = self.data.cases[index].annotated.clone()
        flags[sorted(self.pseudo_labelled.get(index, ()))] = False
        return flags

    def base_sentence(self, name: str) -> str:
        from voila.vocabulary import class_sentence

        return class_sentence(name, self.vocabulary, self.base.card.get("prompt_template", DEFAULT_TEMPLATE))

    def training_record(self, totals: RunTotals, source: str) -> dict[str, Any]:
        record = super().training_record(totals, source)
        base_classes = list(self.base.card["classes"])
        added = [name for name in self.data.class_names if name not in base_classes]
        record["base"] = {
            "file": self.base_path.name,
            "sha256": self.base_sha256,
            "classes": base_classes[1:],
            "description": self.base.card.get("description", ""),
        }
        record["added_classes"] = added
        record["keep_base"] = self.config.keep_base
        forgetting = self._forgetting(totals.final_scores)
        if forgetting is not None:
            record["base_classes_dice"] = forgetting
        record["summary"] = (
            f"fine-tuned from {self.base_path.name}: added {', '.join(added) or 'no class'}; "
            + record["summary"]
        )
        return record


def label_sources(
    annotated: dict[int, Any], pseudo_labelled: dict[int, set[int]], classes: dict[str, int]
) -> dict[str, str]:
    """What each base structure's forgetting figure was scored against: ``"reference"`` (the
    validation cases' own labels), ``"pseudo-labels"`` (the base's confident predictions, where a
    validation case is also a training case that did not label it: agreement with the base, not
    accuracy) or ``"reference and pseudo-labels"``. ``annotated``: validation case index → its
    per-class annotated flags; ``pseudo_labelled``: case index → the class indices pseudo-labelled;
    ``classes``: structure name → class index."""
    sources = {}
    for name, c in classes.items():
        kinds = {
            "pseudo-labels" if c in pseudo_labelled.get(i, ()) else "reference"
            for i, flags in annotated.items()
            if bool(flags[c])
        }
        sources[name] = " and ".join(sorted(kinds, reverse=True)) or "reference"
    return sources


def finetune(
    base: PathLike,
    config: dict[str, Any] | PathLike,
    progress: Callable[[TrainingProgress], None] | None = None,
    stop: threading.Event | None = None,
    progress_bar: bool = False,
    **overrides: Any,
) -> Path:
    """Fine-tune the model file ``base`` (see the module docstring) and return the new model file.

    ``config``: training settings (dict or YAML path; :data:`voila.training.config.SETTINGS`);
    those the base fixes (preset, spacing, text encoder weights) may not be given.
    """
    settings = finetune_config(base, config, overrides)
    if not settings.command:
        settings.command = f"voila.finetune({str(base)!r}, ...)"
    return FinetuneTrainer(settings, progress=progress, stop=stop, progress_bar=progress_bar).run()


def finetune_config(base: PathLike, config: dict[str, Any] | PathLike | None, overrides: dict[str, Any]):
    """Settings of a fine-tuning run: fine-tuning's defaults, then the file or dict, then ``overrides``
    (flags); the settings the base model's card fixes may not be given."""
    given = setting_names(config)
    fixed = sorted((given | {k for k, v in overrides.items() if v is not None}) & set(FIXED_BY_BASE))
    if fixed:
        raise ConfigError(
            f"{', '.join(fixed)} come from the base model's card when fine-tuning; leave them out"
        )
    defaults = {key: value for key, value in FINETUNE_DEFAULTS.items() if key not in given}
    return load_train_config(config, {**defaults, **overrides, "base": str(base)})
