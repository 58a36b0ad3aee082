"""Locate the project's shared data: vocabulary, terminology, sample CT, demo model.

The repository's top-level ``Resources/`` folder is the one home of these files. A checkout or
editable install finds it next to the package; elsewhere set ``VOILA_RESOURCES`` to its path.
"""

from __future__ import annotations

import os
from pathlib import Path

from voila.errors import VoilaError

DEMO_MODEL = "Models/voila_demo.safetensors"
VOCABULARY = "Vocabulary/voila_vocabulary.json"
SAMPLE_CT = "SampleData/totalseg-example/example_ct.nii.gz"


def resources_dir() -> Path:
    """The ``Resources/`` folder: ``$VOILA_RESOURCES`` or the repository's own."""
    env = os.environ.get("VOILA_RESOURCES")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "Resources")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise VoilaError(
        "cannot find the VOILA Resources folder; set VOILA_RESOURCES to the 'Resources' folder "
        "of a VOILA checkout"
    )


def resource_path(relative: str) -> Path:
    """Path of a file inside ``Resources/``; a clear error if it is missing."""
    path = resources_dir() / relative
    if not path.exists():
        raise VoilaError(f"missing resource {path}; is the VOILA checkout complete?")
    return path
