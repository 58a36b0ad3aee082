"""Refining with clicks and boxes on real MRML (slicer-core): markups -> world-RAS spatial prompts,
Slicer's place mode with the label convention, and runs of the real worker with the shipped demo
model on the bundled CT, answered from the encoding it keeps after the first run."""

from __future__ import annotations

import time

import numpy as np
import pytest
import slicer
import vtk
from mrml_scene import (
    REPO,
    add_volume_from_array,
    load_volume,
    matrix,
    new_scene,
    segment_mask,
    to_vtk_matrix,
)
from VOILASegmenterLib import mrml_io

REFERENCE = REPO / "Resources" / "SampleData" / "totalseg-example" / "example_seg_fast_force_split.nii.gz"
KIDNEY_LEFT, LIVER = 3, 5  # TotalSegmentator labels of the bundled reference (same grid as the CT)
# Fewer windows than the default 0.5 and no heatmap: these tests are about clicks, not quality.
OVERLAP = 0.25
ROTATION = np.array(
    [[0.0, -1.0, 0.0, 30.0], [1.0, 0.0, 0.0, -36.0], [0.0, 0.0, 1.0, 12.0], [0.0, 0.0, 0.0, 1.0]]
)


def rotation_about_s(degrees: float, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    angle = np.radians(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    rotation[:3, 3] = shift
    return rotation


def world_of(volume, kji_voxels: np.ndarray) -> np.ndarray:
    """World RAS of ``[k, j, i]`` voxel indices of a volume without a parent transform, ``(N, 3)``."""
    ijk = np.asarray(kji_voxels, dtype=float)[:, ::-1]
    ijk_to_ras = matrix(volume.GetIJKToRASMatrix)
    return ijk @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# -- markups -> spatial prompts (no model) --------------------------------------------------------


@pytest.fixture
def logic_without_worker():
    from VOILASegmenterLib.logic import VOILASegmenterLogic

    return VOILASegmenterLogic()  # its worker starts only on a run, and these tests run none


@pytest.fixture
def small_volume(scene):
    return add_volume_from_array(
        scene, "small", np.zeros((4, 5, 6), dtype=np.int16), np.diag([2.0, 2.0, 2.0, 1.0])
    )


def test_outside_points_are_labelled_excluding_and_slicer_places_them_on_the_prompts_point_list(
    scene, small_volume, logic_without_worker
):
    logic = logic_without_worker
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    interaction = scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")

    point_list = logic.placePoints(small_volume, "my organ", excluding=True)
    assert selection.GetActivePlaceNodeID() == point_list.GetID()
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsFiducialNode"
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert interaction.GetPlaceModePersistence() == 1
    point_list.AddControlPoint(vtk.vtkVector3d(1.0, 2.0, 3.0))  # what a click in a view adds
    assert point_list.GetNthControlPointLabel(0).startswith("-")

    assert logic.placePoints(small_volume, "My  Organ") is point_list  # one list per prompt
    point_list.AddControlPoint(vtk.vtkVector3d(4.0, 5.0, 6.0))
    assert point_list.GetNthControlPointLabel(1).startswith("+")
    point_list.AddControlPoint(vtk.vtkVector3d(7.0, 8.0, 9.0))
    point_list.SetNthControlPointLabel(2, "-  leave this out")  # relabelled in the Markups module
    point_list.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0))
    point_list.UnsetNthControlPointPosition(3)  # not placed (like the preview that follows the mouse)

    assert mrml_io.points_from_markups(point_list) == [
        ((1.0, 2.0, 3.0), False),
        ((4.0, 5.0, 6.0), True),
        ((7.0, 8.0, 9.0), False),
    ]


def test_points_are_world_coordinates_with_the_parent_transforms_applied(
    scene, small_volume, logic_without_worker
):
    moved = rotation_about_s(30.0, (5.0, -7.0, 11.0))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(to_vtk_matrix(moved))
    small_volume.SetAndObserveTransformNodeID(transform.GetID())

    point_list = logic_without_worker.promptPointList(small_volume, "liver")
    assert point_list.GetParentTransformNode() is transform, "clicks move with their volume"
    point_list.AddControlPoint(vtk.vtkVector3d(10.0, 20.0, 30.0))  # node (local) coordinates
    ((position, positive),) = mrml_io.points_from_markups(point_list)
    assert positive and np.allclose(position, (moved @ [10.0, 20.0, 30.0, 1.0])[:3])


