"""Training: configuration, data, the trainer, checkpoints, and ``voila.train(...)`` (:mod:`voila.train.api`).

``voila.train`` is both this package and the training function: once any ``voila.train.*``
module is imported, Python binds the package to the attribute ``voila.train``, hiding the lazy
function export of ``voila/__init__.py``. Calling the package therefore calls
:func:`voila.train.api.train`, so ``voila.train(config, progress=..., stop=...)`` works either way.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from voila.train.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
