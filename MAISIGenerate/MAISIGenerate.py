"""MAISIGenerate: synthetic CT volumes with NVIDIA's MAISI models, in Slicer.

Three ways in: a CT that follows a segmentation (segments matched to MAISI labels by name and
terminology), a CT with random anatomy, or a tumour inpainted into a real CT. Generation runs in a
child process (PythonSlicer running the `maisi` program), so Slicer stays responsive and Cancel
kills it. Results are new nodes: the CT (named with model and seed, on the input's exact grid) and a
segmentation of the labels used (MAISI names, colours and terminology).

This file holds the module, its widget (the only Qt code), a thin ScriptedLoadableModuleLogic
around ``MAISIGenerateLib.logic.GenerateLogic`` and the self-test. torch and MONAI are never
imported at file scope; maisicore only through ``MAISIGenerateLib``, its torch-free modules.
"""

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import ctk
import qt
import slicer
import vtk
from MAISIGenerateLib import dependencies
from MAISIGenerateLib.logic import GenerateLogic, format_duration
from MAISIGenerateLib.parameters import (
    ANATOMY_SIZE_CLASSES,
    BODY_REGIONS,
    DEFAULT_SIZE,
    DEFAULT_SPACING_MM,
    DEVICES,
    MODALITIES,
    MODELS,
    MODES,
    SIZE_TUMORS,
    TUMOR_TYPES,
    FromSegmentation,
    InpaintTumor,
    RandomAnatomy,
    RunOptions,
    body_options,
    format_anatomy_sizes,
    parse_anatomy_sizes,
)
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

logger = logging.getLogger(__name__)
NOT_USED = "(not used)"
WEIGHTS_DIR_SETTING = "MAISI/WeightsFolder"  # application settings key of the weight folder field


#
# MAISIGenerate
#


