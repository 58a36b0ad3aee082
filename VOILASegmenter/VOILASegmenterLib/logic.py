"""VOILASegmenterLogic: segment a CT volume node from typed structure names. Usable without the GUI.

    logic = VOILASegmenterLogic()
    outcome = logic.process(ctNode, ["liver", "spleen", "left kidney"], outputSegmentation=None)
    outcome.segmentation, outcome.heatmap, outcome.notFound

With ``waitForCompletion=False`` the model runs in a worker thread and ``process`` returns a
:class:`SegmentationJob` to poll from the main thread (the widget uses a ``qt.QTimer``). The worker
only sees numpy arrays; MRML is touched on the main thread, by ``poll()``/``finish()``, and only
after a successful, uncancelled run, so a cancelled or failed run leaves the scene as it was.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from voila.errors import Cancelled, InputImageError, PromptError, VoilaError

from VOILASegmenterLib import mrml_io

ProgressCallback = Callable[[float, str], None]


class JobAlreadyRunningError(VoilaError):
    """A segmentation is already running in this logic; wait for it or cancel it."""


class InputRemovedError(VoilaError):
    """The input volume left the scene (or changed size) while it was being segmented."""


@dataclass
class SegmentRecord:
    """One prompt's outcome as shown in the module's result table."""

    prompt: str
    name: str
    found: bool
    color: tuple[int, int, int]
    volumeMl: float
    confidence: float
    openVocabulary: bool
    segmentId: Optional[str] = None
    note: str = ""


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


def parse_prompts(prompts) -> list[str]:
    """Prompt texts from a list or from text separated by commas, semicolons or line breaks
    (:func:`voila.prompts.split_prompts`); checked, so an empty field fails before any work."""
    from voila.prompts import check_prompts, split_prompts

    texts = split_prompts(prompts or [])
    if not texts:
        raise PromptError("type at least one structure name, for example 'liver, spleen, left kidney'")
    check_prompts(texts)
    return texts


def _segment_key(prompt) -> str:
    """What makes a later run's segment "the same": the prompt's class key (the matched structure,
    else the normalised text; :func:`voila.vocabulary.class_key`)."""
    return f"structure:{prompt.key}" if prompt.structure else f"text:{prompt.key}"


class SegmentationJob:
    """One segmentation run. ``poll()`` returns ``None`` while it runs and the outcome once applied."""

    def __init__(self, logic: VOILASegmenterLogic, request: dict, progress: Optional[ProgressCallback]):
        self._logic = logic
        self._request = request
        self._progress = progress
        self._cancelEvent = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._synchronous = False
        self._fraction = 0.0
        self._stage = "Starting"
        self._reported: Optional[tuple[float, str]] = None
        self._result = None
        self._workerError: Optional[BaseException] = None
        self._outcome: Optional[SegmentationOutcome] = None
        self._startTime = time.monotonic()
        self._endTime: Optional[float] = None
        self.done = False
        self.error: Optional[BaseException] = None

    @property
    def fraction(self) -> float:
        return self._fraction

    @property
    def stage(self) -> str:
        return self._stage

    @property
    def elapsedSeconds(self) -> float:
        return (self._endTime or time.monotonic()) - self._startTime

    @property
    def etaSeconds(self) -> Optional[float]:
        """Remaining time extrapolated from progress so far; ``None`` until there is enough to go on."""
        if self.done or self._fraction < 0.02:
            return None
        return self.elapsedSeconds * (1.0 - self._fraction) / self._fraction

    @property
    def running(self) -> bool:
        return not self.done

    def cancel(self) -> None:
        """Ask the run to stop; the next ``poll()`` after it stopped raises :class:`Cancelled`."""
        self._cancelEvent.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="VOILASegmenter", daemon=True)
        self._thread.start()

    def runHere(self) -> SegmentationOutcome:
        self._synchronous = True
        self._work()
        return self.poll()

    def finish(self, timeout: Optional[float] = None) -> Optional[SegmentationOutcome]:
        """Wait (blocking the caller) for the worker, then apply on this thread like ``poll()``."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.poll()

    def poll(self) -> Optional[SegmentationOutcome]:
        """Main thread only. ``None`` while running; then applies the result once and returns it.

        Raises the run's error (a :class:`VoilaError` such as :class:`Cancelled`) when it failed.
        """
        if self.done:
            if self.error is not None:
                raise self.error
            return self._outcome
        if self._thread is not None and self._thread.is_alive():
            self._report()
            return None
        self.done = True
        self._endTime = time.monotonic()
        self._logic._jobFinished(self)
        try:
            if self._workerError is not None:
                raise self._workerError
            if self._cancelEvent.is_set() or self._result is None:
                raise Cancelled("segmentation cancelled; the scene was left unchanged")
            self._stage = "Writing segments"
            self._report()
            self._outcome = self._logic._apply(self._request, self._result, self.elapsedSeconds)
        except BaseException as error:
            self.error = error
            raise
        self._fraction, self._stage = 1.0, "Done"
        self._report()
        return self._outcome

    def _report(self) -> None:
        state = (round(self._fraction, 3), self._stage)
        if self._progress is not None and state != self._reported:
            self._reported = state
            self._progress(self._fraction, self._stage)

    def _onProgress(self, fraction: float) -> None:
        # Called by voila on the worker thread: only numbers are stored here.
        self._fraction = 0.05 + 0.9 * min(max(float(fraction), 0.0), 1.0)
        if self._synchronous:
            self._report()

    def _work(self) -> None:
        request = self._request
        try:
            self._stage = "Loading model"
            if self._synchronous:
                self._report()
            segmenter = self._logic.segmenter(request["modelPath"], request["device"])
            if self._cancelEvent.is_set():
                return
            self._fraction, self._stage = 0.05, "Segmenting"
            self._result = segmenter.segment(
                request["image"],
                request["affine"],
                request["prompts"],
                heatmap=request["computeHeatmap"],
                progress=self._onProgress,
                cancel=self._cancelEvent,
                overlap=request["overlap"],
            )
        except BaseException as error:
            self._workerError = error


