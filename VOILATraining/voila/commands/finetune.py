"""``voila finetune BASE.safetensors --data PATH ... --out DIR``: teach an existing model new
structures or the user's own scans (:mod:`voila.training.finetune`)."""

from __future__ import annotations

import argparse

SUMMARY = "fine-tune a model file on a few (partly) labelled cases: new structures, your own scans"
DESCRIPTION = (
    "Start from BASE (its weights, text encoder, vocabulary and preprocessing, read from its card), keep "
    "every structure it knows and add the datasets' new ones. BASE is never modified. Settings come from an "
    "optional YAML file; flags override it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from voila.commands.train import add_configuration_arguments
    from voila.training.finetune import FIXED_BY_BASE

    parser.add_argument("base", metavar="BASE", help="the VOILA .safetensors model to start from")
    add_configuration_arguments(parser, "--config", exclude=FIXED_BY_BASE)


def run(args: argparse.Namespace) -> int:
    from voila.commands.train import run_trainer
    from voila.training.config import overrides_from_arguments
    from voila.training.finetune import FinetuneTrainer, finetune_config

    overrides = overrides_from_arguments(args)
    config = finetune_config(args.base, args.config_file, overrides)
    return run_trainer(FinetuneTrainer, config)
