"""Which VOILA models the module offers: a registry kept as data (``Resources/model_registry.json``).

An entry is ``{"name", "description", "license", "url", "sha256"}`` for a downloadable model, or
``{"name", "description", "license", "local"}`` for a file shipped with the extension (``local`` is
relative to voila's ``Resources/`` folder, found by :func:`voila.resources.resources_dir`).
Downloads happen only after the user agreed, are checked against the SHA-256 in the registry and
appear in the cache folder only when complete.

    entries = load_registry()
    path = download_model(entries[0], cache_dir, consent=lambda entry: True)
    model_card(path)["description"]
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from voila.errors import ModelFileError, VoilaError

MODULE_RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
REGISTRY_FILE = MODULE_RESOURCES / "model_registry.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    license: str
    url: str = ""
    sha256: str = ""
    local: str = ""

    @property
    def filename(self) -> str:
        return Path(self.local or self.url.split("?")[0]).name

    @classmethod
    def from_dict(cls, data: dict) -> ModelEntry:
        if not data.get("name") or not (data.get("url") or data.get("local")):
            raise VoilaError(f"model registry entry {data!r} needs a 'name' and a 'url' or 'local' file")
        if data.get("url") and len(str(data.get("sha256", ""))) != 64:
            raise VoilaError(
                f"model registry entry '{data['name']}' has a URL but no SHA-256; add its checksum"
            )
        return cls(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            license=str(data.get("license", "")),
            url=str(data.get("url", "")),
            sha256=str(data.get("sha256", "")).lower(),
            local=str(data.get("local", "")),
        )


def load_registry(path: Optional[Path] = None) -> list[ModelEntry]:
    path = Path(path) if path else REGISTRY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise VoilaError(f"cannot read the model registry {path}: {error}; reinstall the extension") from None
    return [ModelEntry.from_dict(entry) for entry in data.get("models", [])]


def local_model_path(entry: ModelEntry) -> Optional[Path]:
    """The shipped file of a ``local`` entry, inside voila's Resources folder (:mod:`voila.resources`)."""
    from voila.resources import resources_dir

    try:
        candidate = resources_dir() / entry.local
    except VoilaError:
        return None
    return candidate if candidate.is_file() else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_model_path(entry: ModelEntry, cache_dir: Path) -> Optional[Path]:
    """The already-downloaded, verified file of ``entry`` (or the shipped file), else ``None``."""
    if entry.local:
        return local_model_path(entry)
    path = Path(cache_dir) / entry.filename
    if path.is_file() and sha256_of(path) == entry.sha256:
        return path
    return None


def download_model(
    entry: ModelEntry,
    cache_dir,
    consent: Callable[[ModelEntry], bool],
    progress: Optional[Callable[[float], None]] = None,
) -> Path:
    """Path of the model file, downloading it into ``cache_dir`` first if the user agrees.

    ``consent(entry)`` is asked only when a download is needed. The file is written to
    ``<name>.partial-<pid>`` and renamed into place after its SHA-256 matched.
    """
    if entry.local:
        path = local_model_path(entry)
        if path is None:
            raise ModelFileError(
                f"the shipped model '{entry.name}' ({entry.local}) is missing; reinstall the extension"
            )
        return path
    cache_dir = Path(cache_dir)
    existing = cached_model_path(entry, cache_dir)
    if existing is not None:
        return existing
    if not consent(entry):
        raise VoilaError(
            f"model '{entry.name}' was not downloaded; choose another model or allow the download"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / entry.filename
    partial = cache_dir / f"{entry.filename}.partial-{os.getpid()}"
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(entry.url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None and total:
                    progress(done / total)
        if digest.hexdigest() != entry.sha256:
            raise ModelFileError(
                f"download of '{entry.name}' is corrupt (SHA-256 mismatch); try again or download "
                f"{entry.url} manually and choose it as a custom model file"
            )
        os.replace(partial, target)
    except OSError as error:
        raise VoilaError(
            f"cannot download model '{entry.name}' from {entry.url} ({error}); check the network connection"
        ) from None
    finally:
        if partial.exists():
            partial.unlink()
    return target


def model_card(path) -> dict:
    """The model card stored in a VOILA ``.safetensors`` file (the weights are not loaded)."""
    from voila.model.model_file import read_model_card

    return read_model_card(path)


def describe_card(card: dict) -> str:
    """A few human lines about a model for the module panel."""
    classes = [name for name in card.get("classes", []) if name != "background"]
    training = card.get("training") or {}
    lines = [
        str(card.get("description") or card.get("preset") or "VOILA model"),
        f"{len(classes)} trained structures; licence: {card.get('license', 'unknown')}",
    ]
    if card.get("intended_use"):
        lines.append(f"Intended use: {card['intended_use']}")
    if training.get("datasets") or training.get("dataset"):
        lines.append(f"Trained on: {training.get('datasets') or training.get('dataset')}")
    return "\n".join(lines)
