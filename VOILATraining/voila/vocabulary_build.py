"""Build the vocabulary and VOILA's Slicer terminology context from terminology files and reference masks.

    python -m voila.vocabulary_build [--out PATH] [--context-out PATH] [--threshold-mm 9] [--max-neighbors 4]

writes ``Resources/Vocabulary/voila_vocabulary.json`` and
``Resources/Terminology/VOILA-TotalSegmentator.term.json``.

Names come from the TotalSegmentator class list, codes from its SNOMED-CT mapping, readable names
and synonyms from the rules in :mod:`voila.vocabulary`. Neighbour prompts ("Neighboring structures
include ...", VOILA §3.1) are *measured*, not written by hand: two structures are neighbours when
some voxel of one lies within ``threshold_mm`` (distance between voxel centres, in the volume's own
spacing; face-touching masks are one voxel apart) of the other in a reference labelmap. Each
structure keeps the ``max_neighbors`` with the largest contact volume (voxels of either mask within
the threshold of the other), nearest first on ties. Structures absent from every labelmap get no
neighbours; the JSON lists them.

Colours are decided here and nowhere else (:func:`structure_colors`): Slicer's recommended colour
for the same category, type and modifier where Slicer's DICOM master or General Anatomy list has
one, else the colour Slicer gives the structure's kind (spine, rib, muscle, artery, vein), each
moved to the nearest colour that neighbours can tell apart where needed. The terminology context
(:func:`terminology_context`) lists every category, type and modifier of the vocabulary once, with
that colour, so Slicer's segments and the preview agree. The output is deterministic.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from voila.data.geometry import voxel_spacing
from voila.errors import VoilaError
from voila.resources import VOCABULARY, resources_dir
from voila.vocabulary import (
    TERMINOLOGY_KEYS,
    Structure,
    Vocabulary,
    default_synonyms,
    free_text_color,
    readable_name,
)

CLASSES = "Terminology/totalsegmentator_classes.json"
SNOMED_MAPPING = "Terminology/totalsegmentator_snomed_mapping.csv"
NEIGHBOR_SOURCES = (
    "SampleData/totalseg-example/example_seg_fast_force_split.nii.gz",
    "SampleData/totalseg-example/example_seg.nii.gz",
)
UPSTREAM = "github.com/wasserth/TotalSegmentator @ 0e65a448d557382b1e925276212b3bec7f5aff83 (Apache-2.0)"
THRESHOLD_MM = 9.0  # three voxels of the 3 mm reference labelmaps
MAX_NEIGHBORS = 4

# Slicer's own category/type lists, copied unchanged: the source of recommended colours.
SLICER_TERMINOLOGIES = (
    "Terminology/SegmentationCategoryTypeModifier-DICOM-Master.json",
    "Terminology/SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json",
)
SLICER_UPSTREAM = (
    "github.com/Slicer/Slicer @ 583e9b37d50ead7daf7b783dce465ccaecec8809, "
    "Modules/Loadable/Terminologies/Resources (3D Slicer licence, BSD-style)"
)
TERMINOLOGY_CONTEXT = "Terminology/VOILA-TotalSegmentator.term.json"
TERMINOLOGY_CONTEXT_NAME = "Segmentation category and type - VOILA"
# Slicer loads a file as a category/type context only when it names this schema.
TERMINOLOGY_CONTEXT_SCHEMA = (
    "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"
)

# CIE76 colour difference (Euclidean distance in CIELAB) that neighbours keep at least. Segments are
# drawn half-transparent over grey CT and shaded in 3-D, which roughly halves the difference between
# two colours; 15 keeps it well above the ~2.3 that is just noticeable side by side.
MIN_COLOR_DIFFERENCE = 15.0
# Where Slicer has no colour for a structure's own type, it starts from the colour Slicer gives its
# kind (first matching name prefix; SCT type codes in Slicer's lists), so vertebrae look like spine,
# arteries red and veins blue.
COLOR_FAMILIES = (
    ("vertebrae_C", "122494005"),  # Cervical spine
    ("vertebrae_T", "122495006"),  # Thoracic spine
    ("vertebrae_L", "122496007"),  # Lumbar spine
    ("vertebrae_S", "272673000"),  # Bone
    ("sacrum", "272673000"),  # Bone
    ("hip_", "272673000"),  # Bone
    ("rib_", "113197003"),  # Rib
    ("costal_cartilages", "309312004"),  # Cartilage
    ("humerus_", "371195002"),  # Bone of upper limb
    ("scapula_", "371195002"),  # Bone of upper limb
    ("femur_", "72001000"),  # Bone of lower limb
    ("gluteus_", "102292000"),  # Muscle of lower limb
    ("iliopsoas_", "102292000"),  # Muscle of lower limb
    ("autochthon_", "71616004"),  # Muscle
    ("atrial_appendage_left", "82471001"),  # Left atrium
    ("brachiocephalic_trunk", "51114001"),  # Artery
    ("subclavian_artery_", "51114001"),  # Artery
    ("common_carotid_artery_", "51114001"),  # Artery
    ("iliac_artery_", "51114001"),  # Artery
    ("brachiocephalic_vein_", "29092000"),  # Vein
    ("superior_vena_cava", "29092000"),  # Vein
    ("inferior_vena_cava", "29092000"),  # Vein
    ("portal_vein_and_splenic_vein", "29092000"),  # Vein
    ("iliac_vena_", "29092000"),  # Vein
)
# Structures told apart even where the sample labelmaps measure no contact: the abdominal organs and
# vessels most often shown together, and (the samples show no chest) the heart with its vessels and
# the three branches that leave the aortic arch side by side.
KEPT_APART = (
    (
        "liver",
        "spleen",
        "kidney_left",
        "kidney_right",
        "aorta",
        "inferior_vena_cava",
        "portal_vein_and_splenic_vein",
    ),
    ("heart", "atrial_appendage_left", "aorta", "pulmonary_vein", "superior_vena_cava"),
    ("brachiocephalic_trunk", "common_carotid_artery_left", "subclavian_artery_left"),
)

_CSV_SEQUENCES = {
    "category": "SegmentedPropertyCategoryCodeSequence",
    "type": "SegmentedPropertyTypeCodeSequence",
    "type_modifier": "SegmentedPropertyTypeModifierCodeSequence",
    "anatomic_region": "AnatomicRegionSequence",
    "anatomic_region_modifier": "AnatomicRegionModifierSequence",
}
_ANATOMICAL_STRUCTURE = {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"}


def read_classes(path: Path) -> dict[int, str]:
    """``{label: name}`` from the TotalSegmentator class list (``{"1": "spleen", ...}``)."""
    return {int(label): name for label, name in json.loads(path.read_text(encoding="utf-8")).items()}


def read_terminology(path: Path) -> dict[str, dict]:
    """``{name: terminology}`` from the SNOMED mapping CSV; missing codes are ``None``."""
    entries: dict[str, dict] = {}
    with path.open(newline="", encoding="utf-8") as stream:
        for row in csv.DictReader(stream):
            terminology = {}
            for key in TERMINOLOGY_KEYS:
                prefix = _CSV_SEQUENCES[key]
                code = (row.get(f"{prefix}.CodeValue") or "").strip()
                terminology[key] = (
                    {
                        "scheme": (row.get(f"{prefix}.CodingSchemeDesignator") or "").strip(),
                        "code": code,
                        "meaning": (row.get(f"{prefix}.CodeMeaning") or "").strip(),
                    }
                    if code
                    else None
                )
            entries[row["Structure"].strip()] = terminology
    return entries


def structure_contacts(
    labelmap: np.ndarray, spacing: tuple[float, float, float], threshold_mm: float
) -> dict[tuple[int, int], tuple[float, float]]:
    """``{(a, b): (volume_mm3, distance_mm)}`` for labels ``b`` with voxels within ``threshold_mm`` of ``a``.

    ``volume_mm3`` is the volume of ``b`` lying within the threshold of ``a``; ``distance_mm`` the
    smallest distance between voxel centres of the two masks. ``labelmap`` is ``(I, J, K)`` integers.
    """
    from scipy import ndimage

    spacing_array = np.asarray(spacing, dtype=float)
    voxel_mm3 = float(np.prod(spacing_array))
    pad = np.ceil(threshold_mm / spacing_array).astype(int) + 1
    boxes = ndimage.find_objects(labelmap)
    contacts: dict[tuple[int, int], tuple[float, float]] = {}
    for index, box in enumerate(boxes):
        if box is None:
            continue
        label = index + 1
        # The distance map only needs the mask's bounding box grown by the threshold.
        grown = tuple(
            slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(box, pad, labelmap.shape)
        )
        crop = labelmap[grown]
        distance = ndimage.distance_transform_edt(crop != label, sampling=spacing_array)
        near = (distance <= threshold_mm + 1e-6) & (crop != 0) & (crop != label)
        other_labels = crop[near].astype(np.int64)
        if other_labels.size == 0:
            continue
        counts = np.bincount(other_labels)
        nearest = np.full(counts.size, np.inf)
        np.minimum.at(nearest, other_labels, distance[near])
        for other in np.flatnonzero(counts):
            contacts[(label, int(other))] = (float(counts[other]) * voxel_mm3, float(nearest[other]))
    return contacts


def _read_labelmap(path: Path, labels: set[int]) -> tuple[np.ndarray, tuple[float, float, float]]:
    import nibabel

    try:
        image = nibabel.load(str(path))
    except (OSError, nibabel.filebasedimages.ImageFileError) as error:
        raise VoilaError(
            f"cannot read reference labelmap {path}: {error}; restore Resources/SampleData"
        ) from None
    data = np.asanyarray(image.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        data = np.rint(data)
    labelmap = data.astype(np.int32)
    labelmap[~np.isin(labelmap, sorted(labels))] = 0
    spacing = voxel_spacing(image.affine)
    return labelmap, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def derive_neighbors(
    resources: Path, classes: dict[int, str], threshold_mm: float, max_neighbors: int
) -> tuple[dict[str, tuple[str, ...]], dict]:
    """Neighbours of every class measured in :data:`NEIGHBOR_SOURCES`, and how they were found."""
    pair_volume: dict[tuple[int, int], float] = {}
    pair_distance: dict[tuple[int, int], float] = {}
    present: set[int] = set()
    sources = []
    for relative in NEIGHBOR_SOURCES:
        path = resources / relative
        labelmap, spacing = _read_labelmap(path, set(classes))
        labels_here = sorted(set(np.unique(labelmap).tolist()) - {0})
        present.update(labels_here)
        contacts = structure_contacts(labelmap, spacing, threshold_mm)
        for (a, b), (volume, distance) in contacts.items():
            if a > b:
                continue
            # Symmetric contact: the shell of b near a plus the shell of a near b.
            volume += contacts.get((b, a), (0.0, distance))[0]
            pair_volume[(a, b)] = max(pair_volume.get((a, b), 0.0), volume)
            pair_distance[(a, b)] = min(pair_distance.get((a, b), np.inf), distance)
        sources.append(
            {
                "file": relative,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "shape": [int(n) for n in labelmap.shape],
                "spacing_mm": [round(s, 6) for s in spacing],
                "structures_present": len(labels_here),
            }
        )

    neighbors: dict[str, tuple[str, ...]] = {}
    evidence: dict[str, list[dict]] = {}
    for label, name in sorted(classes.items()):
        candidates = []
        for (a, b), volume in pair_volume.items():
            if label in (a, b):
                other = b if a == label else a
                candidates.append((-round(volume, 3), round(pair_distance[(a, b)], 3), other))
        chosen = sorted(candidates)[:max_neighbors]
        neighbors[name] = tuple(classes[other] for _, _, other in chosen)
        if chosen:
            evidence[name] = [
                {"name": classes[other], "contact_mm3": round(-volume, 1), "distance_mm": round(distance, 2)}
                for volume, distance, other in chosen
            ]
    absent = [name for label, name in sorted(classes.items()) if label not in present]
    isolated = [name for label, name in sorted(classes.items()) if label in present and not neighbors[name]]
    provenance = {
        "method": (
            "two structures are neighbours when a voxel of one lies within threshold_mm (distance "
            "between voxel centres, volume spacing) of the other in a reference labelmap; each "
            "structure keeps the max_neighbors with the largest contact volume (voxels of either "
            "mask within threshold_mm of the other, maximum over sources), nearest first on ties"
        ),
        "threshold_mm": threshold_mm,
        "max_neighbors": max_neighbors,
        "sources": sources,
        "absent_from_data": absent,
        "absent_from_data_note": "structures absent from every source labelmap have no neighbours",
        "no_neighbor_within_threshold": isolated,
        "evidence": evidence,
    }
    return neighbors, provenance


class SlicerColor(NamedTuple):
    """A recommended colour in one of Slicer's lists, and which list and term it came from."""

    rgb: tuple[int, int, int]
    source: str


