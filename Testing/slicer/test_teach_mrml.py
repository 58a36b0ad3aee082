"""Teaching a model in the module: CTs and the segments chosen from their segmentations (real
MRML from slicer-core) fine-tune a model file in the worker process; the new model lands in the
user's model folder and the scene and the base model are left as they were."""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import slicer
from mrml_scene import add_volume_from_array, to_vtk_matrix
from vtk.util import numpy_support

# Test speed only (as Testing/test_finetune.py): a few 16-voxel patches on the CPU.
FAST = {
    "patch_size": [16, 16, 16],
    "batch_size": 1,
    "epochs": 1,
    "steps_per_epoch": 3,
    "augment": False,
    "val_windows": 2,
}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def logic(tmp_path_factory):
    from VOILASegmenterLib.logic import VOILASegmenterLogic

    logic = VOILASegmenterLogic(defaultDevice="cpu", userModelDir=tmp_path_factory.mktemp("user") / "models")
    yield logic
    logic.shutdown()


@pytest.fixture
def phantom():
    """A phantom CT at 6 mm (the tiny test model's grid): ``(ct [i, j, k], {name: mask}, affine)``."""
    from voila.data.phantoms import make_phantom

    return make_phantom(shape=(24, 24, 24), spacing=(6, 6, 6), seed=4)


def add_segment(segmentation_node, name: str, mask_ijk: np.ndarray, image_to_world: np.ndarray) -> str:
    """A segment drawn by hand: a labelmap with the given geometry, no VOILA tags."""
    mask_kji = np.ascontiguousarray(mask_ijk.transpose(2, 1, 0).astype(np.uint8))
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*reversed(mask_kji.shape))
    image.AllocateScalars(numpy_support.get_vtk_array_type(mask_kji.dtype), 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(mask_kji.shape)[:] = mask_kji
    image.SetImageToWorldMatrix(to_vtk_matrix(image_to_world))
    segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", name)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE)
    return segment_id


def corrected_case(scene, phantom):
    """A CT and a segmentation as after Segment Editor: "liver", a new "Tumor core" (the
    gallbladder's voxels) and a segment that is not chosen."""
    ct, labels, affine = phantom
    volume = add_volume_from_array(scene, "CT", np.ascontiguousarray(ct.transpose(2, 1, 0)), affine)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "corrected")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = {
        name: add_segment(segmentation, name, labels[key], affine)
        for name, key in (("liver", "liver"), ("Tumor core", "gallbladder"), ("Mystery mass", "spleen"))
    }
    return volume, segmentation, ids


def scene_state(scene, volume, segmentation) -> tuple:
    from VOILASegmenterLib import mrml_io

    segments = segmentation.GetSegmentation()
    return (
        scene.GetNumberOfNodes(),
        hashlib.sha1(slicer.util.arrayFromVolume(volume).tobytes()).hexdigest(),
        tuple(
            (
                segments.GetNthSegment(i).GetName(),
                mrml_io.segment_checksum(segmentation, segments.GetNthSegmentID(i)),
            )
            for i in range(segments.GetNumberOfSegments())
        ),
    )


def test_teaching_polled_and_stopped_early_saves_what_it_learned_as_a_new_model_and_changes_nothing_else(
    scene, logic, phantom, tiny_model_path
):
    """As the module runs it: polled from a timer, and stopped from the button once it trains."""
    from voila.model.model_file import read_model_card

    volume, segmentation, ids = corrected_case(scene, phantom)
    before, base_digest = scene_state(scene, volume, segmentation), digest(tiny_model_path)
    runs_before = set(Path(tempfile.gettempdir()).glob("voila-teach-*"))
    reports = []
    job = logic.teach(
        [(volume, segmentation, [ids["Tumor core"], ids["liver"]])],
        tiny_model_path,
        minutes=5,
        progress=lambda fraction, stage: reports.append((threading.get_ident(), fraction, stage)),
        waitForCompletion=False,
        settings=dict(FAST, steps_per_epoch=50),
    )
    while (outcome := job.poll()) is None:
        if any(stage.startswith("train: epoch") for _, _, stage in reports):
            job.cancel()  # the Stop button: ends after the step under way
        time.sleep(0.05)

    assert list(logic.userModelDir.iterdir()) == [outcome.modelPath]
    assert outcome.modelPath.name.startswith("tiny + Tumor core, liver ")
    base_card, card = read_model_card(tiny_model_path), read_model_card(outcome.modelPath)
    assert card["classes"] == [*base_card["classes"], "Tumor core"], "the unchosen segment is not learned"
    assert outcome.addedClasses == ["Tumor core"] and outcome.taught == ["Tumor core", "liver"]
    training = card["training"]
    assert (training["base"]["file"], training["base"]["sha256"]) == ("tiny.safetensors", base_digest)
    assert card["description"].startswith("tiny.safetensors taught in 3D Slicer: Tumor core, liver (1 CT)")
    assert outcome.stopped and 1 <= training["optimizer_steps"] < 50 and outcome.minutes > 0
    assert digest(tiny_model_path) == base_digest
    assert scene_state(scene, volume, segmentation) == before
    assert set(Path(tempfile.gettempdir()).glob("voila-teach-*")) == runs_before, "the run folder is removed"
    assert {ident for ident, _, _ in reports} == {threading.get_ident()}
    assert reports[-1][1:] == (1.0, "Done")


