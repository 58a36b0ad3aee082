"""Hardening II: never destroy a user's file, never read a bomb, never call a broken model a finding.

One row per way it went wrong (issue "Hardening II", items 1-10). Each row is a scenario played
through the real command line (in this process, or as its own process where a signal, stderr of
C++ libraries or peak memory matter) or the public Python API, and states what the user must see.
Every row fails on the code before the fix.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from voila.cli import main
from voila.data.io import write_volume
from voila.data.phantoms import make_phantom, write_phantom_dataset

CARD_KEY = "voila_card"
ENV = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUTF8="1")


@dataclass(frozen=True)
class Row:
    id: str
    item: int  # the numbered item
    scenario: Callable[..., None]


@pytest.fixture(scope="module")
def small_model(tiny_model_path, tmp_path_factory) -> Path:
    """The tiny test model with a 16³ window, so each run is one window on a 16³ grid."""
    tensors, card = read_model(tiny_model_path)
    card["model"]["patch_size"] = [16, 16, 16]
    return write_model(tmp_path_factory.mktemp("model") / "tiny16.safetensors", tensors, card)


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> Path:
    ct, _, affine = make_phantom((32, 32, 32), (3.0, 3.0, 3.0), seed=1)
    return write_volume(tmp_path_factory.mktemp("ct") / "ct.nii.gz", ct, affine)


def read_model(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, json.loads(handle.metadata()[CARD_KEY])


def write_model(path: Path, tensors: dict[str, torch.Tensor], card) -> Path:
    save_file(tensors, str(path), metadata={CARD_KEY: json.dumps(card)})
    return path


def cli(*argv: str, capsys) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code: int, err: str, fragment: str, command: str = "segment", exit_code: int = 2) -> None:
    lines = err.strip().splitlines()
    assert code == exit_code, err
    assert len(lines) == 1 and lines[0].startswith(f"voila {command}: error: "), err
    assert fragment in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def segment(ct: Path, model: Path, *extra: str) -> list[str]:
    return ["segment", str(ct), "-m", str(model), "-p", "liver", "--quiet", *extra]


# -- 1. the input CT is never destroyed ----------------------------------------------------------
def output_is_the_input(ctx) -> None:
    ct = ctx.copy_ct()
    before = ct.read_bytes()
    code, _, err = cli(*segment(ct, ctx.model, "-o", str(ct)), capsys=ctx.capsys)
    one_error_line(code, err, "is an input of this run")
    assert ct.read_bytes() == before


def heatmap_is_the_input(ctx) -> None:
    ct = ctx.copy_ct()
    before = ct.read_bytes()
    code, _, err = cli(
        *segment(ct, ctx.model, "-o", str(ctx.tmp / "seg.nii.gz"), "--heatmap", str(ct)), capsys=ctx.capsys
    )
    one_error_line(code, err, "is an input of this run")
    assert ct.read_bytes() == before and not (ctx.tmp / "seg.nii.gz").exists()


def output_is_a_link_to_the_input(ctx) -> None:
    ct = ctx.copy_ct()
    before = ct.read_bytes()
    (ctx.tmp / "link.nii.gz").symlink_to(ct)
    code, _, err = cli(*segment(ct, ctx.model, "-o", str(ctx.tmp / "link.nii.gz")), capsys=ctx.capsys)
    one_error_line(code, err, "is an input of this run")
    assert ct.read_bytes() == before


# -- 2. a failed run leaves and overwrites nothing -----------------------------------------------
def labelmap_and_heatmap_on_one_path(ctx) -> None:
    (ctx.tmp / "h").mkdir()
    code, _, err = cli(
        *segment(
            ctx.ct, ctx.model, "-o", str(ctx.tmp / "h/seg.nii.gz"), "--heatmap", str(ctx.tmp / "h/seg.nii.gz")
        ),
        capsys=ctx.capsys,
    )
    one_error_line(code, err, "would both be written to")
    assert list((ctx.tmp / "h").iterdir()) == []


def output_is_a_folder_beside_an_earlier_sidecar(ctx) -> None:
    folder = ctx.tmp / "d"
    (folder / "seg.nii.gz").mkdir(parents=True)
    (folder / "seg.json").write_text('{"labels": [], "model": {}, "shape": [], "affine": []}')
    before = snapshot(folder)
    code, _, err = cli(*segment(ctx.ct, ctx.model, "-o", str(folder / "seg.nii.gz")), capsys=ctx.capsys)
    one_error_line(code, err, "is a folder")
    assert snapshot(folder) == before


def a_second_run_replaces_its_own_outputs(ctx) -> None:
    argv = segment(
        ctx.ct, ctx.model, "-o", str(ctx.tmp / "seg.nii.gz"), "--heatmap", str(ctx.tmp / "heat.nii.gz")
    )
    assert cli(*argv, capsys=ctx.capsys)[0] == 0
    assert cli(*argv, capsys=ctx.capsys)[0] == 0
    assert sorted(p.name for p in ctx.tmp.iterdir()) == ["heat.nii.gz", "seg.json", "seg.nii.gz"]


# -- 3. the sidecar never replaces a user's JSON -------------------------------------------------
def sidecar_beside_bids_metadata(ctx) -> None:
    bids = ctx.tmp / "sub-01_ct.json"
    bids.write_text('{"Modality": "CT", "ConvolutionKernel": "B30f"}\n')
    before = snapshot(ctx.tmp)
    code, _, err = cli(*segment(ctx.ct, ctx.model, "-o", str(ctx.tmp / "sub-01_ct.nrrd")), capsys=ctx.capsys)
    one_error_line(code, err, "sub-01_ct.json already exists and was not written by voila segment")
    assert snapshot(ctx.tmp) == before


# -- 4. memory bombs from small files ------------------------------------------------------------
MEASURED = textwrap.dedent(
    """
    import sys, torch, voila, voila.cli, voila.data.io, voila.model.model_file
    # what the commands import on first use (monai, open_clip, torchvision, SimpleITK): imports are
    # not the command's allocations, and their size varies with the installed versions
    import monai, open_clip, SimpleITK, voila.commands.info, voila.commands.segment
    import voila.infer.pipeline, voila.infer.segmenter, voila.model.factory
    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    before = peak()
    code = voila.cli.main(sys.argv[1:])
    print("GROWTH", peak() - before, code)
    """
)


def run_measured(argv: list[str]) -> tuple[int, int, str]:
    """``voila ARGV`` in a fresh process; its exit code, how much its peak memory grew after the
    imports, and its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, *argv], capture_output=True, text=True, env=ENV, timeout=300
    )
    last = done.stdout.strip().splitlines()[-1].split()
    assert last[0] == "GROWTH", done.stdout + done.stderr
    return int(last[2]), int(last[1]), done.stderr