def read_slicer_colors(
    paths: list[Path],
) -> tuple[dict[tuple[str, str, str], SlicerColor], dict[str, SlicerColor]]:
    """Recommended colours in Slicer's category/type lists; the first list that has one wins.

    ``by_entry`` maps ``(category, type, modifier)`` codes (:func:`context_entry`; modifier ``""``
    for the type itself) to the colour; ``by_type`` maps a type code to its colour in any category.
    """
    by_entry: dict[tuple[str, str, str], SlicerColor] = {}
    by_type: dict[str, SlicerColor] = {}
    for path in paths:
        document = json.loads(path.read_text(encoding="utf-8"))
        list_name = document["SegmentationCategoryTypeContextName"]
        for category in document["SegmentationCodes"]["Category"]:
            category_key = _slicer_code_key(category)
            for type_ in category.get("Type", []):
                type_key = _slicer_code_key(type_)
                rgb = _slicer_rgb(type_)
                if rgb:
                    color = SlicerColor(rgb, f"{list_name}: {type_['CodeMeaning']}")
                    by_entry.setdefault((category_key, type_key, ""), color)
                    by_type.setdefault(type_key, color)
                for modifier in type_.get("Modifier", []):
                    rgb = _slicer_rgb(modifier)
                    if rgb:
                        source = f"{list_name}: {type_['CodeMeaning']}, {modifier['CodeMeaning']}"
                        by_entry.setdefault(
                            (category_key, type_key, _slicer_code_key(modifier)), SlicerColor(rgb, source)
                        )
    return by_entry, by_type


