"""The vocabulary: TotalSegmentator classes, prompt matching, terminology, measured neighbours."""

from __future__ import annotations

import csv
import json

import nibabel
import numpy as np
import pytest
from scipy import ndimage
from voila.errors import VoilaError
from voila.vocabulary import Structure, Vocabulary, normalize_prompt, readable_name
from voila.vocabulary_build import (
    NEIGHBOR_SOURCES,
    SLICER_TERMINOLOGIES,
    TERMINOLOGY_CONTEXT,
    build_vocabulary,
    color_difference,
    context_entry,
    main,
    terminology_context,
    terminology_context_json,
    vocabulary_json,
)

VOCABULARY_FILE = "Vocabulary/voila_vocabulary.json"
# CIE76 ΔE that structures shown next to each other keep at least: segments are drawn
# half-transparent over grey CT and shaded in 3-D, which roughly halves a colour difference, and
# 15 stays well above the ~2.3 that is just noticeable side by side.
DISTINGUISHABLE = 15.0


@pytest.fixture(scope="module")
def vocabulary(resources) -> Vocabulary:
    return Vocabulary.load(resources / VOCABULARY_FILE)


@pytest.fixture(scope="module")
def classes(resources) -> dict[int, str]:
    text = (resources / "Terminology/totalsegmentator_classes.json").read_text(encoding="utf-8")
    return {int(label): name for label, name in json.loads(text).items()}


@pytest.fixture(scope="module")
def csv_rows(resources) -> dict[str, dict[str, str]]:
    with (resources / "Terminology/totalsegmentator_snomed_mapping.csv").open(newline="") as stream:
        return {row["Structure"]: row for row in csv.DictReader(stream)}


@pytest.fixture(scope="module")
def labelmaps(resources) -> list[tuple[np.ndarray, np.ndarray]]:
    """(labelmap, spacing) of every reference labelmap the builder measures."""
    loaded = []
    for relative in NEIGHBOR_SOURCES:
        image = nibabel.load(str(resources / relative))
        loaded.append(
            (np.asarray(image.dataobj).astype(np.int32), np.asarray(image.header.get_zooms()[:3], float))
        )
    return loaded


def labels_within(labelmap: np.ndarray, spacing: np.ndarray, label: int, radius_mm: float) -> set[int]:
    """Labels with a voxel within ``radius_mm`` of ``label``, by dilating with an ellipsoidal mm ball."""
    reach = np.floor(radius_mm / spacing).astype(int)
    grid = np.meshgrid(*[np.arange(-r, r + 1) * s for r, s in zip(reach, spacing)], indexing="ij")
    ball = sum(axis**2 for axis in grid) <= radius_mm**2 + 1e-6
    grown = ndimage.binary_dilation(labelmap == label, structure=ball)
    return set(np.unique(labelmap[grown]).tolist()) - {0, label}


def test_the_vocabulary_holds_the_117_totalsegmentator_classes_under_their_labels(vocabulary, classes):
    assert len(vocabulary) == 117
    assert {structure.label: structure.name for structure in vocabulary} == classes
    assert [structure.label for structure in vocabulary] == list(range(1, 118))
    assert vocabulary.names == [classes[label] for label in range(1, 118)]
    assert vocabulary["kidney_left"].label == 3


def test_display_names_are_readable_english_derived_by_rule(vocabulary):
    expected = {
        "kidney_left": "left kidney",
        "vertebrae_L3": "L3 vertebra",
        "rib_left_4": "left 4th rib",
        "rib_right_11": "right 11th rib",
        "iliopsoas_right": "right iliopsoas",
        "lung_upper_lobe_left": "left upper lobe of lung",
        "iliac_vena_left": "left iliac vein",
        "inferior_vena_cava": "inferior vena cava",
        "clavicula_right": "right clavicle",
        "portal_vein_and_splenic_vein": "portal vein and splenic vein",
        "kidney_cyst_left": "left kidney cyst",
    }
    assert {name: vocabulary[name].display_name for name in expected} == expected
    assert all(structure.display_name == readable_name(structure.name) for structure in vocabulary)


