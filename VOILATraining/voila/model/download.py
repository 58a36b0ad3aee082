"""Fetch a model file from a URL: checked against its SHA-256, in place only when complete.

Used by the Slicer module (through the worker process, so the GUI never waits on the network)
and by scripts. The file is written as ``.<name>.partial-<pid>`` beside its destination and
renamed into place only after its checksum matched; a cancelled or failed download leaves nothing.

    path = download(url, sha256, cache / "model.safetensors", progress=print, cancel=event)
"""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from voila.errors import Cancelled, ModelFileError, VoilaError
from voila.outputs import temporary_name

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    sha256: str,
    target: Path,
    progress: Optional[Callable[[float], None]] = None,
    cancel: Optional[threading.Event] = None,
) -> Path:
    """``target``, downloaded from ``url`` unless a file with the expected SHA-256 is already there."""
    target = Path(target)
    if target.is_file() and sha256_of(target) == sha256.lower():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_name(target)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: response.read(CHUNK), b""):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("download cancelled")
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None and total:
                    progress(done / total)
        if digest.hexdigest() != sha256.lower():
            raise ModelFileError(
                f"the download of {url} is corrupt (SHA-256 mismatch); try again, or download it "
                "yourself and choose it as a custom model file"
            )
        os.replace(partial, target)
    except OSError as error:
        raise VoilaError(f"cannot download {url} ({error}); check the network connection") from None
    finally:
        if partial.exists():
            partial.unlink()
    return target
