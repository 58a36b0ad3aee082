"""The run folder: one training run per folder at a time, its log, its settings and its files.

Layout (``RunFolder(out)``)::

    out/.voila-train.lock       pid host of the run using the folder
    out/config.yaml             the resolved settings, by section (written when the run starts)
    out/train.log               the run's log (rank 0)
    out/checkpoints/last.pt     training state after the last epoch (or checkpoint_every steps)
    out/checkpoints/best.pt     training state with the best validation mean Dice
    out/metrics.csv  out/tensorboard/  out/curves.png  out/validation.png
    out/model.safetensors       the exported model (unless --export names another file)

Half-written files (``.<name>.partial-<pid>…``, see :func:`voila.data.io.atomic_path`) that a
killed run left are removed when the next run takes the lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

import yaml

from voila.data.io import atomic_path
from voila.errors import OutputError, TrainingError
from voila.outputs import pid_alive, recover_stale_files

LOCK_NAME = ".voila-train.lock"
LOG = logging.getLogger("voila.train")


class RunFolder:
    """Paths of a run folder, and claiming it for one run (:meth:`claim` / :meth:`release`)."""

    def __init__(self, out: Path, export: Path | None = None) -> None:
        self.out = Path(out)
        self.model = Path(export) if export else self.out / "model.safetensors"
        self.last_checkpoint = self.out / "checkpoints" / "last.pt"
        self.best_checkpoint = self.out / "checkpoints" / "best.pt"
        self.metrics = self.out / "metrics.csv"
        self.tensorboard = self.out / "tensorboard"
        self.curves = self.out / "curves.png"
        self.validation_picture = self.out / "validation.png"
        self.cache = self.out / "cache"
        self.lock: RunLock | None = None
        self._log_handler: logging.Handler | None = None
        self._created: list[Path] = []  # what this run added, removed again if it fails before a checkpoint

    def claim(self, resume: bool, snapshot: dict, inputs: Sequence[str] = ()) -> None:
        """Create the folder, take the lock, check that it may be (re)used, write ``config.yaml``.

        Neither the run folder nor the model file may be one of the ``inputs`` (the datasets), and
        a model file outside the run folder may not replace a file an earlier run did not export.
        """
        for source in inputs:
            for path, what in (
                (self.out, "the run folder (--out)"),
                (self.model, "the model file (--export)"),
            ):
                if os.path.realpath(path) == os.path.realpath(source):
                    raise OutputError(f"{what} {path} is training data; choose another location")
        if self.model.exists() and self.out not in self.model.parents and not resume:
            raise OutputError(
                f"{self.model} already exists and this run did not export it; choose another --export"
            )
        missing = [folder for folder in (self.out, *self.out.parents) if not folder.exists()]
        check_output_folder(self.out)
        lock = RunLock(self.out)
        lock.acquire()
        self.lock = lock
        self._created = [
            self.out / "config.yaml",
            self.out / "train.log",
            self.cache,
            self.tensorboard,
            self.out / "checkpoints",
            *missing,
        ]
        if resume:
            if not self.last_checkpoint.is_file():
                raise TrainingError(
                    f"nothing to resume in {self.out} (no checkpoints/last.pt); start without --resume"
                )
        elif self.last_checkpoint.is_file() or self.metrics.is_file():
            finished = " finished" if self.model.is_file() else ""
            raise TrainingError(
                f"{self.out} already holds a{finished} training run; use --resume to continue it, "
                "or choose another --out"
            )
        with atomic_path(self.out / "config.yaml") as partial:
            partial.write_text(yaml.safe_dump(snapshot, sort_keys=False), encoding="utf-8")

    def start_log(self) -> None:
        """Copy the ``voila.train`` log into ``train.log`` (at INFO level or finer)."""
        handler = logging.FileHandler(self.out / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        LOG.addHandler(handler)
        if LOG.level == logging.NOTSET or LOG.level > logging.INFO:
            LOG.setLevel(logging.INFO)
        self._log_handler = handler

    def discard_unused(self) -> None:
        """After a run that failed before its first checkpoint: remove what it added (a new run
        folder disappears entirely), so a failed command leaves nothing behind."""
        if self.lock is None or not self.lock.held or self.last_checkpoint.exists():
            return
        self._close_log()
        folders = [self.out, *self.out.parents]
        for path in self._created:
            with contextlib.suppress(OSError):
                if path.is_file():
                    path.unlink()
                elif path.is_dir() and path not in folders:
                    shutil.rmtree(path)
        self.lock.release()
        for folder in folders:
            if folder in self._created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: nothing that was not ours is ever removed

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_handler is not None:
            LOG.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None


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
                if host == socket.gethostname() and not pid_alive(pid):
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
            recover_stale_files(self.path.parent, recursive=True)
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