@pytest.mark.parametrize(
    ("prompt", "name"),
    [
        ("Left Kidney", "kidney_left"),
        ("kidney_left", "kidney_left"),
        ("kidney left", "kidney_left"),
        ("L kidney", "kidney_left"),
        ("lt. kidney", "kidney_left"),
        ("Kidney (left)", "kidney_left"),
        ("the right kidney", "kidney_right"),
        ("  LIVER ", "liver"),
        ("liver.", "liver"),
        ("IVC", "inferior_vena_cava"),
        ("inferior-vena-cava", "inferior_vena_cava"),
        ("gall bladder", "gallbladder"),
        ("bladder", "urinary_bladder"),
        ("small intestine", "small_bowel"),
        ("large bowel", "colon"),
        ("oesophagus", "esophagus"),
        ("L3", "vertebrae_L3"),
        ("L-3 vertebra", "vertebrae_L3"),
        ("third lumbar vertebra", "vertebrae_L3"),
        ("rib 4 left", "rib_left_4"),
        ("left fourth rib", "rib_left_4"),
        ("LUL", "lung_upper_lobe_left"),
        ("right hip bone", "hip_right"),
        ("left erector spinae", "autochthon_left"),
        ("Ｌｉｖｅｒ", "liver"),
    ],
)
def test_prompts_match_regardless_of_case_spacing_punctuation_side_position_and_synonym(
    vocabulary, prompt, name
):
    assert vocabulary.match(prompt) is vocabulary[name]


@pytest.mark.parametrize("prompt", ["hello world", "liver tumour", "", "   ", "left liver"])
def test_text_that_names_no_structure_is_free_text(vocabulary, prompt):
    assert vocabulary.match(prompt) is None


@pytest.mark.parametrize("prompt", ["kidney", "Kidneys", "femur", "hip", "adrenal gland", "lung upper lobe"])
def test_a_paired_structure_without_its_side_is_free_text_not_a_guess(vocabulary, prompt):
    assert vocabulary.match(prompt) is None


def test_every_name_and_synonym_matches_exactly_one_structure(vocabulary):
    for structure in vocabulary:
        for term in (structure.name, structure.display_name, *structure.synonyms):
            assert vocabulary.match(term) is structure, term


def test_a_vocabulary_whose_synonym_names_two_structures_is_rejected(vocabulary):
    spleen, liver = vocabulary["spleen"], vocabulary["liver"]
    clash = Structure(liver.name, liver.label, liver.display_name, synonyms=("Spleen ",))
    with pytest.raises(VoilaError, match="both"):
        Vocabulary([spleen, clash])


def test_normalize_prompt_folds_case_unicode_separators_and_trailing_punctuation():
    assert normalize_prompt("  Kidney_LEFT --  cyst. ") == "kidney left cyst"
    assert normalize_prompt("Ｌｉｖｅｒ!?") == "liver"
    assert normalize_prompt("portal_vein_and_splenic_vein") == "portal vein and splenic vein"


def test_every_structure_carries_the_snomed_codes_of_the_csv(vocabulary, csv_rows):
    assert vocabulary.provenance["terminology"]["fallbacks"] == [
        s.name for s in vocabulary if s.name not in csv_rows
    ]
    for structure in vocabulary:
        row = csv_rows[structure.name]
        type_code = row["SegmentedPropertyTypeCodeSequence.CodeValue"]
        assert structure.snomed_code == f"SCT:{type_code}"
        assert (
            structure.terminology["type"]["meaning"] == row["SegmentedPropertyTypeCodeSequence.CodeMeaning"]
        )
        assert (
            structure.terminology["category"]["code"]
            == row["SegmentedPropertyCategoryCodeSequence.CodeValue"]
        )
        modifier = row["SegmentedPropertyTypeModifierCodeSequence.CodeValue"]
        assert (structure.terminology["type_modifier"] or {}).get("code", "") == modifier


@pytest.fixture(scope="module")
def slicer_colors(resources) -> dict[tuple[str, str, str], tuple[int, int, int]]:
    """Recommended colours in Slicer's lists: ``(category, type, modifier)`` codes -> RGB, DICOM master first."""
    colors: dict[tuple[str, str, str], tuple[int, int, int]] = {}
    for relative in SLICER_TERMINOLOGIES:
        document = json.loads((resources / relative).read_text(encoding="utf-8"))
        for category in document["SegmentationCodes"]["Category"]:
            category_key = f"{category['CodingSchemeDesignator']}:{category['CodeValue']}"
            for type_ in category.get("Type", []):
                type_key = f"{type_['CodingSchemeDesignator']}:{type_['CodeValue']}"
                for item, modifier_key in [(type_, "")] + [
                    (m, f"{m['CodingSchemeDesignator']}:{m['CodeValue']}") for m in type_.get("Modifier", [])
                ]:
                    if "recommendedDisplayRGBValue" in item:
                        rgb = tuple(int(c) for c in item["recommendedDisplayRGBValue"])
                        colors.setdefault((category_key, type_key, modifier_key), rgb)
    return colors