def card_describes_a_huge_network(ctx) -> None:
    tensors, card = read_model(ctx.model)
    card["model"]["cas"]["channels"] = [512, 1024, 2048, 4096]  # ~1.3 G parameters, 5 GB of float32
    model = write_model(ctx.tmp / "huge.safetensors", tensors, card)
    code, growth, err = run_measured(["info", str(model)])
    assert code == 2 and "weights do not match" in err, err
    assert growth < 300 * 2**20, f"refusing the card allocated {growth / 2**20:.0f} MB"


def sparse_file_with_an_unexpected_tensor(ctx) -> None:
    tensors, card = read_model(ctx.model)
    path = ctx.tmp / "sparse.safetensors"
    write_model(path, tensors, card)
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_length])
    end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    size = 3 * 2**30  # 3 GB of float32 the file claims, nothing of it real (a sparse file)
    header["model.extra"] = {"dtype": "F32", "shape": [size // 4], "data_offsets": [end, end + size]}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    data = path.read_bytes()[8 + header_length :]
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded + data)
        handle.truncate(8 + len(encoded) + end + size)
    code, growth, err = run_measured(["info", str(path)])
    assert code == 2 and "weights do not match" in err and "unexpected" in err, err
    assert growth < 300 * 2**20, f"refusing the file read {growth / 2**20:.0f} MB"


def nifti_header_claims_a_huge_volume(ctx) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((1100, 1100, 1100))
    header.set_data_dtype(np.int16)
    header.set_slope_inter(1.0, 0.0)
    header.set_sform(np.eye(4), code=1)
    payload = header.binaryblock + b"\0" * 4 + np.full(2**20, -1000, np.int16).tobytes()
    path = ctx.tmp / "bomb.nii.gz"
    path.write_bytes(gzip.compress(payload))
    argv = segment(path, ctx.model, "-o", str(ctx.tmp / "seg.nii.gz"))
    code, growth, err = run_measured(argv)
    assert code == 2 and "truncated or corrupt" in err, err
    assert growth < 300 * 2**20, f"refusing the image allocated {growth / 2**20:.0f} MB"


# -- 5. interrupted writes leave nothing; stale partial files are cleaned up ----------------------
def sigterm_during_a_run(ctx) -> None:
    out = ctx.tmp / "out"
    out.mkdir()
    ct = ctx.large_ct()
    argv = [a for a in segment(ct, ctx.model, "-o", str(out / "seg.nii.gz"), "--heatmap", str(out / "h.nii.gz"))
            if a != "--quiet"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "voila", *argv], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=ENV
    )
    seen = b""
    while b"segmenting" not in seen and process.poll() is None:  # the progress bar: the run is under way
        seen += os.read(process.stderr.fileno(), 64)
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    err = (seen + rest).decode("utf-8", "replace")
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == "voila segment: terminated (SIGTERM); no partial output was kept"
    assert list(out.iterdir()) == []


