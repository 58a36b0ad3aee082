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
    "train",
]


def __getattr__(name: str):
    if name == "Segmenter":
        from voila.infer.segmenter import Segmenter

        return Segmenter
    if name == "train":
        from voila.train.api import train

        return train
    raise AttributeError(f"module 'voila' has no attribute {name!r}")
