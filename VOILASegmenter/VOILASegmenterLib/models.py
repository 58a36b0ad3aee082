"""Which VOILA models the module offers: a registry kept as data (``Resources/model_registry.json``).

An entry is ``{"name", "description", "license", "url", "sha256"}`` for a downloadable model, or
``{"name", "description", "license", "local"}`` for a file shipped with the extension (``local`` is
relative to voila's ``Resources/`` folder, found by :func:`voila.resources.resources_dir`).
Downloads happen only after the user agreed, run in the worker process (:mod:`voila.model.download`),
are checked against the SHA-256 in the registry and appear in the cache folder only when complete.

    entries = load_registry()
    path, download_request = prepare_download(entries[0], cache_dir)   # request: for the worker
    model_card(path)["description"]

The models a user teaches in the module are theirs, not a cache's: they are kept in
:func:`user_model_dir` (listed by :func:`user_models`), each under a name of its own that never
replaces another file (:func:`store_model`).

    path = store_model(run_folder / "model.safetensors", user_model_dir(), "voila_demo + Tumor core")
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from voila.errors import ModelFileError, OutputError, VoilaError

MODULE_RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
REGISTRY_FILE = MODULE_RESOURCES / "model_registry.json"
MODEL_SUFFIX = ".safetensors"
# A taught model's name lists the structures it was taught, up to about this many characters.
NAME_LENGTH = 80


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


def cached_model_path(entry: ModelEntry, cache_dir: Path) -> Optional[Path]:
    """The already-downloaded, verified file of ``entry`` (or the shipped file), else ``None``."""
    if entry.local:
        return local_model_path(entry)
    from voila.model.download import sha256_of

    path = Path(cache_dir) / entry.filename
    if path.is_file() and sha256_of(path) == entry.sha256:
        return path
    return None


def prepare_download(entry: ModelEntry, cache_dir) -> tuple[Optional[Path], Optional[dict]]:
    """``(path, None)`` when the model is already on this computer (shipped or downloaded and
    verified), else ``(None, request)``: the worker's ``download`` request, to send only after the
    user agreed (the download itself runs in the worker process, with progress and cancel)."""
    if entry.local:
        path = local_model_path(entry)
        if path is None:
            raise ModelFileError(
                f"the shipped model '{entry.name}' ({entry.local}) is missing; reinstall the extension"
            )
        return path, None
    existing = cached_model_path(entry, Path(cache_dir))
    if existing is not None:
        return existing, None
    return None, {"url": entry.url, "sha256": entry.sha256, "target": str(Path(cache_dir) / entry.filename)}


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


def user_model_dir() -> Path:
    """Where the models a user teaches are kept: ``VOILA/models`` beside Slicer's user settings
    (it outlives the extension, its updates and the cache), or ``~/.voila/models`` outside Slicer."""
    try:
        import slicer

        settings = slicer.app.slicerUserSettingsFilePath
    except (ImportError, AttributeError):  # no application: a script or slicer-core
        return Path.home() / ".voila" / "models"
    return Path(settings).parent / "VOILA" / "models"


def user_models(folder) -> list[Path]:
    """The model files in ``folder``, newest first (none when it does not exist yet)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        path
        for path in folder.iterdir()
        if path.suffix == MODEL_SUFFIX and not path.name.startswith(".") and path.is_file()
    ]
    return sorted(found, key=lambda path: (-path.stat().st_mtime, path.name))


def taught_model_name(base, structures, when: Optional[datetime.datetime] = None) -> str:
    """The file name stem of a model taught from ``base`` (a path) to know ``structures``, e.g.
    ``voila_demo + Tumor core, liver 2025-06-01 1432``."""
    from voila.data.layouts import file_stem

    taught = ", ".join(dict.fromkeys(str(name) for name in structures)) or "more cases"
    if len(taught) > NAME_LENGTH:
        taught = taught[: NAME_LENGTH - 4].rstrip(", ") + " etc"
    when = when or datetime.datetime.now()
    return file_stem(f"{Path(base).stem} + {taught} {when:%Y-%m-%d %H%M}")


def store_model(source, folder, name: str) -> Path:
    """Copy the model file ``source`` into ``folder`` (created if needed) as ``<name>.safetensors``,
    or ``<name> (2).safetensors`` and so on: an existing file is never replaced. The name is
    claimed before the copy and the copy appears complete or not at all."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for number in itertools.count(1):
            target = folder / (f"{name}{MODEL_SUFFIX}" if number == 1 else f"{name} ({number}){MODEL_SUFFIX}")
            try:
                open(target, "xb").close()  # exclusive creation: the name is ours
                break
            except FileExistsError:
                continue
    except OSError as error:
        raise OutputError(
            f"cannot save the model in {folder}: {error.strerror or error}; check that the folder is writable"
        ) from None
    partial = folder / f".{target.name}.partial"
    try:
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    except OSError as error:
        for leftover in (partial, target):
            with contextlib.suppress(OSError):
                leftover.unlink()
        raise OutputError(
            f"cannot save the model as {target}: {error.strerror or error}; free some disk space and teach again"
        ) from None
    return target
