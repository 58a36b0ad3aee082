"""Helpers for MRML tests without the Slicer application (``slicer-core``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "VOILASegmenter"
SAMPLE_CT = REPO / "Resources" / "SampleData" / "totalseg-example" / "example_ct.nii.gz"

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


def _register_segmentation_converters() -> None:
    # The Segmentations module does this when Slicer starts; without it a segment has no labelmap.
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


_register_segmentation_converters()


def new_scene():
    """A scene with Slicer's default colour tables and one slice view (Red), like the application."""
    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkMRMLApplicationLogic()
    application_logic.SetMRMLScene(scene)
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLApplicationLogic(application_logic)
    slice_logic.SetMRMLScene(scene)
    slice_logic.AddSliceNode("Red")
    # Keep the logics alive as long as the scene.
    scene._voila_logics = (application_logic, color_logic, slice_logic)
    return scene


def load_volume(scene, path: Path = SAMPLE_CT, name: str = "CT"):
    """Read a volume file through a volume storage node, as File > Add Data does."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(volume):
        raise RuntimeError(f"could not read {path}")
    volume.SetAndObserveStorageNodeID(storage.GetID())
    volume.CreateDefaultDisplayNodes()
    return volume


def matrix(node_matrix_getter) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node_matrix_getter(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def to_vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    from VOILASegmenterLib.mrml_io import array_to_vtk_matrix  # the product's one conversion

    return array_to_vtk_matrix(array)


def add_volume_from_array(scene, name: str, array_kji: np.ndarray, ijk_to_ras: np.ndarray):
    image = vtk.vtkImageData()
    image.SetDimensions(*reversed(array_kji.shape))
    image.AllocateScalars(numpy_support.get_vtk_array_type(array_kji.dtype), 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(array_kji.shape)[:] = array_kji
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volume.SetIJKToRASMatrix(to_vtk_matrix(ijk_to_ras))
    volume.SetAndObserveImageData(image)
    volume.CreateDefaultDisplayNodes()
    return volume


def segment_mask(segmentation_node, segment_id: str, shape_kji) -> np.ndarray:
    """The segment as a boolean ``[k, j, i]`` array on its reference (input volume) grid."""
    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    mask = np.zeros(shape_kji, dtype=bool)
    if image.GetPointData().GetScalars() is None:
        return mask
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    if i1 < i0:
        return mask
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    values = values.reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
    mask[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1] = values > 0
    return mask
