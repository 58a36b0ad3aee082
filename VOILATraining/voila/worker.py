"""A worker process that runs the model outside a GUI's main thread and its GIL.

3D Slicer's Python (PythonQt) holds the GIL while Qt idles in C++, so a Python thread inside
Slicer only runs while the GUI thread happens to execute Python: a model in such a thread crawls.
The model therefore runs in a process of its own (Slicer's ``PythonSlicer``; any Python
elsewhere), started on first use and kept alive, so the loaded model stays warm between runs.

Protocol, in one session folder the client owns:

- requests: one JSON line per request on the worker's stdin, ``{"op": ..., "job": id, ...}``;
  ``op`` is ``segment``, ``train``, ``finetune``, ``download``, ``cancel`` (stops one job) or
  ``quit``. Arrays travel as ``.npy`` files in the job's folder, read with ``allow_pickle=False``:
  nothing from the peer is ever unpickled.
- events: the worker appends JSON lines to ``<job>/events.jsonl``: ``progress`` (fraction,
  stage), then exactly one of ``done`` (with the result; result files are in place before),
  ``error`` (the :class:`~voila.errors.VoilaError` class name and its one-line message) or
  ``cancelled``.

The client polls that file: reading a file never blocks, so the GUI thread needs no thread of its
own and a QTimer calling :meth:`WorkerJob.poll` is enough. A worker that died is noticed by its
exit code, reported in one line, and replaced on the next request.

>>> worker = Worker()                                          # started on the first submit
>>> job = worker.submit("segment", {"prompts": ["liver"], "affine": affine.tolist()}, {"image": ct})
>>> while (result := job.poll()) is None: ...                  # from a timer, every 200 ms
>>> result["arrays"]["labelmap"], result["result"]["labels"]
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import voila.errors as errors_module
from voila.errors import Cancelled, VoilaError
from voila.infer.results import heatmap_kind

EVENTS = "events.jsonl"
REQUEST = "request.json"
# progress events are written at most this often (seconds): enough for a progress bar
PROGRESS_INTERVAL = 0.1
# Volumes whose encodings a worker keeps (least recently used dropped): the current one and one more.
ENCODINGS_KEPT = 2


class WorkerError(VoilaError):
    """The worker process stopped unexpectedly; the next request starts a new one."""


# -- the client (the GUI's side) ---------------------------------------------------------------
class WorkerJob:
    """One request to the worker. ``poll()`` returns None while it runs, then the result once."""

    def __init__(self, worker: Worker, job_id: str, folder: Path, op: str) -> None:
        self.worker = worker
        self.id = job_id
        self.folder = folder
        self.op = op
        self.fraction = 0.0
        self.stage = "Starting"
        self.done = False
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._offset = 0
        self._pending = b""
        self.started = time.monotonic()

    def cancel(self) -> None:
        """Ask the worker to stop this job; the next ``poll()`` after it stopped raises Cancelled."""
        if not self.done:
            self.worker._send({"op": "cancel", "job": self.id})

    def poll(self) -> dict[str, Any] | None:
        """Read what the worker reported since the last call (never blocks)."""
        if self.done:
            if self.error is not None:
                raise self.error
            return self.result
        for event in self._new_events():
            kind = event.get("event")
            if kind == "progress":
                self.fraction = float(event.get("fraction", self.fraction))
                self.stage = str(event.get("stage", self.stage))
            elif kind in ("done", "error", "cancelled"):
                return self._finish(event)
        if not self.worker.alive:
            for event in self._new_events():  # what it wrote just before it ended
                if event.get("event") in ("done", "error", "cancelled"):
                    return self._finish(event)
            return self._finish({"event": "crashed"})
        return None

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> dict[str, Any]:
        """Block the caller until the job ends (scripts and tests; a GUI polls instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            result = self.poll()
            if self.done:
                return result  # type: ignore[return-value]
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"worker job {self.id} did not finish in {timeout} s")
            time.sleep(interval)

    def _new_events(self) -> list[dict[str, Any]]:
        try:
            with open(self.folder / EVENTS, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._pending + data
        lines = data.split(b"\n")
        self._pending = lines.pop()  # an incomplete last line waits for the next poll
        return [json.loads(line) for line in lines if line.strip()]

    def _finish(self, event: dict[str, Any]) -> dict[str, Any] | None:
        self.done = True
        kind = event["event"]
        if kind == "done":
            arrays = {
                name: np.load(self.folder / f"{name}.npy", allow_pickle=False)
                for name in event.get("arrays", [])
            }
            self.result = {"result": event.get("result"), "arrays": arrays}
            self.fraction, self.stage = 1.0, "Done"
            self.worker._forget(self)
            return self.result
        if kind == "cancelled":
            self.error = Cancelled(f"{self.op} cancelled")
        elif kind == "error":
            error_class = getattr(errors_module, str(event.get("type")), None)
            if not (isinstance(error_class, type) and issubclass(error_class, VoilaError)):
                error_class = WorkerError
            self.error = error_class(str(event.get("message", "")))
        else:
            self.error = WorkerError(
                f"the VOILA worker process stopped unexpectedly (exit code {self.worker.exit_code}) while "
                f"running this {self.op}; its log is {self.worker.log_path}. The next run starts a new worker"
            )
        self.worker._forget(self)
        raise self.error


class Worker:
    """The client of one worker process (started on the first :meth:`submit`, kept alive).

    ``python``: the interpreter to run it with (Slicer: ``PythonSlicer``; default: this one).
    ``environment``: extra environment variables for it.
    """

    def __init__(self, python: str | None = None, environment: dict[str, str] | None = None) -> None:
        self.python = python or default_python()
        self.environment = dict(environment or {})
        self.session: Path | None = None
        self.process: subprocess.Popen | None = None
        self._log = None
        self._jobs: dict[str, WorkerJob] = {}
        self._numbers = itertools.count(1)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def log_path(self) -> Path | None:
        return None if self.session is None else self.session / "worker.log"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> None:
        """Start the worker process if it is not running (a crashed one is replaced)."""
        if self.alive:
            return
        self._close_log()
        self.session = Path(tempfile.mkdtemp(prefix="voila-worker-"))
        package_parent = str(Path(__file__).resolve().parents[1])
        environment = dict(os.environ, **self.environment)
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_parent, environment.get("PYTHONPATH", "")) if p
        )
        environment.setdefault("PYTHONUTF8", "1")
        self._log = open(self.session / "worker.log", "ab")
        self.process = subprocess.Popen(
            [self.python, "-m", "voila.worker", str(self.session)],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environment,
            **_hidden_console(),
        )

    def submit(
        self, op: str, request: dict[str, Any], arrays: dict[str, np.ndarray] | None = None
    ) -> WorkerJob:
        """Hand ``request`` (JSON-ready) and ``arrays`` to the worker; returns the job to poll."""
        self.start()
        assert self.session is not None
        job_id = f"{op}-{next(self._numbers)}"
        folder = self.session / job_id
        folder.mkdir()
        for name, array in (arrays or {}).items():
            np.save(folder / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        (folder / REQUEST).write_text(json.dumps(request), encoding="utf-8")
        job = WorkerJob(self, job_id, folder, op)
        self._jobs[job_id] = job
        self._send({"op": op, "job": job_id})
        return job

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to quit (kill it if it does not), and remove the session folder."""
        if self.process is not None:
            with contextlib.suppress(OSError, ValueError):
                self._send({"op": "quit"})
                self.process.stdin.close()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_log()
        if self.session is not None:
            shutil.rmtree(self.session, ignore_errors=True)
        self.process, self.session = None, None

    def _send(self, message: dict[str, Any]) -> None:
        if not self.alive:
            return
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode("utf-8"))
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died: the next poll reports it

    def _forget(self, job: WorkerJob) -> None:
        self._jobs.pop(job.id, None)
        with contextlib.suppress(OSError):
            shutil.rmtree(job.folder)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self.alive:
                self.process.kill()


def default_python() -> str:
    """``PythonSlicer`` inside 3D Slicer (its ``sys.executable`` is the application), else this
    interpreter."""
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def _hidden_console() -> dict[str, Any]:
    if os.name == "nt":  # no console window flashing up on Windows
        info = subprocess.STARTUPINFO()
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
        return {"startupinfo": info}
    return {}


# -- the worker (its own process) ----------------------------------------------------------------
class JobContext:
    """What a job handler gets: its request, its folder, progress reporting and its cancel event."""

    def __init__(self, folder: Path, cancel: threading.Event) -> None:
        self.folder = folder
        self.cancel = cancel
        self.request: dict[str, Any] = json.loads((folder / REQUEST).read_text(encoding="utf-8"))
        self._events = open(folder / EVENTS, "a", encoding="utf-8")
        self._last_progress = 0.0
        self.arrays: list[str] = []

    def emit(self, event: dict[str, Any]) -> None:
        self._events.write(json.dumps(event) + "\n")
        self._events.flush()

    def progress(self, fraction: float, stage: str) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL or fraction >= 1.0:
            self._last_progress = now
            self.emit({"event": "progress", "fraction": round(float(fraction), 4), "stage": stage})

    def load_array(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", allow_pickle=False)

    def save_array(self, name: str, array: np.ndarray) -> None:
        partial = self.folder / f".{name}.partial.npy"
        np.save(partial, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(partial, self.folder / f"{name}.npy")
        self.arrays.append(name)

    def close(self) -> None:
        self._events.close()


class Handlers:
    """The jobs a worker runs; each takes a :class:`JobContext` and returns a JSON-ready result.
    Loaded models stay in memory between jobs (one per model file and device), and so do the
    encodings of the last :data:`ENCODINGS_KEPT` volumes: another prompt, click or box on a volume
    already encoded is answered from its tokens in about a second."""

    def __init__(self) -> None:
        self.segmenters: dict[tuple[str | None, str], Any] = {}
        self.encodings: OrderedDict[tuple, Any] = OrderedDict()

    def segmenter(self, model: str | None, device: str):
        key = (model, device)
        if key not in self.segmenters:
            from voila.infer.segmenter import Segmenter

            self.segmenters[key] = Segmenter.load(model, device=device)
        return self.segmenters[key]

    def segment(self, job: JobContext) -> dict[str, Any]:
        request = job.request
        job.progress(0.0, "Loading model")
        segmenter = self.segmenter(request.get("model"), request.get("device", "auto"))
        if job.cancel.is_set():
            raise Cancelled("segmentation cancelled")
        image = job.load_array("image")
        affine = np.asarray(request["affine"], dtype=np.float64)
        kind = heatmap_kind(request.get("heatmap", "review"))  # True / "review" / "complexity" / None
        complexity = kind == "complexity"
        overlap = float(request.get("overlap", 0.5))
        points = {
            p: [(tuple(xyz), bool(positive)) for xyz, positive in clicks]
            for p, clicks in (request.get("points") or {}).items()
        }
        boxes = {p: (tuple(a), tuple(b)) for p, (a, b) in (request.get("boxes") or {}).items()}
        key = (request.get("model"), request.get("device"), overlap, _fingerprint(image, affine))
        encoding = self.encodings.get(key)
        if encoding is None or (complexity and encoding.encoded.heatmap is None):
            job.progress(0.02, "Segmenting")
            encoding = segmenter.encode(
                image,
                affine,
                heatmap=complexity,
                progress=lambda fraction: job.progress(0.02 + 0.93 * fraction, "Segmenting"),
                cancel=job.cancel,
                overlap=overlap,
            )
            self.encodings[key] = encoding
            while len(self.encodings) > ENCODINGS_KEPT:
                self.encodings.popitem(last=False)  # the least recently used volume goes
        self.encodings.move_to_end(key)
        job.progress(0.95, "Answering the prompts")
        result = encoding.segment(request["prompts"], points=points, boxes=boxes, heatmap=kind)
        job.progress(0.97, "Sending the result")
        job.save_array("labelmap", result.labelmap)
        if result.heatmap is not None:
            job.save_array("heatmap", result.heatmap)
        return dict(
            result.to_dict(),
            encodings_kept=len(self.encodings),
            encodings_bytes=sum(e.nbytes for e in self.encodings.values()),
        )

    def train(self, job: JobContext) -> dict[str, Any]:
        import voila

        config = job.request["config"]  # settings, or the path of a YAML file
        report = _training_progress(job, config.get("max_minutes") if isinstance(config, dict) else None)
        path = voila.train(config, progress=report, stop=job.cancel)
        return {"model": str(path), "stopped": job.cancel.is_set()}

    def finetune(self, job: JobContext) -> dict[str, Any]:
        """Fine-tune the model file ``base`` (:func:`voila.finetune`) with the training settings
        ``config``. ``cases`` ``[{"id", "image", "affine", "masks": {label: array name}}]`` (arrays
        with the job; ``affine`` maps the image's voxel indices to RAS) are written as one dataset
        named ``dataset`` and learned besides ``config["data"]``. Cancel stops the training early:
        the model learned so far is still exported (``stopped``)."""
        import voila
        from voila.data.layouts import file_stem, write_totalsegmentator_case

        request = job.request
        config = dict(request.get("config") or {})
        if request.get("cases"):
            job.progress(0.0, "Preparing the cases")
            root = job.folder / "data" / file_stem(request.get("dataset") or "cases")
            for case in request["cases"]:
                write_totalsegmentator_case(
                    root,
                    case["id"],
                    job.load_array(case["image"]),
                    np.asarray(case["affine"], dtype=np.float64),
                    {label: job.load_array(name) for label, name in case["masks"].items()},
                )
            config["data"] = [str(root), *config.get("data", [])]
        if job.cancel.is_set():
            raise Cancelled("teaching cancelled before it began")
        report = _training_progress(job, config.get("max_minutes"))
        path = voila.finetune(request["base"], config, progress=report, stop=job.cancel)
        return {"model": str(path), "stopped": job.cancel.is_set()}

    def download(self, job: JobContext) -> dict[str, Any]:
        from voila.model.download import download

        request = job.request
        path = download(
            request["url"],
            request["sha256"],
            Path(request["target"]),
            progress=lambda fraction: job.progress(fraction, "Downloading"),
            cancel=job.cancel,
        )
        return {"path": str(path)}


def _training_progress(job: JobContext, max_minutes: float | None) -> Callable[[Any], None]:
    """A training run's :class:`~voila.training.loop.TrainingProgress` as job progress: the share
    of its steps done or, when a time box ends it sooner, of the time box gone."""
    started = time.monotonic()

    def report(progress) -> None:
        fraction = progress.step / max(progress.total, 1)
        if max_minutes:
            fraction = max(fraction, (time.monotonic() - started) / (60.0 * float(max_minutes)))
        job.progress(
            min(fraction, 1.0),
            f"{progress.phase}: epoch {progress.epoch}/{progress.epochs}, step {progress.step}",
        )

    return report


def _fingerprint(image: np.ndarray, affine: np.ndarray) -> str:
    """What makes two volumes the same: voxels, their type and shape, and the grid."""
    digest = hashlib.sha1(np.ascontiguousarray(image).view(np.uint8))
    digest.update(f"{image.dtype}{image.shape}".encode("ascii"))
    digest.update(np.round(np.asarray(affine, dtype=np.float64), 6).tobytes())
    return digest.hexdigest()


def run_job(handlers: Handlers, folder: Path, op: str, cancel: threading.Event) -> None:
    job = JobContext(folder, cancel)
    try:
        handler: Optional[Callable[[JobContext], dict[str, Any]]] = getattr(handlers, op, None)
        if handler is None or op.startswith("_"):
            raise VoilaError(f"the worker knows no request {op!r}; update the VOILA extension")
        result = handler(job)
        job.emit({"event": "done", "result": result, "arrays": job.arrays})
    except Cancelled:
        job.emit({"event": "cancelled"})
    except VoilaError as error:
        job.emit({"event": "error", "type": type(error).__name__, "message": str(error)})
    except Exception as error:  # a bug: one line for the GUI, the traceback in the log
        traceback.print_exc()
        sys.stdout.flush()
        job.emit(
            {
                "event": "error",
                "type": "WorkerError",
                "message": f"internal error in the VOILA worker: {type(error).__name__}: {error} (see its log)",
            }
        )
    finally:
        job.close()


def serve(session: Path) -> int:
    """The worker's main loop: requests from stdin, one job at a time; returns on ``quit`` or when
    stdin closes (the GUI went away)."""
    requests: queue.Queue = queue.Queue()
    cancels: dict[str, threading.Event] = {}
    lock = threading.Lock()

    def read_requests() -> None:
        for line in sys.stdin.buffer:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("op") == "cancel":
                with lock:
                    cancels.setdefault(str(message.get("job")), threading.Event()).set()
            elif message.get("op") == "quit":
                break
            else:
                requests.put(message)
        requests.put(None)

    threading.Thread(target=read_requests, name="requests", daemon=True).start()
    handlers = Handlers()
    while True:
        message = requests.get()
        if message is None:
            return 0
        job_id = str(message.get("job"))
        with lock:
            cancel = cancels.setdefault(job_id, threading.Event())
        run_job(handlers, session / job_id, str(message.get("op")), cancel)
        with lock:
            cancels.pop(job_id, None)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1 or not Path(arguments[0]).is_dir():
        print(
            "usage: python -m voila.worker SESSION_FOLDER (started by voila.worker.Worker)", file=sys.stderr
        )
        return 2
    from voila.cli import quiet_libraries

    quiet_libraries(debug=False)
    return serve(Path(arguments[0]))


if __name__ == "__main__":
    sys.exit(main())