def stale_partial_files_of_a_killed_run(ctx) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    stale = ctx.tmp / f".seg.nii.gz.partial-{gone.pid}.nii.gz"
    stale.write_bytes(b"half a file")
    moved_aside = ctx.tmp / f".heat.nii.gz.previous-{gone.pid}.nii.gz"
    moved_aside.write_bytes(b"the user's earlier heatmap")
    code, _, err = cli(*segment(ctx.ct, ctx.model, "-o", str(ctx.tmp / "seg.nii.gz")), capsys=ctx.capsys)
    assert code == 0, err
    assert not stale.exists() and not moved_aside.exists()
    assert (ctx.tmp / "heat.nii.gz").read_bytes() == b"the user's earlier heatmap"  # put back, never lost
    assert not [p for p in ctx.tmp.iterdir() if "partial" in p.name]


# -- 6. a broken model is never reported as anatomy ----------------------------------------------
def nan_weights(ctx) -> None:
    tensors, card = read_model(ctx.model)
    key = next(k for k in tensors if k.startswith("model.voxel_encoder") and tensors[k].ndim > 1)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    model = write_model(ctx.tmp / "nan.safetensors", tensors, card)
    code, out, err = cli(*segment(ctx.ct, model, "-o", str(ctx.tmp / "seg.nii.gz")), capsys=ctx.capsys)
    one_error_line(code, err, "is broken")
    assert "NOT FOUND" not in out and list(p.name for p in ctx.tmp.iterdir()) == ["nan.safetensors"]


def nan_text_cache(ctx) -> None:
    tensors, card = read_model(ctx.model)
    tensors["text_cache.features"] = torch.full_like(tensors["text_cache.features"], float("nan"))
    model = write_model(ctx.tmp / "nan-text.safetensors", tensors, card)
    code, out, err = cli(*segment(ctx.ct, model, "-o", str(ctx.tmp / "seg.nii.gz")), capsys=ctx.capsys)
    one_error_line(code, err, "is broken")
    assert "NOT FOUND" not in out


