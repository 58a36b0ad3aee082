"""Training: the settings (:mod:`~voila.training.config`), the data (:mod:`~voila.training.data`),
the trainer and its hooks (:mod:`~voila.training.loop`), the run folder, validation, export, and
``voila.train(...)`` (:mod:`~voila.training.api`).

``voila.train`` is a plain function exported by the ``voila`` package; this package is
``voila.training``, so the two never shadow each other.
"""
