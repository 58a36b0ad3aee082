"""The module's logic on real MRML (slicer-core), the real bundled CT and the shipped demo model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import slicer
import vtk
from mrml_scene import (
    add_volume_from_array,
    load_volume,
    matrix,
    segment_mask,
    to_vtk_matrix,
)

PROMPTS = ["liver", "spleen", "left kidney"]


@pytest.fixture(scope="session")
def segmenter_available():
    """The shipped demo model is part of the product: its absence is a failure, not a skip."""
    from voila.resources import DEMO_MODEL, resources_dir

    assert (resources_dir() / DEMO_MODEL).is_file(), f"the demo model {DEMO_MODEL} is missing"


@pytest.fixture(scope="module")
def logic(segmenter_available):
    from VOILASegmenterLib.logic import VOILASegmenterLogic

    # One logic for the module: the model stays loaded between tests, as in Slicer.
    return VOILASegmenterLogic()


@pytest.fixture(scope="module")
def vocabulary():
    from voila.vocabulary import Vocabulary

    return Vocabulary.load()


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def lps_copy(scene, volume):
    """The same voxels stored with i and j reversed (as an LPS-ordered file would hold them)."""
    array = slicer.util.arrayFromVolume(volume)[:, ::-1, ::-1].copy()
    ni, nj = array.shape[2], array.shape[1]
    flip = np.array([[-1, 0, 0, ni - 1], [0, -1, 0, nj - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    return add_volume_from_array(scene, "CT LPS", array, matrix(volume.GetIJKToRASMatrix) @ flip)


def transformed_copy(scene, volume):
    """The same voxels under a rotating parent transform, placed so the world geometry is unchanged."""
    rotation = np.array([[0, -1, 0, 20.0], [1, 0, 0, -35.0], [0, 0, 1, 12.5], [0, 0, 0, 1]])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rotation")
    transform.SetMatrixTransformToParent(to_vtk_matrix(rotation))
    array = slicer.util.arrayFromVolume(volume).copy()
    local = np.linalg.inv(rotation) @ matrix(volume.GetIJKToRASMatrix)
    copy = add_volume_from_array(scene, "CT transformed", array, local)
    copy.SetAndObserveTransformNodeID(transform.GetID())
    return copy


def segments_by_name(segmentation_node) -> dict:
    segmentation = segmentation_node.GetSegmentation()
    return {
        segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
        for i in range(segmentation.GetNumberOfSegments())
    }


def test_each_found_prompt_becomes_a_segment_named_coloured_and_coded_from_the_vocabulary(
    scene, logic, vocabulary
):
    from VOILASegmenterLib.mrml_io import segment_terminology

    ct = load_volume(scene)
    outcome = logic.process(ct, PROMPTS, None)
    segmentation = outcome.segmentation.GetSegmentation()
    assert [record.found for record in outcome.segments] == [True, True, True]
    assert segmentation.GetNumberOfSegments() == 3
    for prompt, record in zip(PROMPTS, outcome.segments):
        structure = vocabulary.match(prompt)
        segment = segmentation.GetSegment(record.segmentId)
        assert segment.GetName() == structure.display_name
        assert np.allclose(segment.GetColor(), np.array(structure.color) / 255.0)
        type_code = structure.terminology["type"]
        assert f"{type_code['scheme']}^{type_code['code']}^{type_code['meaning']}" in segment_terminology(
            segment
        )
        assert record.volumeMl > 0


def test_segmentation_and_heatmap_live_on_the_input_grid_and_the_heatmap_is_shown(scene, logic):
    ct = load_volume(scene)
    outcome = logic.process(ct, ["liver"], None, heatmapOpacity=0.35)
    segmentation_node, heatmap = outcome.segmentation, outcome.heatmap
    reference = slicer.vtkOrientedImageData()
    geometry = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    )
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, reference, False)
    assert reference.GetDimensions() == ct.GetImageData().GetDimensions()
    reference_matrix = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(reference_matrix)
    assert np.allclose(matrix(lambda m: m.DeepCopy(reference_matrix)), matrix(ct.GetIJKToRASMatrix))

    assert heatmap.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions()
    assert np.allclose(matrix(heatmap.GetIJKToRASMatrix), matrix(ct.GetIJKToRASMatrix))
    values = slicer.util.arrayFromVolume(heatmap)
    assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == heatmap.GetID()
    assert composite.GetBackgroundVolumeID() == ct.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.35)
    assert heatmap.GetDisplayNode().GetColorNode().GetName() == "VOILA Complexity"


def test_results_agree_for_lps_ordered_and_transformed_copies_of_the_same_ct(scene, logic):
    ct = load_volume(scene)
    shape = slicer.util.arrayFromVolume(ct).shape
    reference = logic.process(ct, PROMPTS, None)
    lps = lps_copy(scene, ct)
    flipped = logic.process(lps, PROMPTS, None)
    moved = transformed_copy(scene, ct)
    transformed = logic.process(moved, PROMPTS, None)
    assert transformed.segmentation.GetParentTransformNode() is moved.GetParentTransformNode()
    assert transformed.heatmap.GetParentTransformNode() is moved.GetParentTransformNode()
    for expected, from_lps, from_moved in zip(reference.segments, flipped.segments, transformed.segments):
        mask = segment_mask(reference.segmentation, expected.segmentId, shape)
        lps_mask = segment_mask(flipped.segmentation, from_lps.segmentId, shape)[:, ::-1, ::-1]
        moved_mask = segment_mask(transformed.segmentation, from_moved.segmentId, shape)
        assert mask.sum() > 0
        for other in (lps_mask, moved_mask):
            dice = 2.0 * np.logical_and(mask, other).sum() / (mask.sum() + other.sum())
            assert dice > 0.99, expected.name
            assert abs(int(other.sum()) - int(mask.sum())) <= 0.01 * mask.sum(), expected.name
        assert from_lps.volumeMl == pytest.approx(expected.volumeMl, rel=0.01)


def test_running_again_replaces_segments_of_the_same_prompts_in_place_and_keeps_others(scene, logic):
    ct = load_volume(scene)
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    segmentation_node.CreateDefaultDisplayNodes()
    manual_id = segmentation_node.GetSegmentation().AddEmptySegment("", "my annotation", [0.1, 0.2, 0.3])
    first = logic.process(ct, ["liver", "spleen"], segmentation_node)
    ids = {record.name: record.segmentId for record in first.segments}
    second = logic.process(ct, ["Liver", "left kidney"], segmentation_node)
    assert second.segmentation is segmentation_node
    by_name = segments_by_name(segmentation_node)
    assert by_name["liver"] == ids["liver"]
    assert by_name["spleen"] == ids["spleen"]
    assert by_name["my annotation"] == manual_id
    assert "left kidney" in by_name
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == 4


def test_the_segmentation_joins_the_input_volumes_study_in_the_subject_hierarchy(scene, logic):
    ct = load_volume(scene)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "patient")
    study = sh.CreateStudyItem(patient, "study")
    sh.CreateItem(study, ct)
    outcome = logic.process(ct, ["liver"], None)
    assert sh.GetItemParent(sh.GetItemByDataNode(outcome.segmentation)) == study
    assert sh.GetItemParent(sh.GetItemByDataNode(outcome.heatmap)) == study


def test_a_non_blocking_run_is_polled_to_completion_with_progress_on_the_calling_thread(scene, logic):
    from VOILASegmenterLib.logic import SegmentationJob

    ct = load_volume(scene)
    calls = []
    job = logic.process(
        ct,
        PROMPTS,
        None,
        waitForCompletion=False,
        progress=lambda f, s: calls.append((f, s, threading.current_thread())),
    )
    assert isinstance(job, SegmentationJob)
    deadline = time.monotonic() + 600
    outcome = None
    while outcome is None:
        assert time.monotonic() < deadline, "segmentation did not finish in 10 minutes"
        outcome = job.poll()
        time.sleep(0.05)
    assert job.done and job.error is None
    assert outcome.segmentation.GetSegmentation().GetNumberOfSegments() == 3
    assert all(thread is threading.main_thread() for _, _, thread in calls)
    fractions = [fraction for fraction, _, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_second_run_while_one_is_running_is_refused(scene, logic):
    from voila.errors import Cancelled, VoilaError
    from VOILASegmenterLib.logic import JobAlreadyRunningError

    ct = load_volume(scene)
    job = logic.process(ct, PROMPTS, None, waitForCompletion=False)
    with pytest.raises(JobAlreadyRunningError) as refused:
        logic.process(ct, ["liver"], None)
    assert isinstance(refused.value, VoilaError) and "already running" in str(refused.value)
    job.cancel()
    with pytest.raises(Cancelled):
        job.finish()


def test_cancelling_mid_run_leaves_the_scene_as_it_was(scene, logic):
    from voila.errors import Cancelled

    ct = load_volume(scene)
    before = node_ids(scene)
    job = logic.process(ct, PROMPTS, None, waitForCompletion=False)
    deadline = time.monotonic() + 300
    while job.stage != "Segmenting" and time.monotonic() < deadline:
        time.sleep(0.01)
    job.cancel()
    with pytest.raises(Cancelled):
        job.finish()
    assert node_ids(scene) == before
    assert isinstance(job.error, Cancelled) and job.done
    assert logic.job is None


def test_removing_the_input_during_a_run_discards_the_result_with_a_clear_message(scene, logic):
    from VOILASegmenterLib.logic import InputRemovedError

    ct = load_volume(scene)
    job = logic.process(ct, ["liver"], None, waitForCompletion=False)
    scene.RemoveNode(ct)
    before = node_ids(scene)
    with pytest.raises(InputRemovedError, match="removed"):
        job.finish()
    assert node_ids(scene) == before


def test_the_module_parses_a_typed_field_exactly_as_the_command_line_does():
    from voila.errors import PromptError
    from voila.prompts import split_prompts
    from VOILASegmenterLib.logic import parse_prompts

    typed = "liver; spleen\nleft kidney,  aorta"
    assert parse_prompts(typed) == split_prompts(typed) == ["liver", "spleen", "left kidney", "aorta"]
    with pytest.raises(PromptError):
        parse_prompts(" ,\n")
