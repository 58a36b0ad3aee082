"""Where the model runs and in which precision: the one home of device and mixed-precision choices.

Devices are named as PyTorch names them: ``auto`` (the first CUDA GPU, else the CPU), ``cpu``,
``cuda``, ``cuda:N`` and ``mps`` (Apple GPUs). Mixed precision (``amp``) is ``auto`` (bf16 where
the GPU supports it, else fp16; none on the CPU and on Apple GPUs, whose autocast is unreliable for
3-D convolutions), ``bf16``, ``fp16`` or ``none``.

>>> device = resolve_device("auto")
>>> autocast_dtype(device, "auto")          # None on the CPU
"""

from __future__ import annotations

import re
from typing import Optional

from voila.errors import ConfigError

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
DEVICE_HELP = "auto (GPU if available), cpu, cuda, cuda:N or mps"
_DEVICE_NAME = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def check_device_name(name: str) -> str:
    """``name`` (lower case) if it is a device name VOILA understands, else :class:`ConfigError`."""
    text = str(name).strip().lower()
    if not _DEVICE_NAME.match(text):
        raise ConfigError(f"device must be {DEVICE_HELP}, not {name!r}")
    return text


def device_argument(name: str) -> str:
    """:func:`check_device_name` as an argparse ``type`` (argparse reports the message)."""
    import argparse

    try:
        return check_device_name(name)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def resolve_device(name: str = "auto", local_rank: Optional[int] = None):
    """The ``torch.device`` for a device name; ``local_rank`` picks the GPU of a ``torchrun``
    process when the name is ``auto`` or ``cuda``. Asking for a GPU that is not there is a
    :class:`ConfigError` that says what to use instead."""
    import torch

    text = check_device_name(str(name))
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} was asked for but no CUDA GPU is available; use --device cpu or auto"
            )
        if text == "cuda" and local_rank is not None:
            text = f"cuda:{local_rank}"
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                f"numbered 0..{torch.cuda.device_count() - 1}"
            )
        return device
    if text == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("device 'mps' was asked for but no Apple GPU is available; use cpu or auto")
    return torch.device(text)


def autocast_dtype(device, amp: str = "auto"):
    """The autocast dtype for ``device`` under the ``amp`` choice, or ``None`` for float32."""
    import torch

    if amp not in AMP_CHOICES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_CHOICES)}, not {amp!r}")
    if amp == "none" or torch.device(device).type != "cuda":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def device_choices() -> list[tuple[str, str]]:
    """``(device, label)`` pairs for a device selector, each label with its memory; works without
    PyTorch (then only ``auto`` and ``cpu``)."""
    choices = [("auto", "Automatic (GPU if available)")]
    memory = _system_memory_gb()
    cpu = ("cpu", f"CPU ({memory:.0f} GB RAM)" if memory else "CPU")
    try:
        import torch
    except ImportError:
        return [*choices, cpu]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            choices.append((f"cuda:{index}", f"{properties.name} ({properties.total_memory / 2**30:.0f} GB)"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append(("mps", "Apple GPU (shared memory)"))
    return [*choices, cpu]


def available_memory_bytes() -> Optional[int]:
    """Memory the OS can give this process now (psutil: Linux, Windows, macOS); None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError, RuntimeError):
        return None


def format_bytes(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GB" if n_bytes >= 2**29 else f"{n_bytes / 2**20:.1f} MB"


def _system_memory_gb() -> Optional[float]:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except (ImportError, OSError, RuntimeError):
        return None