def test_colour_difference_is_cie76_in_cielab():
    assert float(color_difference((0, 0, 0), (255, 255, 255))) == pytest.approx(100.0, abs=0.01)
    # sRGB red is L*a*b* (53.24, 80.09, 67.20): its distance from black is the length of that vector.
    assert float(color_difference((255, 0, 0), (0, 0, 0))) == pytest.approx(117.34, abs=0.05)
    assert float(color_difference((221, 130, 101), (221, 130, 101))) == 0.0


def test_liver_and_spleen_keep_slicers_brown_and_purple(vocabulary, slicer_colors):
    for name in ("liver", "spleen"):
        assert vocabulary[name].color == slicer_colors[context_entry(vocabulary[name].terminology)]
    assert vocabulary["liver"].color == (221, 130, 101)
    assert vocabulary["spleen"].color == (157, 108, 162)


def test_a_structure_with_a_colour_in_slicers_lists_keeps_it_unless_recorded_as_moved(
    vocabulary, slicer_colors
):
    moved = vocabulary.provenance["colors"]["moved"]
    kept = 0
    for structure in vocabulary:
        entry = context_entry(structure.terminology)
        slicer_rgb = slicer_colors.get(entry) or slicer_colors.get((entry[0], entry[1], ""))
        if slicer_rgb is None:
            continue
        if structure.name in moved:
            assert tuple(moved[structure.name]["from"]) == slicer_rgb != structure.color
        else:
            assert structure.color == slicer_rgb, structure.name
            kept += 1
    assert kept >= 20


def test_neighbouring_structures_have_colours_that_can_be_told_apart(vocabulary):
    for structure in vocabulary:
        for neighbor in structure.neighbors:
            difference = float(color_difference(structure.color, vocabulary[neighbor].color))
            assert difference >= DISTINGUISHABLE, (structure.name, neighbor, difference)


def test_the_main_abdominal_organs_and_vessels_have_colours_that_can_be_told_apart(vocabulary):
    names = [
        "liver",
        "spleen",
        "kidney_left",
        "kidney_right",
        "aorta",
        "inferior_vena_cava",
        "portal_vein_and_splenic_vein",
    ]
    for index, name in enumerate(names):
        for other in names[index + 1 :]:
            difference = float(color_difference(vocabulary[name].color, vocabulary[other].color))
            assert difference >= DISTINGUISHABLE, (name, other, difference)


def test_every_structure_colour_is_its_recommended_colour_in_the_terminology_context(vocabulary, resources):
    context = json.loads((resources / TERMINOLOGY_CONTEXT).read_text(encoding="utf-8"))
    recommended = {}
    for category in context["SegmentationCodes"]["Category"]:
        category_key = f"{category['CodingSchemeDesignator']}:{category['CodeValue']}"
        for type_ in category["Type"]:
            type_key = f"{type_['CodingSchemeDesignator']}:{type_['CodeValue']}"
            for modifier in type_.get("Modifier", []):
                key = (
                    category_key,
                    type_key,
                    f"{modifier['CodingSchemeDesignator']}:{modifier['CodeValue']}",
                )
                recommended[key] = tuple(modifier["recommendedDisplayRGBValue"])
            if "recommendedDisplayRGBValue" in type_:
                recommended[(category_key, type_key, "")] = tuple(type_["recommendedDisplayRGBValue"])
    assert {structure.name: structure.color for structure in vocabulary} == {
        structure.name: recommended[context_entry(structure.terminology)] for structure in vocabulary
    }


def test_the_committed_terminology_context_is_exactly_what_the_builder_makes_of_the_vocabulary(
    resources, vocabulary
):
    committed = (resources / TERMINOLOGY_CONTEXT).read_text(encoding="utf-8")
    assert terminology_context_json(terminology_context(vocabulary)) == committed


def test_a_kidney_cyst_keeps_its_kidney_region_and_side_from_the_csv(vocabulary):
    terminology = vocabulary["kidney_cyst_left"].terminology
    assert terminology["category"]["meaning"] == "Morphologically Altered Structure"
    assert terminology["anatomic_region"]["meaning"] == "Kidney"
    assert terminology["anatomic_region_modifier"]["meaning"] == "Left"


def test_to_dict_and_from_dict_round_trip_exactly(vocabulary):
    data = vocabulary.to_dict()
    again = Vocabulary.from_dict(json.loads(json.dumps(data)))
    assert again == vocabulary
    assert again.to_dict() == data
    assert json.dumps(again.to_dict()) == json.dumps(data)
    assert again["liver"] == vocabulary["liver"] and hash(again["liver"]) == hash(vocabulary["liver"])