# -- 7. zero spacing is refused, not read as 1 mm ------------------------------------------------
def zero_spacing_in_a_qform_only_header(ctx) -> None:
    ct, _, _ = make_phantom((32, 32, 32), (3.0, 3.0, 3.0), seed=1)
    image = nib.Nifti1Image(ct, None)
    image.header.set_qform(np.diag([3.0, 3.0, 3.0, 1.0]), code=1)
    image.header.set_sform(None, code=0)
    image.header["pixdim"][1:4] = (3.0, 0.0, 3.0)
    path = ctx.tmp / "zero.nii.gz"
    nib.save(image, str(path))
    done = subprocess.run(
        [sys.executable, "-m", "voila", *segment(path, ctx.model, "-o", str(ctx.tmp / "seg.nii.gz"))],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    one_error_line(done.returncode, done.stderr, "zero voxel size")
    assert not (ctx.tmp / "seg.nii.gz").exists()


# -- 8. no internal error for a damaged card, a huge label value or a relative datalist ------------
def edit(**changes) -> Callable[[dict], dict]:
    def apply(card: dict) -> dict:
        for dotted, value in changes.items():
            *path, last = dotted.split("__")
            target = card
            for key in path:
                target = target[key]
            target[last] = value
        return card

    return apply


def card_entry_damaged(**changes) -> Callable:
    def scenario(ctx) -> None:
        tensors, card = read_model(ctx.model)
        model = write_model(ctx.tmp / "edited.safetensors", tensors, edit(**changes)(card))
        for argv, command in ((segment(ctx.ct, model, "-o", str(ctx.tmp / "seg.nii.gz")), "segment"),
                              (["info", str(model)], "info")):  # fmt: skip
            code, _, err = cli(*argv, capsys=ctx.capsys)
            one_error_line(code, err, "is damaged", command=command)

    return scenario


def card_is_not_an_object(value) -> Callable:
    def scenario(ctx) -> None:
        tensors, _ = read_model(ctx.model)
        model = write_model(ctx.tmp / "edited.safetensors", tensors, value)
        code, _, err = cli("info", str(model), capsys=ctx.capsys)
        one_error_line(code, err, "not a valid VOILA model file", command="info")

    return scenario


def evaluate_a_huge_label_value(ctx) -> None:
    reference = np.zeros((12, 12, 12), np.int32)
    reference[3:8, 3:8, 3:8] = 5
    prediction = reference.copy()
    prediction[0, 0, 0] = 2**31 - 1
    write_volume(ctx.tmp / "ref.nii.gz", reference, np.eye(4))
    write_volume(ctx.tmp / "pred.nii.gz", prediction, np.eye(4))
    code, out, err = cli(
        "evaluate", "--pred", str(ctx.tmp / "pred.nii.gz"), "--ref", str(ctx.tmp / "ref.nii.gz"),
        "--classes", "5=liver", capsys=ctx.capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "| liver" in out and "1.0000" in out


def train_with_a_relative_datalist(ctx) -> None:
    data = write_phantom_dataset(ctx.tmp / "phantoms", 2, shape=(24, 24, 24), spacing=(6, 6, 6))
    folder = ctx.tmp / "dl"
    folder.mkdir()
    entries = []
    for case in sorted(p for p in data.iterdir() if p.is_dir()):
        labels = np.zeros(nib.load(str(case / "ct.nii.gz")).shape, np.uint8)
        labels[nib.load(str(case / "segmentations/liver.nii.gz")).get_fdata() > 0] = 1
        write_volume(folder / f"{case.name}_label.nii.gz", labels, nib.load(str(case / "ct.nii.gz")).affine)
        shutil.copy(case / "ct.nii.gz", folder / f"{case.name}.nii.gz")
        entries.append({"image": f"{case.name}.nii.gz", "label": f"{case.name}_label.nii.gz"})
    (folder / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "liver"}, "training": entries})
    )
    cwd = os.getcwd()
    os.chdir(ctx.tmp)
    try:
        code, _, err = cli(
            "train", "--data", "dl/dataset.json", "--out", "run", "--preset", "tiny", "--spacing", "6",
            "--patch-size", "16", "--text-pretrained", "none", "--device", "cpu", "--epochs", "1",
            "--steps-per-epoch", "1", "--batch-size", "1", "--no-augment", capsys=ctx.capsys,
        )  # fmt: skip
    finally:
        os.chdir(cwd)
    assert code == 0, err
    assert (ctx.tmp / "run" / "model.safetensors").is_file()


# -- 9. "background" is not a structure ----------------------------------------------------------
def background_as_a_prompt(ctx) -> None:
    code, _, err = cli(
        "segment", str(ctx.ct), "-m", str(ctx.model), "-p", "Background", "-o", str(ctx.tmp / "seg.nii.gz"),
        "--quiet", capsys=ctx.capsys,
    )  # fmt: skip
    one_error_line(code, err, "not a structure to segment")
    assert not (ctx.tmp / "seg.nii.gz").exists()