def test_the_segments_voxels_are_taken_on_the_cts_grid_whatever_geometry_and_transforms_they_have(
    scene, phantom
):
    from VOILASegmenterLib import mrml_io

    ct, labels, affine = phantom
    rotation = np.array([[0, -1, 0, 20.0], [1, 0, 0, -35.0], [0, 0, 1, 12.5], [0, 0, 0, 1]])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    transform.SetMatrixTransformToParent(to_vtk_matrix(rotation))
    volume = add_volume_from_array(scene, "CT", np.ascontiguousarray(ct.transpose(2, 1, 0)), affine)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    # drawn elsewhere: the same world voxels stored with i reversed, the transform in the geometry
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    flip_i = np.array([[-1, 0, 0, ct.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    segment_id = add_segment(segmentation, "liver", labels["liver"][::-1], rotation @ affine @ flip_i)
    checksum = mrml_io.segment_checksum(segmentation, segment_id)

    mask = mrml_io.segment_mask_on_volume(segmentation, segment_id, volume)

    assert np.array_equal(mask, labels["liver"].transpose(2, 1, 0))
    assert mrml_io.segment_checksum(segmentation, segment_id) == checksum


@pytest.mark.parametrize(
    "case, message",
    [
        ("no pair", "choose a CT, its segmentation and the segments to learn"),
        ("no segment chosen", "choose at least one segment of 'corrected' to learn"),
        ("empty segment", "segment 'nothing' of 'corrected' has no voxel inside CT 'CT'"),
        ("no segmentation", "choose the segmentation whose segments show what to learn on 'CT'"),
        ("no CT", "choose the CT volume: it must be loaded in the scene"),
        ("no time", "give the training time in minutes"),
    ],
)
def test_unusable_input_is_one_clear_error_before_anything_is_written_or_started(
    scene, phantom, tiny_model_path, tmp_path, case, message
):
    from VOILASegmenterLib.logic import TeachingInputError, VOILASegmenterLogic

    volume, segmentation, ids = corrected_case(scene, phantom)
    empty = segmentation.GetSegmentation().AddEmptySegment("", "nothing")
    pairs = {
        "no pair": [],
        "no segment chosen": [(volume, segmentation, [])],
        "empty segment": [(volume, segmentation, [ids["liver"], empty])],
        "no segmentation": [(volume, None, [ids["liver"]])],
        "no CT": [(None, segmentation, [ids["liver"]])],
        "no time": [(volume, segmentation, [ids["liver"]])],
    }[case]
    logic = VOILASegmenterLogic(userModelDir=tmp_path / "models")
    before = scene_state(scene, volume, segmentation)

    with pytest.raises(TeachingInputError, match=message):
        logic.teach(pairs, tiny_model_path, minutes=0 if case == "no time" else 5, settings=FAST)

    assert not (tmp_path / "models").exists() and logic._worker is None, "nothing written, nothing started"
    assert scene_state(scene, volume, segmentation) == before


def test_a_taught_model_never_replaces_a_file_in_the_model_folder(tmp_path):
    from VOILASegmenterLib import models

    source = tmp_path / "model.safetensors"
    source.write_bytes(b"new")
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "demo + liver.safetensors").write_bytes(b"theirs")

    stored = [models.store_model(source, folder, "demo + liver") for _ in range(2)]

    assert [path.name for path in stored] == ["demo + liver (2).safetensors", "demo + liver (3).safetensors"]
    assert (folder / "demo + liver.safetensors").read_bytes() == b"theirs"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["demo + liver.safetensors", *[p.name for p in stored]]
    )
    assert models.user_models(folder)[0].name in {path.name for path in stored} | {"demo + liver.safetensors"}


def test_the_worker_writes_the_cases_on_their_grid_and_trains_nothing_once_cancelled(
    tmp_path, phantom, tiny_model_path
):
    from voila.worker import EVENTS, REQUEST, Handlers, run_job

    ct, labels, affine = phantom
    folder = tmp_path / "finetune-1"
    folder.mkdir()
    np.save(folder / "image_0.npy", ct)
    np.save(folder / "mask_0_0.npy", labels["liver"].astype(np.uint8))
    request = {
        "base": str(tiny_model_path),
        "config": dict(FAST, device="cpu", out=str(tmp_path / "run")),
        "cases": [
            {"id": "01 CT", "image": "image_0", "affine": affine.tolist(), "masks": {"liver": "mask_0_0"}}
        ],
        "dataset": "Slicer scene",
    }
    (folder / REQUEST).write_text(json.dumps(request), encoding="utf-8")
    cancel = threading.Event()
    cancel.set()

    run_job(Handlers(), folder, "finetune", cancel)

    events = [json.loads(line) for line in (folder / EVENTS).read_text().splitlines()]
    assert events[-1] == {"event": "cancelled"} and not (tmp_path / "run").exists()
    written = folder / "data" / "Slicer scene" / "01 CT"
    assert sorted(p.name for p in (written / "segmentations").iterdir()) == ["liver.nii.gz"]
    from voila.data.io import read_image

    image, image_affine = read_image(written / "ct.nii.gz")
    assert np.array_equal(image, ct) and np.allclose(image_affine, affine)
