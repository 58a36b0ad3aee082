"""``voila train [CONFIG.yaml] --data PATH ... [--preset NAME] [--out DIR] ...``: train and export a model.

Flags override the YAML file's settings; the run folder receives checkpoints, metrics, pictures
and the exported ``.safetensors`` model. Ctrl-C (or SIGTERM) stops cleanly: the checkpoint is
written and the best model so far exported; ``--resume`` continues the run.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a VOILA model on CT datasets (TotalSegmentator, MONAI datalist, nnU-Net raw)",
        description=(
            "Train a VOILA model and export it as one .safetensors file. Settings come from an "
            "optional YAML file; flags override it. Runs on CPU, one GPU, or several under torchrun."
        ),
    )
    parser.add_argument("config", nargs="?", help="a training configuration YAML file (optional)")
    parser.add_argument(
        "--data",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="dataset folders or datalist .json files (layout detected)",
    )
    parser.add_argument("--preset", help="model preset: paper, small, tiny, or a preset YAML file")
    parser.add_argument("--out", help="run folder (checkpoints, metrics, pictures, model)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        dest="steps_per_epoch",
        help="optimiser steps per epoch (default: one pass over the training cases)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        dest="max_minutes",
        help="stop cleanly (checkpoint, validation, export) after this many minutes",
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--sampling", choices=("cas", "random", "none"), help="voxel sampling for the loss")
    parser.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    parser.add_argument(
        "--patch-size",
        type=int,
        nargs="+",
        dest="patch_size",
        metavar="N",
        help="training/inference patch (1 or 3 sizes, voxels)",
    )
    parser.add_argument("--batch-size", type=int, dest="batch_size")
    parser.add_argument("--accumulate", type=int, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--schedule", choices=("constant", "cosine"))
    parser.add_argument("--warmup-epochs", type=float, dest="warmup_epochs")
    parser.add_argument("--val-every", type=int, dest="val_every", help="validate every N epochs")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--text-pretrained",
        dest="text_pretrained",
        help="open_clip weights tag for the text encoder ('none': random weights, offline)",
    )
    parser.add_argument("--spacing", type=float, nargs="+", help="model grid spacing in mm (default 1.5)")
    parser.add_argument("--num-workers", type=int, dest="num_workers", help="data-loading worker processes")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), help="mixed precision on CUDA")
    parser.add_argument("--cache", choices=("memory", "disk"), help="where preprocessed cases are kept")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        dest="checkpoint_every",
        help="also checkpoint every N optimiser steps inside an epoch",
    )
    parser.add_argument("--export", help="model file to write (default: OUT/model.safetensors)")
    parser.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        default=None,
        help="random patches only: no rotations, zoom or intensity changes",
    )
    parser.add_argument(
        "--mirror",
        action="store_true",
        default=None,
        help="also flip patches head-feet and front-back (off by default: after RAS reorientation a "
        "mirrored patch shows anatomy no scan has; left-right is never flipped)",
    )
    return parser


OVERRIDES = (
    "data",
    "preset",
    "out",
    "epochs",
    "steps_per_epoch",
    "max_minutes",
    "device",
    "sampling",
    "resume",
    "patch_size",
    "batch_size",
    "accumulate",
    "lr",
    "schedule",
    "warmup_epochs",
    "val_every",
    "seed",
    "text_pretrained",
    "spacing",
    "num_workers",
    "amp",
    "cache",
    "checkpoint_every",
    "export",
    "augment",
    "mirror",
)


def run(args: argparse.Namespace) -> int:
    from voila.train.config import load_train_config
    from voila.train.trainer import Trainer

    overrides = {key: getattr(args, key, None) for key in OVERRIDES}
    overrides["command"] = "voila " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    config = load_train_config(args.config, overrides)

    logger = logging.getLogger("voila.train")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # open_clip's root-logger warnings must not print every line twice

    stop = threading.Event()

    def request_stop(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print(
            "\nstopping after this step (checkpoint + export); press Ctrl-C again to abort", file=sys.stderr
        )
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        path = Trainer(config, stop=stop).run()
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
        logger.removeHandler(handler)
    print(f"model: {path}")
    return 0