def test_the_box_of_a_rotated_transformed_roi_is_the_world_axis_aligned_box_around_it(
    scene, small_volume, logic_without_worker
):
    roi = logic_without_worker.promptBox(small_volume, "left kidney")
    assert mrml_io.box_from_roi(roi) is None, "an ROI not placed yet is no box"
    object_to_node = rotation_about_s(40.0, (10.0, 20.0, 30.0))
    roi.SetAndObserveObjectToNodeMatrix(to_vtk_matrix(object_to_node))
    roi.SetSize(20.0, 10.0, 6.0)
    parent = rotation_about_s(-25.0, (3.0, 4.0, -5.0))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(to_vtk_matrix(parent))
    roi.SetAndObserveTransformNodeID(transform.GetID())

    half = np.array([10.0, 5.0, 3.0])
    corners = np.array([[x, y, z, 1.0] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * [*half, 1.0]
    world = (parent @ object_to_node @ corners.T).T[:, :3]
    low, high = mrml_io.box_from_roi(roi)
    assert np.allclose(low, world.min(axis=0)) and np.allclose(high, world.max(axis=0))


def test_each_prompt_has_one_point_list_and_one_box_per_volume_in_the_volumes_study(
    scene, small_volume, logic_without_worker
):
    logic = logic_without_worker
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    sh.CreateItem(study, small_volume)
    other = add_volume_from_array(scene, "other", np.zeros((4, 5, 6), dtype=np.int16), np.eye(4))

    points = logic.promptPointList(small_volume, "liver")
    box = logic.promptBox(small_volume, "liver")
    assert points.GetName() == "VOILA points: liver" and box.GetName() == "VOILA box: liver"
    assert points.GetAttribute("VOILA.Prompt") == "liver"
    assert sh.GetItemParent(sh.GetItemByDataNode(points)) == study
    assert sh.GetItemParent(sh.GetItemByDataNode(box)) == study
    points.SetName("renamed by the user")
    assert logic.promptMarkups(small_volume, "Liver").points is points
    assert logic.promptPointList(other, "liver") is not points, "clicks on one CT never go with another"

    points.AddControlPoint(vtk.vtkVector3d(1.0, 2.0, 3.0))
    assert logic.spatialPrompts(small_volume, "liver, spleen") == ({"liver": [((1.0, 2.0, 3.0), True)]}, {})
    box.SetCenter(0.0, 0.0, 0.0)
    box.SetSize(2.0, 4.0, 6.0)
    _, boxes = logic.spatialPrompts(small_volume, ["spleen", "liver"])
    assert boxes == {"liver": ((-1.0, -2.0, -3.0), (1.0, 2.0, 3.0))}
    assert logic.spatialPrompts(other, "liver") == ({}, {})

    logic.clearPromptMarkups(small_volume, "liver")
    assert logic.spatialPrompts(small_volume, "liver") == ({}, {})
    assert sorted(node.GetName() for node in logic.voilaMarkups(small_volume)) == ["renamed by the user"]


# -- the real worker, the demo model, the bundled CT ---------------------------------------------


@pytest.fixture(scope="module")
def module_scene():
    scene = new_scene()
    yield scene
    scene.Clear(1)


@pytest.fixture(scope="module")
def logic():
    from voila.resources import DEMO_MODEL, resources_dir
    from VOILASegmenterLib.logic import VOILASegmenterLogic

    assert (resources_dir() / DEMO_MODEL).is_file(), f"the demo model {DEMO_MODEL} is missing"
    logic = VOILASegmenterLogic()
    yield logic
    logic.shutdown()


@pytest.fixture(scope="module")
def ct(module_scene):
    return load_volume(module_scene)


@pytest.fixture(scope="module")
def reference(module_scene, ct) -> np.ndarray:
    """The reference labels as a ``[k, j, i]`` array on the CT's grid."""
    labels = load_volume(module_scene, REFERENCE, "reference")
    assert np.allclose(matrix(labels.GetIJKToRASMatrix), matrix(ct.GetIJKToRASMatrix))
    return slicer.util.arrayFromVolume(labels).copy()


@pytest.fixture(scope="module")
def first_run(logic, ct):
    """The first run on the CT, which encodes it: ``(seconds, encoding memory after it)``."""
    started = time.monotonic()
    outcome = logic.process(ct, ["liver"], None, overlap=OVERLAP, heatmapKind=None)
    assert outcome.segments[0].found
    return time.monotonic() - started, logic.encodingMemory


@pytest.fixture(scope="module")
def liver_point(ct, reference) -> np.ndarray:
    """World RAS of the reference liver voxel farthest from the liver's surface."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(reference == LIVER)
    return world_of(ct, [np.unravel_index(int(depth.argmax()), depth.shape)])[0]


def run(logic, volume, prompts):
    points, boxes = logic.spatialPrompts(volume, prompts)
    return logic.process(volume, prompts, None, overlap=OVERLAP, heatmapKind=None, points=points, boxes=boxes)


def only_mask(outcome, volume) -> np.ndarray:
    (record,) = outcome.segments
    assert record.found, record.note
    return segment_mask(outcome.segmentation, record.segmentId, slicer.util.arrayFromVolume(volume).shape)


@pytest.fixture(scope="module")
def clicked_organ(module_scene, logic, ct, reference, liver_point, first_run) -> np.ndarray:
    """'my organ' from one inside point on the liver: its mask ``[k, j, i]``."""
    point_list = logic.promptPointList(ct, "my organ")
    point_list.AddControlPointWorld(vtk.vtkVector3d(*liver_point))
    mask = only_mask(run(logic, ct, ["my organ"]), ct)
    point_list.RemoveAllControlPoints()
    return mask


def test_a_point_in_the_liver_and_any_name_segment_the_liver(clicked_organ, reference):
    assert dice(clicked_organ, reference == LIVER) > 0.5


def test_a_second_run_on_the_same_volume_is_answered_from_the_kept_encoding(logic, ct, first_run):
    first_seconds, memory_after_first = first_run
    assert memory_after_first.volumes >= 1 and memory_after_first.bytes > 0
    before = logic.encodingMemory
    started = time.monotonic()
    logic.process(ct, ["liver", "spleen"], None, overlap=OVERLAP, heatmapKind=None)
    seconds = time.monotonic() - started
    assert logic.encodingMemory == before, "no new encoding for a volume the worker holds"
    assert seconds < 0.25 * first_seconds, f"{seconds:.1f} s again after {first_seconds:.1f} s first"


def test_a_point_on_a_volume_under_a_rotating_transform_gives_the_same_segment(
    module_scene, logic, ct, liver_point, clicked_organ
):
    """The same voxels under a rotating parent transform, stored so that they lie where the CT's
    lie in the world (the model sees the same scan); the point list follows the volume's
    transform, so a point placed in a view at the liver is stored rotated back in its list."""
    transform = module_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rotation")
    transform.SetMatrixTransformToParent(to_vtk_matrix(ROTATION))
    local = np.linalg.inv(ROTATION) @ matrix(ct.GetIJKToRASMatrix)
    moved = add_volume_from_array(module_scene, "CT moved", slicer.util.arrayFromVolume(ct).copy(), local)
    moved.SetAndObserveTransformNodeID(transform.GetID())
    point_list = logic.promptPointList(moved, "my organ")
    point_list.AddControlPointWorld(vtk.vtkVector3d(*liver_point))  # placed in a view
    stored = [0.0, 0.0, 0.0]
    point_list.GetNthControlPointPosition(0, stored)
    assert np.linalg.norm(np.subtract(stored, liver_point)) > 10.0, "the list holds it in the volume's frame"
    mask = only_mask(run(logic, moved, ["my organ"]), moved)  # same voxels, same [k, j, i] grid
    assert dice(mask, clicked_organ) > 0.95


def test_a_box_keeps_its_prompt_inside_the_boxs_world_bounds(module_scene, logic, ct, reference, first_run):
    kidney = world_of(ct, np.argwhere(reference == KIDNEY_LEFT))
    low, high = kidney.min(axis=0) + [0.0, 0.0, 15.0], kidney.max(axis=0)  # cuts the kidney's lower pole
    roi = logic.promptBox(ct, "left kidney")
    roi.SetCenter(*((low + high) / 2))
    roi.SetSize(*(high - low))
    box = mrml_io.box_from_roi(roi)
    assert np.allclose(box, (low, high))
    mask = only_mask(run(logic, ct, ["left kidney"]), ct)
    kept = world_of(ct, np.argwhere(mask))
    # The model keeps the voxels of its 1.5 mm grid inside the box; the CT's voxels take the label
    # of the nearest of those, whose centre is at most half a model voxel away on each axis.
    tolerance = 0.75 + 1e-6
    assert len(kept) > 50
    assert np.all(kept >= low - tolerance) and np.all(kept <= high + tolerance)
    assert np.any(kidney[:, 2] < low[2] - tolerance), "the box cuts part of the kidney off"


def test_an_excluding_point_carves_the_region_around_it_out(logic, ct, reference, liver_point, clicked_organ):
    liver = reference == LIVER
    candidates = np.argwhere(clicked_organ & liver)
    far = candidates[np.argmax(np.linalg.norm(candidates - np.argwhere(liver).mean(axis=0), axis=1))]
    excluded = world_of(ct, [far])[0]
    point_list = logic.placePoints(ct, "my organ")
    point_list.AddControlPointWorld(vtk.vtkVector3d(*liver_point))
    logic.placePoints(ct, "my organ", excluding=True)
    point_list.AddControlPointWorld(vtk.vtkVector3d(*excluded))
    assert [positive for _, positive in mrml_io.points_from_markups(point_list)] == [True, False]
    carved = only_mask(run(logic, ct, ["my organ"]), ct)

    near = np.linalg.norm(world_of(ct, np.argwhere(clicked_organ)) - excluded, axis=1) <= 6.0
    near_voxels = tuple(np.argwhere(clicked_organ)[near].T)
    assert not carved[tuple(far)]
    assert carved[near_voxels].mean() < 0.5, "most of the excluded point's surroundings are gone"
    assert carved.sum() < clicked_organ.sum()
