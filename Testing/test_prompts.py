"""Prompts and class names have one home: split, deduplicated and matched the same way everywhere."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import voila
from voila.data.phantoms import write_phantom_dataset
from voila.infer.segmenter import Segmenter
from voila.prompts import resolve_prompts, split_prompts
from voila.vocabulary import Vocabulary, class_key, class_name


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return Vocabulary.load()


def test_prompts_split_at_commas_semicolons_and_line_breaks_whatever_the_caller():
    assert split_prompts("liver,  spleen;left kidney\naorta\r\n") == [
        "liver",
        "spleen",
        "left kidney",
        "aorta",
    ]
    assert split_prompts(["liver, spleen", "  inferior   vena cava "]) == [
        "liver",
        "spleen",
        "inferior vena cava",
    ]
    assert split_prompts(" , ;\n") == []


def test_dataset_labels_become_vocabulary_names_or_words(vocabulary):
    assert class_name("Kidney (left)", vocabulary) == "kidney_left"
    assert class_name("SpinalCord", vocabulary) == "spinal_cord"
    assert class_name("Esophagus", vocabulary) == "esophagus"
    assert class_name("Tumor_Core", vocabulary) == "Tumor Core"
    assert class_name("LeftParotid", vocabulary) == "Left Parotid"


def test_a_prompt_means_a_class_whatever_its_spelling(vocabulary):
    assert class_key("tumor core", vocabulary) == class_key("Tumor_Core", vocabulary) == "tumor core"
    assert class_key("left parotid", vocabulary) == class_key("LeftParotid", vocabulary)
    assert class_key("L kidney", vocabulary) == class_key("kidney_left", vocabulary) == "kidney_left"
    assert class_key("parotid", vocabulary) != class_key("left parotid", vocabulary)


def test_duplicates_are_dropped_with_one_note_however_often_they_repeat(vocabulary):
    prompts = ["liver", "Liver", "spleen", *["liver"] * 999, "L kidney", "kidney_left"]
    resolved, notes = resolve_prompts(prompts, vocabulary, ["background", "liver"])
    assert [p.prompt for p in resolved] == ["liver", "spleen", "L kidney"]
    assert [p.trained for p in resolved] == [True, False, False]
    assert notes == [
        "duplicate prompt 'Liver' (same as 'liver') was ignored",
        "duplicate prompt 'liver' (same as 'liver') was ignored 999 times",
        "duplicate prompt 'kidney_left' (same as 'L kidney') was ignored",
    ]


def test_prompts_resolve_to_trained_free_text_classes_by_their_key(vocabulary):
    classes = ["background", "liver", "Tumor Core", "Left Parotid"]
    resolved, _ = resolve_prompts(
        ["tumor core", "LEFT PAROTID", "right parotid", "pancreas"], vocabulary, classes
    )
    assert [(p.class_name, p.trained) for p in resolved] == [
        ("Tumor Core", True),
        ("Left Parotid", True),
        (None, False),
        (None, False),
    ]
    assert resolved[3].structure.name == "pancreas" and resolved[3].text_class == "pancreas"


@pytest.fixture(scope="module")
def tumor_core_model(tmp_path_factory) -> Path:
    """A tiny model trained a few steps on phantoms whose liver mask is called ``Tumor_Core``."""
    root = tmp_path_factory.mktemp("tumor")
    data = write_phantom_dataset(root / "data", 3, shape=(24, 24, 24), spacing=(6, 6, 6), val_fraction=0.34)
    for case in sorted(p for p in data.iterdir() if p.is_dir()):
        masks = case / "segmentations"
        shutil.move(masks / "liver.nii.gz", masks / "Tumor_Core.nii.gz")
        for mask in masks.iterdir():
            if mask.name not in ("Tumor_Core.nii.gz", "spleen.nii.gz"):
                mask.unlink()
    torch.manual_seed(0)
    return voila.train(
        {
            "data": [str(data)],
            "out": str(root / "run"),
            "preset": "tiny",
            "spacing": 6,
            "patch_size": 16,
            "text_pretrained": "none",
            "device": "cpu",
            "batch_size": 1,
            "epochs": 1,
            "steps_per_epoch": 3,
            "augment": False,
        }
    )


def test_a_free_text_dataset_label_is_segmented_as_a_trained_class_by_its_spoken_name(tumor_core_model):
    segmenter = Segmenter.load(tumor_core_model, device="cpu")
    assert segmenter.classes == ["background", "spleen", "Tumor Core"]
    resolved, _ = segmenter.resolve_prompts(["tumor core"])
    assert resolved[0].trained and resolved[0].class_name == "Tumor Core"
    # the trained class's own row of the embedding matrix, not an appended open-vocabulary row
    assert segmenter.prompt_rows(resolved) == [segmenter.classes.index("Tumor Core")]

    ct = np.full((20, 20, 20), -1000, dtype=np.int16)
    ct[4:16, 4:16, 4:16] = 60
    result = segmenter.segment(ct, np.diag([6.0, 6.0, 6.0, 1.0]), ["tumor core"], heatmap=False)
    assert result.prompts[0].trained
    assert "open vocabulary" not in result.prompts[0].note
