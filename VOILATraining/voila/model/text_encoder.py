"""The frozen CLIP text tower (open_clip) and the cache of its prompt embeddings.

The text encoder is never trained and is only needed for text it has not seen: the vocabulary's
embeddings travel inside the model file (:class:`TextEmbeddingCache`), so segmenting known
structures needs no CLIP weights at all. Free text loads the encoder once, lazily.

Example::

    encoder = TextEncoder("ViT-B-32", pretrained="openai")        # or "hf-hub:..." names
    features = encoder.encode(["This region represents the liver."])   # (1, 512), unit norm
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from voila.errors import TextEncoderUnavailableError


def text_feature_dim(model_name: str) -> int:
    """Width of the model's text embedding, read from open_clip's model config (no weights)."""
    import open_clip

    config = open_clip.get_model_config(model_name)
    if config and "embed_dim" in config:
        return int(config["embed_dim"])
    return 512  # hf-hub models resolve their config only on download; CLIP-B and BiomedCLIP use 512


class TextEncoder:
    """Frozen open_clip text tower. ``pretrained=None`` builds the real architecture with
    deterministic random weights (seed 0), which is what offline tests use."""

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = "openai", device: str = "cpu"):
        self.model_name = model_name
        self.pretrained = pretrained or None
        self.device = torch.device(device)
        try:
            import open_clip

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = open_clip.create_model(model_name, pretrained=self.pretrained, device=self.device)
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as error:  # network, missing weights, unknown name: one actionable message
            raise TextEncoderUnavailableError(
                f"cannot load the CLIP text encoder {model_name!r} (pretrained={self.pretrained!r}): "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
                "Free-text prompts need it once: connect to the internet so open_clip can cache the "
                "weights, or use structure names from the vocabulary (see `voila info MODEL`)"
            ) from None
        if hasattr(model, "visual"):
            model.visual = None  # the image tower is never used: free its memory
        model.eval().requires_grad_(False)
        self.model = model

    @property
    def identifier(self) -> str:
        return f"{self.model_name}/{self.pretrained}"

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``texts`` → unit-norm features ``(T, F)`` float32 on the CPU."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        features = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(features, dim=-1).cpu()


def cache_folder() -> Path:
    """Where VOILA keeps what it can compute again (text embeddings): ``$VOILA_CACHE``, else the
    platform's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux, ``~/Library/Caches``
    on macOS, ``%LOCALAPPDATA%`` on Windows) + ``voila``."""
    if os.environ.get("VOILA_CACHE"):
        return Path(os.environ["VOILA_CACHE"])
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "voila" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "voila"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "voila"


def text_encoder_id(model_name: str, pretrained: str | None) -> str:
    """What fixes a text encoder's output: model, weights, and the open_clip release that builds
    it (random weights are seeded, so they are fixed too). Read without importing open_clip."""
    import importlib.metadata

    try:
        release = importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        release = "unknown"
    return f"{model_name}/{pretrained or 'random-seed-0'}/open_clip {release}"


class DiskTextCache:
    """Text embeddings of one text encoder on disk, one ``.npy`` per sentence (written atomically,
    read with ``allow_pickle=False``): a free-text prompt costs the encoder only once per machine,
    not once per ``voila segment`` process. Unwritable cache folders are simply not used."""

    def __init__(self, encoder_id: str, folder: Path | None = None) -> None:
        key = hashlib.sha1(encoder_id.encode("utf-8")).hexdigest()[:16]
        self.folder = (folder or cache_folder()) / "text-embeddings" / key

    def _path(self, text: str) -> Path:
        return self.folder / f"{hashlib.sha1(text.encode('utf-8')).hexdigest()}.npy"

    def get(self, text: str) -> torch.Tensor | None:
        try:
            return torch.from_numpy(np.load(self._path(text), allow_pickle=False))
        except (OSError, ValueError):
            return None

    def put(self, text: str, feature: torch.Tensor) -> None:
        path = self._path(text)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial-{os.getpid()}.npy")
            np.save(partial, feature.detach().cpu().float().numpy(), allow_pickle=False)
            os.replace(partial, path)
        except OSError:
            pass


class TextEmbeddingCache:
    """Text → CLIP feature ``(F,)``. Stored in the model file; filled lazily for new text, from the
    :class:`DiskTextCache` of the encoder when one is set, else by the encoder.

    ``encoder_factory`` is called at most once, the first time a text is missing from both.
    """

    def __init__(self, texts: Iterable[str] = (), features: torch.Tensor | None = None, encoder_factory=None):
        texts = list(texts)
        if features is None:
            features = torch.zeros(0, 0)
        if len(texts) != features.shape[0]:
            raise ValueError("texts and features disagree in length")
        self._rows = {text: features[i].clone() for i, text in enumerate(texts)}
        self._encoder_factory = encoder_factory
        self._encoder: TextEncoder | None = None
        self._disk: DiskTextCache | None = None
        self._lock = threading.Lock()

    def __contains__(self, text: str) -> bool:
        return text in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def texts(self) -> list[str]:
        return list(self._rows)

    def as_tensor(self) -> torch.Tensor:
        """All cached features ``(T, F)`` in the order of :attr:`texts`."""
        if not self._rows:
            return torch.zeros(0, 0)
        return torch.stack(list(self._rows.values()))

    def set_encoder_factory(self, factory, encoder_id: str | None = None) -> None:
        """The encoder to build when a text is missing; ``encoder_id`` (model name and weights)
        names its on-disk cache."""
        self._encoder_factory = factory
        self._disk = DiskTextCache(encoder_id) if encoder_id else None

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """Features ``(T, F)`` for ``texts``, encoding (and caching) the ones not seen yet."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._rows]
        if missing:
            with self._lock:
                if self._disk is not None:
                    for text in missing:
                        stored = self._disk.get(text)
                        if stored is not None:
                            self._rows[text] = stored
                    missing = [t for t in missing if t not in self._rows]
                if missing:
                    if self._encoder is None:
                        if self._encoder_factory is None:
                            raise TextEncoderUnavailableError(
                                f"no cached text embedding for {missing[0]!r} and no text encoder configured; "
                                "use a structure name the model knows (see `voila info MODEL`)"
                            )
                        self._encoder = self._encoder_factory()
                    for text, row in zip(missing, self._encoder.encode(missing)):
                        self._rows[text] = row
                        if self._disk is not None:
                            self._disk.put(text, row)
        return torch.stack([self._rows[t] for t in texts])
