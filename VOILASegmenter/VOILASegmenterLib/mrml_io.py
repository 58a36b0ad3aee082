"""MRML nodes <-> numpy: the only place where the module touches voxel geometry.

A scalar volume node gives ``(array, affine)`` in `voila`'s convention: ``array`` is Slicer's
``[k, j, i]`` voxel array (no transposed copy) and ``affine`` maps ``(k, j, i, 1)`` to world RAS,
i.e. the node's IJK->RAS matrix, hardened with its parent transform, with its first and third
columns swapped. Results come back on that same ``[k, j, i]`` grid and are written into
segments and a heatmap volume that share the input's IJK->RAS matrix and parent transform.

Everything here runs on the main thread and only uses the scene the nodes belong to
(``node.GetScene()``), never a global ``slicer.mrmlScene``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import slicer
import vtk
from voila.errors import InputImageError, VoilaError
from vtk.util import numpy_support

from VOILASegmenterLib.terminology import (  # noqa: F401 (moved there; importable from here until callers move)
    ANATOMIC_CONTEXT,
    CATEGORY_CONTEXT,
    segment_terminology,
    set_segment_terminology,
    terminology_string,
)

# Swaps the first and third voxel axes: (k, j, i, 1) -> (i, j, k, 1).
KJI_TO_IJK = np.array(
    [[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)

PROMPT_TAG = "VOILA.Prompt"
CONFIDENCE_TAG = "VOILA.Confidence"
CHECKSUM_TAG = "VOILA.Checksum"  # of the voxels VOILA wrote: a different one means the user edited it
# Expected quality from the review map's calibration (voila.infer.review): the predicted Dice, and
# "1" with a reason (CHECK_REASON_TAG) where the structure deserves a second look, else "0".
PREDICTED_DICE_TAG = "VOILA.PredictedDice"
CHECK_TAG = "VOILA.Check"
CHECK_REASON_TAG = "VOILA.CheckReason"
# Marks every heatmap VOILA created, whatever its kind (the name predates the review map; scenes
# saved since carry it): VOILA writes heatmaps only into such volumes.
HEATMAP_ATTRIBUTE = "VOILA.ComplexityHeatmap"
# What the heatmap holds: a key of voila.infer.results.HEATMAP_KINDS ("review" or "complexity").
HEATMAP_KIND_ATTRIBUTE = "VOILA.HeatmapKind"
# A new heatmap volume is called "<input volume> <this>".
HEATMAP_NAMES = {"review": "VOILA review map", "complexity": "VOILA CAS complexity"}
# A control point whose label starts with this is an excluding ("outside") click; any other label
# includes. Labels show next to the points in every view and can be edited in the Markups module,
# so the user sees, and can change, what each click means; they are saved with the scene.
EXCLUDING_LABEL_PREFIX = "-"
INCLUDING_LABEL_FORMAT = "+%d"  # Slicer's control point label format (%d: the point's number)
EXCLUDING_LABEL_FORMAT = EXCLUDING_LABEL_PREFIX + "%d"
HEATMAP_COLOR_NAME = "VOILA Heatmap"
# The heatmap's colour table is fully transparent up to this value and fully opaque from the next.
HEATMAP_TRANSPARENT_BELOW = 0.1
HEATMAP_OPAQUE_FROM = 0.5

# A perceptually uniform dark-to-bright ramp (matplotlib's "inferno" sampled at 9 stops), so the
# heatmap reads the same in Slicer builds without the Colors module's file-based tables.
_INFERNO_STOPS = (
    (0.000, 0.001, 0.000, 0.014),
    (0.125, 0.110, 0.047, 0.271),
    (0.250, 0.258, 0.039, 0.407),
    (0.375, 0.416, 0.094, 0.433),
    (0.500, 0.578, 0.148, 0.404),
    (0.625, 0.735, 0.216, 0.330),
    (0.750, 0.865, 0.317, 0.226),
    (0.875, 0.954, 0.469, 0.100),
    (1.000, 0.988, 0.998, 0.645),
)


def vtk_matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_to_vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's own IJK->RAS matrix (parent transforms not applied), ``(4, 4)``."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return vtk_matrix_to_array(matrix)


def node_to_world(node) -> np.ndarray:
    """The node's parent transforms as one ``(4, 4)`` matrix (identity without any); non-linear
    transforms are refused."""
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise InputImageError(
            f"'{node.GetName()}' is under a non-linear transform ('{transform_node.GetName()}'); "
            "harden the transform (Data module, right-click) and run again"
        )
    to_world = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(to_world)
    return vtk_matrix_to_array(to_world)


def ijk_to_world(volume_node) -> np.ndarray:
    """IJK->world RAS with the parent transform hardened into it; non-linear transforms are refused."""
    return node_to_world(volume_node) @ ijk_to_ras(volume_node)


def volume_to_numpy(volume_node) -> tuple[np.ndarray, np.ndarray]:
    """``(array [k, j, i], affine (k, j, i, 1) -> world RAS)``; the array is a copy the caller owns."""
    image_data = volume_node.GetImageData() if volume_node is not None else None
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else "(none)"
        raise InputImageError(f"volume '{name}' has no voxels; load a CT volume and select it as input")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputImageError(
            f"volume '{volume_node.GetName()}' has {image_data.GetNumberOfScalarComponents()} components; "
            "select a single-channel CT volume"
        )
    shape = tuple(reversed(image_data.GetDimensions()))
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(shape).copy()
    return array, ijk_to_world(volume_node) @ KJI_TO_IJK


def _oriented_image(array_kji: np.ndarray, ijk_to_ras_matrix: np.ndarray) -> slicer.vtkOrientedImageData:
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*reversed(array_kji.shape))
    vtk_type = numpy_support.get_vtk_array_type(array_kji.dtype)
    image.AllocateScalars(vtk_type, 1)
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(array_kji.shape)
    voxels[:] = array_kji
    image.SetImageToWorldMatrix(array_to_vtk_matrix(ijk_to_ras_matrix))
    return image


@dataclass
class VoilaSegment:
    """A segment VOILA wrote: its ID and whether the user changed its voxels since."""

    segment_id: str
    edited: bool


def voila_segments(segmentation_node) -> dict[str, list[VoilaSegment]]:
    """``{prompt key: [VoilaSegment, ...]}`` of the segments this module wrote earlier, in list
    order. A segment counts as edited when its voxels no longer match the checksum stored when
    VOILA wrote it (Segment Editor changes, or a segment of an older version without checksum)."""
    segmentation = segmentation_node.GetSegmentation()
    found: dict[str, list[VoilaSegment]] = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        segment_id = segmentation.GetNthSegmentID(index)
        key, stored = vtk.reference(""), vtk.reference("")
        if segment.GetTag(PROMPT_TAG, key):
            segment.GetTag(CHECKSUM_TAG, stored)
            edited = str(stored) != segment_checksum(segmentation_node, segment_id)
            found.setdefault(str(key), []).append(VoilaSegment(segment_id, edited))
    return found


def segment_checksum(segmentation_node, segment_id: str) -> str:
    """A fingerprint of a segment's voxels: their bounding box (in the labelmap's IJK) and the
    mask inside it, so it does not depend on how far the (possibly shared) labelmap extends."""
    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    scalars = image.GetPointData().GetScalars() if image.GetPointData() is not None else None
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    if scalars is None or i1 < i0:
        return "empty"
    mask = numpy_support.vtk_to_numpy(scalars).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1) > 0
    where = np.nonzero(mask)
    if not where[0].size:
        return "empty"
    low, high = [int(w.min()) for w in where], [int(w.max()) + 1 for w in where]
    box = mask[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    digest = hashlib.sha1(str([low[0] + k0, low[1] + j0, low[2] + i0, *box.shape]).encode("ascii"))
    digest.update(np.packbits(box).tobytes())
    return digest.hexdigest()


def prepare_segmentation(segmentation_node, input_volume) -> None:
    """Geometry, display, parent transform and subject-hierarchy place follow the input volume."""
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(input_volume)
    segmentation_node.SetAndObserveTransformNodeID(input_volume.GetTransformNodeID())
    place_next_to(segmentation_node, input_volume)


def write_segment(
    segmentation_node,
    segment_id: str | None,
    mask_kji: np.ndarray,
    ijk_to_ras_matrix,
    *,
    name,
    color,
    prompt_key,
    terminology_entry,
    confidence,
    predicted_dice: float | None = None,
    check: bool = False,
    check_reason: str = "",
) -> str:
    """Create or replace (same ID, same place in the list) one segment from a ``[k, j, i]`` mask,
    tagged with what VOILA knows of it (tags are saved with the scene). ``predicted_dice`` None
    (not assessed) leaves no predicted-Dice tag."""
    segmentation = segmentation_node.GetSegmentation()
    if segment_id is None or segmentation.GetSegment(segment_id) is None:
        segment_id = segmentation.AddEmptySegment("", name, [c / 255.0 for c in color])
    segment = segmentation.GetSegment(segment_id)
    segment.SetName(name)
    segment.SetColor(*[c / 255.0 for c in color])
    segment.SetTag(PROMPT_TAG, prompt_key)
    segment.SetTag(CONFIDENCE_TAG, f"{confidence:.4f}")
    # a replaced segment must not keep the quality of the result it replaces
    if predicted_dice is None:
        segment.RemoveTag(PREDICTED_DICE_TAG)
    else:
        segment.SetTag(PREDICTED_DICE_TAG, f"{predicted_dice:.4f}")
    segment.SetTag(CHECK_TAG, "1" if check else "0")
    if check and check_reason:
        segment.SetTag(CHECK_REASON_TAG, check_reason)
    else:
        segment.RemoveTag(CHECK_REASON_TAG)
    if terminology_entry:
        set_segment_terminology(segment, terminology_entry)
    image = _oriented_image(mask_kji.astype(np.uint8, copy=False), ijk_to_ras_matrix)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise VoilaError(f"could not write segment '{name}' into '{segmentation_node.GetName()}'")
    # read back, as an edit check later reads it: what Slicer holds, not what was handed over
    segment.SetTag(CHECKSUM_TAG, segment_checksum(segmentation_node, segment_id))
    return segment_id


def segment_mask_on_volume(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A segment as a boolean ``[k, j, i]`` mask on ``volume_node``'s voxel grid (the grid of
    :func:`volume_to_numpy`), whatever geometry its labelmap has: nearest-neighbour resampled,
    the parent transforms of both nodes applied (linear ones only). Neither node is changed."""
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    if segment is None:
        raise VoilaError(f"'{segmentation_node.GetName()}' has no segment {segment_id!r}")
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(labelmap):
        raise InputImageError(
            f"'{segmentation_node.GetName()}' holds no binary labelmap; create it in the Segmentations "
            "module (Representations: Binary labelmap, Create) and try again"
        )
    shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    mask = np.zeros(shape, dtype=bool)
    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    if image.GetPointData().GetScalars() is None or i1 < i0 or j1 < j0 or k1 < k0:
        return mask
    # both grids in world RAS: the segment's image->world through its node's transforms
    image_to_world = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(image_to_world)
    image.SetImageToWorldMatrix(
        array_to_vtk_matrix(node_to_world(segmentation_node) @ vtk_matrix_to_array(image_to_world))
    )
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    reference.SetImageToWorldMatrix(array_to_vtk_matrix(ijk_to_world(volume_node)))
    resampled = slicer.vtkOrientedImageData()
    resample = slicer.vtkOrientedImageDataResample
    if not resample.ResampleOrientedImageToReferenceOrientedImage(image, reference, resampled, False):
        raise VoilaError(
            f"could not resample segment '{segment.GetName()}' onto volume '{volume_node.GetName()}'"
        )
    i0, i1, j0, j1, k0, k1 = resampled.GetExtent()
    scalars = resampled.GetPointData().GetScalars()
    if scalars is None or i1 < i0 or j1 < j0 or k1 < k0:
        return mask
    values = numpy_support.vtk_to_numpy(scalars).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1) > 0
    # the resampled extent may reach past the volume's: keep the overlap
    low = [max(0, k0), max(0, j0), max(0, i0)]
    high = [min(shape[0], k1 + 1), min(shape[1], j1 + 1), min(shape[2], i1 + 1)]
    if any(h <= lo for lo, h in zip(low, high)):
        return mask
    mask[low[0] : high[0], low[1] : high[1], low[2] : high[2]] = values[
        low[0] - k0 : high[0] - k0, low[1] - j0 : high[1] - j0, low[2] - i0 : high[2] - i0
    ]
    return mask


