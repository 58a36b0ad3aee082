"""Errors a user can cause and fix.

Every error raised for bad input, a bad file or a bad configuration is a :class:`VoilaError`
subclass whose message is one line that says what is wrong *and what to do*. The command line
prints that line and exits non-zero; the Slicer module shows it in a message box.
"""

from __future__ import annotations


class VoilaError(Exception):
    """Base class: a problem the user can fix. ``str(error)`` is the one-line message."""

    exit_code = 2


class InputImageError(VoilaError):
    """The image cannot be segmented as given (missing, unreadable, wrong dimensionality, NaN...)."""


class PromptError(VoilaError):
    """The prompts cannot be used (none given, too long, ...)."""


class ModelFileError(VoilaError):
    """The model file is not a valid VOILA model (not safetensors, truncated, wrong version...)."""


class TextEncoderUnavailableError(VoilaError):
    """Free text needs the CLIP text encoder, which cannot be loaded (offline, not installed)."""


class ConfigError(VoilaError):
    """A training configuration is invalid (unknown key, missing path, no overlapping labels...)."""


class DatasetError(VoilaError):
    """A dataset folder or datalist cannot be used (unknown layout, empty, no readable case)."""


class TrainingError(VoilaError):
    """Training had to stop (NaN loss, output folder in use, ...); the last good checkpoint is kept."""


class OutputError(VoilaError):
    """An output cannot be written (folder missing or read-only, disk full); nothing was left behind."""


class InsufficientMemoryError(VoilaError):
    """The estimated memory for the run exceeds what this machine has."""


class Cancelled(VoilaError):
    """The user cancelled the run; nothing was written."""

    exit_code = 130
