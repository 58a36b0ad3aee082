"""VOILASegmenter: segment CT structures by typing their names (VOILA, AAAI 2025).

The widget is a thin shell: everything that touches voxels lives in ``VOILASegmenterLib``
(GUI-free, usable from the Python console) and in the ``voila`` package.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Offered in the pick-list; any other name can be typed (the completer knows the whole vocabulary).
COMMON_STRUCTURES = (
    "liver",
    "spleen",
    "pancreas",
    "stomach",
    "gallbladder",
    "left kidney",
    "right kidney",
    "aorta",
    "inferior vena cava",
    "urinary bladder",
    "heart",
    "esophagus",
    "colon",
    "small bowel",
    "duodenum",
    "left lung upper lobe",
    "right lung lower lobe",
    "trachea",
    "L1 vertebra",
    "sacrum",
)
CUSTOM_MODEL = "custom"
# The heatmaps the module offers, by kind (voila.infer.results.HEATMAP_KINDS says what each holds).
HEATMAP_CHOICES = (
    ("review", _("Review map (where to double-check)")),
    ("complexity", _("CAS complexity (raw)")),
)

POLL_INTERVAL_MS = 200
# A placed or moved point, or a changed box, re-segments this long after the last change, so a
# drag or a quick series of clicks costs one run, not one per mouse event.
REFINE_DELAY_MS = 300


class VOILASegmenter(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VOILA Segmenter")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["VOILA for 3D Slicer contributors"]
        self.parent.helpText = _(
            """Segment structures in a CT volume by typing their names (for example <i>liver, spleen,
left kidney</i>). Names of structures the model was trained on are matched to the model's vocabulary
(synonyms, side words and abbreviations are understood); other text is tried as an open-vocabulary
prompt. Each found structure becomes a segment with standard colour and DICOM/SNOMED terminology.
The <b>review map</b> shows where to double-check: a value <i>v</i> means that about <i>v</i> of the
voxels with that value were labelled wrongly on patients the model was not trained on (0.3: about 3 in
10 such voxels were wrong). The result table gives each structure's <b>predicted Dice</b> and marks
<b>CHECK</b> where a structure deserves a second look (its tooltip says why: a low predicted Dice, or
a place far from where the structure lay in the training data). Under <b>Outputs</b> the raw
<b>CAS complexity</b> map (where the model's complexity decoder expects hard voxels; not calibrated)
can be chosen instead.<br><br>
<b>Refine with clicks</b>: choose a structure, then place <i>Inside</i> points on it, <i>Outside</i>
points on what it must leave out (their labels start with "-"), or a <i>Box</i> it must stay in.
Any name works with a click. Each change re-segments in about a second, from the encoding the
worker keeps of the last volumes.<br><br>
<b>Teach</b> the model from your own segmentations: correct a result in Segment Editor (or draw
one), choose that segmentation under <i>Teach</i>, check the segments to learn, optionally
<i>Add pair</i> for more CT + segmentation pairs, and press <i>Teach</i>. A segment named after a
structure the model knows (<i>liver</i>, <i>left kidney</i>) teaches that structure; any other name
(<i>Tumor core</i>) becomes a new structure that can then be typed like any other. The model chosen
under <b>Model and device</b> is the starting point and is never changed: training runs in the
background for the minutes set (<i>Stop</i> ends it sooner and keeps what was learned), and the new
model is saved in your VOILA model folder, listed under <b>Model and device</b> and selected.<br><br>
Train a model on your own labelled CTs from the Python console:
<pre>
import voila
voila.train("my_training.yaml")   # writes a .safetensors model file
</pre>
then choose <i>Custom model file</i> under <b>Model and device</b>.
See <a href="https://github.com/voila-slicer/SlicerVOILA">the project page</a>. Not for clinical use."""
        )
        self.parent.acknowledgementText = _(
            """Based on VOILA: Complexity-Aware Universal Segmentation of CT images by Voxel Interacting
with Language (Wan, Gao, Pang, Ding; AAAI 2025). Vocabulary, colours and terminology follow
TotalSegmentator (Wasserthal et al., Radiology: AI 2023). Built on MONAI, PyTorch and open_clip."""
        )


@parameterNodeWrapper
class VOILASegmenterParameterNode:
    """The module's settings; saved with the scene.

    inputVolume: CT to segment. prompts: comma-separated structure names. model: registry name or
    "custom"; modelPath: the custom .safetensors file. device: "auto", "cpu", "cuda:0", "mps".
    overlap: sliding-window overlap. outputSegmentation/heatmapVolume: results (created when empty).
    heatmapKind: "review" (the review map) or "complexity" (raw CAS complexity); computed only
    while showHeatmap is on. teachSegmentation: the segmentation of inputVolume to teach from;
    teachMinutes: how long a teaching run trains at most.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    prompts: str = "liver, spleen, left kidney"
    model: str = ""
    modelPath: str = ""
    device: str = "auto"
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    outputSegmentation: vtkMRMLSegmentationNode
    heatmapVolume: vtkMRMLScalarVolumeNode
    showHeatmap: bool = True
    heatmapKind: str = "review"
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.4
    teachSegmentation: vtkMRMLSegmentationNode
    teachMinutes: Annotated[int, WithinRange(1, 600)] = 10


def _formatSeconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class VOILASegmenterWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._modelEntries = []
        self._librariesReady = False
        self._segmentAfterDownload = False
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollJob)
        self._refineTimer = qt.QTimer()
        self._refineTimer.setSingleShot(True)
        self._refineTimer.setInterval(REFINE_DELAY_MS)
        self._refineTimer.connect("timeout()", self.onRefine)
        self._refineQueued = False  # a change came during a run: one re-run when it ends
        self._jobRefines = False  # the running job came from clicks: errors go to the status line
        self._observedVolume = None
        self._lastSpatialPrompts = None  # (volume ID, points, boxes) of the last run started
        self._jobTeaches = False  # the running job is a teaching run
        self._userModelPaths: set[str] = set()  # the taught models the model chooser lists
        # Pairs to teach from besides the current choice: (CT volume ID, segmentation ID, [segment ID]).
        self._teachPairs: list[tuple[str, str, list[str]]] = []
        self._observedTeachSegmentation = None
        self._listedTeachSegmentationID = None

    # --- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VOILASegmenter.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.ui.commonStructuresComboBox.addItem(_("Add a common structure..."))
        self.ui.commonStructuresComboBox.addItems(list(COMMON_STRUCTURES))
        # The heatmap goes only into a heatmap VOILA created (or a new one): never into a user's volume.
        self.ui.heatmapVolumeSelector.addAttribute("vtkMRMLScalarVolumeNode", "VOILA.ComplexityHeatmap", "1")
        for kind, label in HEATMAP_CHOICES:
            self.ui.heatmapKindComboBox.addItem(label, kind)
        self.ui.progressBar.setVisible(False)
        self.ui.resultsTableWidget.setVisible(False)
        self.ui.resultsTableWidget.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        self.ui.teachPairsTableWidget.setVisible(False)
        self.ui.teachPairsTableWidget.horizontalHeader().setSectionResizeMode(2, qt.QHeaderView.Stretch)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.commonStructuresComboBox.connect("activated(int)", self.onCommonStructureChosen)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.showHeatmapCheckBox.connect("toggled(bool)", self.onHeatmapDisplayChanged)
        self.ui.heatmapKindComboBox.connect("currentIndexChanged(int)", self.onHeatmapKindChanged)
        self.ui.heatmapOpacitySliderWidget.connect("valueChanged(double)", self.onHeatmapDisplayChanged)
        self.ui.heatmapColorTableComboBox.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.onHeatmapColorChanged
        )
        self.ui.insidePointButton.connect("clicked()", self.onInsidePoint)
        self.ui.outsidePointButton.connect("clicked()", self.onOutsidePoint)
        self.ui.boxButton.connect("clicked()", self.onBox)
        self.ui.clearClicksButton.connect("clicked()", self.onClearClicks)
        self.ui.teachSegmentsListWidget.connect("itemChanged(QListWidgetItem*)", self.onTeachSegmentChecked)
        self.ui.teachAddPairButton.connect("clicked()", self.onAddTeachPair)
        self.ui.teachRemovePairButton.connect("clicked()", self.onRemoveTeachPair)
        self.ui.teachButton.connect("clicked()", self.onTeachButton)

        self._setUpLibraries()
        self.initializeParameterNode()

    def _setUpLibraries(self) -> bool:
        """Import the logic if its Python packages are present; otherwise say what Segment will do."""
        try:
            from VOILASegmenterLib.environment import ensure_voila_importable, missing_packages

            if not ensure_voila_importable():
                self.ui.statusLabel.text = _("The voila package is missing: reinstall the VOILA extension.")
                return False
            missing = missing_packages()
            if missing:
                self.ui.statusLabel.text = _(
                    "First use: {packages} will be installed when you press Segment (you will be asked first)."
                ).format(packages=", ".join(missing))
                return False
            from VOILASegmenterLib.logic import VOILASegmenterLogic
        except ImportError as error:
            self.ui.statusLabel.text = _("Cannot load VOILA: {error}").format(error=error)
            return False
        if self.logic is None:
            self.logic = VOILASegmenterLogic()
        from VOILASegmenterLib.logic import loadTerminology

        loadTerminology()  # segment terminology pickers know all 117 structures from the start
        self.ui.teachHintLabel.text = _(
            "Taught models are saved in {folder} and listed under Model and device."
        ).format(folder=self.logic.userModelDir)
        self._populateModels()
        self._populateDevices()
        self._populateCompleter()
        self._librariesReady = True
        return True

    def _populateModels(self) -> None:
        from VOILASegmenterLib import models

        self._modelEntries = models.load_registry()
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for entry in self._modelEntries:
            self.ui.modelComboBox.addItem(entry.name, entry.name)
        taught = models.user_models(self.logic.userModelDir)  # newest first
        self._userModelPaths = {str(path) for path in taught}
        for path in taught:
            self.ui.modelComboBox.addItem(_("{name} (your model)").format(name=path.stem), str(path))
        self.ui.modelComboBox.addItem(_("Custom model file"), CUSTOM_MODEL)
        self.ui.modelComboBox.blockSignals(wasBlocked)

    def _populateDevices(self) -> None:
        from voila.device import device_choices

        wasBlocked = self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.clear()
        for device, label in device_choices():
            self.ui.deviceComboBox.addItem(label, device)
        self.ui.deviceComboBox.blockSignals(wasBlocked)

    def _populateCompleter(self) -> None:
        """Complete the word being typed after the last comma from every name the vocabulary knows."""
        from voila.vocabulary import Vocabulary

        try:
            vocabulary = Vocabulary.load()
        except Exception as error:
            logging.warning(f"VOILA: vocabulary not available for completion: {error}")
            return
        words = set()
        for structure in vocabulary:
            words.add(structure.display_name)
            words.update(structure.synonyms)
        self._completer = qt.QCompleter(sorted(words, key=str.lower))
        self._completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        self._completer.setFilterMode(qt.Qt.MatchContains)
        self._completer.setWidget(self.ui.promptsLineEdit)
        self._completer.connect("activated(QString)", self.onCompletionChosen)
        self.ui.promptsLineEdit.connect("textEdited(QString)", self.onPromptsEdited)

    # --- parameter node ------------------------------------------------------------------------

    def cleanup(self) -> None:
        self._timer.stop()
        self._refineTimer.stop()
        if self.job is not None:
            self.job.cancel()
        if self.logic is not None:
            self.logic.shutdown()  # the worker process and the models it holds
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        if self.job is not None:
            self.job.cancel()
        self._refineTimer.stop()
        self._observeMarkups(None)
        self._observeTeachSegmentation(None)
        self._teachPairs = []
        self._showTeachPairs()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        if self.logic is None:  # Python packages not set up yet: the parameters wait for them
            return
        self.setParameterNode(VOILASegmenterParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.GetAttribute("VOILA.ComplexityHeatmap"):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode: Optional[VOILASegmenterParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._restoreChoices()
            self._updateGui()

    def _restoreChoices(self) -> None:
        node = self._parameterNode
        modelIndex = self.ui.modelComboBox.findData(node.model) if node.model else 0
        self.ui.modelComboBox.setCurrentIndex(max(modelIndex, 0))
        self.ui.modelPathLineEdit.currentPath = node.modelPath
        deviceIndex = self.ui.deviceComboBox.findData(node.device)
        self.ui.deviceComboBox.setCurrentIndex(max(deviceIndex, 0))
        kindIndex = self.ui.heatmapKindComboBox.findData(node.heatmapKind)
        self.ui.heatmapKindComboBox.setCurrentIndex(max(kindIndex, 0))
        self.onModelChanged()

    def _updateGui(self, caller=None, event=None) -> None:
        node = self._parameterNode
        running = self.job is not None
        if running and not self._jobTeaches:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; the scene is left unchanged.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Segment")
            ready = bool(node and node.inputVolume and node.prompts.strip())
            self.ui.applyButton.enabled = ready and not running
            if running:
                self.ui.applyButton.toolTip = _("VOILA is teaching a model: wait for it, or stop it.")
            else:
                self.ui.applyButton.toolTip = (
                    _("Segment the listed structures.")
                    if ready
                    else _("Select a CT volume and type structure names.")
                )
        custom = self.ui.modelComboBox.currentData == CUSTOM_MODEL
        self.ui.modelPathLineEdit.setVisible(custom)
        self.ui.modelPathLabel.setVisible(custom)
        heatmap = node.heatmapVolume if node else None
        self.ui.heatmapKindComboBox.enabled = bool(node and node.showHeatmap)
        self.ui.heatmapColorTableComboBox.enabled = heatmap is not None
        if heatmap is not None and heatmap.GetDisplayNode():
            wasBlocked = self.ui.heatmapColorTableComboBox.blockSignals(True)
            self.ui.heatmapColorTableComboBox.setCurrentNode(heatmap.GetDisplayNode().GetColorNode())
            self.ui.heatmapColorTableComboBox.blockSignals(wasBlocked)
        self._updateRefineGui()
        self._updateTeachGui()

    # --- refine with clicks ----------------------------------------------------------------------

    def _updateRefineGui(self) -> None:
        """The structure chooser lists the typed structures; a new input volume's points and boxes
        are watched (what is already placed there counts as run, so only changes re-segment)."""
        node = self._parameterNode
        volume = node.inputVolume if node else None
        if not self._librariesReady:
            volume = None
        if volume is not self._observedVolume:
            self._observeMarkups(volume)
            self._lastSpatialPrompts = self._spatialPromptsNow()
        from_text = []
        if self._librariesReady and node:
            from voila.prompts import split_prompts

            from_text = split_prompts(node.prompts)
        combo = self.ui.refinePromptComboBox
        if [combo.itemText(index) for index in range(combo.count)] != from_text:
            current = combo.currentText
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            combo.addItems(from_text)
            combo.setCurrentIndex(max(combo.findText(current), 0))
            combo.blockSignals(wasBlocked)
        ready = volume is not None and combo.count > 0
        for button in (
            self.ui.insidePointButton,
            self.ui.outsidePointButton,
            self.ui.boxButton,
            self.ui.clearClicksButton,
        ):
            button.enabled = ready

    def _observeMarkups(self, volume) -> None:
        """Watch every VOILA point list and box of ``volume`` (and nothing else)."""
        self.removeObservers(self.onMarkupsChanged)
        self._observedVolume = volume
        if volume is None or self.logic is None:
            return
        events = (
            slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
            slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
            slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
            vtk.vtkCommand.ModifiedEvent,  # an ROI's centre or size
        )
        for markups in self.logic.voilaMarkups(volume):
            for event in events:
                self.addObserver(markups, event, self.onMarkupsChanged)

    def _spatialPromptsNow(self):
        node = self._parameterNode
        if self.logic is None or not node or not node.inputVolume:
            return None
        points, boxes = self.logic.spatialPrompts(node.inputVolume, node.prompts)
        return node.inputVolume.GetID(), points, boxes

    def _refineTarget(self):
        """``(volume, structure)`` the refine buttons act on, or ``(None, None)``."""
        node = self._parameterNode
        prompt = self.ui.refinePromptComboBox.currentText.strip()
        if self.logic is None or not node or not node.inputVolume or not prompt:
            return None, None
        return node.inputVolume, prompt

    def onInsidePoint(self) -> None:
        self._placePoints(excluding=False)

    def onOutsidePoint(self) -> None:
        self._placePoints(excluding=True)

    def _placePoints(self, excluding: bool) -> None:
        volume, prompt = self._refineTarget()
        if volume is None:
            return
        self.logic.placePoints(volume, prompt, excluding=excluding)
        self._observeMarkups(volume)

    def onBox(self) -> None:
        volume, prompt = self._refineTarget()
        if volume is None:
            return
        self.logic.placeBox(volume, prompt)
        self._observeMarkups(volume)

    def onClearClicks(self) -> None:
        volume, prompt = self._refineTarget()
        if volume is None:
            return
        self.logic.clearPromptMarkups(volume, prompt)
        self._observeMarkups(volume)
        self._refineTimer.start()

    def onMarkupsChanged(self, caller=None, event=None) -> None:
        self._refineTimer.start()  # (re)starts: one run once the changes pause

    def onRefine(self) -> None:
        """Re-segment with the points and boxes as they are now; never a second run at once."""
        if self.job is not None:
            self._refineQueued = True
            return
        node = self._parameterNode
        if not self._librariesReady or not node or not node.inputVolume or not node.prompts.strip():
            return
        if self._spatialPromptsNow() == self._lastSpatialPrompts:
            return  # e.g. the preview point that follows the mouse moved: nothing was placed
        self._run(refining=True)

    # --- prompts ---------------------------------------------------------------------------------

    def _currentWord(self, text: str) -> str:
        return text.split(",")[-1].strip()

    def onPromptsEdited(self, text: str) -> None:
        word = self._currentWord(text)
        if len(word) < 2:
            self._completer.popup().hide()
            return
        self._completer.setCompletionPrefix(word)
        self._completer.complete()

    def onCompletionChosen(self, completion: str) -> None:
        parts = self.ui.promptsLineEdit.text.split(",")[:-1]
        parts.append(completion)
        self._setPrompts(", ".join(part.strip() for part in parts if part.strip()))

    def onCommonStructureChosen(self, index: int) -> None:
        if index <= 0:
            return
        name = self.ui.commonStructuresComboBox.itemText(index)
        current = [part.strip() for part in self.ui.promptsLineEdit.text.split(",") if part.strip()]
        if name.lower() not in (part.lower() for part in current):
            current.append(name)
        self._setPrompts(", ".join(current))
        self.ui.commonStructuresComboBox.setCurrentIndex(0)

    def _setPrompts(self, text: str) -> None:
        self.ui.promptsLineEdit.text = text
        if self._parameterNode:
            self._parameterNode.prompts = text

    # --- model and device ------------------------------------------------------------------------

    def _selectedEntry(self):
        name = self.ui.modelComboBox.currentData
        return next((entry for entry in self._modelEntries if entry.name == name), None)

    def _selectedUserModel(self):
        """The chosen taught model file (listed from the user model folder), else None."""
        path = self.ui.modelComboBox.currentData
        return path if path in self._userModelPaths else None

    def onModelChanged(self, index=None) -> None:
        if self._parameterNode and self.ui.modelComboBox.currentData is not None:
            self._parameterNode.model = self.ui.modelComboBox.currentData
        self._updateGui()
        self._showModelCard()

    def onModelPathChanged(self, path: str) -> None:
        if self._parameterNode:
            self._parameterNode.modelPath = path
        self._showModelCard()

    def onDeviceChanged(self, index: int) -> None:
        device = self.ui.deviceComboBox.currentData or "auto"
        if self._parameterNode:
            self._parameterNode.device = device
        hints = {
            "auto": _("Uses the first GPU if PyTorch sees one, otherwise the CPU."),
            "cpu": _("Works everywhere; a full-body CT takes minutes. Needs about 4 GB of free RAM."),
        }
        self.ui.deviceHintLabel.text = hints.get(
            device, _("GPU: seconds per CT. About 4 GB of GPU memory is enough for the default quality.")
        )

    def _modelPathIfAvailable(self):
        """The selected model file if it is already on this computer (no download)."""
        if self.ui.modelComboBox.currentData == CUSTOM_MODEL:
            path = self.ui.modelPathLineEdit.currentPath
            return path or None
        if self._selectedUserModel():
            return self._selectedUserModel()
        entry = self._selectedEntry()
        if entry is None:
            return None
        from VOILASegmenterLib import models

        return models.cached_model_path(entry, self._modelCacheDir())

    def _modelCacheDir(self) -> str:
        return os.path.join(slicer.app.cachePath, "VOILA", "models")

    def _showModelCard(self) -> None:
        if not self._librariesReady:
            return
        entry = self._selectedEntry()
        path = self._modelPathIfAvailable()
        if path is None:
            self.ui.modelCardLabel.text = (
                entry.description + "\n" + _("Will be downloaded when you first press Segment.")
                if entry is not None
                else _("Choose a .safetensors model file.")
            )
            return
        from voila.errors import VoilaError
        from VOILASegmenterLib import models

        try:
            self.ui.modelCardLabel.text = models.describe_card(models.model_card(path))
        except VoilaError as error:
            self.ui.modelCardLabel.text = str(error)

    def _modelToRun(self):
        """``(path, None)`` for a model on this computer (``path`` None: the default model), or
        ``(None, downloadRequest)`` when the chosen registered model must be downloaded first."""
        if self.ui.modelComboBox.currentData == CUSTOM_MODEL:
            path = self.ui.modelPathLineEdit.currentPath
            if not path:
                raise ValueError(_("choose a model file (.safetensors) or select a registered model"))
            return path, None
        if self._selectedUserModel():
            return self._selectedUserModel(), None
        entry = self._selectedEntry()
        if entry is None:
            return None, None
        from VOILASegmenterLib import models

        path, request = models.prepare_download(entry, self._modelCacheDir())
        return (str(path) if path else None), request

    def _askDownload(self) -> bool:
        entry = self._selectedEntry()
        return slicer.util.confirmOkCancelDisplay(
            _("Download the VOILA model '{name}' (licence: {licence})?\n{url}").format(
                name=entry.name, licence=entry.license, url=entry.url
            )
        )

    # --- running ---------------------------------------------------------------------------------

    def _ensureDependencies(self) -> bool:
        if self._librariesReady:
            return True
        from VOILASegmenterLib.environment import DependencyError, install_dependencies

        # No busy cursor here: the consent dialog must look and behave like any dialog.
        self.ui.statusLabel.text = _("Setting up VOILA's Python packages...")
        slicer.app.processEvents()
        try:
            installed = install_dependencies(
                lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle=_("VOILA setup"))
            )
        except DependencyError as error:
            slicer.util.errorDisplay(str(error))
            return False
        if not installed:
            self.ui.statusLabel.text = _("VOILA cannot run without its Python packages.")
            return False
        return self._setUpLibraries()

    def onApplyButton(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            self.ui.applyButton.enabled = False
            return
        if not self._ensureDependencies():
            return
        self._run(refining=False)

    def _run(self, refining: bool) -> None:
        """Start a run (the model's download first, when needed and agreed). A run started by
        clicks (``refining``) reports problems in the status line, not in a dialog that would
        interrupt placing points."""
        from voila.errors import VoilaError

        try:
            modelPath, downloadRequest = self._modelToRun()
            if downloadRequest is not None:
                if refining:
                    self.ui.statusLabel.text = _("Press Segment first: the chosen model must be downloaded.")
                    return
                if not self._askDownload():
                    self.ui.statusLabel.text = _("The model was not downloaded; choose another model.")
                    return
                # the download runs in the worker process, with progress and Cancel; then Segment
                self.job = self.logic.downloadModel(downloadRequest, progress=self.onProgress)
                self._segmentAfterDownload = True
            else:
                self._startSegmentation(modelPath)
        except (VoilaError, ValueError) as error:
            if refining:
                self.ui.statusLabel.text = _("Failed: {error}").format(error=error)
            else:
                slicer.util.errorDisplay(str(error))
            return
        self._jobRefines = refining
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = _("Starting...")
        self._timer.start()
        self._updateGui()

    def _startSegmentation(self, modelPath) -> None:
        node = self._parameterNode
        self._segmentAfterDownload = False
        spatial = self._spatialPromptsNow()
        points, boxes = spatial[1:] if spatial else ({}, {})
        self.job = self.logic.process(
            node.inputVolume,
            node.prompts,
            node.outputSegmentation,
            heatmapVolume=node.heatmapVolume,
            modelPath=modelPath,
            device=node.device,
            progress=self.onProgress,
            waitForCompletion=False,
            overlap=node.overlap,
            # only when shown; the CAS complexity map costs about a third of a run on a new volume
            heatmapKind=node.heatmapKind if node.showHeatmap else None,
            showHeatmap=node.showHeatmap,
            heatmapOpacity=node.heatmapOpacity,
            points=points,
            boxes=boxes,
        )
        self._lastSpatialPrompts = spatial

    def onProgress(self, fraction: float, stage: str) -> None:
        self.ui.progressBar.value = int(fraction * 1000)
        job = self.job
        if job is None:
            return
        self.ui.statusLabel.text = _("{stage}: {percent}% - {elapsed} elapsed, about {eta} left").format(
            stage=_(stage),
            percent=int(fraction * 100),
            elapsed=_formatSeconds(job.elapsedSeconds),
            eta=_formatSeconds(job.etaSeconds),
        )

    def onPollJob(self) -> None:
        job = self.job
        if job is None:
            self._timer.stop()
            return
        from voila.errors import Cancelled, VoilaError

        refining = self._jobRefines
        try:
            outcome = job.poll()
        except Cancelled:
            if self._jobTeaches:
                self._jobEnded(_("Stopped before the training began; no model was saved."))
            else:
                self._jobEnded(_("Cancelled; nothing was changed."))
            return
        except VoilaError as error:
            self._jobEnded(_("Failed: {error}").format(error=error))
            if not refining:
                slicer.util.errorDisplay(str(error))
            return
        except Exception as error:
            teaching = self._jobTeaches
            logging.exception("VOILA teaching failed" if teaching else "VOILA segmentation failed")
            self._jobEnded(_("Failed: {error}").format(error=error))
            if not refining:
                failed = _("Teaching failed: {error}") if teaching else _("Segmentation failed: {error}")
                slicer.util.errorDisplay(failed.format(error=error))
            return
        if outcome is None:
            return
        if self._jobTeaches:
            self._showTaughtModel(outcome)
            return
        if self._segmentAfterDownload:  # the model is here now: segment with it
            self._showModelCard()
            try:
                self._startSegmentation(outcome["path"])
            except VoilaError as error:
                self._jobEnded(_("Failed: {error}").format(error=error))
                slicer.util.errorDisplay(str(error))
            return
        self._parameterNode.outputSegmentation = outcome.segmentation
        if outcome.heatmap is not None:
            self._parameterNode.heatmapVolume = outcome.heatmap
        found = sum(1 for record in outcome.segments if record.found)
        message = _("{found} of {total} structures found in {time}.").format(
            found=found, total=len(outcome.segments), time=_formatSeconds(outcome.elapsedSeconds)
        )
        if outcome.messages:
            message += " " + "; ".join(outcome.messages)
        memory = self.logic.encodingMemory
        if memory is not None and memory.volumes:
            kept = (
                _("1 volume kept encoded ({size} MB).")
                if memory.volumes == 1
                else _("{count} volumes kept encoded ({size} MB).")
            )
            message += " " + kept.format(count=memory.volumes, size=round(memory.bytes / 1e6))
        self._jobEnded(message)
        self._showResults(outcome)

    def _jobEnded(self, message: str) -> None:
        self._timer.stop()
        self.job = None
        self._jobRefines = False
        self._jobTeaches = False
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = message
        self._updateGui()
        if self._refineQueued:  # points changed during the run: one more, with them as they are now
            self._refineQueued = False
            self._refineTimer.start()

    def _showResults(self, outcome) -> None:
        table = self.ui.resultsTableWidget
        table.setRowCount(len(outcome.segments))
        for row, record in enumerate(outcome.segments):
            colour = qt.QTableWidgetItem()
            colour.setBackground(qt.QBrush(qt.QColor(*record.color)))
            assessed = record.found and record.predictedDice is not None
            check = qt.QTableWidgetItem(_("CHECK") if record.found and record.check else "")
            cells = [
                qt.QTableWidgetItem(record.name + (" " + _("(free text)") if record.openVocabulary else "")),
                colour,
                qt.QTableWidgetItem(f"{record.volumeMl:.1f}" if record.found else "-"),
                qt.QTableWidgetItem(f"{record.confidence:.2f}" if record.found else "-"),
                qt.QTableWidgetItem(_("yes") if record.found else _("no")),
                qt.QTableWidgetItem(f"{record.predictedDice:.2f}" if assessed else "-"),
                check,
            ]
            if record.note:  # why it was not found
                cells[0].setToolTip(record.note)
                cells[4].setToolTip(record.note)
            if record.found and record.check:
                font = check.font()
                font.setBold(True)
                check.setFont(font)
                check.setToolTip(record.checkReason or _("Check this structure."))
            for column, cell in enumerate(cells):
                table.setItem(row, column, cell)
        table.setVisible(True)

    # --- teach -----------------------------------------------------------------------------------

    def _updateTeachGui(self) -> None:
        node = self._parameterNode
        segmentation = node.teachSegmentation if node else None
        if segmentation is not self._observedTeachSegmentation:
            self._observeTeachSegmentation(segmentation)
        teaching = self.job is not None and self._jobTeaches
        if teaching:
            self.ui.teachButton.text = _("Stop")
            self.ui.teachButton.toolTip = _("Stop teaching now; the model learned so far is saved.")
            self.ui.teachButton.enabled = True
        else:
            self.ui.teachButton.text = _("Teach")
            ready = self.job is None and bool(self._teachPairIDs())
            self.ui.teachButton.enabled = ready
            if self.job is not None:
                self.ui.teachButton.toolTip = _("VOILA is busy with a run; teach when it has finished.")
            elif ready:
                self.ui.teachButton.toolTip = _(
                    "Teach the model chosen under Model and device from the checked segments."
                )
            else:
                self.ui.teachButton.toolTip = _(
                    "Choose a CT volume, its segmentation and the segments to learn."
                )
        self.ui.teachAddPairButton.enabled = self._currentTeachPair() is not None
        self.ui.teachRemovePairButton.enabled = bool(self._teachPairs)

    def _observeTeachSegmentation(self, segmentation) -> None:
        """List ``segmentation``'s segments, and list them again whenever they change."""
        self.removeObservers(self.onTeachSegmentsChanged)
        self._observedTeachSegmentation = segmentation
        if segmentation is not None:
            for event in (
                slicer.vtkSegmentation.SegmentAdded,
                slicer.vtkSegmentation.SegmentRemoved,
                slicer.vtkSegmentation.SegmentModified,
            ):
                self.addObserver(segmentation, event, self.onTeachSegmentsChanged)
        self._listTeachSegments()

    def onTeachSegmentsChanged(self, caller=None, event=None) -> None:
        self._listTeachSegments()
        self._updateTeachGui()

    def _listTeachSegments(self) -> None:
        """One checkable row per segment; a segment stays checked while its segmentation is shown."""
        segmentation = self._observedTeachSegmentation
        segmentationID = segmentation.GetID() if segmentation is not None else None
        checked = (
            set(self._checkedSegmentIDs()) if segmentationID == self._listedTeachSegmentationID else set()
        )
        self._listedTeachSegmentationID = segmentationID
        listWidget = self.ui.teachSegmentsListWidget
        wasBlocked = listWidget.blockSignals(True)
        listWidget.clear()
        if segmentation is not None:
            segments = segmentation.GetSegmentation()
            for index in range(segments.GetNumberOfSegments()):
                segmentID = segments.GetNthSegmentID(index)
                item = qt.QListWidgetItem(segments.GetNthSegment(index).GetName())
                item.setData(qt.Qt.UserRole, segmentID)
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked if segmentID in checked else qt.Qt.Unchecked)
                listWidget.addItem(item)
        listWidget.blockSignals(wasBlocked)

    def _checkedSegmentIDs(self) -> list:
        listWidget = self.ui.teachSegmentsListWidget
        items = [listWidget.item(row) for row in range(listWidget.count)]
        return [item.data(qt.Qt.UserRole) for item in items if item.checkState() == qt.Qt.Checked]

    def onTeachSegmentChecked(self, item=None) -> None:
        self._updateTeachGui()

    def _currentTeachPair(self):
        """``(CT volume ID, segmentation ID, [segment ID])`` of the current choice, or None."""
        node = self._parameterNode
        segmentIDs = self._checkedSegmentIDs()
        if not node or not node.inputVolume or not node.teachSegmentation or not segmentIDs:
            return None
        return node.inputVolume.GetID(), node.teachSegmentation.GetID(), segmentIDs

    def _teachPairIDs(self) -> list:
        """The listed pairs, then the current choice unless it is listed already."""
        pairs = list(self._teachPairs)
        current = self._currentTeachPair()
        if current is not None and current not in pairs:
            pairs.append(current)
        return pairs

    def onAddTeachPair(self) -> None:
        """Keep the current CT, segmentation and checked segments as a pair; another CT and
        segmentation can then be chosen."""
        current = self._currentTeachPair()
        if current is not None and current not in self._teachPairs:
            self._teachPairs.append(current)
        self._showTeachPairs()
        self._updateTeachGui()

    def onRemoveTeachPair(self) -> None:
        row = self.ui.teachPairsTableWidget.currentRow()
        if 0 <= row < len(self._teachPairs):
            del self._teachPairs[row]
        elif self._teachPairs:
            self._teachPairs.pop()
        self._showTeachPairs()
        self._updateTeachGui()

    def _showTeachPairs(self) -> None:
        table = self.ui.teachPairsTableWidget
        table.setRowCount(len(self._teachPairs))
        scene = slicer.mrmlScene
        for row, (volumeID, segmentationID, segmentIDs) in enumerate(self._teachPairs):
            volume, segmentation = scene.GetNodeByID(volumeID), scene.GetNodeByID(segmentationID)
            segments = segmentation.GetSegmentation() if segmentation is not None else None
            names = [
                segments.GetSegment(segmentID).GetName()
                for segmentID in segmentIDs
                if segments is not None and segments.GetSegment(segmentID) is not None
            ]
            cells = (
                volume.GetName() if volume is not None else _("(removed)"),
                segmentation.GetName() if segmentation is not None else _("(removed)"),
                ", ".join(names),
            )
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        table.setVisible(bool(self._teachPairs))

    def onTeachButton(self) -> None:
        if self.job is not None:
            if self._jobTeaches:
                self.job.cancel()
                self.ui.statusLabel.text = _("Stopping after the current step; what was learned is saved...")
                self.ui.teachButton.enabled = False
            return
        if not self._ensureDependencies():
            return
        from voila.errors import VoilaError

        node = self._parameterNode
        scene = slicer.mrmlScene
        pairs = [
            (scene.GetNodeByID(volumeID), scene.GetNodeByID(segmentationID), segmentIDs)
            for volumeID, segmentationID, segmentIDs in self._teachPairIDs()
        ]
        try:
            basePath, downloadRequest = self._modelToRun()
            if downloadRequest is not None:
                raise ValueError(
                    _(
                        "the chosen model is not on this computer yet: press Segment once to download it, "
                        "or choose another model to teach"
                    )
                )
            self.job = self.logic.teach(
                pairs,
                basePath,
                minutes=node.teachMinutes,
                device=node.device,
                progress=self.onProgress,
                waitForCompletion=False,
            )
        except (VoilaError, ValueError) as error:
            slicer.util.errorDisplay(str(error))
            return
        self._jobTeaches = True
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = _("Teaching for up to {minutes} min...").format(minutes=node.teachMinutes)
        self._timer.start()
        self._updateGui()

    def _showTaughtModel(self, outcome) -> None:
        """List the new model under Model and device, select it and say what it learned."""
        self._populateModels()
        index = self.ui.modelComboBox.findData(str(outcome.modelPath))
        self.ui.modelComboBox.setCurrentIndex(max(index, 0))
        self.onModelChanged()
        added = ", ".join(outcome.addedClasses) or _("none")
        done = (
            _("Stopped after {minutes} min; what it learned was saved")
            if outcome.stopped
            else _("Taught in {minutes} min")
        )
        self._jobEnded(
            done.format(minutes=f"{outcome.minutes:.1f}")
            + " "
            + _("as '{name}', now selected under Model and device. New structures: {added}.").format(
                name=outcome.modelPath.stem, added=added
            )
        )

    # --- heatmap display -------------------------------------------------------------------------

    def onHeatmapKindChanged(self, index=None) -> None:
        """The kind applies from the next run (a run with clicks included)."""
        kind = self.ui.heatmapKindComboBox.currentData
        if self._parameterNode and kind:
            self._parameterNode.heatmapKind = kind

    def onHeatmapDisplayChanged(self, *args) -> None:
        node = self._parameterNode
        if not node or not node.heatmapVolume or not node.inputVolume:
            return
        from VOILASegmenterLib import mrml_io

        if self.ui.showHeatmapCheckBox.checked:
            mrml_io.show_heatmap(
                slicer.mrmlScene,
                node.inputVolume,
                node.heatmapVolume,
                self.ui.heatmapOpacitySliderWidget.value,
            )
        else:
            mrml_io.hide_heatmap(slicer.mrmlScene, node.heatmapVolume)

    def onHeatmapColorChanged(self, colorNode) -> None:
        node = self._parameterNode
        if colorNode is None or not node or not node.heatmapVolume or not node.heatmapVolume.GetDisplayNode():
            return
        node.heatmapVolume.GetDisplayNode().SetAndObserveColorNodeID(colorNode.GetID())


class VOILASegmenterTest(ScriptedLoadableModuleTest):
    """The slicer-core test flow (Testing/slicer/test_logic_mrml.py) inside the real application."""

    PROMPTS = ["liver", "spleen", "left kidney"]

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from VOILASegmenterLib.environment import dependency_report

        problem = dependency_report()  # also puts a source checkout's voila on sys.path
        if problem:
            self.fail(problem)  # not skipTest: ctest counts a skip as a pass
        self.setUp()
        self.test_segments_sample_ct()
        self.setUp()
        self.test_non_blocking_run_and_cancel()

    def _loadSampleCT(self):
        from voila.resources import SAMPLE_CT, resource_path

        return slicer.util.loadVolume(str(resource_path(SAMPLE_CT)))

    def test_segments_sample_ct(self):
        self.delayDisplay("Segmenting the sample CT")
        from VOILASegmenterLib.logic import VOILASegmenterLogic
        from VOILASegmenterLib.mrml_io import segment_terminology

        ct = self._loadSampleCT()
        outcome = VOILASegmenterLogic().process(ct, self.PROMPTS, None)
        segmentation = outcome.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 3)
        self.assertEqual(
            [segmentation.GetSegment(r.segmentId).GetName() for r in outcome.segments],
            ["liver", "spleen", "left kidney"],
        )
        self.assertIn(
            "SCT^10200004^Liver", segment_terminology(segmentation.GetSegment(outcome.segments[0].segmentId))
        )
        self.assertEqual(outcome.heatmap.GetImageData().GetDimensions(), ct.GetImageData().GetDimensions())
        self.delayDisplay("Sample CT segmented")

    def test_non_blocking_run_and_cancel(self):
        self.delayDisplay("Non-blocking run, then cancel")
        from voila.errors import Cancelled
        from VOILASegmenterLib.logic import VOILASegmenterLogic

        ct = self._loadSampleCT()
        logic = VOILASegmenterLogic()
        job = logic.process(ct, self.PROMPTS, None, waitForCompletion=False)
        outcome = job.finish()
        self.assertEqual(outcome.segmentation.GetSegmentation().GetNumberOfSegments(), 3)
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.process(ct, self.PROMPTS, None, waitForCompletion=False)
        job.cancel()
        with self.assertRaises(Cancelled):
            job.finish()
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Non-blocking run and cancel passed")