def _slicer_code_key(item: dict) -> str:
    return f"{item['CodingSchemeDesignator']}:{item['CodeValue']}"


def _slicer_rgb(item: dict) -> tuple[int, int, int] | None:
    value = item.get("recommendedDisplayRGBValue")
    return (int(value[0]), int(value[1]), int(value[2])) if value and len(value) == 3 else None


def context_entry(terminology: dict) -> tuple[str, str, str]:
    """``(category, type, modifier)`` codes as ``"SCHEME:value"`` (modifier ``""`` if none).

    One entry of the terminology context; structures that differ only by anatomic region (the
    left and right kidney cysts) share it.
    """

    def key(code: dict | None) -> str:
        return f"{code['scheme']}:{code['code']}" if code else ""

    return (
        key(terminology.get("category")),
        key(terminology.get("type")),
        key(terminology.get("type_modifier")),
    )


_SRGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def cielab(rgb) -> np.ndarray:
    """CIELAB (D65) of sRGB colours given as ``(..., 3)`` values 0..255."""
    linear = np.asarray(rgb, dtype=float) / 255.0
    linear = np.where(linear > 0.04045, ((linear + 0.055) / 1.055) ** 2.4, linear / 12.92)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65_WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    )


def color_difference(first, second) -> np.ndarray:
    """CIE76 ΔE between sRGB colours ``(..., 3)`` (broadcast): 0 equal, ~2.3 just noticeable, 100 black/white."""
    return np.linalg.norm(cielab(first) - cielab(second), axis=-1)


