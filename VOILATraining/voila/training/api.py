"""``voila.train(config, progress=..., stop=...)``: training from Python (e.g. Slicer's console).

Example::

    import threading, voila
    stop = threading.Event()                  # stop.set() from another thread ends the run cleanly
    path = voila.train({"data": ["/data/TotalSegmentator"], "preset": "small", "out": "runs/a"},
                       progress=lambda p: print(p.epoch, p.step, p.total, p.loss, p.eta), stop=stop)
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Union

from voila.training.config import load_train_config
from voila.training.loop import Trainer, TrainingProgress

PathLike = Union[str, "os.PathLike[str]"]


def train(
    config: dict[str, Any] | PathLike,
    progress: Callable[[TrainingProgress], None] | None = None,
    stop: threading.Event | None = None,
    progress_bar: bool = False,
    **overrides: Any,
) -> Path:
    """Train a VOILA model and return the path of the exported ``.safetensors`` model file.

    ``config`` is a dict of training settings (flat or by section) or the path of a YAML file with
    them (see :data:`voila.training.config.SETTINGS`); ``overrides`` replace single settings.
    ``progress`` is called with a :class:`TrainingProgress` (``epoch``, ``step``, ``total``,
    ``loss``, ``eta`` in seconds, ``phase``) after every optimiser step; when ``stop`` is set the
    run writes its checkpoint, exports the best model so far and returns. Raises
    :class:`voila.VoilaError` subclasses for problems the user can fix.
    """
    settings = load_train_config(config, overrides)
    if not settings.command:
        settings.command = (
            f"voila.train({config!r})" if not isinstance(config, dict) else "voila.train(<dict>)"
        )
    return Trainer(settings, progress=progress, stop=stop, progress_bar=progress_bar).run()
