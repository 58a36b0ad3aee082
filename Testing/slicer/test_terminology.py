"""VOILA's terminology context, read by Slicer's own terminology logic (slicer-core, no application)."""

from __future__ import annotations

import json
import shutil

import pytest
import slicer
import vtk
from voila.errors import VoilaError
from voila.vocabulary import Vocabulary
from voila.vocabulary_build import TERMINOLOGY_CONTEXT, context_entry
from VOILASegmenterLib.terminology import (
    CATEGORY_CONTEXT,
    load_terminology,
    segment_terminology,
    set_segment_terminology,
    terminology_string,
)

# What Slicer shows when a terminology has no recommended colour (vtkSlicerTerminologyType::INVALID_COLOR).
NO_COLOR = (127, 127, 127)


@pytest.fixture(scope="module")
def vocabulary(resources) -> Vocabulary:
    return Vocabulary.load(resources / "Vocabulary/voila_vocabulary.json")


def loaded_contexts(logic) -> list[str]:
    names = vtk.vtkStringArray()
    logic.GetLoadedTerminologyNames(names)
    return [names.GetValue(index) for index in range(names.GetNumberOfValues())]


@pytest.fixture
def terminologies():
    """A terminology logic with only the shipped context: without a scene Slicer loads none of its own."""
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert loaded_contexts(logic) == []
    load_terminology(logic)
    return logic


def code_key(coded) -> str:
    """``"SCHEME:value"`` of a Slicer category or type object, ``""`` when it has no code."""
    value = coded.GetCodeValue()
    return f"{coded.GetCodingSchemeDesignator()}:{value}" if value else ""


def context_entries(logic) -> list[tuple[tuple[str, str, str], tuple[int, int, int]]]:
    """Every (category, type, modifier) the logic reads from the context, with its recommended colour."""
    entries = []
    for category_index in range(logic.GetNumberOfCategoriesInTerminology(CATEGORY_CONTEXT)):
        category = slicer.vtkSlicerTerminologyCategory()
        assert logic.GetNthCategoryInTerminology(CATEGORY_CONTEXT, category_index, category)
        for type_index in range(logic.GetNumberOfTypesInTerminologyCategory(CATEGORY_CONTEXT, category)):
            type_ = slicer.vtkSlicerTerminologyType()
            assert logic.GetNthTypeInTerminologyCategory(CATEGORY_CONTEXT, category, type_index, type_)
            if not type_.GetHasModifiers():
                key = (code_key(category), code_key(type_), "")
                entries.append((key, tuple(type_.GetRecommendedDisplayRGBValue())))
                continue
            count = logic.GetNumberOfTypeModifiersInTerminologyType(CATEGORY_CONTEXT, category, type_)
            for modifier_index in range(count):
                modifier = slicer.vtkSlicerTerminologyType()
                assert logic.GetNthTypeModifierInTerminologyType(
                    CATEGORY_CONTEXT, category, type_, modifier_index, modifier
                )
                key = (code_key(category), code_key(type_), code_key(modifier))
                entries.append((key, tuple(modifier.GetRecommendedDisplayRGBValue())))
    return entries


def test_the_shipped_context_is_loaded_once_under_the_name_segments_use():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert load_terminology(logic) == CATEGORY_CONTEXT
    assert load_terminology(logic) == CATEGORY_CONTEXT
    assert loaded_contexts(logic) == [CATEGORY_CONTEXT]
    assert CATEGORY_CONTEXT != "Segmentation category and type - DICOM master list"


def test_each_category_type_and_modifier_of_the_vocabulary_is_in_the_context_exactly_once(
    terminologies, vocabulary
):
    keys = [key for key, _ in context_entries(terminologies)]
    assert len(keys) == len(set(keys))
    assert set(keys) == {context_entry(structure.terminology) for structure in vocabulary}
    # 117 structures, 116 entries: the two kidney cysts differ only by anatomic region.
    assert len(keys) == len(vocabulary) - 1


def test_every_structure_entry_resolves_in_the_shipped_context_alone_to_the_vocabulary_colour(
    terminologies, vocabulary
):
    colors = dict(context_entries(terminologies))
    for structure in vocabulary:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminologies.DeserializeTerminologyEntry(terminology_string(structure.terminology), entry)
        assert entry.GetTerminologyContextName() == CATEGORY_CONTEXT
        objects = (entry.GetCategoryObject(), entry.GetTypeObject(), entry.GetTypeModifierObject())
        key = tuple(code_key(coded) for coded in objects)
        assert colors[key] == structure.color, structure.name

        # What Slicer does with a loaded segment: look the codes up in the loaded contexts, then
        # recommend the modifier's colour where the type has modifiers (qSlicerTerminologyNavigatorWidget).
        assert terminologies.UpdateEntryFromLoadedTerminologies(entry, [CATEGORY_CONTEXT], [])
        type_ = entry.GetTypeObject()
        recommended = entry.GetTypeModifierObject() if type_.GetHasModifiers() else type_
        assert structure.color != NO_COLOR, structure.name
        assert tuple(recommended.GetRecommendedDisplayRGBValue()) == structure.color, structure.name


def test_each_structure_that_owns_an_entry_is_found_by_its_vocabulary_name(terminologies, vocabulary):
    for structure in vocabulary:
        if structure.name.startswith("kidney_cyst_"):
            continue  # one entry for both sides: the side is the anatomic region's modifier
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminologies.FindTypeInTerminologyBy3dSlicerLabel(CATEGORY_CONTEXT, structure.name, entry)
        assert entry.GetTypeObject().GetCodeValue() == structure.terminology["type"]["code"]
        modifier = structure.terminology["type_modifier"]
        assert (entry.GetTypeModifierObject().GetCodeValue() or "") == (modifier["code"] if modifier else "")


def test_terminology_string_is_slicers_serialized_entry_naming_the_voila_context(terminologies, vocabulary):
    entry_text = terminology_string(vocabulary["liver"].terminology)
    assert entry_text == (
        "Segmentation category and type - VOILA~SCT^123037004^Anatomical Structure"
        "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
    )
    cyst = terminology_string(vocabulary["kidney_cyst_left"].terminology)
    entry = slicer.vtkSlicerTerminologyEntry()
    assert terminologies.DeserializeTerminologyEntry(cyst, entry)
    assert terminologies.SerializeTerminologyEntry(entry) == cyst
    assert entry.GetRegionObject().GetCodeMeaning() == "Kidney"
    assert entry.GetRegionModifierObject().GetCodeMeaning() == "Left"
    assert terminology_string(None) is None


def test_a_segment_keeps_the_terminology_entry_it_was_given(vocabulary):
    entry_text = terminology_string(vocabulary["vertebrae_L3"].terminology)
    segment = slicer.vtkSegment()
    set_segment_terminology(segment, entry_text)
    assert segment_terminology(segment) == entry_text


def test_a_context_file_slicer_cannot_read_is_an_error_that_says_what_to_do(resources, tmp_path, monkeypatch):
    (tmp_path / "Vocabulary").mkdir()
    shutil.copy(resources / "Vocabulary/voila_vocabulary.json", tmp_path / "Vocabulary")
    broken = tmp_path / TERMINOLOGY_CONTEXT
    broken.parent.mkdir()
    broken.write_text(json.dumps({"SegmentationCategoryTypeContextName": "no schema"}), encoding="utf-8")
    monkeypatch.setenv("VOILA_RESOURCES", str(tmp_path))
    with pytest.raises(VoilaError, match="vocabulary_build"):
        load_terminology(slicer.vtkSlicerTerminologiesModuleLogic())
