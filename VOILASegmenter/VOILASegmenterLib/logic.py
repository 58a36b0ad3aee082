"""VOILASegmenterLogic: segment a CT volume node from typed structure names. Usable without the GUI.

    logic = VOILASegmenterLogic()
    outcome = logic.process(ctNode, ["liver", "spleen", "left kidney"], outputSegmentation=None)
    outcome.segmentation, outcome.heatmap, outcome.notFound
    outcome.segments[0].predictedDice, outcome.segments[0].check, outcome.segments[0].checkReason

The heatmap is the review map by default (``heatmapKind="review"``): a value v means that about v
of the voxels with that value were labelled wrongly on patients the model was not trained on
(:data:`voila.infer.results.HEATMAP_KINDS`); ``heatmapKind="complexity"`` gives the raw CAS
complexity map instead, and ``None`` none.

The model runs in a separate Python process (:class:`voila.worker.Worker`; ``PythonSlicer`` in
Slicer), never on the GUI thread and never in a Python thread of Slicer's process: PythonQt holds
the GIL while Qt idles, so such a thread would only run while the GUI thread executes Python. The
worker starts on first use and stays alive, so the model stays loaded between runs; a crashed
worker is reported in one line and replaced on the next run.

With ``waitForCompletion=False`` ``process`` returns a :class:`SegmentationJob` to poll from the main
thread (the widget uses a ``qt.QTimer``): ``poll()`` never blocks. MRML is touched only on the
caller's thread, by ``poll()``/``finish()``, and only after a successful, uncancelled run, so a
cancelled or failed run leaves the scene as it was. Nothing the user had is overwritten: the
heatmap goes only into a volume VOILA created, and a re-run replaces only the segments VOILA
wrote that the user has not edited since.

Clicks and boxes refine a prompt: each prompt has one point list (``VOILA points: <prompt>``;
a point labelled ``-...`` excludes, :data:`mrml_io.EXCLUDING_LABEL_PREFIX`) and one ROI (``VOILA
box: <prompt>``) per input volume, found by their tags whatever the user renames them to.
:meth:`VOILASegmenterLogic.spatialPrompts` turns them into ``points``/``boxes`` for
:meth:`VOILASegmenterLogic.process`. The worker keeps the encodings of the last volumes, so a run on
a volume it has seen takes about a second; :attr:`VOILASegmenterLogic.encodingMemory` says what
it holds.

    points, boxes = logic.spatialPrompts(ctNode, "my organ")
    logic.process(ctNode, "my organ", outputSegmentation=None, points=points, boxes=boxes)

Teaching: :meth:`VOILASegmenterLogic.teach` fine-tunes a model (:func:`voila.finetune`, in the
worker) on CTs and the segments chosen from their segmentations, and saves the new model in
:attr:`VOILASegmenterLogic.userModelDir` under a name of its own:

    outcome = logic.teach([(ctNode, segmentationNode, ["Segment_1", "Segment_2"])], minutes=10)
    outcome.modelPath, outcome.addedClasses, outcome.stopped
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
from voila.errors import (
    Cancelled,
    InputImageError,
    ModelFileError,
    OutputError,
    PromptError,
    VoilaError,
)

try:  # inside 3D Slicer: the module's logic class, owner of its parameter node
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # slicer-core (tests, batch scripts): MRML without the application
    ScriptedLoadableModuleLogic = object

from VOILASegmenterLib import mrml_io

ProgressCallback = Callable[[float, str], None]

POINTS_NAME = "VOILA points: {prompt}"
BOX_NAME = "VOILA box: {prompt}"
# Node reference from a prompt's markups to the volume they were placed on: clicks on one CT are
# never sent with another (a reference, unlike an attribute, follows node IDs when a scene loads).
VOLUME_REFERENCE_ROLE = "VOILA.Volume"


class JobAlreadyRunningError(VoilaError):
    """A segmentation is already running in this logic; wait for it or cancel it."""


class InputRemovedError(VoilaError):
    """The input volume left the scene (or changed size) while it was being segmented."""


class TeachingInputError(VoilaError):
    """The CTs, segmentations or segments chosen to teach from cannot be used; nothing was written."""


@dataclass
class SegmentRecord:
    """One prompt's outcome as shown in the module's result table. ``predictedDice`` (None: not
    assessed, e.g. not found), ``check`` and ``checkReason``: the expected quality of a found
    structure and whether, and why, it deserves a second look (:mod:`voila.infer.review`);
    ``note``: why a prompt was not found."""

    prompt: str
    name: str
    found: bool
    color: tuple[int, int, int]
    volumeMl: float
    confidence: float
    openVocabulary: bool
    segmentId: Optional[str] = None
    note: str = ""
    predictedDice: Optional[float] = None
    check: bool = False
    checkReason: str = ""


@dataclass
class SegmentationOutcome:
    segmentation: Any
    heatmap: Any
    segments: list[SegmentRecord]
    elapsedSeconds: float
    messages: list[str] = field(default_factory=list)
    result: Any = None

    @property
    def notFound(self) -> list[str]:
        return [record.prompt for record in self.segments if not record.found]

    @property
    def toCheck(self) -> list[str]:
        """Prompts found but flagged "check this structure"."""
        return [record.prompt for record in self.segments if record.found and record.check]

    @property
    def heatmapKind(self) -> Optional[str]:
        """What :attr:`heatmap` holds: ``review``, ``complexity`` or None (no heatmap)."""
        return None if self.result is None else self.result.heatmap_kind


@dataclass
class TeachOutcome:
    """A taught model: ``modelPath`` (in the user model folder), the classes it added to its base
    (``addedClasses``; the structures it was ``taught`` may also be classes the base knew), the
    minutes it trained, and whether it was ``stopped`` before its time was up (saved all the same,
    with what it had learned)."""

    modelPath: Any
    basePath: Any
    taught: list[str]
    addedClasses: list[str]
    minutes: float
    stopped: bool
    elapsedSeconds: float


@dataclass
class PromptMarkups:
    """A prompt's point list and ROI on one volume (``None`` where there is none yet)."""

    prompt: str
    points: Any = None
    box: Any = None