def structure_colors(
    classes: dict[int, str],
    terminology: dict[str, dict],
    neighbors: dict[str, tuple[str, ...]],
    slicer_lists: list[Path],
) -> tuple[dict[str, tuple[int, int, int]], dict]:
    """``{name: (r, g, b)}`` for every class, and where each colour came from.

    Structures of one context entry (:func:`context_entry`) share a colour. Each entry starts from
    Slicer's recommended colour for it, else from its kind's (:data:`COLOR_FAMILIES`), else from
    :func:`free_text_color`. Entries are coloured in that order of authority (a colour Slicer gives
    one structure before one it gives both sides of a pair), then by label, and each takes the
    colour nearest its start that differs by :data:`MIN_COLOR_DIFFERENCE` from every entry already
    coloured that it must be told apart from: measured neighbours, consecutive labels
    (TotalSegmentator numbers vertebrae, ribs and the chest vessels in anatomical order, which covers
    regions the sample labelmaps do not show) and the groups in :data:`KEPT_APART`.
    """
    by_entry, by_type = read_slicer_colors(slicer_lists)
    labels = {name: label for label, name in classes.items()}
    # A structure without a type code is not in the context: it is a colour unit of its own.
    unit_of = {
        name: context_entry(terminology[name]) if terminology[name].get("type") else ("", "", name)
        for name in labels
    }
    members: dict[tuple[str, str, str], list[str]] = {}
    for _, name in sorted(classes.items()):
        members.setdefault(unit_of[name], []).append(name)

    start: dict[tuple[str, str, str], tuple[int, tuple[int, int, int], str]] = {}
    for unit, names in members.items():
        own = by_entry.get(unit) or by_entry.get((unit[0], unit[1], ""))
        family = next((code for prefix, code in COLOR_FAMILIES if names[0].startswith(prefix)), None)
        if own is not None:
            start[unit] = (1 if unit[2] else 0, own.rgb, own.source)
        elif family is not None:
            if f"SCT:{family}" not in by_type:
                raise VoilaError(f"COLOR_FAMILIES names SCT {family}, which has no colour in Slicer's lists")
            kind = by_type[f"SCT:{family}"]
            start[unit] = (2, kind.rgb, f"{kind.source} (its kind)")
        else:
            start[unit] = (3, free_text_color(names[0]), "voila.vocabulary.free_text_color")

    pairs = [(name, other) for name in labels for other in neighbors.get(name, ()) if other in labels]
    pairs += [(classes[label], classes[label + 1]) for label in classes if label + 1 in classes]
    pairs += [(a, b) for group in KEPT_APART for a in group for b in group if a in labels and b in labels]
    apart: dict[tuple[str, str, str], set[tuple[str, str, str]]] = {unit: set() for unit in members}
    for a, b in pairs:
        if unit_of[a] != unit_of[b]:
            apart[unit_of[a]].add(unit_of[b])
            apart[unit_of[b]].add(unit_of[a])

    levels = np.append(np.arange(0, 256, 8), 255)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    grid_lab = cielab(grid)
    chosen: dict[tuple[str, str, str], tuple[int, int, int]] = {}
    moved: dict[str, dict] = {}
    for unit in sorted(members, key=lambda unit: (start[unit][0], labels[members[unit][0]])):
        _, rgb, _ = start[unit]
        candidates = np.vstack([np.asarray(rgb)[None], grid])
        candidates_lab = np.vstack([cielab(rgb)[None], grid_lab])
        # Rounded so that last-digit differences between platforms cannot change the choice.
        from_start = np.round(np.linalg.norm(candidates_lab - candidates_lab[0], axis=-1), 6)
        partners = [chosen[other] for other in sorted(apart[unit]) if other in chosen]
        if partners:
            partner_lab = cielab(np.asarray(partners))
            separation = np.linalg.norm(candidates_lab[:, None, :] - partner_lab[None], axis=-1).min(axis=1)
            from_start[np.round(separation, 6) < MIN_COLOR_DIFFERENCE] = np.inf
        best = int(np.argmin(from_start))
        if not np.isfinite(from_start[best]):
            raise VoilaError(
                f"no colour sets {members[unit][0]} apart from its neighbours; lower MIN_COLOR_DIFFERENCE"
            )
        chosen[unit] = (int(candidates[best, 0]), int(candidates[best, 1]), int(candidates[best, 2]))
        if best:
            for name in members[unit]:
                moved[name] = {"from": list(rgb), "delta_e": round(float(from_start[best]), 2)}

    colors = {name: chosen[unit_of[name]] for name in labels}
    provenance = {
        "method": (
            "each context entry (category, type, modifier) starts from Slicer's recommended colour "
            "for it, else from the colour Slicer gives its kind, and takes the colour nearest that "
            "start (CIE76 in CIELAB, sRGB grid in steps of 8) that differs by min_delta_e from every "
            "entry coloured before it that it must be told apart from: measured neighbours, "
            "consecutive labels and the kept_apart groups; Slicer's colours of unpaired structures "
            "are placed first, then those of paired structures, then kinds, each in label order"
        ),
        "min_delta_e": MIN_COLOR_DIFFERENCE,
        "kept_apart": [list(group) for group in KEPT_APART],
        "start": {name: start[unit_of[name]][2] for name in sorted(labels, key=labels.get)},
        "moved": moved,
    }
    return colors, provenance


