"""VOILA: text-prompted, complexity-aware universal CT segmentation.

Heavy submodules (torch, MONAI, open_clip) are imported on first use, so ``import voila`` is cheap.

>>> import voila
>>> segmenter = voila.Segmenter.load()                      # the shipped demo model
>>> result = segmenter.segment(ct, affine, ["liver", "left kidney"])
"""

from __future__ import annotations

from voila.errors import (
    Cancelled,
    ConfigError,
    DatasetError,
    InputImageError,
    InsufficientMemoryError,
    ModelFileError,
    OutputError,
    PromptError,
    TextEncoderUnavailableError,
    TrainingError,
    VoilaError,
)

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "ConfigError",
    "DatasetError",
    "InputImageError",
    "InsufficientMemoryError",
    "ModelFileError",
    "OutputError",
    "PromptError",
    "Segmenter",
    "TextEncoderUnavailableError",
    "TrainingError",
    "VoilaError",
    "__version__",
    "finetune",
    "train",
]


def train(config, progress=None, stop=None, progress_bar: bool = False, **overrides):
    """Train a VOILA model; returns the exported model file. See :func:`voila.training.api.train`."""
    from voila.training.api import train as run_training

    return run_training(config, progress=progress, stop=stop, progress_bar=progress_bar, **overrides)


def finetune(base, config, progress=None, stop=None, progress_bar: bool = False, **overrides):
    """Fine-tune the model file ``base``; returns the new model file. See :mod:`voila.training.finetune`."""
    from voila.training.finetune import finetune as run_finetuning

    return run_finetuning(base, config, progress=progress, stop=stop, progress_bar=progress_bar, **overrides)


def __getattr__(name: str):
    if name == "Segmenter":
        from voila.infer.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'voila' has no attribute {name!r}")