@dataclass(frozen=True)
class EncodingMemory:
    """What the worker holds besides the models: the encodings (voxel tokens) of ``volumes``
    volumes, ``bytes`` in all, reported after each segmentation."""

    volumes: int
    bytes: int


def parse_prompts(prompts) -> list[str]:
    """Prompt texts from a list or from text separated by commas, semicolons or line breaks
    (:func:`voila.prompts.split_prompts`); checked, so an empty field fails before any work."""
    from voila.prompts import check_prompts, split_prompts

    texts = split_prompts(prompts or [])
    if not texts:
        raise PromptError("type at least one structure name, for example 'liver, spleen, left kidney'")
    check_prompts(texts)
    return texts


def _with_spatial_prompts(prompts, points: dict, boxes: dict) -> list[str]:
    """The typed prompts plus any prompt named only by points or a box (as the engine adds them),
    so that "click + any name" needs no typing twice."""
    from voila.prompts import split_prompts

    texts = split_prompts(prompts or [])
    known = {text.casefold() for text in texts}
    for name in (*points, *boxes):
        if " ".join(str(name).split()).casefold() not in known:
            texts.append(str(name))
            known.add(" ".join(str(name).split()).casefold())
    return texts


def _json_points(points: Optional[dict]) -> dict:
    """``{prompt: [((R, A, S), positive), ...]}`` as JSON for the worker."""
    try:
        return {
            str(prompt): [[[float(c) for c in position], bool(positive)] for position, positive in clicks]
            for prompt, clicks in (points or {}).items()
        }
    except (TypeError, ValueError) as error:
        raise PromptError(
            f"points must be {{prompt: [((R, A, S), positive), ...]}} in mm ({error})"
        ) from None


def _json_boxes(boxes: Optional[dict]) -> dict:
    """``{prompt: ((R1, A1, S1), (R2, A2, S2))}`` as JSON for the worker."""
    try:
        return {
            str(prompt): [[float(c) for c in corner] for corner in corners]
            for prompt, corners in (boxes or {}).items()
        }
    except (TypeError, ValueError) as error:
        raise PromptError(f"boxes must be {{prompt: ((R1, A1, S1), (R2, A2, S2))}} in mm ({error})") from None


def _segment_key(prompt) -> str:
    """What makes a later run's segment "the same": the prompt's class key (the matched structure,
    else the normalised text; :func:`voila.vocabulary.class_key`)."""
    return f"structure:{prompt.key}" if prompt.structure else f"text:{prompt.key}"


