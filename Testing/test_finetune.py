"""Teaching a model: fine-tuning a model file on a few, partly labelled cases."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import voila
from voila.cli import main
from voila.data.io import write_volume
from voila.data.phantoms import write_phantom_dataset
from voila.errors import ConfigError
from voila.infer.review import check_joint_table
from voila.infer.segmenter import Segmenter
from voila.model.model_file import read_model_card
from voila.training.data import TrainingData
from voila.training.finetune import label_sources
from voila.vocabulary import Vocabulary

FAST = {
    "patch_size": [16, 16, 16],
    "device": "cpu",
    "batch_size": 1,
    "epochs": 1,
    "steps_per_epoch": 3,
    "augment": False,
    "val_windows": 2,
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def new_structure_data(tmp_path_factory) -> Path:
    """Phantoms at 6 mm (the tiny test model's grid) labelling the liver and a new structure
    ``TumorCore`` (the gallbladder's voxels), as a user's few cases would."""
    data = write_phantom_dataset(
        tmp_path_factory.mktemp("teach") / "data", 3, shape=(24, 24, 24), spacing=(6, 6, 6)
    )
    for case in sorted(p for p in data.iterdir() if p.is_dir()):
        masks = case / "segmentations"
        shutil.move(masks / "gallbladder.nii.gz", masks / "TumorCore.nii.gz")
        for mask in masks.iterdir():
            if mask.name not in ("TumorCore.nii.gz", "liver.nii.gz"):
                mask.unlink()
    return data


@pytest.fixture(scope="module")
def finetuned(tiny_model_path, new_structure_data, tmp_path_factory) -> dict:
    before = digest(tiny_model_path)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("runs") / "teach"
    path = voila.finetune(tiny_model_path, dict(FAST, data=[str(new_structure_data)], out=str(out)))
    return {"path": path, "base": tiny_model_path, "base_digest_before": before, "out": out}


def test_finetuning_keeps_every_base_class_adds_the_new_one_and_records_its_base(finetuned):
    base_card = read_model_card(finetuned["base"])
    card = read_model_card(finetuned["path"])
    assert card["classes"] == [*base_card["classes"], "Tumor Core"]
    training = card["training"]
    assert training["base"]["file"] == finetuned["base"].name
    assert training["base"]["sha256"] == finetuned["base_digest_before"]
    assert training["added_classes"] == ["Tumor Core"]
    assert training["keep_base"] == "pseudo-labels"
    assert training["datasets"][0]["name"] == "data"
    assert card["preprocessing"] == base_card["preprocessing"]  # from the base, nothing repeated
    assert card["text_encoder"] == base_card["text_encoder"]
    assert "fine-tuned from tiny.safetensors" in training["summary"]
    base_spacing = base_card["preprocessing"]["spacing"]  # the base's grid, not the --spacing default
    assert f"{base_spacing[0]:g} mm grid" in training["summary"]
    assert training["settings"]["model"]["spacing"] == base_spacing
    # the forgetting measure: the base's structures on the validation case, before and after
    forgetting = training["base_classes_dice"]
    assert set(forgetting["before"]) == set(forgetting["after"]) == {"liver"}
    assert all(0 <= v <= 1 for v in [*forgetting["before"].values(), *forgetting["after"].values()])
    assert forgetting["mean_change"] == pytest.approx(
        forgetting["after"]["liver"] - forgetting["before"]["liver"], abs=2e-4
    )
    assert forgetting["labels"] == {"liver": "reference"}  # the held-out case labels it
    # the review map's calibration and the structures' places come from this run's validation case
    review = card["review"]
    assert review["fitted_on"].startswith("1 whole validation case(s)")
    assert len(review["calibration"]["x"]) >= 2 and {"liver", "Tumor Core"} <= set(review["places"])
    # the joint table of 1 - p and intensity novelty, and the classes' profiles from the cases
    check_joint_table(review["joint"], "card")
    assert {"background", "liver", "Tumor Core"} <= set(review["intensity"]["density"])


def test_the_forgetting_figure_says_when_it_was_scored_against_the_bases_own_predictions():
    """A validation case that is also a training case gets pseudo-labels for the base structures it
    does not label: a figure against those is agreement with the base, and the card says so."""
    annotated = {0: torch.tensor([True, True, False, True]), 2: torch.tensor([True, True, True, True])}
    pseudo = {0: {3}, 1: {1, 2}, 2: {2}}  # case 1 is a training case only
    sources = label_sources(annotated, pseudo, {"liver": 1, "spleen": 2, "aorta": 3})
    assert sources == {
        "liver": "reference",  # labelled by both validation cases
        "spleen": "pseudo-labels",  # case 0 does not annotate it; case 2 got it from the base
        "aorta": "reference and pseudo-labels",
    }


def test_a_time_boxed_finetune_keeps_the_bases_patch(tiny_model_path, new_structure_data, tmp_path):
    """The base's patch is the inference window of a model the user has: a time box on the CPU
    (which picks the patch for ``voila train``) does not change it."""
    settings = {k: v for k, v in FAST.items() if k != "patch_size"}
    settings.update(data=[str(new_structure_data)], out=str(tmp_path / "boxed"), steps_per_epoch=250,
                    max_minutes=0.02)  # fmt: skip
    path = voila.finetune(tiny_model_path, settings)
    assert (
        read_model_card(path)["model"]["patch_size"]
        == read_model_card(tiny_model_path)["model"]["patch_size"]
    )
    assert "time box: patch" not in (tmp_path / "boxed" / "train.log").read_text(encoding="utf-8")


def test_the_base_file_is_never_modified(finetuned):
    assert digest(finetuned["base"]) == finetuned["base_digest_before"]


def test_a_camel_case_dataset_label_is_a_trained_class_for_its_spoken_name(finetuned):
    segmenter = Segmenter.load(finetuned["path"], device="cpu")
    resolved, _ = segmenter.resolve_prompts(["tumor core", "liver"])
    assert [p.class_name for p in resolved] == ["Tumor Core", "liver"] and all(p.trained for p in resolved)


def test_settings_the_base_fixes_are_refused_and_the_base_is_never_an_output(
    tiny_model_path, new_structure_data, tmp_path
):
    with pytest.raises(ConfigError, match="spacing come from the base model's card"):
        voila.finetune(
            tiny_model_path, dict(FAST, data=[str(new_structure_data)], out=str(tmp_path / "a"), spacing=3)
        )
    with pytest.raises(ConfigError, match="never overwrites it"):
        voila.finetune(
            tiny_model_path,
            dict(FAST, data=[str(new_structure_data)], out=str(tmp_path / "b"), export=str(tiny_model_path)),
        )


def test_the_command_line_fine_tunes_with_one_line_errors(
    tiny_model_path, new_structure_data, tmp_path, capsys
):
    code = main(["finetune", str(tiny_model_path), "--data", str(new_structure_data), "--out", str(tmp_path / "r"),
                 "--structures", "TumorCore", "--trainable", "neck", "--text-adapters", "--fusion", "--patch-size", "16",
                 "--device", "cpu", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "1", "--no-augment",
                 "--val-windows", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    card = read_model_card(tmp_path / "r" / "model.safetensors")
    assert card["training"]["added_classes"] == ["Tumor Core"] and card["model"]["text_adapters"]
    assert card["training"]["settings"]["optim"]["trainable"] == "neck"
    # the fused model segments through the engine, its classes fitted to each volume's tokens
    assert card["model"]["fusion"]
    segmenter = Segmenter.load(tmp_path / "r" / "model.safetensors", device="cpu")
    assert (
        float(segmenter.model.fusion.gate.detach()) != 0.0
    )  # the gate the base lacked was opened by training
    case = next(p for p in sorted(new_structure_data.iterdir()) if p.is_dir())
    ct = nib.load(str(case / "ct.nii.gz"))
    result = segmenter.segment(np.asarray(ct.dataobj, np.float32), ct.affine, ["tumor core", "liver"])
    assert result.labelmap.shape == ct.shape and len(result.prompts) == 2
    resolved, _ = segmenter.resolve_prompts(["tumor core"])
    one, other = (torch.nn.functional.normalize(torch.randn(32, 4, 4, 4), dim=0) for _ in range(2))
    assert not torch.equal(
        segmenter.class_embeddings(resolved, one), segmenter.class_embeddings(resolved, other)
    )
    code = main(["finetune", str(tiny_model_path), "--data", str(new_structure_data), "--out", str(tmp_path / "s"),
                 "--structures", "nothing like it"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line]  # progress lines may precede it
    assert code == 2 and errors == err[-1:], err
    assert (
        "--structures 'nothing like it': no dataset labels it; the datasets label: TumorCore, liver"
        in err[-1]
    )
    assert not (tmp_path / "s").exists()


def test_parameter_efficient_training_freezes_the_backbone_but_its_last_stage(
    tiny_model_path, new_structure_data, tmp_path
):
    from voila.training.finetune import FinetuneTrainer, finetune_config

    config = finetune_config(
        tiny_model_path, dict(FAST, data=[str(new_structure_data)], out=str(tmp_path / "r")), {}
    )
    config.trainable = "neck"
    trainer = FinetuneTrainer(config)
    trainer.model_config = trainer.build_model_config()
    model = trainer.base.model
    groups = trainer.parameter_groups(model)
    learning = {id(p) for group in groups for p in group["params"]}
    backbone = model.voxel_encoder.backbone
    assert not any(id(p) in learning for p in backbone.stem.parameters())
    assert all(id(p) in learning for p in backbone.stages[-1].parameters())
    assert all(id(p) in learning for p in model.voxel_encoder.neck.parameters())
    assert groups[0]["lr"] == pytest.approx(config.lr * 0.1)  # the fine-tuning default encoder_lr


# -- partial labels at voxel level ------------------------------------------------------------------
def test_voxels_outside_the_annotated_region_carry_no_label_and_no_loss(tmp_path):
    data = write_phantom_dataset(tmp_path / "data", 1, shape=(24, 24, 24), spacing=(6, 6, 6), val_fraction=0)
    case = next(p for p in data.iterdir() if p.is_dir())
    ct = nib.load(str(case / "ct.nii.gz"))
    region = np.zeros(ct.shape, np.uint8)
    region[:, :, 12:] = 1  # the upper half was contoured; the lower half was never looked at
    write_volume(case / "annotated.nii.gz", region, ct.affine)
    from voila.data.preprocess import PreprocessingConfig

    prepared = TrainingData.prepare([data], PreprocessingConfig(spacing=(6, 6, 6)), Vocabulary.load())
    label = prepared.cases[0].label.as_tensor()[0]
    ignore = prepared.ignore_index
    assert (label == ignore).any() and ((label > 0) & (label < ignore)).any()
    lower = label[:, :, : label.shape[2] // 3]
    assert bool((lower == ignore).all()), "the never-annotated half is unknown, not background"

    from voila.model.config import load_preset
    from voila.model.losses import marginal_cross_entropy
    from voila.model.voila import VoilaModel

    config = load_preset("tiny")
    config.sampling.mode = "none"  # every voxel: the loss is comparable voxel for voxel
    torch.manual_seed(0)
    model = VoilaModel(config, text_dim=8, num_classes=3)
    ct_patch = torch.randn(1, 1, 16, 16, 16)
    labels = torch.randint(0, 3, (1, 16, 16, 16))
    labels[..., :8] = 3  # the ignore value (number of classes): outside the annotated region
    features, annotated = torch.randn(2, 8), torch.ones(1, 3, dtype=torch.bool)
    losses = model.losses(ct_patch, labels, features, annotated)
    with torch.no_grad():
        tokens = model.voxel_tokens(ct_patch).flatten(2)[0].t()
        logits = model.logits(tokens, model.class_embeddings(features))
    known = labels.flatten() < 3
    expected = marginal_cross_entropy(
        logits[known], labels.flatten()[known], annotated.expand(int(known.sum()), -1)
    )
    assert float(losses.cross_entropy) == pytest.approx(float(expected), rel=1e-5)


def test_labelled_slices_only_mark_the_other_slices_unknown(tmp_path):
    data = write_phantom_dataset(tmp_path / "data", 1, shape=(24, 24, 24), spacing=(6, 6, 6), val_fraction=0)
    case = next(p for p in data.iterdir() if p.is_dir())
    for mask_path in (case / "segmentations").iterdir():
        mask = nib.load(str(mask_path))
        values = np.asarray(mask.dataobj).copy()
        values[:, :, 1::2] = 0  # contoured on every other axial slice
        nib.save(nib.Nifti1Image(values, mask.affine), str(mask_path))
    from voila.data.preprocess import PreprocessingConfig

    prepared = TrainingData.prepare(
        [data], PreprocessingConfig(spacing=(6, 6, 6)), Vocabulary.load(), annotated_region="slices"
    )
    label = prepared.cases[0].label.as_tensor()[0]
    ignore = prepared.ignore_index
    per_slice = [(label[:, :, k] == ignore).all() for k in range(label.shape[2])]
    assert any(per_slice) and not all(per_slice)
    for k in range(label.shape[2]):  # a slice is either unknown or fully known
        assert bool((label[:, :, k] == ignore).all()) or not bool((label[:, :, k] == ignore).any())
