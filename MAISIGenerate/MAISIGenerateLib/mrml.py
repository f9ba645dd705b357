"""MRML nodes <-> maisicore volumes: the one place that converts between Slicer's volume nodes and
``maisicore.io.geometry.Volume``.

Slicer arrays (``slicer.util.arrayFromVolume``) are indexed (k, j, i) = (z, y, x); maisicore arrays
are (x, y, z). Both use the node's IJKToRAS matrix (index -> RAS, mm) as the affine, so the
geometry carries over unchanged, whatever the orientation (oblique, flipped axes).

Only MRML, VTK and numpy here (no Qt): this runs in Slicer and headless with the ``slicer-core`` wheel.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import slicer
import vtk


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's IJKToRAS matrix as a 4x4 float64 array (index (i, j, k) -> RAS, mm).

    The node's own matrix: a parent transform, if any, is not applied."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix).astype(np.float64)


def volume_from_node(volume_node):
    """A ``maisicore.io.geometry.Volume`` copy of a scalar/labelmap volume node: array (x, y, z),
    affine = the node's IJKToRAS."""
    from maisicore.io.geometry import Volume, kji_to_ijk

    array = slicer.util.arrayFromVolume(volume_node)
    return Volume(np.ascontiguousarray(kji_to_ijk(array)), ijk_to_ras(volume_node))


def add_volume_node(volume, name: str, class_name: str = "vtkMRMLScalarVolumeNode", like=None):
    """A new volume node holding ``volume`` (array (x, y, z), affine index -> RAS).

    ``like``: a node whose IJKToRAS is copied verbatim when it describes the same grid (so the
    result's geometry equals the reference bit for bit) and whose parent transform is reused."""
    from maisicore.io.geometry import ijk_to_kji

    affine = np.asarray(volume.affine, dtype=np.float64)
    if like is not None:
        reference = ijk_to_ras(like)
        if not np.allclose(reference, affine, atol=1e-4):
            raise ValueError(f"the result is not on the grid of {like.GetName()!r} (affines differ)")
        affine = reference
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(ijk_to_kji(volume.array)), affine, name, class_name)
    if like is not None and like.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(like.GetParentTransformNode().GetID())
    return node


def segment_ids(segmentation_node) -> list[str]:
    """Segment ids of a segmentation node, in display order."""
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]


def segment_terminology(segment) -> str:
    """The segment's serialised terminology entry ('' when none): the ``TerminologyEntry`` tag,
    read through ``vtkSegment.GetTerminology`` where this Slicer has it."""
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology() or ""
    value = vtk.mutable("") if hasattr(vtk, "mutable") else None
    if value is not None and segment.GetTag("TerminologyEntry", value):
        return str(value)
    return ""


def set_segment_terminology(segment, entry: str) -> None:
    """Set the segment's terminology entry (serialised string)."""
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(entry)
    else:
        segment.SetTag("TerminologyEntry", entry)


def remove_nodes(*nodes) -> None:
    """Remove nodes and their display nodes from the scene; None is skipped."""
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        displays = []
        if hasattr(node, "GetNumberOfDisplayNodes"):
            displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        slicer.mrmlScene.RemoveNode(node)
        for display in displays:
            if display is not None and display.GetScene() is not None:
                slicer.mrmlScene.RemoveNode(display)


@contextmanager
def temporary_nodes():
    """Every node added to the scene inside the ``with`` block (helper labelmaps, their display
    nodes, colour tables) is removed at its end, whatever happens."""
    scene = slicer.mrmlScene
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node is not None and node.GetID() not in before and node.GetScene() is not None:
                scene.RemoveNode(node)


def segmentation_grid(segmentation_node) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """The segmentation's reference geometry without exporting anything: (shape (x, y, z) voxels,
    IJKToRAS of its first voxel), or None when the segmentation has none."""
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    text = segmentation_node.GetSegmentation().GetConversionParameter(name)
    image = slicer.vtkOrientedImageData()
    if not text or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, image):
        return None
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    affine = slicer.util.arrayFromVTKMatrix(matrix).astype(np.float64)
    extent = image.GetExtent()
    affine[:3, 3] = affine[:3, :3] @ np.array(extent[0::2], dtype=np.float64) + affine[:3, 3]
    shape = tuple(int(extent[2 * a + 1] - extent[2 * a] + 1) for a in range(3))
    return shape, affine