class WorkerTask:
    """One request to the logic's worker process, polled from the caller's thread.

    ``poll()`` never blocks: ``None`` while the worker runs it, then its outcome (once), or the
    error it ended with (a :class:`VoilaError`, e.g. :class:`Cancelled`). ``progress(fraction,
    stage)`` is called from ``poll()``, so always on the caller's thread. A cancelled request's
    result is discarded, unless ``stopKeepsResult`` (training: ``cancel()`` stops it early and what
    it learned is still a model).
    """

    stopKeepsResult = False

    def __init__(self, logic: VOILASegmenterLogic, progress: Optional[ProgressCallback] = None) -> None:
        self._logic = logic
        self._progress = progress
        self._work = None  # the worker's job
        self._reported: Optional[tuple[float, str]] = None
        self._outcome: Any = None
        self._startTime = time.monotonic()
        self._endTime: Optional[float] = None
        self._cancelled = False
        self.done = False
        self.error: Optional[BaseException] = None

    def submit(self, op: str, request: dict, arrays: Optional[dict] = None) -> None:
        self._work = self._logic.worker.submit(op, request, arrays)
        if self._cancelled:
            self._work.cancel()

    @property
    def fraction(self) -> float:
        if self.done and self.error is None:
            return 1.0
        return 0.0 if self._work is None else 0.95 * self._work.fraction

    @property
    def stage(self) -> str:
        if self.done:
            return "Done" if self.error is None else "Stopped"
        return "Starting" if self._work is None else self._work.stage

    @property
    def elapsedSeconds(self) -> float:
        return (self._endTime or time.monotonic()) - self._startTime

    @property
    def etaSeconds(self) -> Optional[float]:
        """Remaining time extrapolated from progress so far; ``None`` until there is enough to go on."""
        if self.done or self.fraction < 0.02:
            return None
        return self.elapsedSeconds * (1.0 - self.fraction) / self.fraction

    @property
    def running(self) -> bool:
        return not self.done

    def cancel(self) -> None:
        """Stop this request only (the worker stays up); the next ``poll()`` raises Cancelled."""
        self._cancelled = True
        if self._work is not None:
            self._work.cancel()

    def finish(self, timeout: Optional[float] = None, interval: float = 0.05):
        """Wait (blocking the caller) for the request, then complete it like ``poll()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            outcome = self.poll()
            if self.done or (deadline is not None and time.monotonic() > deadline):
                return outcome
            time.sleep(interval)

    def poll(self):
        if self.done:
            if self.error is not None:
                raise self.error
            return self._outcome
        try:
            reply = self._work.poll()
        except BaseException as error:
            return self._end(self._describe(error))
        if reply is None:
            self._reportStage(self.fraction, self.stage)
            return None
        if self._cancelled and not self.stopKeepsResult:
            return self._end(self._describe(Cancelled("cancelled")))
        try:
            self._outcome = self._complete(reply)
        except BaseException as error:
            return self._end(error)
        self._end(None)
        self._reportStage(1.0, "Done")
        return self._outcome

    def _complete(self, reply: dict) -> Any:
        """The outcome of a finished request (subclasses turn it into scene changes)."""
        return reply["result"]

    def _describe(self, error: BaseException) -> BaseException:
        return error

    def _end(self, error: Optional[BaseException]):
        self.done = True
        self._endTime = time.monotonic()
        self._logic._jobFinished(self)
        if error is not None:
            self.error = error
            raise error
        return None

    def _reportStage(self, fraction: float, stage: str) -> None:
        state = (round(fraction, 3), stage)
        if self._progress is not None and state != self._reported:
            self._reported = state
            self._progress(fraction, stage)


class SegmentationJob(WorkerTask):
    """One segmentation run. ``poll()`` returns ``None`` while it runs and the outcome once applied."""

    def __init__(self, logic: VOILASegmenterLogic, request: dict, progress: Optional[ProgressCallback]):
        super().__init__(logic, progress)
        self._request = request

    def start(self) -> None:
        request = self._request
        self.submit(
            "segment",
            {
                "affine": np.asarray(request["affine"]).tolist(),
                "prompts": request["prompts"],
                "model": str(request["modelPath"]) if request["modelPath"] else None,
                "device": request["device"],
                "overlap": request["overlap"],
                "heatmap": request["heatmapKind"],
                "points": request["points"],
                "boxes": request["boxes"],
            },
            {"image": request["image"]},
        )
        request["image"] = None  # the worker has its copy; the GUI process need not hold two

    def _describe(self, error: BaseException) -> BaseException:
        if isinstance(error, Cancelled):
            return Cancelled("segmentation cancelled; the scene was left unchanged")
        return error

    def _complete(self, reply: dict) -> SegmentationOutcome:
        from voila.infer.results import SegmentationResult

        arrays = reply["arrays"]
        if "encodings_kept" in reply["result"]:
            self._logic._encodingMemory = EncodingMemory(
                int(reply["result"]["encodings_kept"]), int(reply["result"].get("encodings_bytes", 0))
            )
        result = SegmentationResult.from_dict(reply["result"], arrays["labelmap"], arrays.get("heatmap"))
        self._reportStage(0.97, "Writing segments")
        return self._logic._apply(self._request, result, self.elapsedSeconds)


class TeachJob(WorkerTask):
    """One teaching run (the worker's ``finetune``). ``poll()`` returns ``None`` while it runs and
    the :class:`TeachOutcome` once the model is in the user model folder. ``cancel()`` stops the
    training early; the model learned so far is saved (``outcome.stopped``)."""

    stopKeepsResult = True

    def __init__(self, logic: VOILASegmenterLogic, request: dict, progress: Optional[ProgressCallback]):
        super().__init__(logic, progress)
        self._request = request
        self._runFolder = None

    def start(self) -> None:
        request = self._request
        self._runFolder = Path(tempfile.mkdtemp(prefix="voila-teach-"))
        config = dict(request["settings"], out=str(self._runFolder / "run"))
        try:
            self.submit(
                "finetune",
                {
                    "base": str(request["basePath"]),
                    "config": config,
                    "cases": request["cases"],
                    "dataset": "Slicer scene",
                },
                request["arrays"],
            )
        except BaseException:
            self._removeRunFolder()
            raise
        request["arrays"] = None  # the worker has its copies

    def _describe(self, error: BaseException) -> BaseException:
        if isinstance(error, Cancelled):
            return Cancelled("teaching stopped before it began; no model was saved")
        return error

    def _complete(self, reply: dict) -> TeachOutcome:
        from voila.model.model_file import read_model_card

        from VOILASegmenterLib import models

        result = reply["result"]
        self._reportStage(0.97, "Saving the model")
        request = self._request
        path = models.store_model(
            result["model"],
            self._logic.userModelDir,
            models.taught_model_name(request["basePath"], request["taught"]),
        )
        training = read_model_card(path).get("training") or {}
        return TeachOutcome(
            modelPath=path,
            basePath=request["basePath"],
            taught=list(request["taught"]),
            addedClasses=list(training.get("added_classes", [])),
            minutes=float(training.get("minutes", 0.0)),
            stopped=bool(result.get("stopped")),
            elapsedSeconds=self.elapsedSeconds,
        )

    def _end(self, error: Optional[BaseException]):
        self._removeRunFolder()
        return super()._end(error)

    def _removeRunFolder(self) -> None:
        if self._runFolder is not None:
            shutil.rmtree(self._runFolder, ignore_errors=True)
            self._runFolder = None


class VOILASegmenterLogic(ScriptedLoadableModuleLogic):
    """GUI-free logic. Owns the module's parameter node (in Slicer) and one worker process, in
    which the models stay loaded between runs.

    ``defaultModelPath`` / ``defaultDevice``: used when a run names none (``None``: the shipped
    demo model). ``python``: the interpreter of the worker (default: ``PythonSlicer`` in Slicer).
    ``userModelDir``: where taught models are saved (default:
    :func:`VOILASegmenterLib.models.user_model_dir`).
    """

    def __init__(
        self,
        python: Optional[str] = None,
        defaultModelPath=None,
        defaultDevice: str = "auto",
        userModelDir=None,
    ):
        if ScriptedLoadableModuleLogic is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        self._python = python
        self._worker = None
        self._job: Optional[WorkerTask] = None
        self._encodingMemory: Optional[EncodingMemory] = None
        self.defaultModelPath = defaultModelPath
        self.defaultDevice = defaultDevice
        self._userModelDir = userModelDir

    @property
    def userModelDir(self):
        """The folder of the user's taught models (a ``Path``; created when the first is saved)."""
        from VOILASegmenterLib import models

        return Path(self._userModelDir) if self._userModelDir else models.user_model_dir()

    @property
    def worker(self):
        """The worker process client (started on first use; a crashed one is replaced)."""
        from voila.worker import Worker

        if self._worker is None:
            self._worker = Worker(python=self._python)
        return self._worker

    @property
    def job(self) -> Optional[WorkerTask]:
        """The running job, if any."""
        return self._job

    @property
    def encodingMemory(self) -> Optional[EncodingMemory]:
        """The encodings the worker kept after the last segmentation; ``None`` before one, or once
        the worker is gone (a new worker starts with none)."""
        if self._worker is None or not self._worker.alive:
            return None
        return self._encodingMemory

    def shutdown(self) -> None:
        """Stop the worker process (it frees the models' memory); the next run starts a new one."""
        if self._job is not None:
            self._job.cancel()
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def downloadModel(self, request: dict, progress: Optional[ProgressCallback] = None) -> WorkerTask:
        """Download a registered model in the worker (``request`` from
        :func:`VOILASegmenterLib.models.prepare_download`, sent only after the user agreed);
        ``poll()`` gives ``{"path": ...}``."""
        return self._startTask(WorkerTask(self, progress), "download", request)

    def trainModel(self, config: dict, progress: Optional[ProgressCallback] = None) -> WorkerTask:
        """Train (``voila.train`` settings) in the worker: Slicer stays responsive and the model
        runs outside its GUI thread; ``cancel()`` stops cleanly (checkpoint and export);
        ``poll()`` gives ``{"model": path, "stopped": bool}``."""
        task = WorkerTask(self, progress)
        task.stopKeepsResult = True
        return self._startTask(task, "train", {"config": dict(config)})

    def _runJob(self, job, waitForCompletion: bool):
        """Start ``job`` as the logic's one job: its outcome when waiting, else the started job."""
        self._job = job
        try:
            job.start()
        except BaseException:
            self._job = None
            raise
        return job.finish() if waitForCompletion else job

    def _startTask(self, task: WorkerTask, op: str, request: dict) -> WorkerTask:
        if self._job is not None and not self._job.done:
            raise JobAlreadyRunningError(
                "VOILA is busy with another run; wait for it to finish or press Cancel first"
            )
        self._job = task
        try:
            task.submit(op, request)
        except BaseException:
            self._job = None
            raise
        return task

    def process(
        self,
        inputVolume,
        prompts,
        outputSegmentation=None,
        heatmapVolume=None,
        modelPath=None,
        device: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
        waitForCompletion: bool = True,
        overlap: float = 0.5,
        heatmapKind: Union[str, bool, None] = "review",
        showHeatmap: bool = True,
        heatmapOpacity: float = 0.4,
        points: Optional[dict] = None,
        boxes: Optional[dict] = None,
    ):
        """Segment ``prompts`` in ``inputVolume`` into ``outputSegmentation`` (created when ``None``).

        One segment per found prompt, named after the matched structure (or the prompt for free
        text), with its colour and DICOM terminology; running again with the same prompts replaces
        those segments in place (unless the user edited them since: then the new result goes next
        to the edited segment) and leaves other segments alone. Each found structure's record and
        segment tags carry its predicted Dice and the "check this structure" flag.

        ``heatmapKind``: ``"review"`` (default; ``True`` too) for the review map, ``"complexity"``
        for the raw CAS complexity map (the first run of a volume with it encodes again), ``None``
        (or ``False``) for none. The heatmap goes into ``heatmapVolume`` (created when ``None``;
        only a volume VOILA created is accepted) on the input grid, tagged with its kind.
        ``progress(fraction, stage)`` is always called on the caller's thread.

        ``points`` ``{prompt: [((R, A, S), positive), ...]}`` and ``boxes`` ``{prompt: ((R1, A1, S1),
        (R2, A2, S2))}`` (world RAS mm; see :meth:`spatialPrompts`) refine their prompts: a
        positive point selects what the prompt means and keeps its connected region, a negative
        one carves its surroundings out, a box keeps the prompt inside it. A prompt named only
        there is added ("click + any name"). On a volume the worker encoded recently, this takes
        about a second.

        Returns a :class:`SegmentationOutcome`, or with ``waitForCompletion=False`` a started
        :class:`SegmentationJob`.
        """
        if self._job is not None and not self._job.done:
            raise JobAlreadyRunningError(
                "a segmentation is already running; wait for it to finish or press Cancel first"
            )
        if inputVolume is None or inputVolume.GetScene() is None:
            raise InputImageError("select an input CT volume that is loaded in the scene")
        from voila.infer.results import heatmap_kind

        try:
            kind = heatmap_kind(heatmapKind)
        except ValueError as error:
            raise OutputError(f"{error} (or None for no heatmap)") from None
        if heatmapVolume is not None:
            checkHeatmapTarget(heatmapVolume, inputVolume)
        image, affine = mrml_io.volume_to_numpy(inputVolume)
        request = {
            "inputVolume": inputVolume,
            "inputShape": image.shape,
            "image": image,
            "affine": affine,
            "prompts": parse_prompts(_with_spatial_prompts(prompts, points or {}, boxes or {})),
            "points": _json_points(points),
            "boxes": _json_boxes(boxes),
            "outputSegmentation": outputSegmentation,
            "heatmapVolume": heatmapVolume,
            "modelPath": modelPath or self.defaultModelPath,
            "device": device or self.defaultDevice or "auto",
            "overlap": float(overlap),
            "heatmapKind": kind,
            "showHeatmap": bool(showHeatmap),
            "heatmapOpacity": float(heatmapOpacity),
        }
        return self._runJob(SegmentationJob(self, request, progress), waitForCompletion)

    # -- teaching --------------------------------------------------------------------------------

    def teach(
        self,
        pairs,
        baseModelPath=None,
        minutes: float = 10.0,
        device: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
        waitForCompletion: bool = True,
        settings: Optional[dict] = None,
    ):
        """Teach a model what the chosen segments show, and save it as a new model file.

        ``pairs``: ``[(ctVolumeNode, segmentationNode, [segmentId, ...]), ...]``, e.g. a CT and its
        segmentation corrected in Segment Editor, plus more CTs if there are. Each chosen segment
        teaches the structure its name says: a vocabulary name ("liver", "left kidney") the
        vocabulary's structure, any other name ("Tumor core") a new free-text class. Segments not
        chosen and structures a CT's segments do not show are unknown on that CT, not background;
        the base model's confident predictions keep its own structures (:mod:`voila.training.finetune`).

        ``baseModelPath`` (default: the logic's default model, else the shipped demo model) is only
        read. The training runs in the worker for at most ``minutes`` on ``device``; ``settings``:
        further training settings (:data:`voila.training.config.SETTINGS`; those the base fixes are
        refused). The new model goes into :attr:`userModelDir` under a name that says what it was
        taught (:func:`VOILASegmenterLib.models.taught_model_name`) and never replaces a file.
        The scene is not changed. Problems with the input raise :class:`TeachingInputError` before
        anything is written.

        Returns a :class:`TeachOutcome`, or with ``waitForCompletion=False`` a started
        :class:`TeachJob` (``cancel()`` stops the training early and saves what it learned).
        """
        if self._job is not None and not self._job.done:
            raise JobAlreadyRunningError(
                "VOILA is busy with another run; wait for it to finish or press Cancel first"
            )
        basePath = self._modelToTeach(baseModelPath)
        try:
            minutes = float(minutes)
        except (TypeError, ValueError):
            minutes = 0.0
        if not minutes > 0:
            raise TeachingInputError("give the training time in minutes (for example 10)")
        cases, arrays, taught = _teaching_cases(pairs)
        defaults = {
            "max_minutes": minutes,
            "device": device or self.defaultDevice or "auto",
            "description": f"{basePath.name} taught in 3D Slicer: {', '.join(taught)} "
            f"({len(cases)} CT{'s' if len(cases) > 1 else ''})",
        }
        request = {
            "basePath": basePath,
            "cases": cases,
            "arrays": arrays,
            "taught": taught,
            "settings": dict(defaults, **(settings or {})),
        }
        return self._runJob(TeachJob(self, request, progress), waitForCompletion)

    def _modelToTeach(self, baseModelPath):
        """The base model file of a teaching run, checked to be a VOILA model."""
        from voila.model.model_file import read_model_card
        from voila.resources import DEMO_MODEL, resource_path

        path = Path(baseModelPath or self.defaultModelPath or resource_path(DEMO_MODEL))
        if not path.is_file():
            raise ModelFileError(
                f"the model to teach, {path}, does not exist; choose a model under Model and device"
            )
        read_model_card(path)  # a file that is no VOILA model fails here, in a line
        return path

    # -- clicks and boxes ------------------------------------------------------------------------

    def voilaMarkups(self, inputVolume) -> list:
        """Every point list and ROI of VOILA's prompts placed on ``inputVolume``."""
        scene = inputVolume.GetScene() if inputVolume is not None else None
        if scene is None:
            return []
        found = []
        for className in ("vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode"):
            for index in range(scene.GetNumberOfNodesByClass(className)):
                node = scene.GetNthNodeByClass(index, className)
                if node.GetAttribute(mrml_io.PROMPT_TAG) is not None and (
                    node.GetNodeReferenceID(VOLUME_REFERENCE_ROLE) == inputVolume.GetID()
                ):
                    found.append(node)
        return found

    def promptMarkups(self, inputVolume, prompt: str) -> PromptMarkups:
        """``prompt``'s point list and ROI on ``inputVolume`` (spelling of spaces and case aside)."""
        prompt = " ".join(str(prompt).split())
        markups = PromptMarkups(prompt)
        for node in self.voilaMarkups(inputVolume):
            if " ".join(node.GetAttribute(mrml_io.PROMPT_TAG).split()).casefold() != prompt.casefold():
                continue
            if node.IsA("vtkMRMLMarkupsROINode"):
                if markups.box is None:
                    markups.box = node
            elif markups.points is None:
                markups.points = node
        return markups

    def promptPointList(self, inputVolume, prompt: str):
        """``prompt``'s point list on ``inputVolume``, created (empty) when there is none."""
        existing = self.promptMarkups(inputVolume, prompt).points
        if existing is not None:
            return existing
        pointList = self._newMarkups("vtkMRMLMarkupsFiducialNode", POINTS_NAME, inputVolume, prompt)
        pointList.SetControlPointLabelFormat(mrml_io.INCLUDING_LABEL_FORMAT)
        return pointList

    def promptBox(self, inputVolume, prompt: str):
        """``prompt``'s ROI on ``inputVolume``, created (not placed) when there is none."""
        existing = self.promptMarkups(inputVolume, prompt).box
        if existing is not None:
            return existing
        return self._newMarkups("vtkMRMLMarkupsROINode", BOX_NAME, inputVolume, prompt)

    def _newMarkups(self, className: str, nameFormat: str, inputVolume, prompt: str):
        prompt = " ".join(str(prompt).split())
        scene = inputVolume.GetScene()
        node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(nameFormat.format(prompt=prompt)))
        node.CreateDefaultDisplayNodes()
        node.SetAttribute(mrml_io.PROMPT_TAG, prompt)
        node.SetNodeReferenceID(VOLUME_REFERENCE_ROLE, inputVolume.GetID())
        # under the volume's transform, like its segments: moving the volume moves its clicks too
        node.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        mrml_io.place_next_to(node, inputVolume)
        return node

    def placePoints(self, inputVolume, prompt: str, excluding: bool = False):
        """Start placing ``prompt``'s points in the views (Slicer's persistent place mode on its
        point list): inside points, or with ``excluding`` outside points, labelled by the
        convention of :data:`mrml_io.EXCLUDING_LABEL_PREFIX`. Returns the point list."""
        pointList = self.promptPointList(inputVolume, prompt)
        _startPlaceMode(
            pointList,
            persistent=True,
            labelFormat=mrml_io.EXCLUDING_LABEL_FORMAT if excluding else mrml_io.INCLUDING_LABEL_FORMAT,
        )
        return pointList

    def placeBox(self, inputVolume, prompt: str):
        """Show ``prompt``'s box for editing, or start placing it (two opposite corners) when it
        has none. Returns the ROI."""
        roi = self.promptBox(inputVolume, prompt)
        roi.SetDisplayVisibility(True)
        if mrml_io.box_from_roi(roi) is None:
            _startPlaceMode(roi, persistent=False)
        return roi

    def clearPromptMarkups(self, inputVolume, prompt: str) -> None:
        """Remove ``prompt``'s points and box on ``inputVolume`` (its next run is text only). The
        point list stays, empty, with its label format; the ROI goes, so the next box is placed
        afresh (an emptied box ROI would accept only one control point)."""
        markups = self.promptMarkups(inputVolume, prompt)
        if markups.points is not None:
            markups.points.RemoveAllControlPoints()
        if markups.box is not None:
            markups.box.GetScene().RemoveNode(markups.box)

    def spatialPrompts(self, inputVolume, prompts) -> tuple[dict, dict]:
        """``(points, boxes)`` for :meth:`process` from what is placed for ``prompts`` (a list or
        typed text) on ``inputVolume``: ``{prompt: [((R, A, S), positive), ...]}`` and ``{prompt:
        ((R1, A1, S1), (R2, A2, S2))}`` in world RAS mm; prompts with nothing placed are left out."""
        from voila.prompts import split_prompts

        points: dict = {}
        boxes: dict = {}
        if inputVolume is None or inputVolume.GetScene() is None:
            return points, boxes
        for prompt in split_prompts(prompts or []):
            markups = self.promptMarkups(inputVolume, prompt)
            clicks = mrml_io.points_from_markups(markups.points) if markups.points is not None else []
            if clicks:
                points[prompt] = clicks
            box = mrml_io.box_from_roi(markups.box) if markups.box is not None else None
            if box is not None:
                boxes[prompt] = box
        return points, boxes

    def _jobFinished(self, job: SegmentationJob) -> None:
        if self._job is job:
            self._job = None

    def _apply(self, request: dict, result, elapsedSeconds: float) -> SegmentationOutcome:
        """Main thread: write a finished result into MRML."""
        inputVolume = request["inputVolume"]
        if not mrml_io.node_in_scene(inputVolume):
            raise InputRemovedError(
                "the input volume was removed from the scene while it was being segmented; "
                "the result was discarded"
            )
        if inputVolume.GetImageData() is None or tuple(
            reversed(inputVolume.GetImageData().GetDimensions())
        ) != tuple(request["inputShape"]):
            raise InputRemovedError(
                f"volume '{inputVolume.GetName()}' changed size while it was being segmented; "
                "the result was discarded, run again"
            )
        scene = inputVolume.GetScene()
        messages: list[str] = []
        segmentationNode = request["outputSegmentation"]
        if segmentationNode is not None and not mrml_io.node_in_scene(segmentationNode):
            messages.append("the chosen output segmentation was removed, so a new one was created")
            segmentationNode = None
        if segmentationNode is None:
            segmentationNode = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{inputVolume.GetName()} VOILA")
            )
        mrml_io.prepare_segmentation(segmentationNode, inputVolume)
        loadTerminology()
        records = self._writeSegments(segmentationNode, inputVolume, result, messages)
        heatmapNode = None
        if result.heatmap is not None:
            heatmapNode = request["heatmapVolume"]
            if heatmapNode is not None and not mrml_io.node_in_scene(heatmapNode):
                heatmapNode = None
            if heatmapNode is not None:
                checkHeatmapTarget(heatmapNode, inputVolume)
            kind = result.heatmap_kind or request["heatmapKind"]
            if heatmapNode is None:
                heatmapNode = scene.AddNewNodeByClass(
                    "vtkMRMLScalarVolumeNode", mrml_io.heatmap_name(inputVolume, kind)
                )
            mrml_io.write_heatmap(
                heatmapNode, np.asarray(result.heatmap, dtype=np.float32), inputVolume, kind
            )
            if request["showHeatmap"]:
                mrml_io.show_heatmap(scene, inputVolume, heatmapNode, request["heatmapOpacity"])
        outcome = SegmentationOutcome(
            segmentationNode, heatmapNode, records, elapsedSeconds, messages, result
        )
        if outcome.notFound:
            messages.append("not found: " + ", ".join(outcome.notFound))
        if outcome.toCheck:
            messages.append("check: " + ", ".join(outcome.toCheck))
        return outcome

    def _writeSegments(
        self, segmentationNode, inputVolume, result, messages: list[str]
    ) -> list[SegmentRecord]:
        ijkToRas = mrml_io.ijk_to_ras(inputVolume)
        earlier = mrml_io.voila_segments(segmentationNode)
        labelmap = np.asarray(result.labelmap)
        records = []
        wasModifying = segmentationNode.StartModify()
        try:
            for prompt in result.prompts:
                key = _segment_key(prompt)
                name = prompt.display_name or prompt.prompt
                record = SegmentRecord(
                    prompt=prompt.prompt,
                    name=name,
                    found=bool(prompt.found),
                    color=tuple(int(c) for c in prompt.color),
                    volumeMl=float(prompt.volume_ml),
                    confidence=float(prompt.confidence),
                    openVocabulary=bool(prompt.open_vocabulary),
                    note=prompt.note or "",
                    predictedDice=None if prompt.predicted_dice is None else float(prompt.predicted_dice),
                    check=bool(prompt.check),
                    checkReason=prompt.check_reason or "",
                )
                # replace only what VOILA wrote and the user has not edited since
                replaceable = next((s.segment_id for s in earlier.get(key, []) if not s.edited), None)
                edited = [s for s in earlier.get(key, []) if s.edited]
                if prompt.found:
                    if replaceable is None and edited:
                        messages.append(
                            f"kept your edited segment of '{prompt.prompt}'; the new result is beside it"
                        )
                    record.segmentId = mrml_io.write_segment(
                        segmentationNode,
                        replaceable,
                        labelmap == prompt.label,
                        ijkToRas,
                        name=name,
                        color=record.color,
                        prompt_key=key,
                        terminology_entry=mrml_io.terminology_string(prompt.snomed),
                        confidence=record.confidence,
                        predicted_dice=record.predictedDice,
                        check=record.check,
                        check_reason=record.checkReason,
                    )
                elif replaceable is not None:
                    # A stale segment would read as this run's answer; the table reports the miss.
                    segmentationNode.GetSegmentation().RemoveSegment(replaceable)
                    messages.append(f"removed the earlier segment of '{prompt.prompt}' (not found this time)")
                records.append(record)
        finally:
            segmentationNode.EndModify(wasModifying)
        return records