class MAISIGenerate(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MAISI Generate")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerMAISI developers"]
        self.parent.helpText = _(
            "Generate synthetic CT volumes with NVIDIA's MAISI models (rflow-ct, ddpm-ct), and MR volumes (rflow-mr, "
            "rflow-mr-brain: image only, with a modality choice): from a segmentation, "
            "with random anatomy, or by inpainting a tumour into a CT. Each result is a new volume with a "
            "segmentation of the labels it was generated from. "
            '<a href="https://github.com/SlicerMAISI/SlicerMAISI">Documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "MAISI (Medical AI for Synthetic Imaging) is NVIDIA's; its weights are under NVIDIA's licences. "
            "This module runs MONAI's MAISI networks through the maisicore library shipped with the extension. "
            "The demo segmentation in Sample Data is TotalSegmentator's example (Apache-2.0), converted to MAISI labels."
        )
        # The demo segmentation in Sample Data, once the application (and the Sample Data module) is up.
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Offer the MAISI demo segmentation in the Sample Data module: a file shipped with the extension,
    so one click loads it with no network (``MAISIGenerateLib.sampledata``)."""
    import SampleData
    from MAISIGenerateLib.sampledata import sample_data_sources

    for source in sample_data_sources(Path(__file__).resolve().parent):
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


#
# Parameter node
#


@parameterNodeWrapper
class MAISIGenerateParameterNode:
    """Module state. Nodes are inputs only: results are always new nodes."""

    mode: Annotated[str, Choice(list(MODES))] = "segmentation"
    model: Annotated[str, Choice(list(MODELS))] = "rflow-ct"
    modality: Annotated[str, Choice(list(MODALITIES))] = "auto"  # auto: the model's default
    # From segmentation
    inputSegmentation: vtkMRMLSegmentationNode
    referenceVolume: vtkMRMLScalarVolumeNode
    segmentOverrides: str = "{}"  # JSON: segment id -> MAISI name, or 0 for "not used"
    addBody: bool = True
    # The body envelope from the reference CT: NVIDIA's add_body_envelope parameters (its defaults).
    bodyAirHU: Annotated[float, WithinRange(-1023.0, 0.0)] = -800.0
    bodyClosingVoxels: Annotated[int, WithinRange(1, 31)] = 3  # odd
    bodyBedVoxels: Annotated[int, WithinRange(1, 31)] = 5  # odd
    bodyTableFraction: Annotated[float, WithinRange(0.001, 1.0)] = 0.05
    bodyLungs: Annotated[str, Choice(["auto", "yes", "no"])] = "auto"  # auto: a lung lobe segment is present
    fitGrid: bool = False
    # Random anatomy
    anatomy: str = ""
    anatomySizes: str = ""  # "liver=0.6,hepatic tumor=0.1": the checked rows of "Anatomy sizes" (maisicore's text)
    bodyRegionTop: Annotated[str, Choice(["auto", *BODY_REGIONS])] = "auto"
    bodyRegionBottom: Annotated[str, Choice(["auto", *BODY_REGIONS])] = "auto"
    sizeXY: Annotated[int, WithinRange(32, 512)] = DEFAULT_SIZE[0]
    sizeZ: Annotated[int, WithinRange(32, 768)] = DEFAULT_SIZE[2]
    spacingXY: Annotated[float, WithinRange(0.1, 10.0)] = DEFAULT_SPACING_MM[0]
    spacingZ: Annotated[float, WithinRange(0.1, 10.0)] = DEFAULT_SPACING_MM[2]
    # Inpaint tumour
    inpaintVolume: vtkMRMLScalarVolumeNode
    tumorType: Annotated[str, Choice(list(TUMOR_TYPES))] = "hepatic tumor"
    tumorSource: Annotated[str, Choice(["point", "segment"])] = "point"
    tumorPoint: vtkMRMLMarkupsFiducialNode
    tumorDiameter: Annotated[float, WithinRange(2.0, 200.0)] = 20.0
    tumorSegmentation: vtkMRMLSegmentationNode
    tumorSegmentId: str = ""
    anatomySegmentation: vtkMRMLSegmentationNode
    # Run
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    steps: Annotated[int, WithinRange(0, 1000)] = 0  # 0: the model's default
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    allowAnySize: bool = False
    referenceNumerics: bool = False  # NVIDIA's attention and precision (request field reference_numerics)



def ensureDependencies() -> bool:
    """Install what MAISI needs, after asking: torch through the PyTorch extension (at least the
    version MONAI needs), then the rest of maisicore/requirements.txt through pip with the installed
    torch pinned, so pip never changes it. True when everything is there, False when the user
    declined; RuntimeError with one message saying what to do when torch does not fit. Shared with
    MAISITrain."""
    import os

    constraintFile = os.path.join(slicer.app.temporaryPath, "maisi-torch-constraint.txt")
    plan = dependencies.current_plan(constraintFile)
    if plan.refusal:
        raise RuntimeError(plan.refusal)
    if plan.torch_requirement:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError(
                _("MAISI needs PyTorch: install the 'PyTorch' extension from the Extensions Manager and restart Slicer.")
            ) from None
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=True, torchVersionRequirement=plan.torch_requirement) is None:
            return False
        plan = dependencies.current_plan(constraintFile)
        if plan.refusal:
            raise RuntimeError(plan.refusal)
    if plan.ready:
        return True
    torchVersion = dependencies.installed_version("torch")
    packages = ", ".join(arg for arg in plan.pip_arguments[2:])
    text = _("MAISI needs these Python packages: {packages}. Install them now (a few minutes)? "
             "torch {torch} stays as it is.").format(packages=packages, torch=torchVersion)
    if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("MAISI dependencies")):
        return False
    with open(constraintFile, "w", encoding="utf-8") as handle:
        handle.write(plan.constraints)
    _pipInstall(plan.pip_arguments)
    if dependencies.installed_version("torch") != torchVersion:  # the constraint forbids it; say so if it happened
        raise RuntimeError(_("Installing MAISI's packages changed torch from {before} to {after}: restart Slicer.").format(
            before=torchVersion, after=dependencies.installed_version("torch")))
    return not dependencies.missing_requirements()


def _pipInstall(arguments: list) -> None:
    """``pip install ARGUMENTS`` in Slicer's Python (the user has already agreed): Slicer's newer
    ``slicer.packaging.pip_install`` without its own prompt where it has one, else ``slicer.util.pip_install``."""
    import inspect

    try:
        from slicer import packaging
    except ImportError:
        packaging = None
    install = getattr(packaging, "pip_install", None)
    if install is not None and "interactive" in inspect.signature(install).parameters:
        install(list(arguments), interactive=False)
    else:
        slicer.util.pip_install(list(arguments))


#
# MAISIGenerateWidget
#


class MAISIGenerateWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs into the parameter node, Apply starts a worker, a timer streams it."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedSegmentation = None
        self._job = None
        self._cancelling = None  # a cancelled job whose warm worker has not answered yet
        self._download = None
        self._statusJob = None  # `maisi weights list` running in the worker
        self._weightRows = None
        self._cudaAvailable = None
        self._maskGrid = None
        self._segmentTableRefreshPending = False
        self._sizeRows = {}  # anatomy size class -> (checkbox, slider)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MAISIGenerate.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        for combo, names in ((self.ui.modelComboBox, MODELS), (self.ui.modalityComboBox, MODALITIES)):
            combo.clear()  # maisicore's names (the .ui lists the CT models only as a design-time preview)
            combo.addItems(list(names))
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MAISIGenerateLogic()
        self.logic.label_progress = self.onLabelProgress

        self._timer = qt.QTimer()
        self._timer.setInterval(250)
        self._timer.connect("timeout()", self.onTimer)
        self.ui.segmentTable.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        self.ui.segmentTable.horizontalHeader().setSectionResizeMode(1, qt.QHeaderView.Stretch)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.draftButton.connect("clicked(bool)", self.onDraftButton)
        self.ui.modeTabWidget.connect("currentChanged(int)", self.onModeChanged)
        self.ui.refreshWeightsButton.connect("clicked(bool)", self.updateWeightsStatus)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.removeWeightsButton.connect("clicked(bool)", self.onRemoveWeights)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        # The weight folder is remembered across sessions (and its history kept in the drop-down).
        self.ui.weightsDirPathLineEdit.settingKey = WEIGHTS_DIR_SETTING
        self.ui.weightsDirPathLineEdit.currentPath = str(qt.QSettings().value(WEIGHTS_DIR_SETTING + "/Current", ""))
        self.ui.weightsDirPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsDirChanged)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.referenceVolumeSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", lambda node: qt.QTimer.singleShot(0, self.updateSuggestedGrid))
        self.ui.tumorSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node: self.onTumorSegmentChanged())
        self.ui.tumorSegmentSelector.connect("currentSegmentChanged(QString)", lambda segmentId: self.onTumorSegmentChanged())
        self.setupAnatomySizes()

        self.initializeParameterNode()
        self.updateDependencyButton()

    def cleanup(self) -> None:
        self.stopWorker(resetPanel=False)
        if self._download is not None:
            self._download.cancel()
            self._download = None
        if self._statusJob is not None:
            self._statusJob.cancel()
            self._statusJob = None
        self._timer.stop()
        self.removeObservers()

    def stopWorker(self, resetPanel: bool = True) -> None:
        """End the running generation (nothing is added) and the warm worker: module cleanup (also
        when Slicer exits) and scene close. The next Apply starts a new worker."""
        for job in (self._job, self._cancelling):
            if job is not None:
                job.begin_cancel()
        if self.logic is not None:
            self.logic.shutdown()  # closes the worker's input: it cancels what runs and exits (killed if it does not)
        for job in (self._job, self._cancelling):
            if job is not None:
                job.cleanup()
        if self._job is not None:
            self._job = None
            if resetPanel:
                self.resetApply()
        self._cancelling = None

    def enter(self) -> None:
        self.initializeParameterNode()
        self.updateDependencyButton()
        if self._weightRows is None and dependencies.torch_installed():
            self.updateWeightsStatus()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.stopWorker()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.ui.modeTabWidget.currentIndex = MODES.index(self._parameterNode.mode)
            self.ui.tumorSegmentSelector.setCurrentNode(self._parameterNode.tumorSegmentation)
            if self._parameterNode.tumorSegmentId:
                self.ui.tumorSegmentSelector.setCurrentSegmentID(self._parameterNode.tumorSegmentId)
            self.onSegmentationChanged(self._parameterNode.inputSegmentation)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """Enable Apply when the current mode has its inputs; refresh the estimate."""
        p = self._parameterNode
        if p is None or self._job is not None:
            return
        if p.mode == "segmentation":
            ready = p.inputSegmentation is not None
            reason = _("Select a segmentation")
        elif p.mode == "inpaint":
            has_tumor = p.tumorPoint is not None if p.tumorSource == "point" else bool(p.tumorSegmentId)
            ready = p.inpaintVolume is not None and has_tumor
            reason = _("Select a CT volume and a tumour point or segment")
        else:
            ready, reason = True, ""
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Start the generation") if ready else reason
        # Drafts and updates (the interactive loop) are the From-segmentation mode's.
        segmentationMode = p.mode == "segmentation"
        self.ui.draftButton.visible = segmentationMode
        self.ui.draftButton.enabled = segmentationMode and ready
        self.updateApplyChoice()
        self.ui.tumorPointSelector.enabled = p.tumorSource == "point"
        self.ui.tumorDiameterSpinBox.enabled = p.tumorSource == "point"
        self.ui.tumorSegmentSelector.enabled = p.tumorSource == "segment"
        self.updateAnatomySizeRows()
        self.updateEstimate()
        self.updateWeightsLabel()

    # ---- anatomy sizes (mask generation)

    def setupAnatomySizes(self) -> None:
        """The Random tab's "Anatomy sizes (mask generation)" group, built from maisicore's list of the
        classes with a size control: per class a checkbox (use it) and a 0–1 slider. The checked rows
        are the parameter node's ``anatomySizes`` text; the size database is a path field like the mask database."""
        group = ctk.ctkCollapsibleGroupBox()
        group.setObjectName("anatomySizesGroupBox")
        group.title = _("Anatomy sizes (mask generation)")
        group.toolTip = _("Checked rows: the model's mask networks generate the mask with these sizes (a fraction "
                          "of the range seen in training; at most one tumour). Leave Anatomy empty.")
        form = qt.QFormLayout(group)
        for name in ANATOMY_SIZE_CLASSES:
            check = qt.QCheckBox(name)
            slider = ctk.ctkSliderWidget()
            slider.minimum, slider.maximum, slider.singleStep, slider.pageStep, slider.decimals = 0.0, 1.0, 0.05, 0.1, 2
            slider.value = 0.5
            slider.enabled = False
            slider.toolTip = _("Size of {name}: 0 the smallest, 1 the largest seen in training").format(name=name)
            check.connect("toggled(bool)", lambda on, name=name: self.onAnatomySizeToggled(name, on))
            slider.connect("valueChanged(double)", lambda value: self.storeAnatomySizes())
            form.addRow(check, slider)
            self._sizeRows[name] = (check, slider)
        self.sizeDbPathLineEdit = ctk.ctkPathLineEdit()
        self.sizeDbPathLineEdit.nameFilters = [_("Anatomy size database (*.json)")]
        self.sizeDbPathLineEdit.toolTip = _("Optional: NVIDIA's all_anatomy_size_conditions.json "
                                            "(default: the one in the maisi cache)")
        form.addRow(_("Size database:"), self.sizeDbPathLineEdit)
        group.collapsed = True
        self.ui.randomTab.layout().addRow(group)

    def onAnatomySizeToggled(self, name: str, on: bool) -> None:
        """At most one tumour (maisicore's rule): checking a tumour unchecks the others."""
        self._sizeRows[name][1].enabled = on
        if on and name in SIZE_TUMORS:
            for other in SIZE_TUMORS:
                if other != name:
                    check = self._sizeRows[other][0]
                    wasBlocked = check.blockSignals(True)
                    check.checked = False
                    check.blockSignals(wasBlocked)
                    self._sizeRows[other][1].enabled = False
        self.storeAnatomySizes()

    def storeAnatomySizes(self) -> None:
        """The checked rows into the parameter node, as maisicore's ``name=size,...`` text."""
        if self._parameterNode is None:
            return
        pairs = [(name, slider.value) for name, (check, slider) in self._sizeRows.items() if check.checked]
        self._parameterNode.anatomySizes = format_anatomy_sizes(pairs) if pairs else ""

    def updateAnatomySizeRows(self) -> None:
        """The rows from the parameter node's text (unreadable text: no row checked)."""
        try:
            sizes = dict(parse_anatomy_sizes(self._parameterNode.anatomySizes)) if self._parameterNode.anatomySizes else {}
        except ValueError:
            sizes = {}
        for name, (check, slider) in self._sizeRows.items():
            wasBlocked = (check.blockSignals(True), slider.blockSignals(True))
            check.checked = name in sizes
            slider.enabled = name in sizes
            if name in sizes:
                slider.value = min(max(sizes[name], 0.0), 1.0)
            check.blockSignals(wasBlocked[0])
            slider.blockSignals(wasBlocked[1])

    def onModeChanged(self, index: int) -> None:
        if self._parameterNode is not None:
            self._parameterNode.mode = MODES[index]

    # ---- dependencies

    def updateDependencyButton(self) -> None:
        ready = dependencies.torch_installed() and not dependencies.missing_requirements()
        self.ui.installDependenciesButton.visible = not ready

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages MAISI needs."), waitCursor=True):
            self.ensureDependencies()
        self.updateDependencyButton()
        self.updateWeightsStatus()

    def ensureDependencies(self) -> bool:
        return ensureDependencies()

    # ---- weights

    def _cuda(self) -> bool:
        if self._cudaAvailable is None and dependencies.torch_installed():
            import torch

            self._cudaAvailable = bool(torch.cuda.is_available())
        return bool(self._cudaAvailable)

    def updateWeightsStatus(self) -> None:
        """Ask the worker which weights are installed (`maisi weights list`); the timer picks the
        answer up, so the panel stays responsive while the worker loads torch."""
        if not dependencies.torch_installed():
            self.ui.weightsStatusLabel.text = _("install the dependencies first")
            return
        if self._statusJob is not None:
            return
        try:
            self._statusJob = self.logic.start_weights_status()
        except Exception as exc:  # shown in the panel, not fatal: a weight folder still works
            self.ui.weightsStatusLabel.text = _("status unavailable: {error}").format(error=exc)
            return
        self.ui.weightsStatusLabel.text = _("checking the installed weights...")
        self._timer.start()

    def onWeightsStatusDone(self) -> None:
        job, self._statusJob = self._statusJob, None
        try:
            self._weightRows = {row.get("model"): row for row in self.logic.weights_rows(job)}
        except Exception as exc:  # shown in the panel, not fatal: a weight folder still works
            self._weightRows = {}
            self.ui.weightsStatusLabel.text = _("status unavailable: {error}").format(error=exc)
            return
        self.updateWeightsLabel()

    def onWeightsDirChanged(self, path: str) -> None:
        qt.QSettings().setValue(WEIGHTS_DIR_SETTING + "/Current", path)
        if path:
            self.ui.weightsDirPathLineEdit.addCurrentPathToHistory()
        self.updateWeightsLabel()

    def updateWeightsLabel(self) -> None:
        if self._parameterNode is None:
            return
        folder = self.ui.weightsDirPathLineEdit.currentPath
        model = self._parameterNode.model
        self.ui.downloadWeightsButton.enabled = False
        self.ui.removeWeightsButton.enabled = False
        if folder:
            self.ui.weightsStatusLabel.text = _("weight folder {folder}").format(folder=folder)
            return
        if not self._weightRows:
            return
        row = self._weightRows.get(model)
        if model == "demo":
            self.ui.weightsStatusLabel.text = _("demo: bundled with maisicore (tiny, one patient; for trying things out)")
        elif row is None:
            self.ui.weightsStatusLabel.text = _("{model}: unknown to `maisi weights list`").format(model=model)
        elif row.get("installed"):
            self.ui.weightsStatusLabel.text = _("{model}: installed in {path}").format(model=model, path=row.get("path", "?"))
            self.ui.removeWeightsButton.enabled = self._download is None
        else:
            size = row.get("size_bytes")
            self.ui.weightsStatusLabel.text = _("{model}: not downloaded ({size}licence: {license})").format(
                model=model, license=row.get("license", "?"), size=f"{size / 1e9:.1f} GB, " if size else "")
            self.ui.downloadWeightsButton.enabled = self._download is None

    def onDownloadWeights(self) -> None:
        model = self._parameterNode.model
        row = (self._weightRows or {}).get(model, {})
        text = _(
            "The {model} weights are NVIDIA's and come under their licence:\n\n{license}\n{url}\n\n{summary}\n\n"
            "Download them into the maisi cache ({path}) and accept this licence?"
        ).format(model=model, license=row.get("license", "?"), url=row.get("license_url", ""),
                 summary=row.get("license_summary", ""), path=row.get("path", "?"))
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("MAISI weights licence")):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the download."), waitCursor=True):
            self._download = self.logic.start_weights_download(model)
            self.appendLog(_("Downloading {model} weights...").format(model=model))
            self.ui.downloadWeightsButton.enabled = False
            self._timer.start()

    def onRemoveWeights(self) -> None:
        model = self._parameterNode.model
        path = (self._weightRows or {}).get(model, {}).get("path", "?")
        if not slicer.util.confirmOkCancelDisplay(
                _("Delete the downloaded {model} weights in {path}?").format(model=model, path=path),
                windowTitle=_("Remove MAISI weights")):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to remove the weights."), waitCursor=True):
            self.appendLog(self.logic.remove_weights(model))
        self.updateWeightsStatus()

    # ---- segment table, grid and estimate

    def _overrides(self) -> dict:
        try:
            return json.loads(self._parameterNode.segmentOverrides or "{}")
        except ValueError:
            return {}

    def onSegmentationChanged(self, node) -> None:
        """Watch the chosen segmentation's segments; refresh the table and grid once the parameter
        node has taken the new selection (next event loop turn)."""
        if self._observedSegmentation is not None:
            self.removeObserver(self._observedSegmentation, vtk.vtkCommand.ModifiedEvent, self.onSegmentsModified)
        self._observedSegmentation = node.GetSegmentation() if node is not None else None
        if self._observedSegmentation is not None:
            self.addObserver(self._observedSegmentation, vtk.vtkCommand.ModifiedEvent, self.onSegmentsModified)
        qt.QTimer.singleShot(0, self.refreshSegmentTable)
        qt.QTimer.singleShot(0, self.updateSuggestedGrid)

    def onSegmentsModified(self, caller=None, event=None) -> None:
        """Segments added, renamed, recoded or painted: refresh the table once, a moment later."""
        if not self._segmentTableRefreshPending:
            self._segmentTableRefreshPending = True
            qt.QTimer.singleShot(200, self.refreshSegmentTable)

    def refreshSegmentTable(self) -> None:
        """One row per segment: its name, the MAISI label it becomes (editable), how it was matched."""
        self._segmentTableRefreshPending = False
        table = self.ui.segmentTable
        table.setRowCount(0)
        node = self._parameterNode.inputSegmentation if self._parameterNode else None
        if node is None:
            self.ui.segmentStatusLabel.text = ""
            return
        from maisicore.anatomy.labels import label_table  # torch-free, as is matching

        names = [NOT_USED] + [info.name for info in label_table()]
        matches = self.logic.match_segments(node, self._overrides())
        for row, match in enumerate(matches):
            table.insertRow(row)
            nameItem = qt.QTableWidgetItem(match.segment_name)
            nameItem.setFlags(qt.Qt.ItemIsEnabled)
            table.setItem(row, 0, nameItem)
            combo = qt.QComboBox()
            combo.addItems(names)
            combo.currentIndex = names.index(match.label_name) if match.label_name in names else 0
            combo.connect("activated(int)", lambda index, segmentId=match.segment_id: self.onSegmentLabelChosen(segmentId, names[index]))
            table.setCellWidget(row, 1, combo)
            byItem = qt.QTableWidgetItem(match.matched_by)
            byItem.setFlags(qt.Qt.ItemIsEnabled)
            if match.matched_by == "unresolved":
                byItem.setForeground(qt.QBrush(qt.QColor("red")))
            table.setItem(row, 2, byItem)
        unresolved = [m.segment_name for m in matches if m.matched_by == "unresolved"]
        used = sum(1 for m in matches if m.label_id is not None)
        text = _("{used} of {total} segments used.").format(used=used, total=len(matches))
        if unresolved:
            text += " " + _("Unresolved (left out unless you choose a label): {names}").format(names=", ".join(unresolved))
        self.ui.segmentStatusLabel.text = text

    def onSegmentLabelChosen(self, segmentId: str, labelName: str) -> None:
        overrides = self._overrides()
        overrides[segmentId] = 0 if labelName == NOT_USED else labelName
        self._parameterNode.segmentOverrides = json.dumps(overrides)
        qt.QTimer.singleShot(0, self.refreshSegmentTable)

    def _generationSize(self):
        """Voxels (x, y, z) the current request generates, or None when unknown."""
        p = self._parameterNode
        if p.mode == "random":
            return (p.sizeXY, p.sizeXY, p.sizeZ)
        if p.mode == "segmentation" and p.inputSegmentation is not None:
            grid = self._maskGrid
            if grid is not None:
                return grid["suggested"][0] if p.fitGrid else grid["shape"]
        if p.mode == "inpaint" and p.inpaintVolume is not None:
            return self.logic.inpaint_region_size(p.inpaintVolume, p.tumorDiameter)
        return None

    def updateSuggestedGrid(self) -> None:
        """Show the mask's grid and the published grid closest to its field of view."""
        self._maskGrid = None
        self.ui.suggestedGridLabel.text = ""
        p = self._parameterNode
        if p is None or p.inputSegmentation is None:
            return
        try:
            grid = self.logic.mask_grid(p.inputSegmentation, p.referenceVolume)
            size, spacing = self.logic.suggest_grid(grid, p.model)
        except Exception as exc:
            self.ui.suggestedGridLabel.text = _("No grid: {error}").format(error=exc)
            return
        self._maskGrid = {"shape": grid.shape, "spacing": grid.spacing, "suggested": (size, spacing)}
        self.ui.suggestedGridLabel.text = _(
            "Mask grid {shape} voxels at {spacing} mm; closest published grid {size} at {suggested} mm."
        ).format(shape="×".join(map(str, grid.shape)), spacing="×".join(f"{s:.3g}" for s in grid.spacing),
                 size="×".join(map(str, size)), suggested="×".join(f"{s:.3g}" for s in spacing))
        self.updateEstimate()

    def updateEstimate(self) -> None:
        size = self._generationSize() if self._parameterNode else None
        if size is None:
            self.ui.estimateLabel.text = ""
            return
        p = self._parameterNode
        steps = p.steps or None
        cpu = format_duration(self.logic.estimate_seconds(size, steps, p.model, "cpu"))
        gpu = format_duration(self.logic.estimate_seconds(size, steps, p.model, "cuda"))
        here = _("a CUDA GPU is available") if self._cuda() else _("no CUDA GPU found: runs on the CPU")
        self.ui.estimateLabel.text = _("Rough time for {size} voxels: {cpu} on CPU, {gpu} on a GPU ({here}).").format(
            size="×".join(map(str, size)), cpu=cpu, gpu=gpu, here=here)

    def onTumorSegmentChanged(self) -> None:
        if self._parameterNode is None:
            return
        self._parameterNode.tumorSegmentation = self.ui.tumorSegmentSelector.currentNode()
        self._parameterNode.tumorSegmentId = self.ui.tumorSegmentSelector.currentSegmentID() or ""

    # ---- run

    def requestFromParameters(self):
        """(source, RunOptions) from the parameter node and the path fields."""
        p = self._parameterNode
        options = RunOptions(
            model=p.model,
            weights_dir=self.ui.weightsDirPathLineEdit.currentPath or None,
            seed=p.seed,
            steps=p.steps or None,
            device=p.device,
            allow_any_size=p.allowAnySize,
            modality=None if p.modality == "auto" else p.modality,
            reference_numerics=p.referenceNumerics,
        )
        if p.mode == "segmentation":
            body = body_options(p.bodyAirHU, p.bodyClosingVoxels, p.bodyBedVoxels, p.bodyTableFraction, p.bodyLungs)
            source = FromSegmentation(p.inputSegmentation, p.referenceVolume, self._overrides(), p.addBody, p.fitGrid,
                                      body_options=body)
        elif p.mode == "random":
            regions = [r for r in (p.bodyRegionTop, p.bodyRegionBottom) if r != "auto"]
            anatomy = tuple(a.strip() for a in p.anatomy.split(",") if a.strip())
            sizes = tuple(parse_anatomy_sizes(p.anatomySizes)) if p.anatomySizes else ()
            source = RandomAnatomy(anatomy, tuple(regions), (p.sizeXY, p.sizeXY, p.sizeZ),
                                   (p.spacingXY, p.spacingXY, p.spacingZ), self.ui.maskDbPathLineEdit.currentPath or None,
                                   anatomy_sizes=sizes, anatomy_size_db=self.sizeDbPathLineEdit.currentPath or None)
        else:
            center = None
            if p.tumorSource == "point":
                if p.tumorPoint is None or p.tumorPoint.GetNumberOfControlPoints() < 1:
                    raise ValueError(_("Place a point at the tumour's centre."))
                center = [0.0, 0.0, 0.0]
                p.tumorPoint.GetNthControlPointPositionWorld(0, center)
            source = InpaintTumor(
                p.inpaintVolume, p.tumorType,
                tumor_segmentation=p.tumorSegmentation if p.tumorSource == "segment" else None,
                tumor_segment_id=p.tumorSegmentId if p.tumorSource == "segment" else None,
                center_ras=tuple(center) if center else None,
                diameter_mm=p.tumorDiameter if p.tumorSource == "point" else None,
                anatomy_segmentation=p.anatomySegmentation,
                overrides=self._overrides() if p.anatomySegmentation is p.inputSegmentation else {},
            )
        return source, options

    def updateApplyChoice(self) -> None:
        """"After an edit" applies once a (non-draft) result of the chosen segmentation exists."""
        p = self._parameterNode
        hasPrevious = (p is not None and p.mode == "segmentation"
                       and self.logic.previous_result(p.inputSegmentation) is not None)
        self.ui.applyChoiceComboBox.enabled = hasPrevious

    def onDraftButton(self) -> None:
        if self._job is None:
            self.onApplyButton(draft=True)

    def onApplyButton(self, checked: bool = False, draft: bool = False) -> None:
        if self._job is not None:
            self.cancelJob()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the generation."), waitCursor=True):
            if not self.ensureDependencies():
                return
            self.updateDependencyButton()
            source, options = self.requestFromParameters()
            if isinstance(source, FromSegmentation):
                source.draft = draft
                source.update_changed = self.ui.applyChoiceComboBox.currentIndex == 0  # "Update the changed region"
            self.ui.logTextEdit.clear()
            self._job = self.logic.start(source, options)
            self.appendLog("$ " + " ".join(self._job.command))
            for line in self._job.log:
                self.appendLog(line)
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the generation (the worker keeps its loaded model for the next Apply)")
            self.ui.draftButton.enabled = False
            self.ui.progressBar.value = 0
            self._timer.start()

    def onLabelProgress(self, done: int, total: int) -> None:
        """Segments -> labels slice by slice, then the body envelope's steps: show it and repaint at
        most every 0.1 s (user input waits until the end)."""
        now = time.monotonic()
        if now - getattr(self, "_lastRepaint", 0.0) >= 0.1 or done == total:
            self._lastRepaint = now
            self.ui.progressBar.value = int(100 * done / max(total, 1))
            slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents)

    def cancelJob(self) -> None:
        """Ask the worker to stop at its next step without blocking the panel; the timer waits for
        its answer (and kills it only if it does not answer within its grace period)."""
        job, self._job = self._job, None
        if self._cancelling is not None:  # an earlier cancel still unanswered: stop that one now
            self._cancelling.cancel()
        job.begin_cancel()
        self._cancelling = job
        self.appendLog(_("Cancelling…"))
        self.resetApply()
        self._timer.start()

    def pollCancelling(self) -> None:
        job = self._cancelling
        job.poll()
        if job.done or job.cancel_overdue:
            self._cancelling = None
            killed = not job.done
            if killed:
                job.worker.cancel(grace_s=0)  # no answer within its grace period: kill the worker's tree
            job.cleanup()
            if killed:
                self.appendLog(_("The worker did not stop in time and was ended; the next Apply starts a new one."))
            self.appendLog(_("Cancelled; nothing was added to the scene."))

    def resetApply(self) -> None:
        self.ui.applyButton.text = _("Apply")
        self.ui.progressBar.value = 0
        self.onParameterNodeModified()

    def onTimer(self) -> None:
        if self._job is not None:
            for line in self._job.poll():
                self.appendLog(line)
            self.ui.progressBar.value = int(100 * self._job.fraction())
            if self._job.done:
                job, self._job = self._job, None
                with slicer.util.tryWithErrorDisplay(_("MAISI generation failed."), waitCursor=True):
                    result = job.finish()
                    self.showResult(result)
                self.resetApply()
        if self._cancelling is not None:
            self.pollCancelling()
        if self._download is not None:
            for line in self._download.poll():
                self.appendLog(line)
            if self._download.done:
                download, self._download = self._download, None
                try:
                    download.finish()
                    self.appendLog(_("Download finished."))
                except RuntimeError as exc:
                    self.appendLog(_("Download failed: {error}").format(error=exc))
                self.updateWeightsStatus()
        if self._statusJob is not None:
            self._statusJob.poll()
            if self._statusJob.done:
                self.onWeightsStatusDone()
        if self._job is None and self._cancelling is None and self._download is None and self._statusJob is None:
            self._timer.stop()

    def showResult(self, result) -> None:
        slicer.util.setSliceViewerLayers(background=result.volume_node, fit=True)
        self.appendLog(_("Created volume '{name}'").format(name=result.volume_node.GetName()))
        if result.segmentation_node is not None:
            self.appendLog(_("Created segmentation '{name}'").format(name=result.segmentation_node.GetName()))

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logger.info(text)


