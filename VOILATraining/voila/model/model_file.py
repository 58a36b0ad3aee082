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
from safetensors.torch import save as safetensors_bytes

from voila.errors import ModelFileError
from voila.model.config import ModelConfig
from voila.model.text_encoder import TextEmbeddingCache
from voila.model.voila import VoilaModel

FORMAT_VERSION = 1
CARD_KEY = "voila_card"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".bin")
MAX_TEXT_FEATURES = 8192  # CLIP-like text towers give 512-1024; anything larger is not a real card


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
        # written by Python, so the file gets the user's umask (safetensors' own writer makes it
        # 0600: a colleague on a shared server could not load the model)
        temporary.write_bytes(safetensors_bytes(tensors, metadata=metadata))
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
    """The model card, checked entry by entry (:func:`check_card`), without loading any weight."""
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
    if not isinstance(card, dict):
        raise _not_a_model(path, f"its model card is a JSON {type(card).__name__}, not an object")
    version = card.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _not_a_model(path, "its model card has no format_version")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model-file format {version}, newer than this voila understands ({FORMAT_VERSION}); "
            "update VOILA (in Slicer: the extension, via the Extensions Manager; elsewhere: pip install -U from the VOILA repository)"
        )
    for key in ("model", "classes", "preprocessing", "text_encoder"):
        if key not in card:
            raise _not_a_model(path, f"its model card lacks {key!r}")
    check_card(card, path)
    return card


def check_card(card: dict[str, Any], path: Path) -> None:
    """Every entry a model is rebuilt from must be what its reader expects; anything else is one
    :class:`ModelFileError` naming the entry (never an internal error deep in the loader)."""
    from voila.data.preprocess import PreprocessingConfig
    from voila.vocabulary import BACKGROUND, Vocabulary

    def damaged(key: str, detail: str) -> ModelFileError:
        return ModelFileError(
            f"{path}: the model card entry {key!r} is damaged ({detail}); the file was edited or broken: "
            "use the original file, or re-export it with `voila train`"
        )

    classes = card["classes"]
    if not (
        isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)
    ):
        raise damaged("classes", "expected a list of class names, background first")
    if classes[0] != BACKGROUND or len(set(classes)) != len(classes):
        raise damaged("classes", "the first class must be 'background' and each class must appear once")
    encoder = card["text_encoder"]
    if not (isinstance(encoder, dict) and isinstance(encoder.get("model_name"), str)):
        raise damaged("text_encoder", "expected model_name, pretrained and feature_dim")
    dim = encoder.get("feature_dim")
    if not (isinstance(dim, int) and not isinstance(dim, bool) and 1 <= dim <= MAX_TEXT_FEATURES):
        raise damaged(
            "text_encoder", f"feature_dim must be a whole number in 1..{MAX_TEXT_FEATURES}, not {dim!r}"
        )
    if not isinstance(card.get("prompt_template", "{name}"), str) or "{name}" not in card.get(
        "prompt_template", "{name}"
    ):
        raise damaged("prompt_template", "expected text containing {name}")
    texts = (
        (card.get("text_cache") or {}).get("texts", [])
        if isinstance(card.get("text_cache", {}), dict)
        else None
    )
    if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
        raise damaged("text_cache", "expected a list of sentences")
    for key, reader in (
        ("review", _check_review),
        ("model", lambda value: ModelConfig.from_dict(_mapping(value))),
        ("preprocessing", lambda value: PreprocessingConfig.from_dict(_mapping(value))),
        ("vocabulary", lambda value: Vocabulary.from_dict(_mapping(value)) if value is not None else None),
    ):
        try:
            reader(card.get(key))
        except Exception as error:  # any way a hand-edited entry can fail to read
            detail = " ".join(str(error).split())[:160] or type(error).__name__
            raise damaged(key, detail) from None


def _check_review(review: Any) -> None:
    """The ``review`` entry (absent in older files): a calibration table or null, places, and
    optionally a joint table and the classes' intensity profile."""
    from voila.infer.review import check_intensity_profile, check_joint_table, check_table

    if review is None:
        return
    review = _mapping(review)
    if review.get("calibration") is not None:
        check_table(review["calibration"], "review")
    if review.get("joint") is not None:
        check_joint_table(review["joint"], "review")
    if review.get("intensity") is not None:
        check_intensity_profile(review["intensity"], "review")
    for name, place in _mapping(review.get("places") or {}).items():
        place = _mapping(place)
        for key in ("mean", "spread"):
            values = place.get(key)
            if not (
                isinstance(values, list)
                and len(values) == 2
                and all(isinstance(v, (int, float)) for v in values)
            ):
                raise ValueError(f"places[{name!r}].{key} must be two numbers")


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def expected_shapes(card: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensor shapes the card's network has, computed on PyTorch's meta device: nothing is
    allocated, so a card edited to describe a huge network costs nothing to refuse."""
    config = ModelConfig.from_dict(card["model"])
    with torch.device("meta"):
        model = VoilaModel(config, int(card["text_encoder"]["feature_dim"]), num_classes=len(card["classes"]))
    shapes = {f"model.{key}": tuple(value.shape) for key, value in model.state_dict().items()}
    texts = (card.get("text_cache") or {}).get("texts", [])
    if texts:
        shapes["text_cache.features"] = (len(texts), int(card["text_encoder"]["feature_dim"]))
    return shapes


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network from the card and load weights and text cache; refuses mismatches.

    The order keeps a hostile or broken file cheap: the card is checked, the tensors the file
    declares (its header) are compared with the ones the card's network has, and only then are
    the weights read and the network built; NaN or infinite weights are refused.
    """
    path = Path(path)
    card = read_model_card(path)
    expected = expected_shapes(card)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            _compare(path, card, expected, stored)
            tensors = {key: handle.get_tensor(key) for key in expected}
    except (SafetensorError, OSError, ValueError) as error:
        raise _not_a_model(path, f"damaged tensor data: {str(error).splitlines()[0]}") from None
    broken = [
        key for key, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if broken:
        raise ModelFileError(
            f"{path} is broken: {len(broken)} of its tensors hold NaN or infinite values (e.g. {broken[0]}); "
            "use the original file, or re-export it with `voila train`"
        )
    config = ModelConfig.from_dict(card["model"])
    model = VoilaModel(config, int(card["text_encoder"]["feature_dim"]), num_classes=len(card["classes"]))
    model.load_state_dict(
        {key[len("model.") :]: value for key, value in tensors.items() if key.startswith("model.")}
    )
    texts = card.get("text_cache", {}).get("texts", [])
    features = tensors.get("text_cache.features", torch.zeros(0, 0))
    cache = TextEmbeddingCache(texts, features)
    model.eval()
    return LoadedModel(model.to(device), card, cache)


def _compare(
    path: Path, card: dict[str, Any], expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]]
) -> None:
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong_shape = [k for k in expected if k in stored and stored[k] != expected[k]]
    if missing or unexpected or wrong_shape:
        detail = (missing or unexpected or wrong_shape)[0]
        if detail == "text_cache.features":
            raise _not_a_model(path, "its text cache does not match its card")
        raise ModelFileError(
            f"{path}: weights do not match the preset {card.get('preset')!r} in its own card "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} wrong shape, e.g. {detail}); "
            "the file is damaged or was edited: re-export it with `voila train`"
        )
