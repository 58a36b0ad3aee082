"""Output safety: the one rule for every command that writes files.

Nothing the user had is ever changed:

- an output never equals (or resolves to) an input of the run, another output of the run, a
  folder, or an existing file the command does not own (it owns what an earlier run of the same
  command wrote there, as its records say); all of this is checked before any work;
- all outputs of a run appear together or not at all: each is written to a temporary file beside
  its destination, and only when every one is complete are they renamed into place; a failed
  rename puts back what was there before;
- Ctrl-C and SIGTERM clean up (the CLI turns SIGTERM into an exception, so the same clean-up runs);
- half-written files a killed run left (``.<name>.partial-<pid>…``) are removed by the next run
  into the same folder, and a file it had moved aside (``.<name>.previous-<pid>…``) is put back.

Example::

    outputs = OutputSet("voila segment", inputs=[ct_path, model_path], owns=sidecar_owns)
    labelmap = outputs.add("seg.nii.gz", "labelmap", (".nii.gz", ".nii", ".nrrd"))
    outputs.check()                          # before any work
    ...                                      # the work
    with outputs.writing() as temporary:     # every file or none
        write_volume(temporary[labelmap], labels, affine, atomic=False)
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from voila.errors import OutputError

PathLike = Union[str, "os.PathLike[str]"]
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|previous)-(?P<pid>\d+)")


def temporary_name(path: Path, kind: str = "partial") -> Path:
    """``<dir>/.<name>.<kind>-<pid><suffix>``: same folder (atomic rename), same suffix (writers pick
    the format from it)."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}{file_suffix(path)}"


def file_suffix(path: PathLike) -> str:
    """Lower-case extension, treating ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Tidy what killed runs left in ``folder``: delete their half-written ``.partial-<pid>`` files
    and put back files they had moved aside (``.previous-<pid>``) when nothing replaced them.
    Only files whose writer is no longer running are touched. Returns the paths handled."""
    handled = []
    candidates = folder.rglob(".*") if recursive else folder.glob(".*")
    for path in list(candidates):
        match = _TEMPORARY.match(path.name)
        if not match or not path.is_file() or pid_alive(int(match.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            original = path.parent / match.group("name")
            if match.group("kind") == "previous" and not original.exists():
                os.replace(path, original)
            else:
                path.unlink()
            handled.append(path)
    return handled


def describe_os_error(error: OSError, path: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"cannot write {path}: the disk is full; free some space or choose another output folder"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied; choose a writable output folder"
    return f"cannot write {path}: {error.strerror or error}; check the output folder"


@dataclass
class Output:
    path: Path
    what: str
    suffixes: tuple[str, ...]


class OutputSet:
    """The outputs of one run of ``command``: checked together, written together.

    ``inputs``: paths the run reads (never written). ``owns(path)``: True when an existing
    ``path`` was written by an earlier run of this command (so replacing it changes nothing the
    user made); by default nothing existing is owned.
    """

    def __init__(
        self,
        command: str,
        inputs: Sequence[Optional[PathLike]] = (),
        owns: Callable[[Path], bool] | None = None,
    ) -> None:
        self.command = command
        self.inputs = [Path(p) for p in inputs if p]
        self.owns = owns or (lambda path: False)
        self.outputs: list[Output] = []

    def add(self, path: PathLike, what: str, suffixes: Sequence[str] = ()) -> Path:
        path = Path(path)
        self.outputs.append(Output(path, what, tuple(suffixes)))
        return path

    def check(self) -> None:
        """Refuse, before any work, every output that could change something the user has."""
        seen: dict[str, Output] = {}
        for output in self.outputs:
            path, what = output.path, output.what
            if output.suffixes and not path.name.lower().endswith(output.suffixes):
                raise OutputError(f"the {what} {path} must end in {' or '.join(output.suffixes)}")
            if not path.parent.is_dir():
                raise OutputError(f"the folder {path.parent} for the {what} does not exist; create it first")
            if not os.access(path.parent, os.W_OK):
                raise OutputError(f"the folder {path.parent} for the {what} is not writable; choose another")
            key = os.path.realpath(path)
            if key in seen:
                raise OutputError(
                    f"the {what} and the {seen[key].what} would both be written to {path}; give each its own file"
                )
            seen[key] = output
            for source in self.inputs:
                if _same_file(path, source):
                    raise OutputError(
                        f"the {what} {path} is an input of this run ({source}); {self.command} never "
                        "overwrites its input: choose another output file"
                    )
            if path.is_dir():
                raise OutputError(f"the {what} {path} is a folder; give a file name inside it")
            if path.exists() and not self.owns(path):
                raise OutputError(
                    f"{path} already exists and was not written by {self.command}; "
                    f"choose another output name or move that file away first"
                )
        for folder in {output.path.parent for output in self.outputs}:
            recover_stale_files(folder)

    @contextlib.contextmanager
    def writing(self) -> Iterator[dict[Path, Path]]:
        """Yield ``{output: temporary path}``; when the block ends without error, move every output
        into place at once; otherwise (or when a move fails) leave the destinations as they were."""
        temporary = {output.path: temporary_name(output.path) for output in self.outputs}
        try:
            yield temporary
            missing = [path for path, partial in temporary.items() if not partial.is_file()]
            if missing:
                raise RuntimeError(f"{self.command} did not write its {missing[0]}")
            self._commit(temporary)
        finally:
            for partial in temporary.values():
                with contextlib.suppress(OSError):
                    partial.unlink()

    def _commit(self, temporary: dict[Path, Path]) -> None:
        moved: list[tuple[Path, Path | None]] = []  # (destination, what it replaced, moved aside)
        try:
            for path, partial in temporary.items():
                previous = None
                if path.exists():
                    previous = temporary_name(path, "previous")
                    os.replace(path, previous)
                moved.append((path, previous))
                os.replace(partial, path)
        except OSError as error:
            for path, previous in reversed(moved):
                with contextlib.suppress(OSError):
                    if previous is not None:
                        os.replace(previous, path)
                    elif path.exists():
                        path.unlink()
            raise OutputError(describe_os_error(error, path)) from error
        for _, previous in moved:
            if previous is not None:
                with contextlib.suppress(OSError):
                    previous.unlink()


def _same_file(path: Path, other: Path) -> bool:
    if os.path.realpath(path) == os.path.realpath(other):
        return True
    try:
        return path.exists() and other.exists() and os.path.samefile(path, other)
    except OSError:
        return False