def _teaching_cases(pairs) -> tuple[list[dict], dict, list[str]]:
    """The worker's ``cases`` (:meth:`voila.worker.Handlers.finetune`) and their arrays from
    ``[(ctVolumeNode, segmentationNode, [segmentId, ...]), ...]``, and the names of the structures
    taught: each CT as ``(array [k, j, i], affine)``, each chosen segment as a ``uint8`` mask on
    that CT's grid. Every problem is found here, before anything is written; segments with the
    same name in one pair are one structure."""
    pairs = list(pairs or [])
    if not pairs:
        raise TeachingInputError("choose a CT, its segmentation and the segments to learn")
    cases: list[dict] = []
    arrays: dict = {}
    taught: list[str] = []
    for number, pair in enumerate(pairs):
        try:
            volume, segmentation, segmentIds = pair
        except (TypeError, ValueError):
            raise TeachingInputError(
                "give each CT as (CT volume, segmentation, [segment IDs]) to teach from"
            ) from None
        which = f" of pair {number + 1}" if len(pairs) > 1 else ""
        if not mrml_io.node_in_scene(volume):
            raise TeachingInputError(f"choose the CT volume{which}: it must be loaded in the scene")
        if not mrml_io.node_in_scene(segmentation) or not segmentation.IsA("vtkMRMLSegmentationNode"):
            raise TeachingInputError(
                f"choose the segmentation{which} whose segments show what to learn on '{volume.GetName()}'"
            )
        segmentIds = [str(segmentId) for segmentId in (segmentIds or [])]
        if not segmentIds:
            raise TeachingInputError(f"choose at least one segment of '{segmentation.GetName()}' to learn")
        image, affine = mrml_io.volume_to_numpy(volume)
        masks: dict[str, str] = {}
        for index, segmentId in enumerate(segmentIds):
            segment = segmentation.GetSegmentation().GetSegment(segmentId)
            if segment is None:
                raise TeachingInputError(
                    f"'{segmentation.GetName()}' has no segment {segmentId!r} any more; choose the segments again"
                )
            name = " ".join((segment.GetName() or "").split())
            if not name:
                raise TeachingInputError(
                    f"a segment of '{segmentation.GetName()}' has no name; name it after the structure it shows"
                )
            mask = mrml_io.segment_mask_on_volume(segmentation, segmentId, volume)
            if not mask.any():
                raise TeachingInputError(
                    f"segment '{name}' of '{segmentation.GetName()}' has no voxel inside CT "
                    f"'{volume.GetName()}'; draw it on that CT or leave it out"
                )
            if name in masks:  # two segments of one structure: one mask
                arrays[masks[name]] |= mask.astype(np.uint8)
                continue
            masks[name] = f"mask_{number}_{index}"
            arrays[masks[name]] = mask.astype(np.uint8)
            taught.append(name)
        arrays[f"image_{number}"] = image
        cases.append(
            {
                "id": f"{number + 1:02d} {volume.GetName()}",
                "image": f"image_{number}",
                "affine": np.asarray(affine).tolist(),
                "masks": masks,
            }
        )
    return cases, arrays, list(dict.fromkeys(taught))


