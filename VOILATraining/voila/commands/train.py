"""``voila train [CONFIG.yaml] --data PATH ... [--preset NAME] [--out DIR] ...``: train and export a model.

Flags override the YAML file's settings; both come from one declaration
(:data:`voila.training.config.SETTINGS`). The run folder receives checkpoints, metrics, pictures
and the exported ``.safetensors`` model. Ctrl-C (or SIGTERM) stops cleanly: the checkpoint is
written and the best model so far exported; ``--resume`` continues the run.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

SUMMARY = "train a VOILA model on CT datasets (TotalSegmentator, MONAI datalist, nnU-Net raw)"
DESCRIPTION = (
    "Train a VOILA model and export it as one .safetensors file. Settings come from an "
    "optional YAML file (flat, or in sections model/data/optim/run); flags override it. "
    "Runs on CPU, one GPU, or several under torchrun."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_configuration_arguments(parser, "config")


def add_configuration_arguments(parser: argparse.ArgumentParser, config: str, exclude=()) -> None:
    """The optional training configuration YAML file (a positional ``config``, or a ``--config``
    flag stored as ``config_file``) and a flag for every training setting but ``exclude``."""
    from voila.training.config import add_arguments as add_setting_flags

    what = "a training configuration YAML file (optional)"
    if config.startswith("--"):
        parser.add_argument(config, dest="config_file", help=what)
    else:
        parser.add_argument(config, nargs="?", help=what)
    add_setting_flags(parser, exclude=exclude)


def run(args: argparse.Namespace) -> int:
    from voila.training.config import load_train_config, overrides_from_arguments
    from voila.training.loop import Trainer

    overrides = overrides_from_arguments(args)
    config = load_train_config(args.config, overrides)
    return run_trainer(Trainer, config)


def run_trainer(trainer_class, config) -> int:
    """Run a trainer with its log on stderr; Ctrl-C / SIGTERM stop it cleanly (twice: abort): the
    checkpoint is written and the model exported, and the exit code says it was stopped (130 / 143)."""
    logger = logging.getLogger("voila.train")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # open_clip's root-logger warnings must not print every line twice

    stop = threading.Event()
    signalled: list[int] = []

    def request_stop(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print(
            "\nstopping after this step (checkpoint + export); press Ctrl-C again to abort", file=sys.stderr
        )
        signalled.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        path = trainer_class(config, stop=stop).run()
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
        logger.removeHandler(handler)
    print(f"model: {path}")
    if signalled:  # a run cut short by the user is not a success: scripts must be able to tell
        print(
            f"training was stopped before its end; continue it with: voila train --out {config.out} --resume",
            file=sys.stderr,
        )
        return 128 + signalled[0]
    return 0
