"""Slicer terminology of VOILA's segments: the shipped context, and entries as Slicer stores them.

Slicer 5.6's built-in DICOM master list lacks more than half of the TotalSegmentator structures
(vertebrae, ribs, gluteal muscles, iliopsoas, hip, subclavian arteries, ...), so a segment whose
entry names that list shows no terminology. VOILA ships its own category/type context,
``Resources/Terminology/VOILA-TotalSegmentator.term.json``, written by
``python -m voila.vocabulary_build`` with every vocabulary structure once and the vocabulary's colour
as the recommended colour; segments name it. Anatomic regions stay in Slicer's built-in DICOM
anatomic master list, which holds every region the vocabulary uses.
"""

from __future__ import annotations

import vtk
from voila.errors import VoilaError
from voila.resources import resource_path
from voila.vocabulary_build import TERMINOLOGY_CONTEXT, TERMINOLOGY_CONTEXT_NAME

CATEGORY_CONTEXT = TERMINOLOGY_CONTEXT_NAME  # the shipped context: segmentation category and type
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"  # built into Slicer


def load_terminology(terminologies_logic) -> str:
    """Load the shipped context into a ``vtkSlicerTerminologiesModuleLogic``; returns its name.

    In the application the logic is ``slicer.modules.terminologies.logic()``. A context already
    loaded is left alone, so every run may call this.
    """
    loaded = vtk.vtkStringArray()
    terminologies_logic.GetLoadedTerminologyNames(loaded)
    if CATEGORY_CONTEXT in {loaded.GetValue(index) for index in range(loaded.GetNumberOfValues())}:
        return CATEGORY_CONTEXT
    path = resource_path(TERMINOLOGY_CONTEXT)
    name = terminologies_logic.LoadTerminologyFromFile(str(path))
    if name != CATEGORY_CONTEXT:
        raise VoilaError(
            f"Slicer could not load the terminology context {path} (read '{name}'); "
            "regenerate it with 'python -m voila.vocabulary_build' or reinstall the VOILA extension"
        )
    return name


def _code(entry: dict | None) -> str:
    if not entry:
        return "^^"
    return f"{entry.get('scheme', '')}^{entry.get('code', '')}^{entry.get('meaning', '')}"


def terminology_string(terminology: dict | None) -> str | None:
    """Slicer's serialized terminology entry for a vocabulary structure's DICOM codes, or ``None``.

    ``terminology`` maps ``category``, ``type``, ``type_modifier``, ``anatomic_region``,
    ``anatomic_region_modifier`` to ``{"scheme", "code", "meaning"}`` (``voila.vocabulary``). The
    layout is that of ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``.
    """
    if not terminology or not terminology.get("type"):
        return None
    return "~".join(
        [
            CATEGORY_CONTEXT,
            _code(terminology.get("category")),
            _code(terminology.get("type")),
            _code(terminology.get("type_modifier")),
            ANATOMIC_CONTEXT,
            _code(terminology.get("anatomic_region")),
            _code(terminology.get("anatomic_region_modifier")),
        ]
    )


def set_segment_terminology(segment, terminology_entry: str) -> None:
    """Slicer >= 5.7 has ``vtkSegment.SetTerminology``; older releases keep it in a tag."""
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(terminology_entry)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology_entry)


def segment_terminology(segment) -> str:
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology()
    value = vtk.reference("")
    segment.GetTag(segment.GetTerminologyEntryTagName(), value)
    return str(value)
