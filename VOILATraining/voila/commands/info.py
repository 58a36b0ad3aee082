"""``voila info MODEL`` / ``voila info --preset NAME``: the model card and the parameter count."""

from __future__ import annotations

import argparse
import json

SUMMARY = "print a model file's card, or a preset's configuration, and the trainable-parameter count"
DESCRIPTION = "Print a VOILA model file's card (classes, spacing, licence, training) or a preset."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("model", nargs="?", help="a VOILA .safetensors model file")
    source.add_argument("--preset", help="a preset name (paper, small, tiny) or a preset YAML file")
    parser.add_argument("--json", action="store_true", help="print the card as JSON")


def format_parameters(count: int) -> str:
    return f"{count / 1e6:.2f} M ({count:,})"


def run(args: argparse.Namespace) -> int:
    from voila.model.config import load_preset
    from voila.model.text_encoder import text_feature_dim
    from voila.model.voila import VoilaModel

    if args.preset:
        config = load_preset(args.preset)
        model = VoilaModel(config, text_feature_dim(config.text_encoder.model_name), num_classes=2)
        if args.json:
            print(
                json.dumps(
                    dict(config.to_dict(), trainable_parameters=model.trainable_parameters()), indent=2
                )
            )
            return 0
        encoder = config.voxel_encoder
        print(f"preset:              {config.name} — {config.description}")
        print(
            f"voxel encoder:       bottleneck ResNet, stages {encoder.stage_blocks}, stem {encoder.stem_width}, "
            f"strides {encoder.stage_strides}, dilations {encoder.stage_dilations}; FPN neck {config.neck_channels}"
        )
        print(f"tokens:              {config.token_dim}-d, {config.head} head")
        print(
            f"text encoder:        {config.text_encoder.model_name} ({config.text_encoder.pretrained}), frozen"
        )
        print(
            f"sampling:            {config.sampling.mode}, ratio {config.sampling.ratio}, "
            f"oversampling n = {config.sampling.oversampling}"
        )
        print(f"patch:               {config.patch_size}")
        print(f"trainable parameters: {format_parameters(model.trainable_parameters())}")
        return 0

    from voila.model.model_file import load_model

    loaded = load_model(args.model)
    card = loaded.card
    if args.json:
        print(json.dumps(dict(card, trainable_parameters=loaded.model.trainable_parameters()), indent=2))
        return 0
    classes = card["classes"][1:]
    prep = card["preprocessing"]
    print(f"model:               {args.model}")
    print(f"description:         {card.get('description', '')}")
    print(f"intended use:        {card.get('intended_use', '')}")
    print(f"licence:             {card.get('license', 'unknown')}")
    print(f"preset:              {card['preset']} (format {card['format_version']})")
    print(f"text encoder:        {card['text_encoder']['model_name']} ({card['text_encoder']['pretrained']})")
    print(
        f"spacing:             {prep.get('spacing')} mm, orientation {prep.get('orientation')}, "
        f"HU window [{prep.get('intensity_min')}, {prep.get('intensity_max')}]"
    )
    print(f"cached prompts:      {len(loaded.text_cache)}")
    training = card.get("training") or {}
    if training:
        print(f"training:            {training.get('summary', '')}")
        if training.get("command"):
            print(f"reproduce with:      {training['command']}")
    review = card.get("review") or {}
    if review:
        table = "calibrated" if review.get("calibration") else "not calibrated"
        if review.get("joint") and review.get("intensity"):
            table = "calibrated on 1 - p and intensity novelty"
        print(f"review map:          {table}; {review.get('fitted_on', '')}")
        print(f"training places:     {len(review.get('places') or {})} structure(s)")
    print(f"trainable parameters: {format_parameters(loaded.model.trainable_parameters())}")
    print(f"classes ({len(classes)}):        {', '.join(classes)}")
    return 0