class VOILASegmenterLogic:
    """GUI-free logic. Keeps loaded models warm between runs, one per ``(modelPath, device)``."""

    def __init__(self):
        self._segmenters: dict[tuple[Optional[str], str], Any] = {}
        self._segmentersLock = threading.Lock()
        self._job: Optional[SegmentationJob] = None

    @property
    def job(self) -> Optional[SegmentationJob]:
        """The running job, if any."""
        return self._job

    def segmenter(self, modelPath=None, device: str = "auto"):
        """A loaded ``voila.Segmenter`` (cached); thread-safe, so the worker may call it."""
        key = (str(modelPath) if modelPath else None, device or "auto")
        with self._segmentersLock:
            if key not in self._segmenters:
                from voila.infer.segmenter import Segmenter

                self._segmenters[key] = Segmenter.load(model_path=key[0], device=key[1])
            return self._segmenters[key]

    def clearModels(self) -> None:
        """Forget loaded models (frees their memory once nothing else holds them)."""
        with self._segmentersLock:
            self._segmenters.clear()

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def process(
        self,
        inputVolume,
        prompts,
        outputSegmentation=None,
        heatmapVolume=None,
        modelPath=None,
        device: str = "auto",
        progress: Optional[ProgressCallback] = None,
        waitForCompletion: bool = True,
        overlap: float = 0.5,
        cancel: Optional[threading.Event] = None,
        computeHeatmap: bool = True,
        showHeatmap: bool = True,
        heatmapOpacity: float = 0.4,
    ):
        """Segment ``prompts`` in ``inputVolume`` into ``outputSegmentation`` (created when ``None``).

        One segment per found prompt, named after the matched structure (or the prompt for free
        text), with its colour and DICOM terminology; running again with the same prompts replaces
        those segments in place and leaves other segments alone. The complexity heatmap goes into
        ``heatmapVolume`` (created when ``None``) on the input grid. ``progress(fraction, stage)`` is
        always called on the caller's thread. ``cancel`` (a ``threading.Event``) stops the run.

        Returns a :class:`SegmentationOutcome`, or with ``waitForCompletion=False`` a started
        :class:`SegmentationJob`.
        """
        if self._job is not None and not self._job.done:
            raise JobAlreadyRunningError(
                "a segmentation is already running; wait for it to finish or press Cancel first"
            )
        if inputVolume is None or inputVolume.GetScene() is None:
            raise InputImageError("select an input CT volume that is loaded in the scene")
        image, affine = mrml_io.volume_to_numpy(inputVolume)
        request = {
            "inputVolume": inputVolume,
            "inputShape": image.shape,
            "image": image,
            "affine": affine,
            "prompts": parse_prompts(prompts),
            "outputSegmentation": outputSegmentation,
            "heatmapVolume": heatmapVolume,
            "modelPath": modelPath,
            "device": device or "auto",
            "overlap": float(overlap),
            "computeHeatmap": bool(computeHeatmap),
            "showHeatmap": bool(showHeatmap),
            "heatmapOpacity": float(heatmapOpacity),
        }
        job = SegmentationJob(self, request, progress)
        if cancel is not None:
            job._cancelEvent = cancel
        self._job = job
        if waitForCompletion:
            return job.runHere()
        job.start()
        return job

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
        records = self._writeSegments(segmentationNode, inputVolume, result, messages)
        heatmapNode = None
        if result.heatmap is not None:
            heatmapNode = request["heatmapVolume"]
            if heatmapNode is not None and not mrml_io.node_in_scene(heatmapNode):
                heatmapNode = None
            if heatmapNode is None:
                heatmapNode = scene.AddNewNodeByClass(
                    "vtkMRMLScalarVolumeNode",
                    scene.GenerateUniqueName(f"{inputVolume.GetName()} VOILA complexity"),
                )
            mrml_io.write_heatmap(heatmapNode, np.asarray(result.heatmap, dtype=np.float32), inputVolume)
            if request["showHeatmap"]:
                mrml_io.show_heatmap(scene, inputVolume, heatmapNode, request["heatmapOpacity"])
        notFound = [record.prompt for record in records if not record.found]
        if notFound:
            messages.append("not found: " + ", ".join(notFound))
        return SegmentationOutcome(segmentationNode, heatmapNode, records, elapsedSeconds, messages, result)

    def _writeSegments(
        self, segmentationNode, inputVolume, result, messages: list[str]
    ) -> list[SegmentRecord]:
        ijkToRas = mrml_io.ijk_to_ras(inputVolume)
        existing = mrml_io.segment_ids_by_prompt(segmentationNode)
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
                )
                if prompt.found:
                    record.segmentId = mrml_io.write_segment(
                        segmentationNode,
                        existing.get(key),
                        labelmap == prompt.label,
                        ijkToRas,
                        name=name,
                        color=record.color,
                        prompt_key=key,
                        terminology_entry=mrml_io.terminology_string(prompt.snomed),
                        confidence=record.confidence,
                    )
                elif key in existing:
                    # A stale segment would read as this run's answer; the table reports the miss.
                    segmentationNode.GetSegmentation().RemoveSegment(existing[key])
                    messages.append(f"removed the earlier segment of '{prompt.prompt}' (not found this time)")
                records.append(record)
        finally:
            segmentationNode.EndModify(wasModifying)
        return records
