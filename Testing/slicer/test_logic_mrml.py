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


# Fewer windows than the default 0.5: these tests are about geometry and the scene, not quality.
OVERLAP = 0.25


@pytest.fixture(scope="module")
def logic(segmenter_available):
    from VOILASegmenterLib.logic import VOILASegmenterLogic

    # One logic for the module: its worker process keeps the model loaded between tests, as in Slicer.
    logic = VOILASegmenterLogic()
    yield logic
    logic.shutdown()


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
    outcome = logic.process(ct, PROMPTS, None, overlap=OVERLAP)
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
    from VOILASegmenterLib import mrml_io

    ct = load_volume(scene)
    outcome = logic.process(ct, ["liver"], None, heatmapOpacity=0.35, overlap=OVERLAP)
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
    assert heatmap.GetDisplayNode().GetColorNode().GetName() == mrml_io.HEATMAP_COLOR_NAME
    # the default heatmap is the review map, and the volume says so
    assert outcome.heatmapKind == "review"
    assert heatmap.GetAttribute(mrml_io.HEATMAP_KIND_ATTRIBUTE) == "review"
    assert heatmap.GetName() == f"{ct.GetName()} {mrml_io.HEATMAP_NAMES['review']}"
    (record,) = outcome.segments
    assert record.found and 0.0 <= record.predictedDice <= 1.0
    segment = segmentation_node.GetSegmentation().GetSegment(record.segmentId)
    tag = vtk.reference("")
    assert segment.GetTag(mrml_io.PREDICTED_DICE_TAG, tag) and float(str(tag)) == pytest.approx(
        record.predictedDice, abs=1e-4
    )
    assert segment.GetTag(mrml_io.CHECK_TAG, tag) and str(tag) == ("1" if record.check else "0")


def test_the_complexity_heatmap_is_offered_and_renames_a_review_map_it_replaces(scene, logic):
    from voila.errors import OutputError
    from VOILASegmenterLib import mrml_io

    ct = load_volume(scene)
    review = logic.process(ct, ["liver"], None, overlap=OVERLAP)
    complexity = logic.process(
        ct, ["liver"], None, heatmapVolume=review.heatmap, heatmapKind="complexity", overlap=OVERLAP
    )
    assert complexity.heatmap is review.heatmap and complexity.heatmapKind == "complexity"
    assert complexity.heatmap.GetAttribute(mrml_io.HEATMAP_KIND_ATTRIBUTE) == "complexity"
    assert complexity.heatmap.GetName() == f"{ct.GetName()} {mrml_io.HEATMAP_NAMES['complexity']}"
    values = slicer.util.arrayFromVolume(complexity.heatmap)
    assert 0.0 <= values.min() and values.max() <= 1.0
    with pytest.raises(OutputError, match="heatmap must be one of review, complexity"):
        logic.process(ct, ["liver"], None, heatmapKind="hard", overlap=OVERLAP)


def test_results_agree_for_lps_ordered_and_transformed_copies_of_the_same_ct(scene, logic):
    ct = load_volume(scene)
    shape = slicer.util.arrayFromVolume(ct).shape
    reference = logic.process(ct, PROMPTS, None, overlap=OVERLAP)
    lps = lps_copy(scene, ct)
    flipped = logic.process(lps, PROMPTS, None, overlap=OVERLAP)
    moved = transformed_copy(scene, ct)
    transformed = logic.process(moved, PROMPTS, None, overlap=OVERLAP)
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
    first = logic.process(ct, ["liver", "spleen"], segmentation_node, overlap=OVERLAP)
    ids = {record.name: record.segmentId for record in first.segments}
    second = logic.process(ct, ["Liver", "left kidney"], segmentation_node, overlap=OVERLAP)
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
    outcome = logic.process(ct, ["liver"], None, overlap=OVERLAP)
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
        overlap=OVERLAP,
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
    job = logic.process(ct, PROMPTS, None, waitForCompletion=False, overlap=OVERLAP)
    with pytest.raises(JobAlreadyRunningError) as refused:
        logic.process(ct, ["liver"], None, overlap=OVERLAP)
    assert isinstance(refused.value, VoilaError) and "already running" in str(refused.value)
    job.cancel()
    with pytest.raises(Cancelled):
        job.finish()


def test_cancelling_mid_run_leaves_the_scene_as_it_was(scene, logic):
    from voila.errors import Cancelled

    ct = load_volume(scene)
    # Voxels the worker has not encoded: a volume it keeps encoded is answered before any cancel.
    voxels = slicer.util.arrayFromVolume(ct).copy()
    voxels[0, 0, 0] += 1
    fresh = add_volume_from_array(scene, "CT not encoded yet", voxels, matrix(ct.GetIJKToRASMatrix))
    before = node_ids(scene)
    job = logic.process(fresh, PROMPTS, None, waitForCompletion=False, overlap=OVERLAP)
    deadline = time.monotonic() + 300
    while job.poll() is None and job.stage != "Segmenting" and time.monotonic() < deadline:
        time.sleep(0.01)
    worker = logic.worker.pid
    job.cancel()
    with pytest.raises(Cancelled):
        job.finish()
    assert node_ids(scene) == before
    assert isinstance(job.error, Cancelled) and job.done
    assert logic.job is None
    assert logic.worker.pid == worker and logic.worker.alive, "cancel stops the job, not the worker"


