"""Training state on disk: atomic checkpoints and RNG capture/restore.

A checkpoint holds only tensors and plain containers, so it loads with
``torch.load(..., weights_only=True)``: nothing in it can run code. It is serialised in memory
and written through :func:`voila.data.io.atomic_path`, so a crash or a full disk leaves the
previous checkpoint intact.

Example::

    save_checkpoint(run / "checkpoints" / "last.pt", state)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    restore_rng(state["rng"][rank])
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voila.data.io import atomic_path
from voila.errors import TrainingError

CHECKPOINT_FORMAT = 1


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (CPU and CUDA) generator states as tensors and plain containers."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically; a failure raises :class:`OutputError` and keeps the old file."""
    buffer = io.BytesIO()
    torch.save(dict(state, format=CHECKPOINT_FORMAT), buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial, open(partial, "wb") as handle:
        handle.write(buffer.getbuffer())
        handle.flush()
        os.fsync(handle.fileno())
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint (tensors and plain containers only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"no checkpoint at {path}; start without --resume") from None
    except Exception as error:
        raise TrainingError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {str(error).splitlines()[0][:160]}); "
            "it is damaged: delete it to restart from best.pt, or start a new run with another --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a voila training checkpoint of format {CHECKPOINT_FORMAT}")
    return state
