"""Volume nodes to (array, affine) and back: the geometry conventions of DESIGN.md on real MRML."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
from mrml_scene import add_volume_from_array, load_volume, matrix, to_vtk_matrix
from voila.errors import InputImageError
from VOILASegmenterLib import mrml_io


def world_of(affine: np.ndarray, index) -> np.ndarray:
    return (affine @ np.array([*index, 1.0]))[:3]


def test_the_affine_maps_slicers_kji_array_indices_to_world_ras(scene):
    ct = load_volume(scene)
    array, affine = mrml_io.volume_to_numpy(ct)
    assert array.shape == tuple(reversed(ct.GetImageData().GetDimensions()))
    ijk_to_ras = matrix(ct.GetIJKToRASMatrix)
    k, j, i = 7, 11, 13
    assert np.allclose(world_of(affine, (k, j, i)), world_of(ijk_to_ras, (i, j, k)))
    assert array[k, j, i] == slicer.util.arrayFromVolume(ct)[k, j, i]


def test_the_array_is_a_copy_so_the_worker_never_reads_vtk_memory(scene):
    ct = load_volume(scene)
    array, _ = mrml_io.volume_to_numpy(ct)
    array[:] = 0
    assert slicer.util.arrayFromVolume(ct).any()


def test_a_linear_parent_transform_is_hardened_into_the_affine(scene):
    ct = load_volume(scene)
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -20.0, 30.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(to_vtk_matrix(shift))
    ct.SetAndObserveTransformNodeID(transform.GetID())
    _, affine = mrml_io.volume_to_numpy(ct)
    expected = shift @ matrix(ct.GetIJKToRASMatrix)
    assert np.allclose(world_of(affine, (1, 2, 3)), world_of(expected, (3, 2, 1)))


def test_a_volume_under_a_non_linear_transform_is_refused_with_advice_to_harden_it(scene):
    ct = load_volume(scene)
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    ct.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputImageError, match="harden"):
        mrml_io.volume_to_numpy(ct)


def test_a_volume_without_voxels_is_refused(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputImageError, match="no voxels"):
        mrml_io.volume_to_numpy(empty)


def test_segments_written_twice_for_the_same_prompt_keep_their_id(scene):
    ct = load_volume(scene)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mrml_io.prepare_segmentation(node, ct)
    shape = slicer.util.arrayFromVolume(ct).shape
    ijk_to_ras = matrix(ct.GetIJKToRASMatrix)
    mask = np.zeros(shape, dtype=bool)
    mask[10:20, 10:30, 10:40] = True
    options = dict(
        name="liver",
        color=(221, 130, 101),
        prompt_key="structure:liver",
        terminology_entry=None,
        confidence=0.9,
    )
    first = mrml_io.write_segment(node, None, mask, ijk_to_ras, **options)
    assert mrml_io.voila_segments(node) == {"structure:liver": [mrml_io.VoilaSegment(first, edited=False)]}
    smaller = np.zeros_like(mask)
    smaller[12:14, 12:14, 12:14] = True
    second = mrml_io.write_segment(node, first, smaller, ijk_to_ras, **options)
    assert second == first and node.GetSegmentation().GetNumberOfSegments() == 1
    from mrml_scene import segment_mask

    assert segment_mask(node, first, shape).sum() == 8


def test_the_heatmap_volume_copies_the_input_grid_and_parent_transform(scene):
    ct = load_volume(scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    ct.SetAndObserveTransformNodeID(transform.GetID())
    values = np.random.default_rng(0).random(slicer.util.arrayFromVolume(ct).shape).astype(np.float32)
    heatmap = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "heatmap")
    mrml_io.write_heatmap(heatmap, values, ct, "review")
    assert np.allclose(matrix(heatmap.GetIJKToRASMatrix), matrix(ct.GetIJKToRASMatrix))
    assert heatmap.GetTransformNodeID() == transform.GetID()
    assert np.array_equal(slicer.util.arrayFromVolume(heatmap), values)
    display = heatmap.GetDisplayNode()
    assert display.GetColorNode().GetName() == mrml_io.HEATMAP_COLOR_NAME
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))
    assert heatmap.GetAttribute(mrml_io.HEATMAP_KIND_ATTRIBUTE) == "review"
    assert heatmap.GetName() == "heatmap", "a name the user gave is kept"


def test_node_in_scene_notices_a_removed_node(scene):
    volume = add_volume_from_array(scene, "v", np.zeros((2, 3, 4), np.int16), np.eye(4))
    assert mrml_io.node_in_scene(volume)
    scene.RemoveNode(volume)
    assert not mrml_io.node_in_scene(volume)
