"""Hardening: every bad input gives one clear error and leaves nothing behind; nothing is lost.

Each table row names a way a user can get it wrong (an image, a prompt list, a model file, a
training run, a Slicer session) and what the product must answer: the :class:`VoilaError`
subclass the Python API raises, the fragment of its one-line message, and the exit code of the
command line. For every failing row the CLI prints exactly one line on stderr (a traceback only
with ``--debug``) and the output folder is left exactly as it was. Rows that must *work* (odd but
usable input) name the warning or note the user gets instead.

The messages in these tables are the README's "Troubleshooting" section.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_data_io import _write_dicom_series
from voila import device as device_module
from voila import errors
from voila.cli import main
from voila.data.io import read_image, write_volume
from voila.data.phantoms import make_phantom, write_phantom_dataset
from voila.infer.segmenter import Segmenter
from voila.model.model_file import CARD_KEY
from voila.prompts import MAX_PROMPTS
from voila.vocabulary import class_sentence

REPO = Path(__file__).resolve().parents[1]
# A small abdominal phantom: 32³ voxels of 3 mm, i.e. 16³ on the 6 mm grid of the tiny test model,
# smaller than its 48³ patch.
PHANTOM_SHAPE, PHANTOM_SPACING = (32, 32, 32), (3.0, 3.0, 3.0)
MANY = [f"structure number {i}" for i in range(MAX_PROMPTS)]
NON_ASCII = "Leber — 肝臓 ü"
FREE_TEXT = [*MANY, "hello world", NON_ASCII]


@dataclass(frozen=True)
class Row:
    """One way to get it wrong. ``error=None``: it must work, ``message`` is then the warning/note."""

    id: str
    make: Callable[..., Any]
    message: str
    error: type[errors.VoilaError] | None = None
    exit_code: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


def rows(table: Sequence[Row]) -> list:
    return [pytest.param(row, id=row.id) for row in table]


# -- shared inputs ---------------------------------------------------------------------------------
def phantom(shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING, seed=1) -> tuple[np.ndarray, np.ndarray]:
    ct, _, affine = make_phantom(shape, spacing, seed=seed)
    return ct, affine


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        card = json.loads(handle.metadata()[CARD_KEY])
    return tensors, card


def write_model_file(path: Path, tensors: dict[str, torch.Tensor], card: dict[str, Any]) -> Path:
    save_file(tensors, str(path), metadata={CARD_KEY: json.dumps(card)})
    return path


@pytest.fixture(scope="module")
def prompt_model_path(tiny_model_path, tmp_path_factory) -> Path:
    """The tiny test model with cached embeddings for the free text of these tables.

    Encoding 1000 sentences with CLIP takes minutes on two cores; a model file carrying their
    embeddings is the normal case (the trainer caches its classes the same way).
    """
    tensors, card = read_model_file(tiny_model_path)
    from voila.vocabulary import Vocabulary

    vocabulary = Vocabulary.from_dict(card["vocabulary"])
    cached = tensors["text_cache.features"]
    texts = [class_sentence(text, vocabulary, card["prompt_template"]) for text in FREE_TEXT]
    features = torch.nn.functional.normalize(torch.randn(len(texts), cached.shape[1]), dim=-1)
    # The untrained model cannot know that the abdomen holds no brain; give "brain" the liver's
    # embedding so that every voxel prefers a trained class (ties go to the first row) and brain's
    # region is empty, as a trained model's would be.
    texts.append(class_sentence("brain", vocabulary, card["prompt_template"]))
    liver = card["text_cache"]["texts"].index(class_sentence("liver", vocabulary, card["prompt_template"]))
    features = torch.cat([features, cached[liver : liver + 1]])
    tensors["text_cache.features"] = torch.cat([cached, features]).contiguous()
    card["text_cache"]["texts"] += texts
    card["model"]["patch_size"] = [16, 16, 16]  # the phantoms' whole 6 mm grid in one small window
    return write_model_file(tmp_path_factory.mktemp("models") / "prompts.safetensors", tensors, card)


@pytest.fixture(scope="module")
def segmenter(prompt_model_path) -> Segmenter:
    return Segmenter.load(prompt_model_path, device="cpu")


@pytest.fixture
def out(tmp_path) -> Path:
    """The output folder: it must look the same after a failed run."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_cli(argv: Sequence[str], capsys, debug: bool = False) -> tuple[int, str, str]:
    code = main(["--debug", *argv] if debug else list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_clear_error_line(code: int, err: str, row: Row, command: str) -> None:
    lines = err.strip().splitlines()
    assert code == row.exit_code, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"voila {command}: error: ") and "Traceback" not in err
    assert row.message in lines[0]


