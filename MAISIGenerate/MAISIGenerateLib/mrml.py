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


def volume_view(volume_node):
    """A ``maisicore.io.geometry.Volume`` over the node's voxels without copying them: array
    (x, y, z) = the transposed (k, j, i) view (read it, never write it), affine = the node's IJKToRAS."""
    from maisicore.io.geometry import Volume, kji_to_ijk

    return Volume(kji_to_ijk(slicer.util.arrayFromVolume(volume_node)), ijk_to_ras(volume_node))


def exported_segment_masks(segmentation_node, ids: list[str], reference_volume=None):
    """Yield (segment id, bool array (x, y, z)) for each of ``ids``, one at a time, exported by the
    segmentations logic onto the reference volume's grid (else the segmentation's reference
    geometry): only one segment's mask is alive at a time. Leaves the scene as it was."""
    from maisicore.io.geometry import kji_to_ijk

    logic = slicer.modules.segmentations.logic()
    with temporary_nodes():
        grid = reference_volume if reference_volume is not None else reference_geometry_node(segmentation_node)
        temporary = _scratch_labelmap()
        shape_kji = tuple(reversed(grid.GetImageData().GetDimensions()))
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
            yield segment_id, kji_to_ijk(array != 0)


def segment_masks(segmentation_node, ids: list[str], reference_volume=None):
    """Binary masks of the segments ``ids`` on one grid: the reference volume's when given, else the
    segmentation's reference geometry. Returns ({segment id: bool array (x, y, z)}, affine index -> RAS).
    Leaves the scene as it was. (Many segments: ``exported_segment_masks`` holds one at a time.)"""
    if reference_volume is not None:
        affine = ijk_to_ras(reference_volume)
    else:
        with temporary_nodes():
            affine = ijk_to_ras(reference_geometry_node(segmentation_node))
    masks = {segment_id: np.ascontiguousarray(mask)
             for segment_id, mask in exported_segment_masks(segmentation_node, ids, reference_volume)}
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


# ---- segments -> one label array, slice by slice ------------------------------------------------
#
# A segmentation keeps its segments in a few labelmap layers (segments that do not overlap share a
# layer, each with its own label value). Reading the layers slice by slice of the output grid, and
# never exporting a whole segment, keeps the extra memory at a few slices besides the label array,
# however many segments there are.


def _to_world(node) -> np.ndarray | None:
    """4x4 matrix from the node's local coordinates to world (RAS); identity without a parent
    transform; None when the transform to world is not linear."""
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        return None
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix).astype(np.float64)


class _Layer:
    """One labelmap layer of a segmentation, read on the output grid one axial slice (k) at a time.

    values: the layer's voxels, (k, j, i) array (a view of the segmentation's data, never written);
    index_to_output: 4x4 from the layer's index space to the output grid's index space;
    owner: the VTK image holding ``values``."""

    def __init__(self, values: np.ndarray, extent, index_to_output: np.ndarray, shape_xyz, owner=None):
        self.values = values
        self._owner = owner  # the VTK image whose memory ``values`` views: kept alive with it
        self.shape_xyz = tuple(int(s) for s in shape_xyz)
        self.first = np.array(extent[0::2], dtype=np.int64)  # layer index of values[0, 0, 0] (i, j, k)
        output_to_index = np.linalg.inv(index_to_output)
        linear, offset = index_to_output[:3, :3], index_to_output[:3, 3]
        rounded = np.rint(offset)
        self.shift = None  # integer (i, j, k) offset when the layer lies on the output lattice
        if np.allclose(linear, np.eye(3), atol=1e-4) and np.allclose(offset, rounded, atol=1e-3):
            self.shift = rounded.astype(np.int64) + self.first
        else:
            nx, ny = self.shape_xyz[:2]
            j, i = np.mgrid[:ny, :nx]
            points = np.stack([i.ravel(), j.ravel(), np.zeros(i.size), np.ones(i.size)]).astype(np.float64)
            self._base = (output_to_index @ points)[:3]  # layer index of slice k = 0, (3, ny*nx)
            self._step = output_to_index[:3, 2]  # change per output slice

    def slice(self, k: int) -> np.ndarray | None:
        """The layer's values on output slice ``k`` as a (y, x) array (0 outside the layer), or None
        when the layer does not reach that slice."""
        nx, ny, _nz = self.shape_xyz
        size = np.array(self.values.shape[::-1], dtype=np.int64)  # (i, j, k) voxels of the layer
        if self.shift is not None:
            kk = k - self.shift[2]
            if not 0 <= kk < size[2]:
                return None
            lo = np.maximum(self.shift[:2], 0)
            hi = np.minimum(self.shift[:2] + size[:2], (nx, ny))
            if np.any(hi <= lo):
                return None
            out = np.zeros((ny, nx), dtype=self.values.dtype)
            src = lo - self.shift[:2]
            out[lo[1]:hi[1], lo[0]:hi[0]] = self.values[kk, src[1]:src[1] + hi[1] - lo[1], src[0]:src[0] + hi[0] - lo[0]]
            return out
        # nearest voxel, halves rounded up as VTK's nearest-neighbour reslice does
        index = np.floor(self._base + k * self._step[:, None] + 0.5).astype(np.int64) - self.first[:, None]
        inside = np.all((index >= 0) & (index < size[:, None]), axis=0)
        if not inside.any():
            return None
        out = np.zeros(ny * nx, dtype=self.values.dtype)
        i, j, kk = index[:, inside]
        out[inside] = self.values[kk, j, i]
        return out.reshape(ny, nx)


