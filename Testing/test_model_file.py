"""The model file: a bit-exact round trip, a self-describing card, and the real text tower offline."""

from __future__ import annotations

import hashlib
import os
import sys

import torch
from voila.cli import main
from voila.model.model_file import FORMAT_VERSION, load_model, read_model_card, save_model
from voila.model.text_encoder import TextEncoder


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_file_round_trip_is_bit_exact(tiny_model_path, tmp_path):
    loaded = load_model(tiny_model_path)
    again = tmp_path / "again.safetensors"
    save_model(again, loaded.model, loaded.card, loaded.text_cache)
    assert digest(again) == digest(tiny_model_path)
    reloaded = load_model(again)
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), reloaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.text_cache.as_tensor(), reloaded.text_cache.as_tensor())
    assert reloaded.card == loaded.card


def test_the_card_says_everything_needed_to_use_the_model(tiny_model_path):
    card = read_model_card(tiny_model_path)
    assert card["format_version"] == FORMAT_VERSION
    assert card["classes"] == ["background", "liver", "spleen", "kidney_left", "kidney_right", "aorta"]
    assert card["preprocessing"]["spacing"] == [6.0, 6.0, 6.0]
    assert card["text_encoder"]["model_name"] == "ViT-B-32" and card["text_encoder"]["feature_dim"] == 512
    assert len(card["vocabulary"]["structures"]) == 117
    assert len(card["text_cache"]["texts"]) == 5
    assert card["license"] and card["intended_use"]


def test_known_structures_need_no_text_encoder_at_run_time(tiny_model_path):
    loaded = load_model(tiny_model_path)
    features = loaded.text_cache.features(loaded.text_cache.texts)  # no encoder factory configured
    assert features.shape == (5, 512)


def test_open_clip_text_tower_runs_offline_with_random_weights():
    encoder = TextEncoder("ViT-B-32", pretrained=None)
    features = encoder.encode(["This region represents the liver.", "This region represents the spleen."])
    assert features.shape == (2, 512)
    assert torch.allclose(features.norm(dim=1), torch.ones(2), atol=1e-5)
    assert all(not p.requires_grad for p in encoder.model.parameters())
    # deterministic: the same random tower every time, so cached and fresh embeddings agree
    assert torch.allclose(
        TextEncoder("ViT-B-32", pretrained=None).encode(["liver"]), encoder.encode(["liver"])
    )


def test_voila_info_prints_the_card_and_the_parameter_count(tiny_model_path, capsys):
    assert main(["info", str(tiny_model_path)]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 0.43 M" in out and "kidney_left" in out


def test_voila_info_piped_into_a_reader_that_has_gone_is_quiet(tiny_model_path, monkeypatch, capsys):
    """``voila info MODEL | head -1``: once the reader has left, writing fails with a broken pipe;
    no "internal error", the exit status of SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone
    with os.fdopen(write_end, "w", buffering=1) as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert main(["info", str(tiny_model_path)]) == 141
    assert capsys.readouterr().err == ""


def test_a_saved_model_file_is_readable_as_the_users_umask_allows(tiny_model_path, tmp_path):
    loaded = load_model(tiny_model_path)
    previous = os.umask(0o022)
    try:
        path = save_model(tmp_path / "shared.safetensors", loaded.model, loaded.card, loaded.text_cache)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644  # a colleague on the same server can load it
    assert read_model_card(path)["classes"] == loaded.card["classes"]


def test_voila_info_on_the_paper_preset_reports_6_4_million(capsys):
    assert main(["info", "--preset", "paper"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("trainable parameters"))
    millions = float(line.split(":")[1].split("M")[0])
    assert 6.1 <= millions <= 6.8


def test_a_model_built_from_a_model_file_starts_from_its_weights_and_keeps_its_classes(tiny_model_path):
    from voila.data.preprocess import PreprocessingConfig
    from voila.model.config import ModelConfig
    from voila.model.factory import create_model
    from voila.vocabulary import Vocabulary

    base = load_model(tiny_model_path)
    vocabulary = Vocabulary.from_dict(base.card["vocabulary"])
    built = create_model(
        ModelConfig.from_dict(base.card["model"]),
        [*base.card["classes"][1:], "pancreas"],
        vocabulary,
        PreprocessingConfig.from_dict(base.card["preprocessing"]),
        text_pretrained=None,
        base=base,
    )
    assert built.classes == [*base.card["classes"], "pancreas"]
    for name, value in base.model.state_dict().items():
        assert torch.equal(built.model.state_dict()[name], value), name
    # the base's class sentences come from its cache; only the new one was encoded
    assert torch.equal(built.class_features()[:5], base.text_cache.as_tensor())


def test_a_base_without_the_fusion_gains_it_closed_and_answers_as_before(tiny_model_path):
    from voila.data.preprocess import PreprocessingConfig
    from voila.model.config import ModelConfig
    from voila.model.factory import create_model
    from voila.vocabulary import Vocabulary

    base = load_model(tiny_model_path)
    config = ModelConfig.from_dict(dict(base.card["model"], fusion=True))
    built = create_model(
        config,
        base.card["classes"][1:],
        Vocabulary.from_dict(base.card["vocabulary"]),
        PreprocessingConfig.from_dict(base.card["preprocessing"]),
        text_pretrained=None,
        base=base,
    )
    assert built.model.fusion is not None and float(built.model.fusion.gate) == 0.0
    ct = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        tokens = built.model.voxel_tokens(ct)
        features = built.class_features()
        fused = built.model.fuse(built.model.class_embeddings(features), tokens)[0]
        before = base.model.logits(
            base.model.voxel_tokens(ct).flatten(2)[0].t(), base.model.class_embeddings(features)
        )
    after = built.model.logits(tokens.flatten(2)[0].t(), fused)
    assert torch.allclose(after, before, atol=1e-4)