def assert_debug_shows_the_traceback(code: int, err: str, row: Row, command: str) -> None:
    assert code == row.exit_code
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith(f"voila {command}: error: ")
    assert row.message in err.strip().splitlines()[-1]


# -- images ----------------------------------------------------------------------------------------
def two_dimensional(folder: Path) -> Path:
    return save_nifti(folder / "slice.nii.gz", np.zeros((32, 32), np.int16), np.eye(4))


def four_dimensional(folder: Path) -> Path:
    return save_nifti(folder / "timeseries.nii.gz", np.zeros((12, 12, 12, 3), np.int16), np.eye(4))


def vector_volume(folder: Path) -> Path:
    image = sitk.GetImageFromArray(np.zeros((12, 12, 12, 3), np.float32), isVector=True)
    sitk.WriteImage(image, str(folder / "displacement.nrrd"))
    return folder / "displacement.nrrd"


def rgb_volume(folder: Path) -> Path:
    rgb = np.zeros((12, 12, 12), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return save_nifti(folder / "rgb.nii.gz", rgb, np.eye(4))


def with_bad_voxels(value: float) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        ct, affine = phantom()
        ct = ct.astype(np.float32)
        ct[10, 11, 12] = value
        return save_nifti(folder / "ct.nii.gz", ct, affine)

    return make


def sheared(folder: Path) -> Path:
    ct, affine = phantom()
    affine = affine.copy()
    affine[0, 1] = 1.5  # the j axis leans into x: a gantry tilt
    return save_nifti(folder / "tilted.nii.gz", ct, affine)


def wrong_file_type(folder: Path) -> Path:
    (folder / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    return folder / "scan.png"


def text_named_nifti(folder: Path) -> Path:
    (folder / "ct.nii.gz").write_text("patient notes, not an image\n" * 20)
    return folder / "ct.nii.gz"


def missing_file(folder: Path) -> Path:
    return folder / "no_such_ct.nii.gz"


def truncated_nifti(folder: Path) -> Path:
    ct, affine = phantom()
    data = write_volume(folder / "whole.nii.gz", ct, affine).read_bytes()
    (folder / "whole.nii.gz").unlink()
    (folder / "ct.nii.gz").write_bytes(data[: len(data) // 2])
    return folder / "ct.nii.gz"


def empty_dicom_folder(folder: Path) -> Path:
    (folder / "dicom").mkdir()
    return folder / "dicom"


SERIES = {"1.2.826.0.1.3680043.8.498.101": (24, 24, 8), "1.2.826.0.1.3680043.8.498.102": (24, 24, 12)}


def two_dicom_series(folder: Path) -> Path:
    for number, (uid, shape) in enumerate(SERIES.items()):
        ct, _ = phantom(shape, (3.0, 3.0, 4.0), seed=number)
        description = ("arterial", "venous")[number]
        _write_dicom_series(folder / "study", ct, np.diag([3.0, 3.0, 4.0]), (0.0, 0.0, 0.0), uid, description)
    return folder / "study"


def phantom_file(folder: Path) -> Path:
    ct, affine = phantom()
    return write_volume(folder / "ct.nii.gz", ct, affine)


IMAGE_ERRORS = [
    Row("2-d-image", two_dimensional, "a 2-D image or single slice", errors.InputImageError),
    Row("4-d-volume", four_dimensional, "4-D", errors.InputImageError),
    Row("vector-volume", vector_volume, "RGB/vector image", errors.InputImageError),
    Row("rgb-volume", rgb_volume, "RGB/vector image", errors.InputImageError),
    Row("nan-voxels", with_bad_voxels(np.nan), "NaN or infinite voxels", errors.InputImageError),
    Row("inf-voxels", with_bad_voxels(np.inf), "NaN or infinite voxels", errors.InputImageError),
    Row("non-orthogonal-direction", sheared, "resample it first", errors.InputImageError),
    Row("wrong-file-type", wrong_file_type, "unsupported file type .png", errors.InputImageError),
    Row("text-file-named-nii-gz", text_named_nifti, "truncated or corrupt", errors.InputImageError),
    Row("missing-file", missing_file, "does not exist", errors.InputImageError),
    Row("truncated-nifti", truncated_nifti, "truncated or corrupt", errors.InputImageError),
    Row("empty-dicom-folder", empty_dicom_folder, "no DICOM series found", errors.InputImageError),
    Row("two-dicom-series", two_dicom_series, "choose one with --series-uid UID", errors.InputImageError),
    Row(
        "huge-volume",
        phantom_file,
        "crop the volume to the region of interest",
        errors.InsufficientMemoryError,
        extra={"memory_bytes": 2**17},
    ),
]


def segment_argv(image: Path, out: Path, prompts: Sequence[str], model: Path, *extra: str) -> list[str]:
    argv = ["segment", str(image), "-m", str(model), "-o", str(out / "seg.nii.gz"), "--quiet", *extra]
    for prompt in prompts:
        argv += ["-p", prompt]
    return argv


def limit_memory(monkeypatch, row: Row) -> None:
    if "memory_bytes" in row.extra:
        monkeypatch.setattr(device_module, "available_memory_bytes", lambda: row.extra["memory_bytes"])


@pytest.mark.parametrize("row", rows(IMAGE_ERRORS))
def test_an_unusable_image_raises_its_error_class_from_the_python_api(row, segmenter, tmp_path, monkeypatch):
    path = row.make(tmp_path)
    limit_memory(monkeypatch, row)
    with pytest.raises(row.error) as raised:
        image, affine = read_image(path)
        segmenter.segment(image, affine, ["liver"])
    assert row.message in str(raised.value) and "\n" not in str(raised.value)
    if row.id == "two-dicom-series":
        assert all(uid in str(raised.value) for uid in SERIES)
        assert "arterial" in str(raised.value) and "venous" in str(raised.value)


@pytest.mark.parametrize("row", rows(IMAGE_ERRORS))
def test_an_unusable_image_is_one_line_on_stderr_and_leaves_the_output_folder_as_it_was(
    row, prompt_model_path, tmp_path, out, capsys, monkeypatch
):
    path = row.make(tmp_path)
    limit_memory(monkeypatch, row)
    argv = segment_argv(path, out, ["liver"], prompt_model_path, "--heatmap", str(out / "heat.nii.gz"))
    code, _, err = run_cli(argv, capsys)
    assert_one_clear_error_line(code, err, row, "segment")
    code, _, err = run_cli(argv, capsys, debug=True)
    assert_debug_shows_the_traceback(code, err, row, "segment")
    assert listing(out) == []


def mr_like(folder: Path) -> Path:
    ct, affine = phantom()
    return write_volume(folder / "t1.nii.gz", (ct.astype(np.int32) + 1000).astype(np.int16), affine)


def smaller_than_a_patch(folder: Path) -> Path:
    ct, affine = phantom((10, 10, 10), (3.0, 3.0, 3.0))
    return write_volume(folder / "small.nii.gz", ct, affine)


IMAGE_WORKS = [
    Row("mr-like-intensities-warn", mr_like, "do not look like CT in Hounsfield units"),
    Row("smaller-than-a-patch-is-padded", smaller_than_a_patch, ""),
    Row(
        "two-dicom-series-with-series-uid",
        two_dicom_series,
        "",
        extra={"series_uid": "1.2.826.0.1.3680043.8.498.102"},
    ),
]


@pytest.mark.parametrize("row", rows(IMAGE_WORKS))
def test_an_odd_but_usable_image_is_segmented_with_its_warning_in_the_sidecar_and_on_stderr(
    row, segmenter, prompt_model_path, tmp_path, out, capsys
):
    path = row.make(tmp_path)
    uid = row.extra.get("series_uid")
    image, affine = read_image(path, series_uid=uid)
    if uid:  # one series only, never slices of the other one mixed in
        assert image.shape == SERIES[uid]
        expected, _ = phantom(SERIES[uid], (3.0, 3.0, 4.0), seed=list(SERIES).index(uid))
        np.testing.assert_array_equal(image, expected)
    result = segmenter.segment(image, affine, ["liver"])
    assert result.labelmap.shape == image.shape
    assert any(row.message in warning for warning in result.warnings) if row.message else not result.warnings

    code, stdout, err = run_cli(
        segment_argv(path, out, ["liver"], prompt_model_path, *(["--series-uid", uid] if uid else [])), capsys
    )
    assert code == 0, err
    sidecar = json.loads((out / "seg.json").read_text(encoding="utf-8"))
    assert sidecar["shape"] == list(image.shape)
    if row.message:
        assert any(row.message in warning for warning in sidecar["warnings"])
        assert "warning: intensities" in err and row.message in err
    else:
        assert sidecar["warnings"] == [] and err.strip() == ""
    assert listing(out) == ["seg.json", "seg.nii.gz"]


# -- prompts ---------------------------------------------------------------------------------------
PROMPT_ERRORS = [
    Row("no-prompt", lambda: [""], "no prompts given", errors.PromptError),
    Row("whitespace-only", lambda: ["   \t  "], "no prompts given", errors.PromptError),
    Row("10000-character-prompt", lambda: ["x" * 10_000], "at most 200", errors.PromptError),
    Row(
        "1001-prompts", lambda: [*MANY, "one too many"], f"at most {MAX_PROMPTS} per run", errors.PromptError
    ),
]


@pytest.fixture(scope="module")
def phantom_path(tmp_path_factory) -> Path:
    return phantom_file(tmp_path_factory.mktemp("phantom"))


@pytest.mark.parametrize("row", rows(PROMPT_ERRORS))
def test_unusable_prompts_raise_a_prompt_error_and_print_one_line(
    row, segmenter, prompt_model_path, phantom_path, out, capsys
):
    image, affine = read_image(phantom_path)
    with pytest.raises(row.error) as raised:
        segmenter.segment(image, affine, row.make())
    assert row.message in str(raised.value)
    argv = segment_argv(phantom_path, out, [", ".join(row.make())], prompt_model_path)
    code, _, err = run_cli(argv, capsys)
    assert_one_clear_error_line(code, err, row, "segment")
    code, _, err = run_cli(argv, capsys, debug=True)
    assert_debug_shows_the_traceback(code, err, row, "segment")
    assert listing(out) == []


def check_duplicates(result) -> None:
    assert [p.prompt for p in result.prompts] == ["liver"]


def check_many(result) -> None:
    assert len(result.prompts) == len(MANY[:500]) and result.labelmap.dtype == np.uint16
    assert [p.label for p in result.prompts] == list(range(1, 501))


def check_limit(result) -> None:
    assert len(result.prompts) == MAX_PROMPTS


def check_free_text(text: str) -> Callable:
    def check(result) -> None:
        (prompt,) = result.prompts
        assert prompt.prompt == text and prompt.open_vocabulary and prompt.structure is None
        # never silently a known organ: either not found (with the reason) or flagged as free text
        assert prompt.note and (not prompt.found or "open vocabulary" in prompt.note)

    return check


def check_absent(result) -> None:
    (brain,) = result.prompts
    assert brain.structure == "brain" and not brain.found and brain.voxels == 0 and brain.note
    assert not result.labelmap.any()


PROMPT_WORKS = [
    Row(
        "duplicates-dropped-and-reported",
        lambda: ["liver", "Liver", " liver "],
        "duplicate prompt",
        extra={"check": check_duplicates},
    ),
    Row("500-prompts", lambda: MANY[:500], "", extra={"check": check_many}),
    Row(f"{MAX_PROMPTS}-prompts-the-limit", lambda: MANY, "", extra={"check": check_limit, "api_only": True}),
    Row("non-ascii-free-text", lambda: [NON_ASCII], "", extra={"check": check_free_text(NON_ASCII)}),
    Row("nonsense-hello-world", lambda: ["hello world"], "", extra={"check": check_free_text("hello world")}),
    Row("structure-absent-from-the-image", lambda: ["brain"], "", extra={"check": check_absent}),
]


@pytest.mark.parametrize("row", rows(PROMPT_WORKS))
def test_odd_but_usable_prompts_give_a_result_with_each_prompt_accounted_for(
    row, segmenter, prompt_model_path, phantom_path, out, capsys
):
    image, affine = read_image(phantom_path)
    result = segmenter.segment(image, affine, row.make())
    row.extra["check"](result)
    assert any(row.message in w for w in result.warnings) if row.message else not result.warnings
    if row.extra.get("api_only"):
        return
    code, stdout, err = run_cli(
        segment_argv(phantom_path, out, [", ".join(row.make())], prompt_model_path), capsys
    )
    assert code == 0, err
    sidecar = json.loads((out / "seg.json").read_text(encoding="utf-8"))
    assert [entry["prompt"] for entry in sidecar["labels"]] == [p.prompt for p in result.prompts]
    for entry in sidecar["labels"]:
        if not entry["found"]:
            assert entry["note"] and entry["voxels"] == 0
    if any(not p.found for p in result.prompts):
        assert "NOT FOUND" in stdout
    if row.message:
        assert f"warning: {row.message}" in err and any(row.message in w for w in sidecar["warnings"])
    assert listing(out) == ["seg.json", "seg.nii.gz"]


def test_non_ascii_free_text_goes_through_the_real_clip_tokenizer():
    import open_clip

    tokens = open_clip.get_tokenizer("ViT-B-32")([NON_ASCII])
    assert tokens.shape == (1, 77) and int((tokens > 0).sum()) > 3


# -- model files -----------------------------------------------------------------------------------
class MarkerPayload:
    """Unpickling this creates the marker file: what a malicious "model.pt" would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_payload(name: str, zipped: bool = False) -> Callable[[Path, Path], Path]:
    def make(folder: Path, model: Path) -> Path:
        target = folder / name
        state = {"state_dict": {"w": torch.zeros(2)}, "payload": MarkerPayload(folder / "MARKER")}
        if zipped:
            torch.save(state, target)
        else:
            target.write_bytes(pickle.dumps(state, protocol=4))
        return target

    return make


def truncated_model(folder: Path, model: Path) -> Path:
    data = model.read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder / "model.safetensors"


def not_safetensors(folder: Path, model: Path) -> Path:
    (folder / "model.safetensors").write_text("<html>404 Not Found</html>\n")
    return folder / "model.safetensors"


def edited_card(edit: Callable[[dict], None]) -> Callable[[Path, Path], Path]:
    def make(folder: Path, model: Path) -> Path:
        tensors, card = read_model_file(model)
        edit(card)
        return write_model_file(folder / "model.safetensors", tensors, card)

    return make


def future_format(card: dict) -> None:
    card["format_version"] = 99


def small_card_tiny_tensors(card: dict) -> None:
    from voila.model.config import load_preset

    card["preset"], card["model"] = "small", load_preset("small").to_dict()


def openai_text_encoder(card: dict) -> None:
    card["text_encoder"]["pretrained"] = "openai"


MODEL_ERRORS = [
    Row("truncated-model", truncated_model, "is not a valid VOILA model file", errors.ModelFileError),
    Row("not-safetensors", not_safetensors, "is not a valid VOILA model file", errors.ModelFileError),
    Row(
        "pickle-payload-as-model-pt",
        pickle_payload("model.pt"),
        "Pickled PyTorch files are refused",
        errors.ModelFileError,
    ),
    Row(
        "pickle-payload-as-model-safetensors",
        pickle_payload("model.safetensors"),
        "Pickled PyTorch files are refused",
        errors.ModelFileError,
    ),
    Row(
        "torch-save-payload-as-model-safetensors",
        pickle_payload("model.safetensors", zipped=True),
        "Pickled PyTorch files are refused",
        errors.ModelFileError,
    ),
    Row(
        "format-version-99",
        edited_card(future_format),
        "model-file format 99, newer than",
        errors.ModelFileError,
    ),
    Row(
        "card-says-small-tensors-are-tiny",
        edited_card(small_card_tiny_tensors),
        "weights do not match the preset 'small'",
        errors.ModelFileError,
    ),
    Row(
        "free-text-without-cache-offline",
        edited_card(openai_text_encoder),
        "connect to the internet so open_clip can cache the weights",
        errors.TextEncoderUnavailableError,
        extra={"prompts": ["a structure nobody cached"]},
    ),
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache, as on a hospital workstation."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.parametrize("row", rows(MODEL_ERRORS))
def test_an_unusable_model_file_is_refused_without_running_anything_in_it(
    row, tiny_model_path, phantom_path, tmp_path, out, capsys, offline
):
    folder = tmp_path / "download"
    folder.mkdir()
    model = row.make(folder, tiny_model_path)
    prompts = row.extra.get("prompts", ["liver"])
    with pytest.raises(row.error) as raised:
        image, affine = read_image(phantom_path)
        Segmenter.load(model, device="cpu").segment(image, affine, prompts)
    assert row.message in str(raised.value) and "\n" not in str(raised.value)

    argv = segment_argv(phantom_path, out, prompts, model)
    code, _, err = run_cli(argv, capsys)
    assert_one_clear_error_line(code, err, row, "segment")
    code, _, err = run_cli(argv, capsys, debug=True)
    assert_debug_shows_the_traceback(code, err, row, "segment")
    if "prompts" not in row.extra:  # the card itself is readable when only the text encoder is missing
        code, _, err = run_cli(["info", str(model)], capsys)
        assert_one_clear_error_line(code, err, row, "info")
    assert listing(out) == []
    assert not (folder / "MARKER").exists(), "the pickle was unpickled: a model file ran code"


def test_the_pickle_payload_is_real_it_creates_its_marker_when_unpickled(tmp_path):
    for zipped in (False, True):
        path = pickle_payload("control.pt", zipped)(tmp_path, tmp_path)
        if zipped:
            torch.load(path, weights_only=False)
        else:
            pickle.loads(path.read_bytes())
        assert (tmp_path / "MARKER").exists()
        (tmp_path / "MARKER").unlink()


def test_the_real_command_line_prints_one_line_and_never_unpickles(tiny_model_path, phantom_path, tmp_path):
    """``python -m voila`` in its own process: one line, no warnings printed on import, no marker."""
    model = pickle_payload("model.pt", zipped=True)(tmp_path, tiny_model_path)
    argv = segment_argv(phantom_path, tmp_path, ["liver"], model)
    done = subprocess.run(
        [sys.executable, "-m", "voila", *argv], capture_output=True, text=True, encoding="utf-8", timeout=300
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voila segment: error: "), done.stderr
    assert "Pickled PyTorch files are refused" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# -- training --------------------------------------------------------------------------------------
TRAIN_ARGS = [
    "--preset", "tiny", "--text-pretrained", "none", "--spacing", "6", "--patch-size", "16",
    "--batch-size", "1", "--device", "cpu", "--epochs", "2", "--steps-per-epoch", "3",
    "--checkpoint-every", "1", "--no-augment", "--val-every", "2",
]  # fmt: skip
CORRUPT_CASE = "phantom_000"


@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory) -> Path:
    """Four phantoms (one held out); the first training case's CT is truncated."""
    root = write_phantom_dataset(
        tmp_path_factory.mktemp("data") / "phantoms", 4, shape=(32, 32, 32), spacing=(3, 3, 3)
    )
    ct = root / CORRUPT_CASE / "ct.nii.gz"
    ct.write_bytes(ct.read_bytes()[:2000])
    return root


def train_cli(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "voila",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        *TRAIN_ARGS,
        *extra,
    ]


def in_process(argv: Sequence[str]) -> tuple[int, str]:
    """``voila ARGS`` in this process (``main``), its stderr captured; no pytest fixture needed."""
    import contextlib
    import io

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(list(argv))
    return code, stderr.getvalue()


def api_error(**settings) -> errors.VoilaError:
    from voila.training.api import train

    with pytest.raises(errors.VoilaError) as raised:
        train(dict(settings))
    return raised.value


def augmented(command: list[str]) -> list[str]:
    """``command`` with augmentation on: a resumed run must replay its random patches exactly."""
    return [arg for arg in command if arg != "--no-augment"]


@pytest.fixture(scope="module")
def killed_run(phantom_dataset, tmp_path_factory) -> dict[str, Any]:
    """A real ``voila train`` process: a second run is tried while it trains, then it is SIGKILLed
    right after a mid-epoch checkpoint and resumed with ``--resume`` to the end. Alongside it, the
    same run uninterrupted (one thread each: same arithmetic, and the machine has two cores)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    straight = out.parent / "uninterrupted"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    record: dict[str, Any] = {"out": out, "uninterrupted": straight}
    twin = subprocess.Popen(augmented(train_cli(straight, phantom_dataset)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=env)  # fmt: skip
    with open(out.parent / "first.err", "w+", encoding="utf-8", errors="replace") as first_err:
        process = subprocess.Popen(augmented(train_cli(out, phantom_dataset)), stderr=first_err,
                                   stdout=subprocess.DEVNULL, env=env)  # fmt: skip
        try:
            last = out / "checkpoints" / "last.pt"
            deadline = time.monotonic() + 240
            while not last.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert process.poll() is None, "the first run ended before its first checkpoint"
            second = train_cli(out, phantom_dataset)[3:]
            record["concurrent_cli"] = in_process(second)
            record["concurrent_api"] = api_error(**trainer_settings(out, phantom_dataset))
            assert process.poll() is None, "the first run ended before it could be killed"
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
        first_err.seek(0)
        record["first_stderr"] = first_err.read()
    record["killed_at_step"] = int(torch.load(last, weights_only=True)["global_step"])
    record["lock_left_behind"] = (out / ".voila-train.lock").exists()
    resumed = subprocess.run(augmented(train_cli(out, phantom_dataset, "--resume")), capture_output=True, text=True, env=env,
                             encoding="utf-8", errors="replace", timeout=600)  # fmt: skip
    record["resumed"] = resumed
    record["again_cli"] = in_process(train_cli(out, phantom_dataset)[3:])
    _, record["uninterrupted_stderr"] = twin.communicate(timeout=600)
    record["uninterrupted_code"] = twin.returncode
    return record


def trainer_settings(out: Path, data: Path, **more) -> dict[str, Any]:
    return dict(
        data=[str(data)], out=str(out), preset="tiny", text_pretrained="none", spacing=[6.0], patch_size=[16],
        batch_size=1, device="cpu", epochs=2, steps_per_epoch=3, checkpoint_every=1, augment=False, **more,
    )  # fmt: skip


def check_resumed_without_losing_progress(record: dict[str, Any]) -> None:
    resumed, out = record["resumed"], record["out"]
    assert resumed.returncode == 0, resumed.stderr
    step = record["killed_at_step"]
    assert 1 <= step < 6
    assert f"(global step {step})" in resumed.stderr  # continues from the last checkpoint's step
    final = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert final["global_step"] == 6 and final["epoch"] == 2
    assert (out / "model.safetensors").is_file()
    assert not [p for p in out.rglob("*") if ".partial-" in p.name], listing(out)


def check_resumed_bit_identical_to_uninterrupted(record: dict[str, Any]) -> None:
    """Weights, optimiser moments, exported model and metrics rows of the killed-and-resumed run
    equal the uninterrupted run's exactly (RNG, data order, augmentation, scheduler restored)."""
    assert record["uninterrupted_code"] == 0, record["uninterrupted_stderr"][-3000:]
    interrupted, straight = record["out"], record["uninterrupted"]
    final_a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    final_b = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=True)
    assert final_a["global_step"] == final_b["global_step"] == 6
    assert final_a["model"].keys() == final_b["model"].keys()
    different = [k for k in final_a["model"] if not torch.equal(final_a["model"][k], final_b["model"][k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    for key in ("exp_avg", "exp_avg_sq"):
        for index, entry in final_a["optimizer"]["state"].items():
            assert torch.equal(entry[key], final_b["optimizer"]["state"][index][key])
    model_a = load_file(str(straight / "model.safetensors"))
    model_b = load_file(str(interrupted / "model.safetensors"))
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    epochs_a = [row.split(",")[0] for row in (straight / "metrics.csv").read_text().splitlines()[1:]]
    epochs_b = [row.split(",")[0] for row in (interrupted / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs_b == epochs_a == ["0", "1"], "a resumed run keeps one metrics row per epoch"


def check_no_library_chatter(record: dict[str, Any]) -> None:
    for chatter in ("WARNING:root", "ERROR:root", "FutureWarning", "DeprecationWarning", "Traceback"):
        assert chatter not in record["first_stderr"] + record["resumed"].stderr


def check_corrupt_case_skipped(record: dict[str, Any]) -> None:
    assert f"skipped case phantoms/{CORRUPT_CASE}" in record["first_stderr"]
    from voila.model.model_file import read_model_card

    card = read_model_card(record["out"] / "model.safetensors")
    assert [entry["case"] for entry in card["training"]["skipped_cases"]] == [f"phantoms/{CORRUPT_CASE}"]


def check_one_line(code_and_err: tuple[int, str], fragment: str, exit_code: int = 2) -> None:
    code, err = code_and_err
    lines = [line for line in err.strip().splitlines() if line.startswith("voila train: error:")]
    assert code == exit_code and len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def check_second_run_refused_while_running(record: dict[str, Any]) -> None:
    check_one_line(record["concurrent_cli"], "another training run (pid")
    assert isinstance(record["concurrent_api"], errors.TrainingError)
    assert "wait for it to finish, or choose another --out" in str(record["concurrent_api"])


def check_second_run_refused_after_it_finished(record: dict[str, Any]) -> None:
    check_one_line(record["again_cli"], "already holds a finished training run; use --resume")


KILLED_RUN_ROWS = [
    Row("sigkill-mid-epoch-then-resume", check_resumed_without_losing_progress, "(global step"),
    Row("sigkill-resume-ends-bit-identical", check_resumed_bit_identical_to_uninterrupted, ""),
    Row("corrupt-case-skipped-and-reported", check_corrupt_case_skipped, "skipped case"),
    Row("training-log-without-library-chatter", check_no_library_chatter, ""),
    Row(
        "second-run-while-one-trains",
        check_second_run_refused_while_running,
        "another training run",
        errors.TrainingError,
    ),
    Row(
        "second-run-into-a-finished-folder",
        check_second_run_refused_after_it_finished,
        "already holds",
        errors.TrainingError,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("row", rows(KILLED_RUN_ROWS))
def test_an_interrupted_or_contested_training_run_loses_nothing(row, killed_run):
    row.make(killed_run)


def file_as_folder(tmp: Path) -> Path:
    (tmp / "afile").write_text("not a folder")
    return tmp / "afile" / "run"


TRAINING_ERRORS = [
    Row(
        "out-under-a-regular-file",
        file_as_folder,
        "a file is in the way; choose another --out",
        errors.OutputError,
    ),
    Row("out-under-dev-full", lambda tmp: Path("/dev/full/run"), "choose another --out", errors.OutputError),
    Row("out-under-proc", lambda tmp: Path("/proc/voila-run"), "choose another --out", errors.OutputError),
    Row(
        "nan-loss",
        lambda tmp: tmp / "run",
        "the training loss became NaN/Inf",
        errors.TrainingError,
        extra={"lr": 1e30},
    ),
]


@pytest.mark.parametrize("row", rows(TRAINING_ERRORS))
def test_a_training_run_that_cannot_go_on_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    row, phantom_dataset, tmp_path
):
    out = row.make(tmp_path)
    if row.id.startswith("out-under") and sys.platform != "linux":
        pytest.skip("needs Linux /dev and /proc")
    extra = ["--lr", str(row.extra["lr"])] if "lr" in row.extra else []
    before = listing(tmp_path)
    code, err = in_process(train_cli(out, phantom_dataset, *extra)[3:])
    check_one_line((code, err), row.message, row.exit_code)
    if row.id == "nan-loss":
        assert f"the last good checkpoint {out / 'checkpoints' / 'last.pt'} is kept" in err
        state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
        assert state["global_step"] >= 1
        assert not (out / "model.safetensors").exists()
        assert not [p for p in out.rglob("*") if ".partial-" in p.name]
        return
    assert listing(tmp_path) == before
    error = api_error(**trainer_settings(out, phantom_dataset))
    assert isinstance(error, row.error) and row.message in str(error)


# -- the Slicer module -----------------------------------------------------------------------------
SLICER_ROWS = [
    Row("segment-while-a-run-is-in-progress", "test_a_second_run_while_one_is_running_is_refused",
        "a segmentation is already running; wait for it to finish or press Cancel first",
        extra={"error": "JobAlreadyRunningError"}),
    Row("input-node-deleted-during-a-run", "test_removing_the_input_during_a_run_discards_the_result_with_a_clear_message",
        "the input volume was removed from the scene while it was being segmented; the result was discarded",
        extra={"error": "InputRemovedError"}),
    Row("cancel-mid-run-leaves-the-scene-as-it-was", "test_cancelling_mid_run_leaves_the_scene_as_it_was",
        "segmentation cancelled", extra={"error": "Cancelled"}),  # the widget: "Cancelled; nothing was changed."
]  # fmt: skip


@pytest.mark.parametrize("row", rows(SLICER_ROWS))
def test_the_slicer_logic_refuses_or_discards_with_the_message_the_module_shows(
    row, tiny_model_path, monkeypatch
):
    """The scenarios live in ``Testing/slicer/test_logic_mrml.py``; here they run with the tiny model
    (no demo model needed) while every error the logic raises is recorded: the widget shows
    ``str(error)`` in a message box (or the status line for Cancel)."""
    # first: slicer-core's package imports every module of every "slicer/" folder on sys.path,
    # Testing/slicer/ included, and those need their own folder on sys.path
    slicer_tests = str(REPO / "Testing" / "slicer")
    if slicer_tests not in sys.path:
        sys.path.insert(0, slicer_tests)
    pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) provides MRML")
    import test_logic_mrml
    from mrml_scene import new_scene
    from VOILASegmenterLib import logic as logic_module

    raised: list[BaseException] = []

    def recording(method):
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except errors.VoilaError as error:
                raised.append(error)
                raise

        return wrapper

    monkeypatch.setattr(logic_module.SegmentationJob, "poll", recording(logic_module.SegmentationJob.poll))
    monkeypatch.setattr(
        logic_module.VOILASegmenterLogic, "process", recording(logic_module.VOILASegmenterLogic.process)
    )

    class TinyModelLogic(logic_module.VOILASegmenterLogic):
        def segmenter(self, modelPath=None, device: str = "auto"):
            return super().segmenter(modelPath or tiny_model_path, "cpu")

    scene = new_scene()
    try:
        getattr(test_logic_mrml, row.make)(scene, TinyModelLogic())
    finally:
        scene.Clear(1)
    expected = getattr(logic_module, row.extra["error"], None) or getattr(errors, row.extra["error"])
    shown = [str(error) for error in raised if type(error) is expected]
    assert shown and row.message in shown[0] and "\n" not in shown[0]