def test_a_vocabulary_of_an_unknown_format_version_is_refused(vocabulary):
    data = dict(vocabulary.to_dict(), format_version=99)
    with pytest.raises(VoilaError, match="format version"):
        Vocabulary.from_dict(data)


def test_loading_a_missing_file_says_which_file(tmp_path):
    with pytest.raises(VoilaError, match="missing.json"):
        Vocabulary.load(tmp_path / "missing.json")


def test_the_default_vocabulary_is_the_one_in_resources(vocabulary):
    assert Vocabulary.load() == vocabulary


def test_the_prompt_sentence_names_the_structure_and_its_neighbours(vocabulary):
    kidney = Structure(
        "kidney_left", 3, "left kidney", neighbors=("spleen", "adrenal_gland_left", "pancreas")
    )
    assert kidney.prompt_text() == (
        "This region represents the left kidney. "
        "Neighboring structures include the spleen, the left adrenal gland and the pancreas."
    )
    assert vocabulary["brain"].prompt_text() == "This region represents the brain."
    assert vocabulary["brain"].prompt_text("A CT of the {name}.") == "A CT of the brain."


def test_neighbours_of_the_liver_are_measured_in_the_sample_labelmaps(vocabulary, labelmaps):
    liver = vocabulary["liver"]
    threshold = vocabulary.provenance["neighbors"]["threshold_mm"]
    within = set().union(
        *(labels_within(labelmap, spacing, liver.label, threshold) for labelmap, spacing in labelmaps)
    )
    touching = set().union(
        *(labels_within(labelmap, spacing, liver.label, spacing.min()) for labelmap, spacing in labelmaps)
    )
    neighbour_labels = {vocabulary[name].label for name in liver.neighbors}
    assert neighbour_labels and neighbour_labels <= within
    assert neighbour_labels & touching
    assert len(liver.neighbors) == min(vocabulary.provenance["neighbors"]["max_neighbors"], len(within))


@pytest.mark.parametrize("name", ["kidney_left", "spleen", "vertebrae_L3", "colon"])
def test_every_listed_neighbour_lies_within_the_threshold_in_some_labelmap(vocabulary, labelmaps, name):
    structure = vocabulary[name]
    threshold = vocabulary.provenance["neighbors"]["threshold_mm"]
    within = set().union(*(labels_within(lm, sp, structure.label, threshold) for lm, sp in labelmaps))
    assert structure.neighbors
    assert {vocabulary[n].label for n in structure.neighbors} <= within


def test_structures_absent_from_the_sample_data_have_no_neighbours(vocabulary, labelmaps):
    present = set().union(*(set(np.unique(labelmap).tolist()) for labelmap, _ in labelmaps)) - {0}
    absent = [structure.name for structure in vocabulary if structure.label not in present]
    assert "brain" in absent and "heart" in absent
    assert vocabulary.provenance["neighbors"]["absent_from_data"] == absent
    assert all(not vocabulary[name].neighbors for name in absent)
    assert all(vocabulary[structure.name].neighbors for structure in vocabulary if structure.label in present)


def test_the_json_records_how_neighbours_were_derived(vocabulary):
    derivation = vocabulary.provenance["neighbors"]
    assert [source["file"] for source in derivation["sources"]] == list(NEIGHBOR_SOURCES)
    assert derivation["sources"][0]["structures_present"] == 61
    assert derivation["sources"][1]["structures_present"] == 41
    assert derivation["threshold_mm"] > 0 and derivation["max_neighbors"] >= 1
    assert [item["name"] for item in derivation["evidence"]["liver"]] == list(vocabulary["liver"].neighbors)


def test_the_committed_vocabulary_is_exactly_what_the_builder_produces(resources):
    committed = (resources / VOCABULARY_FILE).read_text(encoding="utf-8")
    assert vocabulary_json(build_vocabulary(resources)) == committed


def test_the_builder_command_is_deterministic(resources, tmp_path):
    for run in ("first", "second"):
        arguments = ["--resources", str(resources), "--out", str(tmp_path / f"{run}.json")]
        assert main([*arguments, "--context-out", str(tmp_path / f"{run}.term.json")]) == 0
    assert (tmp_path / "first.json").read_bytes() == (tmp_path / "second.json").read_bytes()
    assert (tmp_path / "first.term.json").read_bytes() == (tmp_path / "second.term.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "first.json",
        "first.term.json",
        "second.json",
        "second.term.json",
    ]


def test_the_examples_in_the_module_documentation_hold(vocabulary):
    import doctest

    import voila.vocabulary

    result = doctest.testmod(voila.vocabulary, extraglobs={"vocabulary": vocabulary})
    assert result.attempted > 0 and result.failed == 0
