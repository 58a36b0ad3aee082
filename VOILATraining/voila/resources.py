"""Locate the project's shared data: vocabulary, terminology, sample CT, demo model.

The repository's top-level ``Resources/`` folder is the one home of these files. It is found, in
this order: ``$VOILA_RESOURCES``; a ``Resources/`` folder beside the ``voila`` package (the
installed Slicer extension, where ``voila/`` and ``Resources/`` sit side by side in the module
folder); the repository's own ``Resources/`` (a checkout or an editable install). This is the only
place that knows these locations.
"""

from __future__ import annotations

import os
from pathlib import Path

from voila.errors import VoilaError

DEMO_MODEL = "Models/voila_demo.safetensors"
VOCABULARY = "Vocabulary/voila_vocabulary.json"
SAMPLE_CT = "SampleData/totalseg-example/example_ct.nii.gz"


def resources_dir() -> Path:
    """The ``Resources/`` folder (see the module docstring for where it is looked for)."""
    env = os.environ.get("VOILA_RESOURCES")
    if env:
        if not (Path(env) / VOCABULARY).is_file():
            raise VoilaError(
                f"VOILA_RESOURCES is {env}, which holds no {VOCABULARY}; point it at the 'Resources' "
                "folder of a VOILA checkout or installed extension, or unset it"
            )
        return Path(env)
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "Resources", package.parents[1] / "Resources"):
        if (candidate / VOCABULARY).is_file():
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