def build_vocabulary(
    resources: Path | None = None, threshold_mm: float = THRESHOLD_MM, max_neighbors: int = MAX_NEIGHBORS
) -> Vocabulary:
    """The vocabulary generated from ``Resources/`` (terminology files and sample labelmaps)."""
    resources = Path(resources) if resources is not None else resources_dir()
    for relative in (CLASSES, SNOMED_MAPPING, *SLICER_TERMINOLOGIES, *NEIGHBOR_SOURCES):
        if not (resources / relative).is_file():
            raise VoilaError(f"missing {resources / relative}; is the VOILA checkout complete?")
    classes = read_classes(resources / CLASSES)
    terminology = read_terminology(resources / SNOMED_MAPPING)
    neighbors, neighbor_provenance = derive_neighbors(resources, classes, threshold_mm, max_neighbors)

    codes: dict[str, dict] = {}
    terminology_fallbacks = []
    for _, name in sorted(classes.items()):
        entry = terminology.get(name, {})
        if not entry.get("type"):
            terminology_fallbacks.append(name)
            entry = {key: None for key in TERMINOLOGY_KEYS}
            entry["category"] = dict(_ANATOMICAL_STRUCTURE)
        codes[name] = entry
    slicer_lists = [resources / relative for relative in SLICER_TERMINOLOGIES]
    colors, color_provenance = structure_colors(classes, codes, neighbors, slicer_lists)

    structures = [
        Structure(
            name=name,
            label=label,
            display_name=readable_name(name),
            synonyms=default_synonyms(name),
            terminology=codes[name],
            color=colors[name],
            neighbors=neighbors[name],
        )
        for label, name in sorted(classes.items())
    ]
    provenance = {
        "generated_by": "python -m voila.vocabulary_build",
        "upstream": UPSTREAM,
        "classes": CLASSES,
        "terminology": {
            "file": SNOMED_MAPPING,
            "fallbacks": terminology_fallbacks,
            "fallback_rule": "category Anatomical Structure (SCT 123037004), no type code",
        },
        "colors": {
            "context": TERMINOLOGY_CONTEXT,
            "slicer_upstream": SLICER_UPSTREAM,
            "slicer_lists": [
                {"file": relative, "sha256": hashlib.sha256((resources / relative).read_bytes()).hexdigest()}
                for relative in SLICER_TERMINOLOGIES
            ],
            **color_provenance,
        },
        "names": "display names and synonyms from voila.vocabulary.readable_name / default_synonyms",
        "neighbors": neighbor_provenance,
    }
    return Vocabulary(structures, provenance=provenance)