def place_next_to(node, reference_node) -> None:
    """Put ``node`` in the subject-hierarchy folder (study) of ``reference_node``, if the scene has one."""
    scene = reference_node.GetScene()
    sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") if scene else None
    if sh is None:
        return
    reference_item = sh.GetItemByDataNode(reference_node)
    if not reference_item:
        return
    parent = sh.GetItemParent(reference_item)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


def heatmap_color_node(scene):
    """The module's heatmap colour table, for either kind (one per scene, created on first use)."""
    existing = scene.GetFirstNodeByName(HEATMAP_COLOR_NAME)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    color_node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", HEATMAP_COLOR_NAME)
    color_node.SetTypeToUser()
    color_node.SetNumberOfColors(256)
    stops = np.array(_INFERNO_STOPS)
    positions = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.interp(positions, stops[:, 0], stops[:, c]) for c in (1, 2, 3)], axis=1)
    # transparent where there is little to review, so the CT shows undimmed there (alpha ramp)
    alpha = np.clip(
        (positions - HEATMAP_TRANSPARENT_BELOW) / (HEATMAP_OPAQUE_FROM - HEATMAP_TRANSPARENT_BELOW), 0, 1
    )
    for index, ((r, g, b), a) in enumerate(zip(rgb, alpha)):
        color_node.SetColor(index, f"{index / 255:.2f}", float(r), float(g), float(b), float(a))
    color_node.SetAttribute("Category", "VOILA")
    return color_node


