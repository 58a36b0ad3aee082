"""Build ``Resources/Vocabulary/voila_vocabulary.json`` from terminology files and reference masks.

    python -m voila.vocabulary_build [--out PATH] [--threshold-mm 9] [--max-neighbors 4]

Names come from the TotalSegmentator class list, codes and colours from its SNOMED-CT mapping,
readable names and synonyms from the rules in :mod:`voila.vocabulary`. Neighbour prompts
("Neighboring structures include ...", VOILA §3.1) are *measured*, not written by hand: two
structures are neighbours when some voxel of one lies within ``threshold_mm`` (distance between
voxel centres, in the volume's own spacing; face-touching masks are one voxel apart) of the other
in a reference labelmap. Each structure keeps the ``max_neighbors`` with the largest contact
volume (voxels of either mask within the threshold of the other), nearest first on ties. Structures
absent from every labelmap get no neighbours; the JSON lists them. The output is deterministic.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

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


def read_terminology(path: Path) -> dict[str, tuple[dict, tuple[int, int, int] | None]]:
    """``{name: (terminology, colour)}`` from the SNOMED mapping CSV; missing codes are ``None``."""
    entries: dict[str, tuple[dict, tuple[int, int, int] | None]] = {}
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
            components = [c.strip() for c in (row.get("DicomRGBColor") or "").split(",")]
            color = None
            if len(components) == 3 and all(c.isdigit() and int(c) <= 255 for c in components):
                color = (int(components[0]), int(components[1]), int(components[2]))
            entries[row["Structure"].strip()] = (terminology, color)
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


def build_vocabulary(
    resources: Path | None = None, threshold_mm: float = THRESHOLD_MM, max_neighbors: int = MAX_NEIGHBORS
) -> Vocabulary:
    """The vocabulary generated from ``Resources/`` (terminology files and sample labelmaps)."""
    resources = Path(resources) if resources is not None else resources_dir()
    for relative in (CLASSES, SNOMED_MAPPING, *NEIGHBOR_SOURCES):
        if not (resources / relative).is_file():
            raise VoilaError(f"missing {resources / relative}; is the VOILA checkout complete?")
    classes = read_classes(resources / CLASSES)
    terminology = read_terminology(resources / SNOMED_MAPPING)
    neighbors, neighbor_provenance = derive_neighbors(resources, classes, threshold_mm, max_neighbors)

    structures = []
    terminology_fallbacks = []
    color_fallbacks = []
    for label, name in sorted(classes.items()):
        codes, color = terminology.get(name, ({}, None))
        if not codes.get("type"):
            terminology_fallbacks.append(name)
            codes = {key: None for key in TERMINOLOGY_KEYS}
            codes["category"] = dict(_ANATOMICAL_STRUCTURE)
        if color is None:
            color_fallbacks.append(name)
            color = free_text_color(name)
        structures.append(
            Structure(
                name=name,
                label=label,
                display_name=readable_name(name),
                synonyms=default_synonyms(name),
                terminology=codes,
                color=color,
                neighbors=neighbors[name],
            )
        )
    provenance = {
        "generated_by": "python -m voila.vocabulary_build",
        "upstream": UPSTREAM,
        "classes": CLASSES,
        "terminology": {
            "file": SNOMED_MAPPING,
            "fallbacks": terminology_fallbacks,
            "fallback_rule": "category Anatomical Structure (SCT 123037004), no type code",
            "color_fallbacks": color_fallbacks,
            "color_fallback_rule": "hue from a hash of the name (voila.vocabulary.free_text_color)",
        },
        "names": "display names and synonyms from voila.vocabulary.readable_name / default_synonyms",
        "neighbors": neighbor_provenance,
    }
    return Vocabulary(structures, provenance=provenance)


def vocabulary_json(vocabulary: Vocabulary) -> str:
    """The canonical text of a vocabulary file."""
    return json.dumps(vocabulary.to_dict(), indent=1, ensure_ascii=False) + "\n"


def write_vocabulary(vocabulary: Vocabulary, path: Path) -> None:
    """Write the vocabulary JSON atomically (:func:`voila.data.io.atomic_path`)."""
    from voila.data.io import atomic_path

    with atomic_path(path) as partial:
        partial.write_text(vocabulary_json(vocabulary), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m voila.vocabulary_build", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, help="output JSON (default: Resources/" + VOCABULARY + ")")
    parser.add_argument("--resources", type=Path, help="the Resources folder (default: the checkout's)")
    parser.add_argument("--threshold-mm", type=float, default=THRESHOLD_MM, help="neighbour distance (mm)")
    parser.add_argument(
        "--max-neighbors", type=int, default=MAX_NEIGHBORS, help="neighbours kept per structure"
    )
    args = parser.parse_args(argv)
    try:
        vocabulary = build_vocabulary(args.resources, args.threshold_mm, args.max_neighbors)
        out = args.out or (Path(args.resources) if args.resources else resources_dir()) / VOCABULARY
        write_vocabulary(vocabulary, out)
    except VoilaError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    with_neighbors = sum(1 for structure in vocabulary if structure.neighbors)
    print(f"wrote {out}: {len(vocabulary)} structures, {with_neighbors} with measured neighbours")
    return 0


if __name__ == "__main__":
    sys.exit(main())
