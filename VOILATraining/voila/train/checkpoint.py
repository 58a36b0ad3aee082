"""Training state on disk: atomic checkpoints, RNG capture/restore, and the run-folder lock.

A checkpoint holds only tensors and plain containers, so it loads with
``torch.load(..., weights_only=True)``: nothing in it can run code. It is serialised in memory
and written through :func:`voila.data.io.atomic_path`, so a crash or a full disk leaves the
previous checkpoint intact.

Example::

    save_checkpoint(run / "checkpoints" / "last.pt", state)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    restore_rng(state["rng"][rank])
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voila.data.io import atomic_path
from voila.errors import OutputError, TrainingError

CHECKPOINT_FORMAT = 1
LOCK_NAME = ".voila-train.lock"


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (CPU and CUDA) generator states as tensors and plain containers."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically; a failure raises :class:`OutputError` and keeps the old file."""
    buffer = io.BytesIO()
    torch.save(dict(state, format=CHECKPOINT_FORMAT), buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial, open(partial, "wb") as handle:
        handle.write(buffer.getbuffer())
        handle.flush()
        os.fsync(handle.fileno())
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint (tensors and plain containers only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"no checkpoint at {path}; start without --resume") from None
    except Exception as error:
        raise TrainingError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {str(error).splitlines()[0][:160]}); "
            "it is damaged: delete it to restart from best.pt, or start a new run with another --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a voila training checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``<run>/.voila-train.lock`` holding ``pid host``: one training run per folder at a time.

    A lock whose process is gone (same host, pid not running) is stale and is taken over.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.token = f"{os.getpid()} {socket.gethostname()}"
        self.held = False

    def acquire(self) -> None:
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released between our attempts
                pid, host = owner
                if host == socket.gethostname() and not _pid_alive(pid):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise TrainingError(
                    f"another training run (pid {pid} on {host}) is using {self.path.parent}; "
                    "wait for it to finish, or choose another --out"
                ) from None
            except OSError as error:
                raise OutputError(_os_message(error, self.path.parent)) from None
            with os.fdopen(descriptor, "w") as handle:
                handle.write(self.token + "\n")
            self.held = True
            remove_stale_partials(self.path.parent)
            return
        raise TrainingError(
            f"cannot take the lock {self.path}; remove it if no training run uses this folder"
        )

    def _owner(self) -> tuple[int, str] | None:
        try:
            text = self.path.read_text(encoding="utf-8").split()
        except FileNotFoundError:
            return None
        except OSError:
            return (-1, "")
        try:
            return int(text[0]), (text[1] if len(text) > 1 else socket.gethostname())
        except (IndexError, ValueError):
            return (-1, socket.gethostname())  # unreadable content: treat as stale

    def release(self) -> None:
        if not self.held:
            return
        with contextlib.suppress(OSError):
            if self.path.read_text(encoding="utf-8").strip() == self.token:
                self.path.unlink()
        self.held = False


_PARTIAL = re.compile(r"^\..+\.partial-(\d+)")


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete half-written files (``.<name>.partial-<pid>…``, see ``atomic_path``) that a killed run
    left in ``folder``; called with the run lock held, so their writer is gone. Returns them."""
    removed = []
    for path in folder.rglob(".*.partial-*"):
        match = _PARTIAL.match(path.name)
        if match and path.is_file() and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def check_output_folder(folder: Path) -> None:
    """Create ``folder`` and prove it is writable, or raise :class:`OutputError` saying what to do."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        raise OutputError(_os_message(error, folder)) from None


def _os_message(error: OSError, folder: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"the disk holding {folder} is full; free some space or choose another --out"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write to {folder}: permission denied; choose a writable --out folder"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"cannot create the run folder {folder}: a file is in the way; choose another --out"
    return f"cannot write to {folder}: {error.strerror or error}; choose another --out folder"