def segment_layers(segmentation_node, ids: list[str], shape_xyz, ijk_to_ras_output: np.ndarray,
                   grid_node=None) -> tuple[dict[int, _Layer], dict[str, tuple[int, int]]] | None:
    """The labelmap layers holding segments ``ids``, readable on the output grid (``shape_xyz``
    voxels, IJKToRAS ``ijk_to_ras_output`` in ``grid_node``'s coordinates), and where each segment
    is: {segment id: (layer index, label value)}. Segments kept as another representation (closed
    surfaces) are converted in a copy of the segmentation: the node is left as it was. None when
    the transform to world is not linear (export the segments instead)."""
    from vtk.util import numpy_support

    segmentation = segmentation_node.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    seg_to_world, grid_to_world = _to_world(segmentation_node), _to_world(grid_node)
    if seg_to_world is None or grid_to_world is None:
        return None
    if any(segmentation.GetSegment(i) is None or segmentation.GetSegment(i).GetRepresentation(name) is None for i in ids):
        copy = slicer.vtkSegmentation()
        copy.DeepCopy(segmentation)
        if not copy.CreateRepresentation(name):
            raise RuntimeError(f"cannot make labelmaps of the segments of {segmentation_node.GetName()!r}")
        segmentation = copy
    output_index_to_world = grid_to_world @ ijk_to_ras_output
    layers, where = {}, {}
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        image = segment.GetRepresentation(name)
        layer = segmentation.GetLayerIndex(segment_id)
        where[segment_id] = (layer, int(segment.GetLabelValue()))
        if layer in layers:
            continue
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        image_to_world = seg_to_world @ slicer.util.arrayFromVTKMatrix(matrix).astype(np.float64)
        extent = image.GetExtent()
        size_kji = tuple(max(0, extent[2 * a + 1] - extent[2 * a] + 1) for a in (2, 1, 0))
        scalars = image.GetPointData().GetScalars()
        values = (numpy_support.vtk_to_numpy(scalars).reshape(size_kji) if scalars is not None and all(size_kji)
                  else np.zeros((0, 0, 0), np.uint8))
        layers[layer] = _Layer(values, extent, np.linalg.inv(output_index_to_world) @ image_to_world, shape_xyz, image)
    return layers, where


def _lookup(size: int, entries: dict[int, int], dtype) -> np.ndarray:
    table = np.zeros(size, dtype=dtype)
    for value, item in entries.items():
        if 0 < value < size:
            table[value] = item
    return table


def _layer_size(layer: _Layer, where: dict, layer_index: int) -> int:
    """Entries a lookup table of the layer's values needs (its largest value + 1)."""
    used = [value for (index, value) in where.values() if index == layer_index]
    return max([int(layer.values.max(initial=0)), *used]) + 1


def count_segment_voxels(layers: dict[int, _Layer], where: dict[str, tuple[int, int]], nz: int) -> dict[str, int]:
    """Voxels of each segment on the output grid (``nz`` slices), counted slice by slice."""
    counts = {index: np.zeros(_layer_size(layer, where, index), np.int64) for index, layer in layers.items()}
    for k in range(nz):
        for index, layer in layers.items():
            values = layer.slice(k)
            if values is not None:
                counts[index] += np.bincount(values.ravel(), minlength=counts[index].size)[:counts[index].size]
    return {segment_id: int(counts[index][value]) for segment_id, (index, value) in where.items()}


def paint_segments(layers: dict[int, _Layer], where: dict[str, tuple[int, int]], order: list[tuple[str, int]],
                   shape_xyz, progress=None) -> np.ndarray:
    """One int16 label array (x, y, z; Fortran order, so its (z, y, x) view is C-contiguous) with the
    segments painted in ``order`` [(segment id, label value)]: where segments overlap, the later one
    in ``order`` wins. Built slice by slice: besides this array only a few slices are held.
    ``progress(done, total)`` is called after each slice."""
    nx, ny, nz = (int(s) for s in shape_xyz)
    labels = np.zeros((nx, ny, nz), dtype=np.int16, order="F")
    kji = labels.T
    rank_of = {segment_id: rank + 1 for rank, (segment_id, _label) in enumerate(order)}
    label_of = dict(order)
    tables = {}
    for index, layer in layers.items():
        size = _layer_size(layer, where, index)
        members = {value: segment_id for segment_id, (i, value) in where.items() if i == index and segment_id in rank_of}
        tables[index] = (_lookup(size, {v: rank_of[s] for v, s in members.items()}, np.int32),
                         _lookup(size, {v: label_of[s] for v, s in members.items()}, np.int16))
    for k in range(nz):
        rank = np.zeros((ny, nx), np.int32)
        for index, layer in layers.items():
            values = layer.slice(k)
            if values is None:
                continue
            ranks, ids = tables[index]
            layer_rank = ranks[values]
            better = layer_rank > rank
            if better.any():
                kji[k][better] = ids[values[better]]
                rank[better] = layer_rank[better]
        if progress is not None:
            progress(k + 1, nz)
    return labels