def _scratch_labelmap():
    """A labelmap node for intermediate results, hidden from node selectors."""
    node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLLabelMapVolumeNode")
    node.UnRegister(None)  # CreateNodeByClass hands over a reference; the scene keeps its own
    node.SetName("__maisi_temp__")
    node.SetHideFromEditors(True)
    return slicer.mrmlScene.AddNode(node)


def reference_geometry_node(segmentation_node, reference_volume=None):
    """A labelmap node on the grid the segmentation is exported to: ``reference_volume``'s grid when
    given, else the segmentation's own reference geometry. Call inside ``temporary_nodes()``."""
    labelmap = _scratch_labelmap()
    ids = vtk.vtkStringArray()
    logic = slicer.modules.segmentations.logic()
    if not logic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    ):
        raise RuntimeError(
            f"cannot export segmentation {segmentation_node.GetName()!r} to a labelmap: choose a reference volume"
        )
    return labelmap


def segment_masks(segmentation_node, ids: list[str], reference_volume=None):
    """Binary masks of the segments ``ids`` on one grid: the reference volume's when given, else the
    segmentation's reference geometry. Returns ({segment id: bool array (x, y, z)}, affine index -> RAS).
    Leaves the scene as it was."""
    from maisicore.io.geometry import kji_to_ijk

    logic = slicer.modules.segmentations.logic()
    with temporary_nodes():
        grid = reference_volume if reference_volume is not None else reference_geometry_node(segmentation_node)
        temporary = _scratch_labelmap()
        affine = ijk_to_ras(grid)
        shape_kji = tuple(reversed(grid.GetImageData().GetDimensions()))
        masks = {}
        for segment_id in ids:
            one = vtk.vtkStringArray()
            one.InsertNextValue(segment_id)
            if not logic.ExportSegmentsToLabelmapNode(
                segmentation_node, one, temporary, grid, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
            ):
                raise RuntimeError(f"cannot export segment {segment_id!r} of {segmentation_node.GetName()!r}")
            array = slicer.util.arrayFromVolume(temporary)
            if array.shape != shape_kji:
                raise RuntimeError(f"segment {segment_id!r} exported with shape {array.shape}, expected {shape_kji}")
            masks[segment_id] = np.ascontiguousarray(kji_to_ijk(array != 0))
        return masks, affine


def add_label_segmentation(labels, name: str, reference_node=None):
    """A new segmentation node with one segment per MAISI label id present in ``labels`` (a Volume,
    (x, y, z) ids): segment name = MAISI name, colour and terminology from the label table.

    ``reference_node``: volume whose grid the labels are on; its IJKToRAS is used and it becomes the
    segmentation's reference geometry."""
    from maisicore.anatomy.labels import label_table

    table = label_table()
    present = [int(v) for v in np.unique(labels.array) if int(v) != 0]
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    if reference_node is not None:
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    try:
        with temporary_nodes():
            colors = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", "__maisi_temp__colors")
            colors.SetTypeToUser()
            colors.SetHideFromEditors(True)
            colors.SetNumberOfColors(max(present, default=0) + 1)
            colors.GetLookupTable().SetRange(0, max(present, default=0))
            colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
            for value in present:
                info = table.by_id(value)
                r, g, b = (c / 255.0 for c in info.color)
                colors.SetColor(value, info.name, r, g, b, 1.0)
            labelmap = add_volume_node(labels, "__maisi_temp__labels", "vtkMRMLLabelMapVolumeNode", like=reference_node)
            labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
            if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation):
                raise RuntimeError("cannot import the labels into a segmentation")
    except BaseException:
        remove_nodes(segmentation)
        raise
    by_name = {table.by_id(v).name: table.by_id(v) for v in present}
    for segment_id in segment_ids(segmentation):
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        info = by_name[segment.GetName()]
        segment.SetColor(*(c / 255.0 for c in info.color))
        entry = info.terminology_entry()
        if entry:
            set_segment_terminology(segment, entry)
    return segmentation
