"""The review map and per-structure flags: calibration, expected quality, implausible places."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.stats import rankdata
from voila import cli
from voila.data.io import read_image
from voila.data.phantoms import write_phantom_dataset
from voila.data.preprocess import PreprocessingConfig, preprocess_volume, resample_to_grid
from voila.errors import ConfigError, ModelFileError
from voila.infer.results import HEATMAP_KINDS, SegmentationResult
from voila.infer.review import (
    TIE_BREAK,
    CalibrationSample,
    IntensityProfile,
    apply_calibration,
    apply_joint_calibration,
    body_mask,
    body_normalised_centre,
    check_intensity_profile,
    check_joint_table,
    check_table,
    fit_calibration,
    fit_joint_calibration,
    load_calibration,
    review_map,
    structure_quality,
)
from voila.infer.segmenter import Segmenter
from voila.model.model_file import read_model_card
from voila.training.data import TrainingData
from voila.training.export import training_statistics
from voila.vocabulary import Vocabulary


def expected_calibration_error(probability, wrong, bins=10):
    which = np.clip((probability * bins).astype(int), 0, bins - 1)
    return sum(
        (which == b).mean() * abs(probability[which == b].mean() - wrong[which == b].mean())
        for b in range(bins)
        if (which == b).any()
    )


# -- calibration ---------------------------------------------------------------------------------
def test_the_isotonic_table_turns_an_overconfident_score_into_observed_error_rates():
    rng = np.random.default_rng(0)
    score = rng.beta(0.5, 3, 400_000)  # mostly confident voxels, as in a CT
    wrong = rng.random(score.shape) < np.sqrt(score)  # really wrong far more often than 1 - p says
    table = fit_calibration(score[::2], wrong[::2])
    assert len(table["x"]) <= 32 and np.all(np.diff(table["y"]) > 0)  # one knot per pooled block
    held_out = apply_calibration(score[1::2], table)
    raw = expected_calibration_error(score[1::2], wrong[1::2])
    calibrated = expected_calibration_error(held_out, wrong[1::2])
    assert raw > 0.15 and calibrated < 0.02, (raw, calibrated)


def test_the_review_map_orders_voxels_exactly_as_the_models_uncertainty():
    score = np.linspace(0.0, 1.0, 1001)
    staircase = {"x": [0.0, 0.3, 0.31, 1.0], "y": [0.05, 0.05, 0.4, 0.4]}  # flat steps tie voxels
    review = apply_calibration(score, staircase)
    assert np.all(np.diff(review) > 0)  # strictly rising: same ranking, same AUROC as 1 - p
    assert np.abs(review - np.interp(score, staircase["x"], staircase["y"])).max() <= 0.01


def test_a_calibration_sample_stays_bounded_and_keeps_its_error_rate():
    sample = CalibrationSample(limit=1000, seed=0)
    probability = np.full(50_000, 0.9, np.float32)
    wrong = np.arange(50_000) % 4 == 0
    sample.add(probability, wrong)
    sample.add(probability[:10], wrong[:10])
    assert sample.voxels == 1010 and sample.cases == 2
    assert np.concatenate(sample.wrong)[:1000].mean() == pytest.approx(0.25, abs=0.05)
    assert CalibrationSample().fit() is None


def auroc(score, positive):
    ranks = rankdata(score)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_the_intensity_profile_finds_a_class_at_an_intensity_it_never_had():
    """A "kidney" seen at 30 HU in training, met at 180 HU (contrast) on a new scan, is foreign:
    novelty near 1; at its training intensity near 0; a class without a profile gets 0."""
    preprocessing = PreprocessingConfig()
    profile = IntensityProfile(["background", "kidney", "never labelled"])
    rng = np.random.default_rng(0)
    hu = np.r_[rng.normal(-80, 40, 5000), rng.normal(30, 10, 2000)]
    labels = np.r_[np.zeros(5000, int), np.ones(2000, int)]
    image = (hu - preprocessing.mean) / preprocessing.std  # the model grid's normalised values
    profile.add(profile.bins(image, preprocessing), labels)
    new = (np.array([30.0, 180.0, 30.0]) - preprocessing.mean) / preprocessing.std
    novelty = profile.novelty(profile.bins(new, preprocessing), np.array([1, 1, 2]))
    assert novelty[0] < 0.1 and novelty[1] > 0.95 and novelty[2] == 0.0
    card = json.loads(json.dumps(profile.to_card()))
    assert set(card["density"]) == {"background", "kidney"}  # nothing stored for an unseen class
    check_intensity_profile(card, "card")
    again = IntensityProfile.from_card(card, ["kidney", "background"])  # by name, any order; 2: none
    assert np.allclose(again.novelty(profile.bins(new, preprocessing), np.array([0, 0, 2])), [*novelty[:2], 0.0],
                       atol=1e-4)  # fmt: skip
    annotated_only = IntensityProfile(["background", "kidney"])
    annotated_only.add(profile.bins(image, preprocessing), labels, annotated=[True, False])
    assert annotated_only.to_card()["density"].keys() == {"background"}


def test_the_joint_table_finds_confident_errors_that_1_minus_p_cannot():
    """Voxels wrong either from doubt or (confidently) from a foreign intensity: the joint table
    fitted on one half ranks the other half's errors better than 1 - p, is non-decreasing in both,
    and says how often such voxels were wrong."""
    rng = np.random.default_rng(1)
    n = 60000
    doubt = rng.beta(1, 4, n)
    novelty = rng.uniform(0, 1, n)
    wrong = rng.uniform(0, 1, n) < np.clip(0.6 * doubt + 0.7 * (novelty > 0.85), 0, 0.95)
    table = fit_joint_calibration(doubt[::2], novelty[::2], wrong[::2])
    check_joint_table(json.loads(json.dumps(table)), "table")
    rate = np.asarray(table["wrong"])
    assert (np.diff(rate, axis=0) >= 0).all() and (np.diff(rate, axis=1) >= 0).all()
    joint = apply_joint_calibration(doubt[1::2], novelty[1::2], table)
    assert auroc(joint, wrong[1::2]) > auroc(doubt[1::2], wrong[1::2]) + 0.1
    assert expected_calibration_error(joint, wrong[1::2]) < 0.03
    # the review map takes the joint table only with a novelty; without one, calibrated 1 - p
    review = {"calibration": fit_calibration(doubt, wrong), "joint": table}
    joint_map = review_map(1 - doubt[:50], review, novelty[:50])
    assert np.allclose(joint_map, apply_joint_calibration(doubt[:50], novelty[:50], table), atol=1e-5)
    assert np.allclose(
        review_map(1 - doubt[:50], review), apply_calibration(doubt[:50], review["calibration"])
    )


def test_the_novelty_map_lights_a_foreign_structure_not_a_lone_noisy_voxel():
    """Regional novelty (a 3³ block's mean): an enhanced kidney that the profile knew at 30 HU is
    foreign throughout; one noisy voxel in an otherwise typical kidney is not."""
    preprocessing = PreprocessingConfig()

    def normalised(hu):
        return (np.asarray(hu, dtype=np.float32) - preprocessing.mean) / preprocessing.std

    profile = IntensityProfile(["background", "kidney"])
    profile.add(profile.bins(normalised(np.full(500, 30.0)), preprocessing), np.ones(500, int))
    hu = np.full((12, 12, 12), 30.0)
    hu[1:5, 1:5, 1:5] = 180.0  # an enhanced region
    hu[8, 8, 8] = 180.0  # one noisy voxel
    novelty = profile.novelty_map(profile.bins(normalised(hu), preprocessing), np.ones(hu.shape, int))
    assert novelty.shape == hu.shape and novelty[2:4, 2:4, 2:4].min() > 0.95
    assert novelty[8, 8, 8] < 0.05 and novelty[10:, :, :].max() < 1e-6
    outside = profile.novelty_map(
        profile.bins(normalised(hu), preprocessing), np.ones(hu.shape, int), hu < 100
    )
    assert outside[2:4, 2:4, 2:4].max() == 0  # outside the body nothing is foreign
    sample = CalibrationSample(limit=1000, seed=0, profile=profile, preprocessing=preprocessing)
    assert np.array_equal(sample.novelty_map(normalised(hu), np.ones(hu.shape, int)), novelty)
    assert CalibrationSample().novelty_map(normalised(hu), np.ones(hu.shape, int)) is None


def test_a_calibration_sample_with_novelties_fits_the_joint_table():
    rng = np.random.default_rng(2)
    sample = CalibrationSample(limit=1000, seed=0)
    sample.add(rng.uniform(0.3, 1, 4000), rng.uniform(0, 1, 4000) < 0.2, rng.uniform(0, 1, 4000))
    table = sample.fit_joint()
    assert sample.voxels == 1000 and table is not None and len(table["wrong"]) >= 2
    assert CalibrationSample().fit_joint() is None
    without = CalibrationSample()
    without.add(rng.uniform(0.3, 1, 100), rng.uniform(0, 1, 100) < 0.2)  # a case without novelty
    assert without.fit_joint() is None and without.fit() is not None


@pytest.mark.parametrize(
    "table",
    [
        {"doubt": [0.5], "novelty": [0.5], "wrong": [[0.1, 0.2]]},  # one row for two doubt bins
        {"doubt": [0.5], "novelty": [0.5], "wrong": [[0.1, 0.2], [0.3, 1.4]]},  # not a share
        {"doubt": [0.6, 0.2], "novelty": [], "wrong": [[0.1], [0.2], [0.3]]},  # edges not increasing
        {"doubt": list(np.linspace(0, 1, 80)), "novelty": [], "wrong": [[0.1]] * 81},  # too many bins
        {"doubt": "0.5"},
    ],
)
def test_a_broken_joint_table_is_refused(table):
    with pytest.raises(ConfigError, match="joint table"):
        check_joint_table(table, "card")


@pytest.mark.parametrize(
    "entry",
    [
        {"hu": [-500, 1500, 25], "density": {"liver": [0.5] * 3}},  # wrong number of bins
        {"hu": [-500, 1500, 0.001], "density": {}},  # two million bins
        {"hu": [-500, 1500, 5], "density": {}},  # 402 bins: a voxel's bin would not fit a byte
        {"hu": [0, 100, 50], "density": {"liver": [0.5, 0.5, 2.0, 0.1]}},  # not a share
        {"density": {}},
    ],
)
def test_a_broken_intensity_profile_is_refused(entry):
    with pytest.raises(ConfigError, match="intensity profile"):
        check_intensity_profile(entry, "card")


@pytest.mark.parametrize(
    "table, message",
    [
        ({"x": [0, 0.5], "y": [0.2, 0.1]}, "non-decreasing"),
        ({"x": [0, 2], "y": [0, 1]}, "within"),
        ({"x": [0, 0.5]}, "of numbers"),
        ({"x": [], "y": []}, "1-1000 knots"),
    ],
)
def test_a_broken_calibration_table_is_refused_with_what_to_fix(table, message):
    with pytest.raises(ConfigError, match=message):
        check_table(table, "t")


def test_a_calibration_file_is_read_checked_and_size_bounded(tmp_path):
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"calibration": {"x": [0, 1], "y": [0.01, 0.9]}, "fitted_on": "2 CTs"}))
    assert load_calibration(good) == {
        "calibration": {"x": [0.0, 1.0], "y": [0.01, 0.9]},
        "fitted_on": "2 CTs",
    }
    huge = tmp_path / "h.json"
    with open(huge, "wb") as stream:
        stream.truncate(2 << 20)  # sparse: 2 MB of nothing
    with pytest.raises(ConfigError, match="over 1 MB"):
        load_calibration(huge)
    with pytest.raises(ConfigError, match="no 'calibration'"):
        (tmp_path / "e.json").write_text("{}")
        load_calibration(tmp_path / "e.json")


# -- per structure -------------------------------------------------------------------------------
def test_predicted_dice_follows_the_review_map_and_flags_below_the_threshold():
    mine = np.zeros((20, 20, 20), bool)
    mine[5:15, 5:15, 5:15] = True
    nothing = np.zeros_like(mine)
    sure = structure_quality(mine, np.full(mine.shape, 0.01, np.float32), nothing)
    assert sure.predicted_dice > 0.98 and not sure.check
    doubtful = structure_quality(mine, np.full(mine.shape, 0.6, np.float32), nothing)
    assert doubtful.predicted_dice < 0.7 and doubtful.check and "predicted Dice" in doubtful.reason
    # judged as the user reads it: 0.6996 is shown as 0.70 and is not "below 0.7"
    edge = structure_quality(mine, np.full(mine.shape, 0.462, np.float32), nothing)
    assert 0.6995 < edge.predicted_dice < 0.7 and not edge.check
    below = structure_quality(mine, np.full(mine.shape, 0.48, np.float32), nothing)
    assert below.check and "predicted Dice 0.68 below 0.7" in below.reason
    missed = np.zeros_like(mine)
    missed[15:18, 5:15, 5:15] = True  # voxels this structure lost to a neighbour, on the fence
    assert structure_quality(mine, np.full(mine.shape, 0.3, np.float32), missed).predicted_dice < (
        structure_quality(mine, np.full(mine.shape, 0.3, np.float32), nothing).predicted_dice
    )


def test_a_structure_found_on_the_wrong_side_is_flagged_as_an_implausible_place():
    mine = np.zeros((20, 20, 20), bool)
    mine[2:6, 8:12, 8:12] = True
    body = np.ones_like(mine)
    centre = body_normalised_centre(mine, body, np.eye(4))
    assert centre[0] < 0.3
    place = {"mean": [0.8, 0.5], "spread": [0.05, 0.05]}  # in training it lay on the other side
    quality = structure_quality(
        mine, np.full(mine.shape, 0.01, np.float32), np.zeros_like(mine), centre, place
    )
    assert quality.check and "left-right" in quality.reason
    here = {"mean": [float(centre[0]), float(centre[1])], "spread": [0.05, 0.05]}
    assert not structure_quality(
        mine, np.full(mine.shape, 0.01, np.float32), np.zeros_like(mine), centre, here
    ).check


def test_training_statistics_measure_only_the_classes_labelled_by_hand(tmp_path):
    """A fine-tune's pseudo-labels come from the base model: the places and intensity profile of
    those classes stay the base's (``labelled_by_hand``), not what the base "found" in new images."""
    from types import SimpleNamespace

    from voila.training.finetune import FinetuneTrainer

    data_root = write_phantom_dataset(
        tmp_path / "data", 1, shape=(24, 24, 24), spacing=(6, 6, 6), val_fraction=0
    )
    preprocessing = PreprocessingConfig(spacing=(6, 6, 6))
    prepared = TrainingData.prepare(
        [data_root], preprocessing, Vocabulary.load(), need_validation_cases=False
    )
    spleen = prepared.class_names.index("spleen")
    trainer = SimpleNamespace(data=prepared, pseudo_labelled={prepared.train_indices[0]: {spleen}})
    by_hand = {i: FinetuneTrainer.labelled_by_hand(trainer, i) for i in prepared.train_indices}
    assert not by_hand[prepared.train_indices[0]][spleen] and prepared.cases[0].annotated[spleen]
    every = training_statistics(prepared, preprocessing)
    measured = training_statistics(prepared, preprocessing, by_hand)
    assert "spleen" in every.places and "spleen" in every.profile.to_card()["density"]
    assert "spleen" not in measured.places and "spleen" not in measured.profile.to_card()["density"]
    assert measured.places["liver"] == every.places["liver"]


def test_training_places_and_inference_centres_agree_for_any_file_orientation(tmp_path):
    """Where training records a structure and where inference finds it are the same world place
    (left is left), also for a file stored in another orientation."""
    data_root = write_phantom_dataset(
        tmp_path / "data", 1, shape=(32, 32, 32), spacing=(3, 3, 3), val_fraction=0
    )
    preprocessing = PreprocessingConfig(spacing=(3, 3, 3))
    prepared = TrainingData.prepare(
        [data_root], preprocessing, Vocabulary.load(), need_validation_cases=False
    )
    places = training_statistics(prepared, preprocessing).places
    assert {"liver", "spleen", "kidney_left", "kidney_right"} <= set(places)
    assert (
        places["liver"]["mean"][0] > places["spleen"]["mean"][0]
    )  # RAS: x grows towards the patient's right
    case = next(p for p in data_root.iterdir() if p.is_dir())
    ct, affine = read_image(case / "ct.nii.gz")
    liver, _ = read_image(case / "segmentations" / "liver.nii.gz")
    # the same world, stored left-right and front-back reversed
    flipped_affine = affine @ np.array(
        [[-1, 0, 0, ct.shape[0] - 1], [0, -1, 0, ct.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float
    )
    for image, mask, grid_affine in (
        (ct, liver, affine),
        (ct[::-1, ::-1], liver[::-1, ::-1], flipped_affine),
    ):
        grid = preprocess_volume(np.ascontiguousarray(image), grid_affine, preprocessing)
        shape = grid.image.shape[1:]
        on_grid = resample_to_grid(np.ascontiguousarray(mask), grid_affine, shape, grid.affine, order=0) > 0
        centre = body_normalised_centre(on_grid, body_mask(grid.image[0].numpy(), preprocessing), grid.affine)
        assert np.allclose(centre[:2], places["liver"]["mean"], atol=0.03), (centre, places["liver"])


# -- in the engine, the sidecar and the command line ---------------------------------------------
@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory):
    root = write_phantom_dataset(
        tmp_path_factory.mktemp("ct"), 1, shape=(40, 40, 40), spacing=(5, 5, 5), seed=7, val_fraction=0
    )
    path = next(p for p in root.iterdir() if p.is_dir()) / "ct.nii.gz"
    return path, *read_image(path)


@pytest.fixture(scope="module")
def encoded(resources, sample_ct):
    """The shipped demo model's encoding of the bundled CT (with the stored CAS heatmap)."""
    from voila.resources import DEMO_MODEL

    segmenter = Segmenter.load(resources / DEMO_MODEL, device="cpu")
    ct, affine = sample_ct
    return segmenter, segmenter.encode(ct, affine, heatmap=True, overlap=0.25)


ALL = ["liver", "spleen", "left kidney", "right kidney", "aorta"]


def test_the_default_heatmap_is_the_review_map_and_every_found_structure_has_its_expected_quality(
    encoded, sample_ct
):
    segmenter, encoding = encoded
    result = encoding.segment(ALL)
    assert result.heatmap_kind == "review" and result.heatmap.shape == sample_ct[0].shape
    assert 0 <= result.heatmap.min() and result.heatmap.max() <= 1
    found = [p for p in result.prompts if p.found]
    assert len(found) >= 3, "the demo model finds these organs on the CT it was trained on"
    for p in found:
        assert 0 <= p.predicted_dice <= 1 and p.check == (p.predicted_dice < 0.7 or bool(p.check_reason))
        assert p.status.startswith("CHECK: ") if p.check else p.status == "found"
    sidecar = result.to_dict()
    assert sidecar["heatmap_kind"] == "review" and sidecar["heatmap"] == HEATMAP_KINDS["review"]
    again = SegmentationResult.from_dict(json.loads(json.dumps(sidecar)), result.labelmap, result.heatmap)
    assert [(p.predicted_dice, p.check, p.check_reason) for p in again.prompts] == [
        (p.predicted_dice, p.check, p.check_reason) for p in result.prompts
    ]
    assert "pred. Dice" in result.table()


def test_the_card_calibration_shapes_the_review_map_and_the_complexity_map_stays_available(encoded):
    segmenter, encoding = encoded
    saved = dict(segmenter.review)
    try:
        segmenter.review["calibration"] = {"x": [0.0, 1.0], "y": [0.3, 0.3]}  # "30 % wrong, whatever p"
        segmenter.review["joint"] = None  # the one-dimensional table alone
        flat = encoding.segment(ALL)
        assert np.allclose(flat.heatmap, 0.3, atol=TIE_BREAK + 1e-6)  # the table, less ties
        complexity = encoding.segment(ALL, heatmap="complexity")
        assert complexity.heatmap_kind == "complexity" and not np.allclose(complexity.heatmap, 0.3)
        assert encoding.segment(ALL, heatmap=None).heatmap is None
    finally:
        segmenter.review = saved


def test_the_joint_table_lights_voxels_whose_intensity_is_foreign_to_their_class(encoded, sample_ct):
    """The shipped demo carries a joint table and the classes' intensity profile: a table that
    says "wrong" only for a foreign intensity lights those voxels alone, whatever the model's doubt."""
    segmenter, encoding = encoded
    assert segmenter.intensity_profile is not None and encoding.intensity_bins is not None
    saved = dict(segmenter.review)
    try:
        segmenter.review["joint"] = {"doubt": [0.5], "novelty": [0.9], "wrong": [[0.1, 0.8], [0.1, 0.8]]}
        heat = encoding.segment(ALL).heatmap
        body = sample_ct[0] > -500
        high = (heat > 0.45) & body
        assert 0 < high.sum() < 0.5 * body.sum()
        values = heat[body]
        levels = (np.abs(values - 0.1) < 0.02) | (np.abs(values - 0.8) < 0.02)
        assert levels.mean() > 0.8  # the table's two shares (between them: interpolation at edges)
    finally:
        segmenter.review = saved


def test_a_structure_found_far_from_its_training_place_is_flagged(encoded):
    segmenter, encoding = encoded
    found = [p for p in encoding.segment(ALL).prompts if p.found]
    target = found[0]
    saved = dict(segmenter.review)
    try:
        centre = [0.5, 0.5]
        segmenter.review["places"] = {target.structure: {"mean": [5.0, centre[1]], "spread": [0.1, 0.1]}}
        flagged = next(p for p in encoding.segment(ALL).prompts if p.label == target.label)
        assert flagged.check and "left-right" in flagged.check_reason
    finally:
        segmenter.review = saved


def test_a_damaged_review_entry_is_a_one_line_model_file_error(tiny_model_path, tmp_path):
    from voila.model.model_file import load_model, save_model

    loaded = load_model(tiny_model_path)
    card = dict(loaded.card, review={"calibration": {"x": [0, 1], "y": [0.9, 0.1]}, "places": {}})
    broken = tmp_path / "broken.safetensors"
    save_model(broken, loaded.model, card, loaded.text_cache)
    with pytest.raises(ModelFileError, match="'review' is damaged"):
        Segmenter.load(broken, device="cpu")


def test_the_command_line_writes_the_kind_asked_for(tiny_model_path, phantom_ct, tmp_path, capsys):
    path = phantom_ct[0]
    out = tmp_path / "seg.nii.gz"
    code = cli.main(["segment", str(path), "-m", str(tiny_model_path), "-p", "liver", "-o", str(out),
                           "--heatmap", str(tmp_path / "heat.nii.gz"), "--heatmap-kind", "complexity",
                           "--device", "cpu", "--quiet"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "pred. Dice" in printed
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["heatmap_kind"] == "complexity" and "CAS complexity" in sidecar["heatmap"]
    assert nib.load(str(tmp_path / "heat.nii.gz")).shape == phantom_ct[1].shape


def test_a_model_gets_a_calibration_from_a_file_into_a_new_copy_and_the_input_stays(
    tiny_model_path, tmp_path
):
    from voila.training.export import recalibrated

    data = write_phantom_dataset(tmp_path / "data", 1, shape=(24, 24, 24), spacing=(6, 6, 6), val_fraction=0)
    table = {"calibration": {"x": [0.0, 0.5, 1.0], "y": [0.01, 0.2, 0.6]}, "fitted_on": "elsewhere"}
    (tmp_path / "cal.json").write_text(json.dumps(table), encoding="utf-8")
    before = tiny_model_path.read_bytes()
    out = recalibrated(
        tiny_model_path, tmp_path / "cal.json", [str(data)], tmp_path / "calibrated.safetensors"
    )
    review = read_model_card(out)["review"]
    assert review["calibration"] == table["calibration"] and review["fitted_on"] == "elsewhere"
    assert {"liver", "spleen", "aorta"} <= set(review["places"])
    assert tiny_model_path.read_bytes() == before
    with pytest.raises(FileExistsError, match="choose a new file"):
        recalibrated(tiny_model_path, tmp_path / "cal.json", [str(data)], out)


def test_the_shipped_demo_model_carries_a_calibration_measured_on_a_patient_it_never_saw(resources, capsys):
    from voila.resources import DEMO_MODEL

    review = read_model_card(resources / DEMO_MODEL)["review"]
    assert "not trained on it" in review["fitted_on"] and len(review["calibration"]["x"]) >= 2
    check_joint_table(review["joint"], "demo")  # the joint table of the same pairs
    check_intensity_profile(review["intensity"], "demo")
    assert {"liver", "spleen", "aorta", "background"} <= set(review["intensity"]["density"])
    assert cli.main(["info", str(resources / DEMO_MODEL)]) == 0
    assert (
        "review map:          calibrated on 1 - p and intensity novelty; bench_heatmap"
        in capsys.readouterr().out
    )