def terminology_context(vocabulary: Vocabulary) -> dict:
    """VOILA's category/type context for Slicer, in the format of Slicer's own lists.

    Every category, type and modifier of the vocabulary appears once, in label order of first use,
    modifiers under their type. The vocabulary colour is the ``recommendedDisplayRGBValue``: on the
    modifier where there is one, as Slicer's lists do for paired structures. ``3dSlicerLabel`` is
    the vocabulary name where one structure owns the entry. A category offers the anatomic region
    (``showAnatomy``) when its structures carry one. Structures without a type code are left out.
    """
    owners: dict[tuple[str, str, str], list[Structure]] = {}
    for structure in vocabulary:
        if structure.terminology.get("type"):
            owners.setdefault(context_entry(structure.terminology), []).append(structure)
    categories: dict[str, dict] = {}
    types: dict[tuple[str, str], dict] = {}
    for (category_key, type_key, modifier_key), structures in owners.items():
        if len({structure.color for structure in structures}) > 1:
            raise VoilaError(
                f"{', '.join(s.name for s in structures)} share one terminology entry but not one colour; "
                "regenerate the vocabulary with 'python -m voila.vocabulary_build'"
            )
        codes = structures[0].terminology
        if category_key not in categories:
            categories[category_key] = {**_context_code(codes["category"]), "showAnatomy": False, "Type": []}
        category = categories[category_key]
        category["showAnatomy"] = category["showAnatomy"] or any(
            s.terminology.get("anatomic_region") for s in structures
        )
        if (category_key, type_key) not in types:
            types[(category_key, type_key)] = _context_code(codes["type"])
            category["Type"].append(types[(category_key, type_key)])
        type_ = types[(category_key, type_key)]
        item = _context_code(codes["type_modifier"]) if modifier_key else type_
        item["recommendedDisplayRGBValue"] = list(structures[0].color)
        if len(structures) == 1:
            item["3dSlicerLabel"] = structures[0].name
        if modifier_key:
            type_.setdefault("Modifier", []).append(item)
    return {
        "SegmentationCategoryTypeContextName": TERMINOLOGY_CONTEXT_NAME,
        "@schema": TERMINOLOGY_CONTEXT_SCHEMA,
        "SegmentationCodes": {"Category": list(categories.values())},
    }


