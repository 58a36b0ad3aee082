"""Build a new VOILA model for a class list: network, prompt sentences, text cache, model card.

Training starts here, and tests use it to make small real model files. Example::

    built = create_model(load_preset("tiny"), ["liver", "spleen"], Vocabulary.load(),
                         PreprocessingConfig(), text_pretrained=None)
    save_model("tiny.safetensors", built.model, built.card, built.text_cache)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from voila.model.config import ModelConfig
from voila.model.model_file import build_card
from voila.model.text_encoder import TextEmbeddingCache, TextEncoder
from voila.model.voila import VoilaModel
from voila.vocabulary import DEFAULT_TEMPLATE, Vocabulary


def class_prompt_text(name: str, vocabulary: Vocabulary, template: str = DEFAULT_TEMPLATE) -> str:
    """The sentence standing for a class: the vocabulary's prompt (with measured neighbours) for
    a known structure, the template filled with the text itself for free text."""
    if name in vocabulary:
        return vocabulary[name].prompt_text(template)
    return template.format(name=name)


@dataclass
class BuiltModel:
    model: VoilaModel
    text_cache: TextEmbeddingCache
    card: dict[str, Any]

    def class_features(self) -> torch.Tensor:
        """CLIP features of the foreground classes ``(N - 1, F)`` in card order."""
        vocabulary = Vocabulary.from_dict(self.card["vocabulary"])
        texts = [
            class_prompt_text(n, vocabulary, self.card["prompt_template"]) for n in self.card["classes"][1:]
        ]
        return self.text_cache.features(texts)


def create_model(
    config: ModelConfig,
    class_names: Sequence[str],
    vocabulary: Vocabulary,
    preprocessing,
    text_pretrained: str | None = "default",
    template: str = DEFAULT_TEMPLATE,
    encoder: TextEncoder | None = None,
    **card_fields: Any,
) -> BuiltModel:
    """A freshly initialised model for ``class_names`` (foreground; background is added first).

    ``text_pretrained="default"`` uses the preset's tag; ``None`` gives open_clip's architecture
    with deterministic random weights (offline). The text encoder runs once here to fill the cache.
    """
    if text_pretrained != "default":
        config.text_encoder.pretrained = text_pretrained
    if encoder is None:
        encoder = TextEncoder(config.text_encoder.model_name, config.text_encoder.pretrained)
    classes = ["background", *class_names]
    texts = [class_prompt_text(n, vocabulary, template) for n in class_names]
    features = encoder.encode(texts) if texts else torch.zeros(0, 0)
    cache = TextEmbeddingCache(texts, features)
    text_dim = int(features.shape[1]) if texts else 512
    model = VoilaModel(config, text_dim=text_dim, num_classes=len(classes))
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