# -- 10. the smaller ones -------------------------------------------------------------------------
def folder_without_dicom_is_one_line_from_the_real_process(ctx) -> None:
    (ctx.tmp / "empty").mkdir()
    (ctx.tmp / "empty" / "notes.txt").write_text("no images here")
    done = subprocess.run(
        [sys.executable, "-m", "voila", *segment(ctx.tmp / "empty", ctx.model, "-o", str(ctx.tmp / "seg.nii.gz"))],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    one_error_line(done.returncode, done.stderr, "no DICOM series found")


def plain_nifti_named_nii_gz(ctx) -> None:
    plain = ctx.tmp / "ct.nii"
    ct, _, affine = make_phantom((32, 32, 32), (3.0, 3.0, 3.0), seed=1)
    write_volume(plain, ct, affine)
    plain.rename(ctx.tmp / "ct_plain.nii.gz")
    code, _, err = cli(
        *segment(ctx.tmp / "ct_plain.nii.gz", ctx.model, "-o", str(ctx.tmp / "s.nii.gz")), capsys=ctx.capsys
    )
    one_error_line(code, err, "rename it to end in .nii")


def singular_affine(ctx) -> None:
    ct, _, _ = make_phantom((32, 32, 32), (3.0, 3.0, 3.0), seed=1)
    affine = np.array([[3.0, 3.0, 0, 0], [0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    path = ctx.tmp / "singular.nii.gz"
    image = nib.Nifti1Image(ct, affine)
    nib.save(image, str(path))
    code, _, err = cli(*segment(path, ctx.model, "-o", str(ctx.tmp / "seg.nii.gz")), capsys=ctx.capsys)
    assert "gantry" not in err
    one_error_line(code, err, "zero voxel size" if "zero" in err else "singular")


def shifted_training_mask(ctx) -> None:
    from voila.data.layouts import discover, load_case_label
    from voila.errors import DatasetError

    data = write_phantom_dataset(
        ctx.tmp / "phantoms", 1, shape=(24, 24, 24), spacing=(6, 6, 6), val_fraction=0
    )
    case_dir = next(p for p in data.iterdir() if p.is_dir())
    mask = nib.load(str(case_dir / "segmentations" / "liver.nii.gz"))
    shifted = mask.affine.copy()
    shifted[0, 3] += 12.0
    nib.save(
        nib.Nifti1Image(np.asarray(mask.dataobj), shifted), str(case_dir / "segmentations" / "liver.nii.gz")
    )
    dataset = discover(data)
    with pytest.raises(DatasetError) as raised:
        load_case_label(dataset.cases[0], dataset.class_names)
    assert "shape (24, 24, 24) vs (24, 24, 24)" not in str(raised.value)
    assert "shifted, flipped or another spacing" in str(raised.value)


def prompts_on_separate_lines(ctx) -> None:
    code, out, err = cli(
        "segment", str(ctx.ct), "-m", str(ctx.model), "-p", "liver\nspleen", "-o", str(ctx.tmp / "seg.nii.gz"),
        "--quiet", capsys=ctx.capsys,
    )  # fmt: skip
    assert code == 0, err
    prompts = [entry["prompt"] for entry in json.loads((ctx.tmp / "seg.json").read_text())["labels"]]
    assert prompts == ["liver", "spleen"]


def terminal_escape_codes_in_a_prompt(ctx) -> None:
    code, out, err = cli(
        "segment", str(ctx.ct), "-m", str(ctx.model), "-p", "\x1b[2J\x1b[31mliver\x1b[0m",
        "-o", str(ctx.tmp / "seg.nii.gz"), "--quiet", capsys=ctx.capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "\x1b" not in out + err
    assert json.loads((ctx.tmp / "seg.json").read_text())["labels"][0]["prompt"] == "liver"


def many_identical_duplicates(ctx) -> None:
    code, _, err = cli(
        "segment", str(ctx.ct), "-m", str(ctx.model), "-p", ", ".join(["liver"] * 999),
        "-o", str(ctx.tmp / "seg.nii.gz"), "--quiet", capsys=ctx.capsys,
    )  # fmt: skip
    assert code == 0, err
    assert err.count("duplicate") == 1 and "998 times" in err


def evaluate_two_single_file_folders_with_other_names(ctx) -> None:
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[3:8, 3:8, 3:8] = 5
    for folder, name in (("pred", "case_a"), ("ref", "case_b")):
        (ctx.tmp / folder).mkdir()
        write_volume(ctx.tmp / folder / f"{name}.nii.gz", labels, np.eye(4))
    code, _, err = cli(
        "evaluate", "--pred", str(ctx.tmp / "pred"), "--ref", str(ctx.tmp / "ref"), capsys=ctx.capsys
    )
    one_error_line(code, err, "no reference for predicted case(s) case_a", command="evaluate")


def evaluate_unnamed_labels_are_reported(ctx) -> None:
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[3:8, 3:8, 3:8] = 5
    labels[9:11, 9:11, 9:11] = 200  # beyond the 117 TotalSegmentator classes
    write_volume(ctx.tmp / "ref.nii.gz", labels, np.eye(4))
    write_volume(ctx.tmp / "pred.nii.gz", labels, np.eye(4))
    code, _, err = cli(
        "evaluate",
        "--pred",
        str(ctx.tmp / "pred.nii.gz"),
        "--ref",
        str(ctx.tmp / "ref.nii.gz"),
        capsys=ctx.capsys,
    )
    assert code == 0, err
    assert "label values with no name (200)" in err


def train_failing_on_its_data_leaves_no_run_folder(ctx) -> None:
    (ctx.tmp / "data").mkdir()
    (ctx.tmp / "data" / "case").mkdir()
    (ctx.tmp / "data" / "case" / "ct.nii.gz").write_text("not an image")
    (ctx.tmp / "data" / "case" / "segmentations").mkdir()
    (ctx.tmp / "data" / "case" / "segmentations" / "liver.nii.gz").write_text("not an image")
    code, _, err = cli(
        "train", "--data", str(ctx.tmp / "data"), "--out", str(ctx.tmp / "runs" / "a"), "--preset", "tiny",
        "--text-pretrained", "none", "--device", "cpu", capsys=ctx.capsys,
    )  # fmt: skip
    assert code == 2 and "no readable case" in err, err
    assert not (ctx.tmp / "runs").exists()


def train_stopped_by_sigint_does_not_exit_zero(ctx) -> None:
    data = write_phantom_dataset(ctx.tmp / "phantoms", 2, shape=(24, 24, 24), spacing=(6, 6, 6))
    process = subprocess.Popen(
        [sys.executable, "-m", "voila", "train", "--data", str(data), "--out", str(ctx.tmp / "run"),
         "--preset", "tiny", "--spacing", "6", "--patch-size", "16", "--text-pretrained", "none",
         "--device", "cpu", "--epochs", "1000", "--steps-per-epoch", "2", "--batch-size", "1", "--no-augment"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (ctx.tmp / "run" / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 130, err
    assert "--resume" in err and (ctx.tmp / "run" / "model.safetensors").is_file()


ROWS = [
    Row("output-is-the-input", 1, output_is_the_input),
    Row("heatmap-is-the-input", 1, heatmap_is_the_input),
    Row("output-is-a-link-to-the-input", 1, output_is_a_link_to_the_input),
    Row("labelmap-and-heatmap-on-one-path", 2, labelmap_and_heatmap_on_one_path),
    Row("output-is-a-folder-beside-an-earlier-sidecar", 2, output_is_a_folder_beside_an_earlier_sidecar),
    Row("a-second-run-replaces-its-own-outputs", 2, a_second_run_replaces_its_own_outputs),
    Row("sidecar-beside-bids-metadata", 3, sidecar_beside_bids_metadata),
    Row("card-describes-a-huge-network", 4, card_describes_a_huge_network),
    Row("sparse-file-with-an-unexpected-tensor", 4, sparse_file_with_an_unexpected_tensor),
    Row("nifti-header-claims-a-huge-volume", 4, nifti_header_claims_a_huge_volume),
    Row("sigterm-during-a-run", 5, sigterm_during_a_run),
    Row("stale-partial-files-of-a-killed-run", 5, stale_partial_files_of_a_killed_run),
    Row("nan-weights", 6, nan_weights),
    Row("nan-text-cache", 6, nan_text_cache),
    Row("zero-spacing-in-a-qform-only-header", 7, zero_spacing_in_a_qform_only_header),
    Row("card-is-a-json-list", 8, card_is_not_an_object([1, 2])),
    Row("card-is-a-json-string", 8, card_is_not_an_object("a model")),
    Row("card-classes-null", 8, card_entry_damaged(classes=None)),
    Row("card-text-encoder-empty", 8, card_entry_damaged(text_encoder={})),
    Row("card-spacing-not-a-number", 8, card_entry_damaged(preprocessing__spacing="abc")),
    Row("card-vocabulary-a-number", 8, card_entry_damaged(vocabulary=5)),
    Row("evaluate-a-huge-label-value", 8, evaluate_a_huge_label_value),
    Row("train-with-a-relative-datalist", 8, train_with_a_relative_datalist),
    Row("background-as-a-prompt", 9, background_as_a_prompt),
    Row("folder-without-dicom-is-one-line", 10, folder_without_dicom_is_one_line_from_the_real_process),
    Row("plain-nifti-named-nii-gz", 10, plain_nifti_named_nii_gz),
    Row("singular-affine", 10, singular_affine),
    Row("shifted-training-mask", 10, shifted_training_mask),
    Row("prompts-on-separate-lines", 10, prompts_on_separate_lines),
    Row("terminal-escape-codes-in-a-prompt", 10, terminal_escape_codes_in_a_prompt),
    Row("many-identical-duplicates", 10, many_identical_duplicates),
    Row(
        "evaluate-single-file-folders-with-other-names", 10, evaluate_two_single_file_folders_with_other_names
    ),
    Row("evaluate-unnamed-labels-are-reported", 10, evaluate_unnamed_labels_are_reported),
    Row("train-failing-on-its-data-leaves-no-run-folder", 10, train_failing_on_its_data_leaves_no_run_folder),
    Row("train-stopped-by-sigint-does-not-exit-zero", 10, train_stopped_by_sigint_does_not_exit_zero),
]


class Context:
    def __init__(self, tmp: Path, ct: Path, model: Path, capsys) -> None:
        self.tmp, self.ct, self.model, self.capsys = tmp, ct, model, capsys

    def copy_ct(self) -> Path:
        return Path(shutil.copy(self.ct, self.tmp / "ct.nii.gz"))

    def large_ct(self) -> Path:
        """A CT that takes the tiny model a good while (a signal must arrive mid-run)."""
        ct, _, affine = make_phantom((160, 160, 160), (1.2, 1.2, 1.2), seed=2)
        return write_volume(self.tmp / "large.nii.gz", ct, affine)


@pytest.mark.parametrize("row", [pytest.param(row, id=f"{row.item}-{row.id}") for row in ROWS])
def test_hardening_ii(row, tmp_path, ct_file, small_model, capsys):
    row.scenario(Context(tmp_path, ct_file, small_model, capsys))


def test_when_one_output_cannot_be_moved_into_place_the_others_are_put_back(tmp_path, monkeypatch):
    import voila.outputs as outputs_module
    from voila.errors import OutputError
    from voila.outputs import OutputSet

    (tmp_path / "seg.nii.gz").write_bytes(b"earlier labelmap")
    (tmp_path / "seg.json").write_bytes(b"earlier sidecar")
    outputs = OutputSet("voila segment", owns=lambda path: True)
    first, second = (
        outputs.add(tmp_path / "seg.nii.gz", "labelmap"),
        outputs.add(tmp_path / "seg.json", "sidecar"),
    )
    outputs.check()
    real_replace = os.replace

    def failing_replace(source, destination):
        if Path(destination) == second and ".partial-" in Path(source).name:
            raise OSError(28, "No space left on device")
        return real_replace(source, destination)

    monkeypatch.setattr(outputs_module.os, "replace", failing_replace)
    with pytest.raises(OutputError, match="the disk is full"):
        with outputs.writing() as temporary:
            temporary[first].write_bytes(b"new labelmap")
            temporary[second].write_bytes(b"new sidecar")
    assert first.read_bytes() == b"earlier labelmap" and second.read_bytes() == b"earlier sidecar"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.json", "seg.nii.gz"]
