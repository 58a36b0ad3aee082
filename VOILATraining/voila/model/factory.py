"""The one place a VOILA model is made: network, class sentences, text cache and model card.

Training, fine-tuning, tests and benchmarks all build through :func:`create_model`; it can start
from a fresh initialisation or from the weights of an existing model file (``base``). Example::

    built = create_model(load_preset("tiny"), ["liver", "spleen"], Vocabulary.load(),
                         PreprocessingConfig(), text_pretrained=None)
    save_model("tiny.safetensors", built.model, built.card, built.text_cache)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from voila.errors import ConfigError
from voila.model.config import ModelConfig
from voila.model.model_file import LoadedModel, build_card
from voila.model.text_encoder import TextEmbeddingCache, TextEncoder
from voila.model.voila import VoilaModel
from voila.vocabulary import BACKGROUND, DEFAULT_TEMPLATE, Vocabulary, class_sentence


@dataclass
class BuiltModel:
    model: VoilaModel
    text_cache: TextEmbeddingCache
    card: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    def class_sentences(self) -> list[str]:
        """The sentence of every foreground class, in card order."""
        vocabulary = Vocabulary.from_dict(self.card["vocabulary"])
        return class_sentences(self.classes[1:], vocabulary, self.card["prompt_template"])

    def class_features(self) -> torch.Tensor:
        """CLIP features of the foreground classes ``(N - 1, F)`` in card order."""
        return self.text_cache.features(self.class_sentences())


def class_sentences(
    names: Sequence[str], vocabulary: Vocabulary, template: str = DEFAULT_TEMPLATE
) -> list[str]:
    return [class_sentence(name, vocabulary, template) for name in names]


def create_model(
    config: ModelConfig,
    class_names: Sequence[str],
    vocabulary: Vocabulary,
    preprocessing,
    text_pretrained: str | None = "default",
    template: str = DEFAULT_TEMPLATE,
    encoder: TextEncoder | None = None,
    text_cache: TextEmbeddingCache | None = None,
    base: LoadedModel | None = None,
    **card_fields: Any,
) -> BuiltModel:
    """A model for ``class_names`` (foreground; background is added first).

    ``text_pretrained="default"`` keeps the preset's open_clip tag; ``None`` gives open_clip's
    architecture with deterministic random weights (offline). Class sentences missing from
    ``text_cache`` are encoded once by ``encoder`` (built from the config when not given).
    ``base``: an existing model whose weights the new one starts from (same architecture; a
    linear head keeps the rows of the classes both share). The network's random initialisation
    draws from torch's global generator: seed it first for a reproducible model.
    """
    if text_pretrained != "default":
        config.text_encoder.pretrained = text_pretrained
    classes = [BACKGROUND, *class_names]
    sentences = class_sentences(class_names, vocabulary, template)
    cache = text_cache if text_cache is not None else TextEmbeddingCache()
    missing = [s for s in sentences if s not in cache]
    if missing:
        encoder = encoder or TextEncoder(config.text_encoder.model_name, config.text_encoder.pretrained)
        cache.set_encoder_factory(lambda: encoder)
    features = cache.features(sentences) if sentences else torch.zeros(0, 0)
    cache = TextEmbeddingCache(sentences, features)
    text_dim = int(features.shape[1]) if sentences else 512
    model = VoilaModel(config, text_dim=text_dim, num_classes=len(classes))
    if base is not None:
        _start_from(model, base, classes)
    card = build_card(
        config,
        classes,
        vocabulary.to_dict(),
        preprocessing.to_dict(),
        text_dim,
        template,
        **card_fields,
    )
    return BuiltModel(model, cache, card)


def _architecture(config: ModelConfig) -> dict[str, Any]:
    """What a fine-tuned model must share with its base: the network's shapes and text encoder
    (not how it samples or trains, its patch, or parts that start from zero: text adapters, the
    fusion, whose gate is 0)."""
    values = config.to_dict()
    return {
        "voxel_encoder": values["voxel_encoder"],
        "neck_channels": values["neck_channels"],
        "token_dim": values["token_dim"],
        "head": values["head"],
        "cas": (values["cas"]["channels"], values["cas"]["latent_dim"]),
        "text_encoder": values["text_encoder"],
    }


def _start_from(model: VoilaModel, base: LoadedModel, classes: list[str]) -> None:
    """Copy ``base``'s weights into ``model``; per-class rows (a linear head's, text adapters) are
    matched by class name, and parts the base lacks keep their initialisation (adapters and the
    fusion's gate: zero, so the new model starts answering as the base does)."""
    if _architecture(model.config) != _architecture(base.model.config):
        raise ConfigError(
            "the base model's architecture differs from the one asked for; start from the base "
            "model's own preset (its card) or train from scratch"
        )
    state = {key: value.clone() for key, value in base.model.state_dict().items()}
    target = model.state_dict()
    base_classes = list(base.card["classes"])
    for key, value in target.items():
        if key not in state:
            if "text_adapters" not in key and not key.startswith("fusion."):
                raise ConfigError(f"the base model has no weight {key!r}; it cannot be the starting point")
            state[key] = value.clone()
        elif state[key].shape != value.shape:  # per-class rows: matched by name
            names = classes if value.shape[0] == len(classes) else classes[1:]
            known = base_classes if state[key].shape[0] == len(base_classes) else base_classes[1:]
            rows = value.clone()
            for row, name in enumerate(names):
                if name in known:
                    rows[row] = state[key][known.index(name)]
            state[key] = rows
    model.load_state_dict(state)