def _startPlaceMode(markupsNode, persistent: bool, labelFormat: Optional[str] = None) -> None:
    """Slicer's place mode on ``markupsNode`` through the scene's selection and interaction nodes
    (what the Markups module's place buttons do), so it works the same from the console."""
    scene = markupsNode.GetScene()
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    interaction = scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    if selection is None or interaction is None:
        raise VoilaError("this scene has no selection or interaction node, so points cannot be placed")
    if labelFormat is not None:
        # Leave place mode first: Slicer then drops its preview point, labelled with the old format.
        if interaction.GetCurrentInteractionMode() == interaction.Place:
            interaction.SetCurrentInteractionMode(interaction.ViewTransform)
        markupsNode.SetControlPointLabelFormat(labelFormat)
    markupsNode.SetDisplayVisibility(True)
    selection.SetReferenceActivePlaceNodeClassName(markupsNode.GetClassName())
    selection.SetReferenceActivePlaceNodeID(markupsNode.GetID())
    interaction.SetPlaceModePersistence(1 if persistent else 0)
    interaction.SetCurrentInteractionMode(interaction.Place)


def loadTerminology() -> None:
    """Make Slicer's terminology logic know VOILA's context (all 117 structures, also on Slicer
    versions whose DICOM master list lacks some); idempotent. Without the application (slicer-core)
    there is no terminology module to tell."""
    import slicer

    modules = getattr(slicer, "modules", None)
    if modules is None or not hasattr(modules, "terminologies"):
        return
    from VOILASegmenterLib.terminology import load_terminology

    load_terminology(modules.terminologies.logic())


class HeatmapOverwriteError(OutputError):
    """The chosen heatmap volume is not one VOILA created (e.g. the input CT)."""


def checkHeatmapTarget(heatmapVolume, inputVolume) -> None:
    """VOILA writes its heatmap only into a heatmap volume it created, never into the input or any
    other volume of the user's."""
    if heatmapVolume is inputVolume or (
        inputVolume is not None and heatmapVolume.GetID() and heatmapVolume.GetID() == inputVolume.GetID()
    ):
        raise HeatmapOverwriteError(
            f"'{heatmapVolume.GetName()}' is the input CT; the heatmap never replaces it: choose 'Create new'"
        )
    if heatmapVolume.GetAttribute(mrml_io.HEATMAP_ATTRIBUTE) != "1":
        raise HeatmapOverwriteError(
            f"'{heatmapVolume.GetName()}' is not a VOILA heatmap; VOILA writes only into heatmaps "
            "it created: choose one of those or 'Create new'"
        )