def test_removing_the_input_during_a_run_discards_the_result_with_a_clear_message(scene, logic):
    from VOILASegmenterLib.logic import InputRemovedError

    ct = load_volume(scene)
    job = logic.process(ct, ["liver"], None, waitForCompletion=False, overlap=OVERLAP)
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


def test_the_model_runs_in_a_worker_process_and_a_run_under_slicers_main_loop_is_not_slowed(scene, logic):
    """Slicer's main thread holds the GIL while Qt idles in C++ (PythonQt never releases it) and
    runs Python only in timer slots; emulated here by sleeping *with* the GIL held (a ``PyDLL``
    call keeps it) and polling every 200 ms. A Python worker thread would crawl in that loop;
    the worker process does not care."""
    import ctypes
    import os

    ct = load_volume(scene)
    logic.process(ct, ["liver"], None, overlap=OVERLAP)  # model loaded and warm, as after a first run
    started = time.monotonic()
    logic.process(ct, PROMPTS, None, overlap=OVERLAP)
    synchronous = time.monotonic() - started

    libc = ctypes.PyDLL(None)  # PyDLL: the GIL stays held during the call, as in Qt's event loop
    threads_before = threading.active_count()
    started = time.monotonic()
    job = logic.process(ct, PROMPTS, None, waitForCompletion=False, overlap=OVERLAP)
    outcome = None
    while outcome is None:
        libc.usleep(195_000)
        outcome = job.poll()
        assert time.monotonic() - started < 600
    emulated = time.monotonic() - started
    assert outcome.segmentation.GetSegmentation().GetNumberOfSegments() == 3
    assert threading.active_count() == threads_before, "no thread of this (GUI) process ran the model"
    assert logic.worker.pid != os.getpid() and logic.worker.alive
    assert emulated <= 2 * synchronous, (
        f"{emulated:.1f} s under the emulated main loop, {synchronous:.1f} s directly"
    )


def test_a_crashed_worker_is_one_line_and_the_next_run_starts_a_new_one(scene, logic):
    import os
    import signal

    from voila.worker import WorkerError

    ct = load_volume(scene)
    before = node_ids(scene)
    job = logic.process(ct, ["liver"], None, waitForCompletion=False, overlap=OVERLAP)
    crashed = logic.worker.pid
    os.kill(crashed, signal.SIGKILL)
    with pytest.raises(WorkerError) as raised:
        job.finish()
    message = str(raised.value)
    assert "stopped unexpectedly" in message and "\n" not in message and "next run" in message
    assert node_ids(scene) == before
    outcome = logic.process(ct, ["liver"], None, overlap=OVERLAP)
    assert outcome.segments[0].found and logic.worker.pid != crashed


def test_the_heatmap_never_overwrites_the_input_or_a_volume_voila_did_not_create(scene, logic):
    from VOILASegmenterLib.logic import HeatmapOverwriteError

    ct = load_volume(scene)
    voxels = slicer.util.arrayFromVolume(ct).copy()
    other = add_volume_from_array(scene, "my other volume", voxels[:4].copy(), matrix(ct.GetIJKToRASMatrix))
    before = node_ids(scene)
    for target in (ct, other):
        with pytest.raises(HeatmapOverwriteError, match="Create new"):
            logic.process(ct, ["liver"], None, heatmapVolume=target, overlap=OVERLAP)
    assert node_ids(scene) == before and np.array_equal(slicer.util.arrayFromVolume(ct), voxels)
    first = logic.process(ct, ["liver"], None, overlap=OVERLAP)
    again = logic.process(ct, ["liver"], None, heatmapVolume=first.heatmap, overlap=OVERLAP)
    assert again.heatmap is first.heatmap  # a heatmap VOILA created is reused
    alpha = [
        first.heatmap.GetDisplayNode().GetColorNode().GetLookupTable().GetTableValue(i)[3] for i in (0, 255)
    ]
    assert alpha == [0.0, 1.0], "low complexity is transparent: the CT is not dimmed there"


def test_a_segment_the_user_edited_is_kept_and_the_new_result_goes_beside_it(scene, logic):
    from VOILASegmenterLib.mrml_io import ijk_to_ras
    from vtk.util import numpy_support

    ct = load_volume(scene)
    shape = slicer.util.arrayFromVolume(ct).shape
    first = logic.process(ct, ["liver", "spleen"], None, overlap=OVERLAP)
    node = first.segmentation
    liver = first.segments[0].segmentId
    edited = segment_mask(node, liver, shape)
    edited[:, :, : shape[2] // 2] = False  # the user erased half of it in Segment Editor
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*reversed(shape))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)[:] = edited
    image.SetImageToWorldMatrix(to_vtk_matrix(ijk_to_ras(ct)))
    logic_class = slicer.vtkSlicerSegmentationsModuleLogic
    logic_class.SetBinaryLabelmapToSegment(image, node, liver, logic_class.MODE_REPLACE)

    second = logic.process(ct, ["liver", "spleen"], node, overlap=OVERLAP)
    assert any("kept your edited segment of 'liver'" in m for m in second.messages)
    assert np.array_equal(segment_mask(node, liver, shape), edited), "the edited segment is untouched"
    new_liver = second.segments[0].segmentId
    assert new_liver != liver and second.segments[1].segmentId == first.segments[1].segmentId
    third = logic.process(ct, ["liver"], node, overlap=OVERLAP)
    assert third.segments[0].segmentId == new_liver, "the unedited VOILA segment is the one replaced"
    assert node.GetSegmentation().GetNumberOfSegments() == 3
