"""MAISITrain: train or fine-tune MAISI models (VAE, diffusion UNet, ControlNet, or a ControlNet for
a new tumour class) on local CTs, from Slicer.

Training runs `maisi train` in a child process (torchrun with one process per GPU when more than
one); the loss curve is read live from the run folder's metrics.jsonl into a plot; Stop kills the
process tree and Resume continues from the last checkpoint. The trained weight folder
(RUN_DIR/weights) is what MAISI Generate's "Weight folder" takes.

This file holds the module, its widget (the only Qt code), a thin ScriptedLoadableModuleLogic
around ``MAISITrainLib.logic.TrainLogic`` and the self-test.
"""

import logging
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from MAISIGenerateLib.parameters import DEVICES
from MAISITrainLib.logic import (
    MODEL_NAMES,
    STAGES,
    WIDTHS,
    LossPlot,
    MetricsReader,
    TrainLogic,
    TrainMonitor,
    TrainRequest,
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
class MAISITrain(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MAISI Train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = ["MAISIGenerate"]  # shares its worker-process helpers
        self.parent.contributors = ["SlicerMAISI developers"]
        self.parent.helpText = _(
            "Train or fine-tune NVIDIA's MAISI models on your CTs: the VAE, the diffusion UNet, the ControlNet, "
            "or a ControlNet fine-tuned for a new tumour class. The loss curve is shown live; Stop and Resume "
            "continue from the last checkpoint. Use the run folder's weights/ in MAISI Generate. "
            '<a href="https://github.com/SlicerMAISI/SlicerMAISI">Documentation</a>.'
        )
        self.parent.acknowledgementText = _("MAISI is NVIDIA's; training runs MONAI's MAISI networks through maisicore.")


@parameterNodeWrapper
class MAISITrainParameterNode:
    """Module state (folders are kept by the path fields' own history)."""

    dataSource: Annotated[str, Choice(["folders", "datalist"])] = "folders"
    stage: Annotated[str, Choice(list(STAGES))] = "controlnet"
    model: Annotated[str, Choice(list(MODEL_NAMES))] = "rflow-ct"
    width: Annotated[str, Choice(list(WIDTHS))] = "official"
    weightedLabels: str = ""
    maxSteps: Annotated[int, WithinRange(0, 10000000)] = 0  # 0: the stage's default
    batchSize: Annotated[int, WithinRange(0, 256)] = 0
    learningRate: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    patchSize: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    gpus: Annotated[int, WithinRange(1, 16)] = 1
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0


class MAISITrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: Start/Stop and Resume drive a TrainJob; a timer streams its log and metrics."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._monitor = None  # the running job with its loss plot (TrainMonitor)
        self._plot = None  # the last run's plot, extended by Resume

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MAISITrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MAISITrainLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(500)
        self._timer.connect("timeout()", self.onTimer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._monitor is not None:
            self._monitor.job.stop()
            self._monitor.close()
            self._monitor = None
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        # A running job goes on; its monitor makes the loss plot again in the new scene.
        self.setParameterNode(None)
        self._plot = None

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
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        folders = p.dataSource == "folders"
        self.ui.imagesDirPathLineEdit.enabled = folders
        self.ui.labelsDirPathLineEdit.enabled = folders
        self.ui.datalistPathLineEdit.enabled = not folders
        self.ui.weightedLabelsLineEdit.enabled = p.stage == "controlnet-finetune"
        self.ui.deviceComboBox.enabled = p.gpus == 1

    def requestFromParameters(self) -> TrainRequest:
        p = self._parameterNode
        folders = p.dataSource == "folders"
        patch = tuple(int(v) for v in p.patchSize.replace(",", " ").split()) or None
        return TrainRequest(
            stage=p.stage,
            out_dir=self.ui.outputDirPathLineEdit.currentPath,
            datalist=None if folders else (self.ui.datalistPathLineEdit.currentPath or None),
            images_dir=(self.ui.imagesDirPathLineEdit.currentPath or None) if folders else None,
            labels_dir=(self.ui.labelsDirPathLineEdit.currentPath or None) if folders else None,
            model=p.model,
            width=p.width,
            init_weights=self.ui.initWeightsPathLineEdit.currentPath or None,
            max_steps=p.maxSteps or None,
            batch_size=p.batchSize or None,
            lr=p.learningRate or None,
            patch_size=patch,
            device=p.device,
            seed=p.seed,
            weighted_labels=tuple(v.strip() for v in p.weightedLabels.split(",") if v.strip()),
            gpus=p.gpus,
        )

    def onStartButton(self) -> None:
        if self._monitor is not None:
            self.stopJob()
            return
        self.startJob(resume=False)

    def onResumeButton(self) -> None:
        self.startJob(resume=True)

    def startJob(self, resume: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the training."), waitCursor=True):
            from MAISIGenerate import ensureDependencies

            if not ensureDependencies():
                return
            request = self.requestFromParameters()
            job = self.logic.start(request, resume=resume)
            previous = self._plot if resume else None  # a new run gets its own curve; Resume extends it
            self._monitor = TrainMonitor(job, request, previous)
            self.ui.logTextEdit.clear()
            for line in job.log:
                self.appendLog(line)
            self.ui.startButton.text = _("Stop")
            self.ui.resumeButton.enabled = False
            self.ui.progressBar.value = 0
            self._timer.start()

    def stopJob(self) -> None:
        self._monitor.job.stop()
        self.appendLog(_("Stopped. Resume continues from the last checkpoint in the run folder."))
        self.onTimer()

    def onTimer(self) -> None:
        monitor = self._monitor
        if monitor is None:
            self._timer.stop()
            return
        status = monitor.tick()
        for line in status.lines:
            self.appendLog(line)
        if status.plot_created:
            slicer.modules.plots.logic().ShowChartInLayout(monitor.plot.chart)
        self._plot = monitor.plot
        last = status.last_row
        if last is not None:
            text = _("step {step}: loss {loss:.4g}").format(step=last["step"], loss=float(last.get("loss", float("nan"))))
            if monitor.request.max_steps:
                self.ui.progressBar.value = int(100 * int(last["step"]) / monitor.request.max_steps)
            self.ui.statusLabel.text = text
        if status.done:
            monitor.close()
            self._monitor = None
            self._timer.stop()
            self.ui.startButton.text = _("Start")
            self.ui.resumeButton.enabled = True
            if status.stopped:
                self.ui.statusLabel.text = _("Stopped.")
            elif status.returncode == 0:
                self.ui.progressBar.value = 100
                self.ui.statusLabel.text = _("Done: weights in {path} (use them as the weight folder in MAISI Generate).").format(
                    path=monitor.request.weights_path)
            else:
                self.ui.statusLabel.text = _("Training failed (exit code {code}); see the log.").format(code=status.returncode)
                slicer.util.errorDisplay(_("MAISI training failed (exit code {code}).").format(code=status.returncode),
                                         detailedText="\n".join(self.ui.logTextEdit.toPlainText().splitlines()[-30:]))

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logger.info(text)


class MAISITrainLogic(ScriptedLoadableModuleLogic, TrainLogic):
    """The usual ScriptedLoadableModuleLogic around the Qt-free ``TrainLogic``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        TrainLogic.__init__(self)

    def getParameterNode(self):
        return MAISITrainParameterNode(super().getParameterNode())


class MAISITrainTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: the command lines a request builds, and a metrics file read into
    the loss plot (training itself is exercised by the maisicore tests)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CommandsAndLossPlot()

    def test_CommandsAndLossPlot(self):
        import json
        import shutil
        import tempfile

        runDir = Path(tempfile.mkdtemp(prefix="maisi-train-selftest-"))
        try:
            self.delayDisplay("Building the training commands")
            logic = MAISITrainLogic()
            request = TrainRequest("vae", str(runDir), images_dir=str(runDir / "images"), max_steps=10, gpus=2)
            commands = logic.commands(request)
            self.assertEqual(commands[0][-4:], ["--images", str(runDir / "images"), "--out", str(runDir / "datalist.json")])
            self.assertIn("torch.distributed.run", commands[1])

            self.delayDisplay("Reading a metrics file into the loss plot")
            rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "time_s": s} for s in range(1, 6)]
            (runDir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            plot = LossPlot("MAISI self-test")
            plot.update(MetricsReader(runDir / "metrics.jsonl").read())
            self.assertEqual(plot.loss_table.GetNumberOfRows(), 5)
            slicer.modules.plots.logic().ShowChartInLayout(plot.chart)
        finally:
            shutil.rmtree(runDir, ignore_errors=True)
        self.delayDisplay("Test passed")
