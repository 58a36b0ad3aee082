"""The VOILA model file: one ``.safetensors`` with weights, cached text embeddings and a JSON card.

Loading reads tensors and a JSON string only: nothing is ever unpickled, so a model downloaded
from the internet cannot run code. Layout:

- tensors ``model.<state_dict key>``: the trainable network;
- tensor ``text_cache.features`` ``(T, F)``: CLIP features of the prompt sentences, in the order
  of the card's ``text_cache.texts``;
- metadata ``voila_card``: the model card (JSON, see :func:`build_card`).

Example::

    save_model("liver.safetensors", model, card, cache)
    loaded = load_model("liver.safetensors")          # LoadedModel(model, card, text_cache)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from voila.errors import ModelFileError
from voila.model.config import ModelConfig
from voila.model.text_encoder import TextEmbeddingCache
from voila.model.voila import VoilaModel

FORMAT_VERSION = 1
CARD_KEY = "voila_card"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".bin")


@dataclass
class LoadedModel:
    model: VoilaModel
    card: dict[str, Any]
    text_cache: TextEmbeddingCache


def build_card(
    config: ModelConfig,
    classes: list[str],
    vocabulary: dict[str, Any],
    preprocessing: dict[str, Any],
    text_dim: int,
    prompt_template: str,
    training: dict[str, Any] | None = None,
    license: str = "Apache-2.0",
    description: str = "",
    intended_use: str = "Research use only. Not for clinical decisions.",
) -> dict[str, Any]:
    """The model card: everything needed to rebuild and use the model, as JSON-ready data."""
    return {
        "format_version": FORMAT_VERSION,
        "preset": config.name,
        "model": config.to_dict(),
        "text_encoder": {
            "model_name": config.text_encoder.model_name,
            "pretrained": config.text_encoder.pretrained,
            "feature_dim": text_dim,
        },
        "preprocessing": preprocessing,
        "classes": list(classes),
        "vocabulary": vocabulary,
        "prompt_template": prompt_template,
        "training": training or {},
        "license": license,
        "description": description,
        "intended_use": intended_use,
    }


def save_model(
    path: str | os.PathLike, model: VoilaModel, card: dict[str, Any], text_cache: TextEmbeddingCache
) -> Path:
    """Write the model file atomically (temporary file in the same folder, then rename)."""
    from voila.data.io import atomic_path

    path = Path(path)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    card = dict(card, text_cache={"texts": text_cache.texts})
    if len(text_cache):
        tensors["text_cache.features"] = text_cache.as_tensor().float().contiguous()
    metadata = {CARD_KEY: json.dumps(card, sort_keys=True, ensure_ascii=False)}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def _looks_pickled(path: Path) -> bool:
    """A pickle (protocol 2+) or a ``torch.save`` zip archive, whatever the file is called."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head == b"PK\x03\x04"


def _not_a_model(path: Path, reason: str) -> ModelFileError:
    hint = ""
    if path.suffix.lower() in PICKLE_SUFFIXES or _looks_pickled(path):
        hint = " Pickled PyTorch files are refused because loading them can run arbitrary code;"
    return ModelFileError(
        f"{path} is not a valid VOILA model file ({reason}).{hint} Use a .safetensors model "
        "exported by `voila train` (check it with `voila info MODEL`)"
    )


def read_model_card(path: str | os.PathLike) -> dict[str, Any]:
    """The model card, validated, without loading the weights."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist; give the path of a .safetensors VOILA model")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as error:
        raise _not_a_model(path, f"not readable as safetensors: {str(error).splitlines()[0]}") from None
    if CARD_KEY not in metadata:
        raise _not_a_model(path, "a safetensors file without a VOILA model card")
    try:
        card = json.loads(metadata[CARD_KEY])
    except json.JSONDecodeError:
        raise _not_a_model(path, "its model card is not valid JSON") from None
    version = card.get("format_version")
    if not isinstance(version, int):
        raise _not_a_model(path, "its model card has no format_version")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model-file format {version}, newer than this voila understands ({FORMAT_VERSION}); "
            "upgrade voila (pip install -U voila-seg)"
        )
    for key in ("model", "classes", "preprocessing", "text_encoder"):
        if key not in card:
            raise _not_a_model(path, f"its model card lacks {key!r}")
    return card


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network from the card and load weights and text cache; refuses mismatches."""
    path = Path(path)
    card = read_model_card(path)
    config = ModelConfig.from_dict(card["model"])
    model = VoilaModel(config, int(card["text_encoder"]["feature_dim"]), num_classes=len(card["classes"]))
    state, features = {}, None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key.startswith("model."):
                    state[key[len("model.") :]] = handle.get_tensor(key)
                elif key == "text_cache.features":
                    features = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as error:
        raise _not_a_model(path, f"damaged tensor data: {str(error).splitlines()[0]}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        detail = (missing or unexpected or wrong_shape)[0]
        raise ModelFileError(
            f"{path}: weights do not match the preset {card.get('preset')!r} in its own card "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} wrong shape, e.g. {detail}); "
            "the file is damaged or was edited: re-export it with `voila train`"
        )
    model.load_state_dict(state)
    texts = card.get("text_cache", {}).get("texts", [])
    if features is None:
        features = torch.zeros(0, 0)
    if len(texts) != features.shape[0]:
        raise _not_a_model(path, "its text cache does not match its card")
    cache = TextEmbeddingCache(texts, features)
    model.eval()
    return LoadedModel(model.to(device), card, cache)