def heatmap_name(input_volume, kind: str) -> str:
    """The name of a new heatmap volume of ``kind`` for ``input_volume`` (unique in its scene)."""
    return input_volume.GetScene().GenerateUniqueName(f"{input_volume.GetName()} {HEATMAP_NAMES[kind]}")


def write_heatmap(heatmap_node, heatmap_kji: np.ndarray, input_volume, kind: str) -> None:
    """Fill a scalar volume node with a heatmap of ``kind`` (:data:`HEATMAP_NAMES`) on the input
    volume's grid; both kinds lie in [0, 1] and share the display (colour table, window 0..1).
    A heatmap of the other kind that still has the name VOILA gave it is renamed after ``kind``."""
    earlier = heatmap_node.GetAttribute(HEATMAP_KIND_ATTRIBUTE)
    if earlier in HEATMAP_NAMES and earlier != kind and heatmap_node.GetScene() is not None:
        if (heatmap_node.GetName() or "").startswith(f"{input_volume.GetName()} {HEATMAP_NAMES[earlier]}"):
            heatmap_node.SetName(heatmap_name(input_volume, kind))
    image = vtk.vtkImageData()
    image.SetDimensions(*reversed(heatmap_kji.shape))
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(heatmap_kji.shape)
    voxels[:] = heatmap_kji
    heatmap_node.SetIJKToRASMatrix(array_to_vtk_matrix(ijk_to_ras(input_volume)))
    heatmap_node.SetAndObserveImageData(image)
    heatmap_node.SetAndObserveTransformNodeID(input_volume.GetTransformNodeID())
    heatmap_node.SetAttribute(HEATMAP_ATTRIBUTE, "1")
    heatmap_node.SetAttribute(HEATMAP_KIND_ATTRIBUTE, kind)
    display = heatmap_node.GetDisplayNode()
    if display is None:
        heatmap_node.CreateDefaultDisplayNodes()
        display = heatmap_node.GetDisplayNode()
    if display.GetColorNode() is None or display.GetColorNodeID() in (None, "", "vtkMRMLColorTableNodeGrey"):
        display.SetAndObserveColorNodeID(heatmap_color_node(heatmap_node.GetScene()).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    place_next_to(heatmap_node, input_volume)


def show_heatmap(scene, input_volume, heatmap_node, opacity: float) -> None:
    """Heatmap as foreground over the input in every slice view the scene has (none: nothing to do)."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if not composite.GetBackgroundVolumeID():
            composite.SetBackgroundVolumeID(input_volume.GetID())
        composite.SetForegroundVolumeID(heatmap_node.GetID() if heatmap_node is not None else None)
        composite.SetForegroundOpacity(float(opacity))


def hide_heatmap(scene, heatmap_node) -> None:
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if heatmap_node is not None and composite.GetForegroundVolumeID() == heatmap_node.GetID():
            composite.SetForegroundVolumeID(None)


def is_excluding_label(label: str) -> bool:
    """Whether a control point label marks an excluding click (see :data:`EXCLUDING_LABEL_PREFIX`)."""
    return str(label or "").lstrip().startswith(EXCLUDING_LABEL_PREFIX)


def points_from_markups(point_list) -> list[tuple[tuple[float, float, float], bool]]:
    """The point list's clicks as ``[((R, A, S), positive), ...]`` in world RAS mm (parent
    transforms applied), the form :meth:`voila.infer.encoding.VolumeEncoding.segment` takes.

    Only placed points count: the preview point that follows the mouse in place mode, and points
    whose position is undefined or skipped, are not clicks yet. A label starting with
    :data:`EXCLUDING_LABEL_PREFIX` makes a point excluding.
    """
    points = []
    for index in range(point_list.GetNumberOfControlPoints()):
        if point_list.GetNthControlPointPositionStatus(index) != point_list.PositionDefined:
            continue
        position = [0.0, 0.0, 0.0]
        point_list.GetNthControlPointPositionWorld(index, position)
        positive = not is_excluding_label(point_list.GetNthControlPointLabel(index))
        points.append((tuple(float(c) for c in position), positive))
    return points


def box_from_roi(roi_node) -> tuple[tuple[float, float, float], tuple[float, float, float]] | None:
    """The world-axis-aligned box around an ROI as two opposite corners ``((R1, A1, S1), (R2, A2,
    S2))`` in mm, or None while the ROI has no extent (not placed yet, or cleared).

    The ROI's own rotation and its parent transforms are applied (Slicer's ``GetRASBounds``): the
    model keeps a prompt inside a world-axis-aligned box, so a rotated ROI keeps it inside the
    box around the ROI.
    """
    if min(roi_node.GetSize()) <= 0.0:
        return None
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    return (
        (float(bounds[0]), float(bounds[2]), float(bounds[4])),
        (float(bounds[1]), float(bounds[3]), float(bounds[5])),
    )


def node_in_scene(node) -> bool:
    """False once the node was removed from its scene (the Python object may outlive it)."""
    if node is None:
        return False
    scene = node.GetScene()
    return scene is not None and scene.GetNodeByID(node.GetID()) is node
