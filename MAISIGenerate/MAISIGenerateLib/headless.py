"""A Slicer scene without the application: what ``slicer.util`` needs, set up with the
``slicer-core`` wheel (MRML, segmentations, volumes, colours; no Qt). For batch scripts run by a
plain Python and for the tests. Inside Slicer use ``slicer.mrmlScene`` instead."""

from __future__ import annotations

import types


def headless_scene():
    """A new ``vtkMRMLScene`` with the application, colour, segmentations and volumes logics
    attached, installed as ``slicer.mrmlScene`` with the ``slicer.modules`` entries that
    ``slicer.util`` uses. Returns the scene."""
    import slicer

    if hasattr(slicer, "app"):
        raise RuntimeError("inside the Slicer application: use slicer.mrmlScene")
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = app_logic.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    # Converter rules are captured when a segmentation is created: attach this logic first.
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    segmentations_logic.SetMRMLApplicationLogic(app_logic)
    volumes_logic = slicer.vtkSlicerVolumesLogic()
    volumes_logic.SetMRMLScene(scene)
    volumes_logic.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("Colors", color_logic)  # volume display nodes look their colours up here
    app_logic.SetModuleLogic("Segmentations", segmentations_logic)
    app_logic.SetModuleLogic("Volumes", volumes_logic)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: segmentations_logic),
        volumes=types.SimpleNamespace(logic=lambda: volumes_logic),
    )
    slicer._maisi_headless_logics = (app_logic, color_logic, segmentations_logic, volumes_logic)  # keep alive
    return scene