#
# MAISIGenerateLogic
#


class MAISIGenerateLogic(ScriptedLoadableModuleLogic, GenerateLogic):
    """The usual ScriptedLoadableModuleLogic around the Qt-free ``GenerateLogic`` (which does all the
    work and also runs headless)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        GenerateLogic.__init__(self)

    def getParameterNode(self):
        return MAISIGenerateParameterNode(super().getParameterNode())


#
# MAISIGenerateTest
#


class MAISIGenerateTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: the bundled demo model generates a CT from a painted sphere
    segmentation on an oblique, flipped grid; the result must lie on that grid and carry MAISI labels."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        # Reload and Test calls runTest directly, outside unittest's runner: say why nothing ran
        # rather than raise SkipTest there.
        if not dependencies.torch_installed() or dependencies.missing_requirements():
            self.delayDisplay("Skipped: install torch (PyTorch extension) and the MAISI requirements first "
                              "(the Install dependencies button of MAISI Generate)")
            return
        self.test_GenerateFromPaintedSphere()

    def test_GenerateFromPaintedSphere(self):
        import numpy as np
        from MAISIGenerateLib import mrml

        logic = MAISIGenerateLogic()
        self.delayDisplay("Painting a sphere on an oblique, flipped 32³ grid")
        angle = np.deg2rad(20.0)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        ijkToRas = np.eye(4)
        ijkToRas[:3, :3] = rotation @ np.diag([-4.0, 4.0, 4.0])
        ijkToRas[:3, 3] = [60.0, -40.0, 10.0]
        k, j, i = np.mgrid[:32, :32, :32]
        ct = np.where(((i - 16) / 14.0) ** 2 + ((j - 16) / 12.0) ** 2 < 1, 40, -1000).astype(np.int16)
        reference = slicer.util.addVolumeFromArray(ct, ijkToRas, "Reference CT")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Painted sphere")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", "Liver")
        sphere = ((i - 14) ** 2 + (j - 15) ** 2 + (k - 16) ** 2 < 36).astype(np.uint8)
        slicer.util.updateSegmentBinaryLabelmapFromArray(sphere, segmentation, segmentId, reference)

        self.delayDisplay("Generating with the bundled demo model (2 steps, CPU)")
        result = logic.run(
            FromSegmentation(segmentation, reference),
            RunOptions(model="demo", seed=1, steps=2, device="cpu"),
            log=logger.info,
        )
        self.assertIsNotNone(result)
        np.testing.assert_array_equal(mrml.ijk_to_ras(result.volume_node), mrml.ijk_to_ras(reference))
        self.assertEqual(slicer.util.arrayFromVolume(result.volume_node).shape, (32, 32, 32))
        self.assertIn("seed 1", result.volume_node.GetName())
        names = {result.segmentation_node.GetSegmentation().GetNthSegment(n).GetName()
                 for n in range(result.segmentation_node.GetSegmentation().GetNumberOfSegments())}
        self.assertEqual(names, {"liver", "body"})
        slicer.util.setSliceViewerLayers(background=result.volume_node, fit=True)
        self.delayDisplay("Test passed")