def _context_code(code: dict) -> dict:
    return {
        "CodeMeaning": code["meaning"],
        "CodingSchemeDesignator": code["scheme"],
        "CodeValue": code["code"],
    }


def vocabulary_json(vocabulary: Vocabulary) -> str:
    """The canonical text of a vocabulary file."""
    return json.dumps(vocabulary.to_dict(), indent=1, ensure_ascii=False) + "\n"


def terminology_context_json(context: dict) -> str:
    """The canonical text of a terminology context file (indented like Slicer's)."""
    return json.dumps(context, indent=2, ensure_ascii=False) + "\n"


def write_text(text: str, path: Path) -> None:
    """Write a generated file atomically (:func:`voila.data.io.atomic_path`)."""
    from voila.data.io import atomic_path

    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m voila.vocabulary_build", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, help="output JSON (default: Resources/" + VOCABULARY + ")")
    parser.add_argument(
        "--context-out",
        type=Path,
        help="terminology context (default: Resources/" + TERMINOLOGY_CONTEXT + ")",
    )
    parser.add_argument("--resources", type=Path, help="the Resources folder (default: the checkout's)")
    parser.add_argument("--threshold-mm", type=float, default=THRESHOLD_MM, help="neighbour distance (mm)")
    parser.add_argument(
        "--max-neighbors", type=int, default=MAX_NEIGHBORS, help="neighbours kept per structure"
    )
    args = parser.parse_args(argv)
    try:
        vocabulary = build_vocabulary(args.resources, args.threshold_mm, args.max_neighbors)
        resources = Path(args.resources) if args.resources else resources_dir()
        out = args.out or resources / VOCABULARY
        context_out = args.context_out or resources / TERMINOLOGY_CONTEXT
        write_text(vocabulary_json(vocabulary), out)
        write_text(terminology_context_json(terminology_context(vocabulary)), context_out)
    except VoilaError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    with_neighbors = sum(1 for structure in vocabulary if structure.neighbors)
    print(f"wrote {out}: {len(vocabulary)} structures, {with_neighbors} with measured neighbours")
    print(f"wrote {context_out}: Slicer terminology context '{TERMINOLOGY_CONTEXT_NAME}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
