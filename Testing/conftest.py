"""Shared fixtures: the repository's paths and the bundled real CT."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Tests never read or fill the user's own cache folder (text embeddings): one of their own, per run.
os.environ["VOILA_CACHE"] = tempfile.mkdtemp(prefix="voila-test-cache-")

REPO = Path(__file__).resolve().parents[1]
RESOURCES = REPO / "Resources"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def resources() -> Path:
    return RESOURCES


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A real (untrained) ``tiny`` VOILA model file: open_clip ViT-B-32 with random weights."""
    import torch
    from voila.data.preprocess import PreprocessingConfig
    from voila.model.config import load_preset
    from voila.model.factory import create_model
    from voila.model.model_file import save_model
    from voila.vocabulary import Vocabulary

    torch.manual_seed(0)
    built = create_model(
        load_preset("tiny"),
        ["liver", "spleen", "kidney_left", "kidney_right", "aorta"],
        Vocabulary.load(RESOURCES / "Vocabulary" / "voila_vocabulary.json"),
        PreprocessingConfig(spacing=(6.0, 6.0, 6.0)),
        text_pretrained=None,
        description="untrained tiny model for tests",
    )
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_model(path, built.model, built.card, built.text_cache)
    return path


@pytest.fixture(scope="session")
def sample_ct():
    """The bundled real CT: (array [i, j, k], affine voxel -> RAS)."""
    from voila.data.io import read_image

    return read_image(RESOURCES / "SampleData" / "totalseg-example" / "example_ct.nii.gz")
