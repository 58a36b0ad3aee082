"""Training data: several datasets, one class list, partial labels, cached preprocessing, patches.

Each dataset is discovered by :func:`voila.data.layouts.discover`; its label names are mapped to
the vocabulary (synonyms included) or kept as free-text classes. The union of all names is the
model's class list (background first). A case annotates only the structures its dataset labels
(or, in the TotalSegmentator layout, the masks present): the ``annotated (N,)`` mask goes to the
losses, so a structure a dataset does not label is never taught as background.

The deterministic preprocessing (the same MONAI transforms inference uses) runs once per case and
is cached in memory or on disk; every training item then applies only the random part. The random
part is re-seeded from ``(seed, epoch, item)`` for every item, so an item's augmentation does not
depend on which process or worker draws it, nor on where a resumed run starts.

Example::

    data = TrainingData.prepare(["/data/TotalSegmentator"], PreprocessingConfig(), vocabulary)
    data.class_names          # ["background", "adrenal_gland_left", ...]
    patches = PatchDataset(data, *patch_transforms(...))
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, RandCropByPosNegLabeld, Randomizable

from voila.data.geometry import same_grid
from voila.data.io import read_image
from voila.data.layouts import IGNORE_LABEL, Case, Dataset, discover, load_case_label
from voila.data.preprocess import PreprocessingConfig, deterministic_transforms
from voila.data.transforms import training_transforms
from voila.errors import ConfigError, DatasetError
from voila.vocabulary import BACKGROUND, DEFAULT_TEMPLATE, Vocabulary, class_key, class_name, class_sentence

LOG = logging.getLogger("voila.train")


@dataclass
class PreparedCase:
    """One case on the model grid. ``image`` float32 ``(1, D, H, W)`` and ``label`` uint8/int16
    ``(1, D, H, W)`` (global class indices) are held in memory, or read from ``cache_file``."""

    case_id: str
    dataset: str
    split: str
    annotated: torch.Tensor  # (N,) bool, background True
    image: MetaTensor | None = None
    label: MetaTensor | None = None
    cache_file: Path | None = None

    def replace_label(self, label: torch.Tensor) -> None:
        """Put a new label volume ``(1, D, H, W)`` (same grid) in place of the prepared one."""
        image, old = self.volumes()
        new = MetaTensor(label.to(old.dtype).contiguous(), affine=old.affine)
        if self.cache_file is None:
            self.label = new
            return
        with np.load(self.cache_file, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
        arrays["label"] = new.as_tensor().numpy()
        np.savez(self.cache_file, **arrays)

    def volumes(self) -> tuple[MetaTensor, MetaTensor]:
        if self.image is not None and self.label is not None:
            return self.image, self.label
        assert self.cache_file is not None
        with np.load(self.cache_file, allow_pickle=False) as stored:
            affine = torch.from_numpy(stored["affine"])
            image = MetaTensor(torch.from_numpy(stored["image"]), affine=affine)
            label = MetaTensor(torch.from_numpy(stored["label"]), affine=affine)
        return image, label


@dataclass
class TrainingData:
    """All prepared cases, the class list and what was skipped."""

    class_names: list[str]
    class_texts: list[str]  # prompt sentence per foreground class (class_names[1:])
    cases: list[PreparedCase]
    train_indices: list[int]
    val_indices: list[int]
    datasets: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (case, reason)
    validating_on_training_cases: bool = False

    @property
    def ignore_index(self) -> int:
        """The label value of voxels outside a case's annotated region (no loss, not even background)."""
        return len(self.class_names)

    @classmethod
    def prepare(
        cls,
        paths: Sequence[str | Path],
        preprocessing: PreprocessingConfig,
        vocabulary: Vocabulary,
        val_fraction: float = 0.1,
        seed: int = 0,
        cache: str = "memory",
        cache_dir: Path | None = None,
        need_validation_cases: bool = True,
        template: str = DEFAULT_TEMPLATE,
        base_classes: Sequence[str] = (),
        structures: Sequence[str] | None = None,
        annotated_region: str = "file",
    ) -> TrainingData:
        """Discover, map labels, read and preprocess every case; unreadable cases are skipped.

        ``base_classes``: classes the model has already (fine-tuning), first and in their order,
        whether or not a dataset labels them. ``structures``: learn only these of the datasets'
        labels (the others are then not annotated). ``annotated_region``: ``file`` (a case's
        annotated-region mask where it has one) or ``slices`` (also: only the slices holding a
        label are annotated); voxels outside it carry :attr:`ignore_index` and no loss.
        """
        datasets = [discover(path) for path in paths]
        wanted = None if not structures else {class_key(name, vocabulary): name for name in structures}
        class_names = _union_class_names(datasets, vocabulary, base_classes, wanted)
        index_of = {class_key(name, vocabulary): i for i, name in enumerate(class_names)}
        ignore_index = len(class_names)
        splits = [_assign_splits(dataset, val_fraction, seed) for dataset in datasets]
        transforms = deterministic_transforms(preprocessing, label_keys=("label",))
        label_dtype = torch.uint8 if len(class_names) < 256 else torch.int16  # + the ignore value
        cache_key = _cache_key(preprocessing, class_names)
        cases: list[PreparedCase] = []
        skipped: list[tuple[str, str]] = []
        summaries = []
        for dataset, split_of in zip(datasets, splits):
            lookup = np.array(
                [
                    ignore_index if name == IGNORE_LABEL else index_of.get(class_key(name, vocabulary), 0)
                    for name in dataset.class_names
                ]
            )
            lookup[0] = 0
            kept = 0
            for case in dataset.cases:
                split = split_of[case.case_id]
                if split == "test" or (split == "val" and not need_validation_cases):
                    continue
                label_description = f"{dataset.name}/{case.case_id}"
                try:
                    prepared = _prepare_case(
                        case,
                        dataset,
                        split,
                        lookup,
                        class_names,
                        index_of,
                        vocabulary,
                        transforms,
                        label_dtype,
                        annotated_region,
                    )
                except Exception as error:  # a corrupt case must not end a long run
                    reason = " ".join(str(error).split())[:300] or type(error).__name__
                    LOG.warning("skipping case %s: %s", label_description, reason)
                    skipped.append((label_description, reason))
                    continue
                if cache == "disk":
                    prepared = _to_disk(prepared, cache_dir, cache_key)
                cases.append(prepared)
                kept += 1
            summaries.append(
                {
                    "name": dataset.name,
                    "layout": dataset.layout,
                    "root": str(dataset.root),
                    "classes": len(dataset.class_names) - 1,
                    "cases_used": kept,
                }
            )
        if not cases:
            raise DatasetError(
                "no readable case in the training data"
                + (f" ({len(skipped)} skipped, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else "")
                + "; check the dataset paths and files"
            )
        train = [i for i, c in enumerate(cases) if c.split == "train"]
        val = [i for i, c in enumerate(cases) if c.split == "val"]
        if not train:
            raise ConfigError(
                "the datasets hold no training case (all are val/test); check the splits in meta.csv"
            )
        if not any(
            bool(c.label is None or ((c.label > 0) & (c.label < len(class_names))).any())
            for c in (cases[i] for i in train)
        ):
            raise DatasetError("the training cases contain no labelled voxel; the masks are all empty")
        on_training = need_validation_cases and not val
        if on_training:
            val = list(train)
        data = cls(
            class_names=class_names,
            class_texts=[class_sentence(name, vocabulary, template) for name in class_names[1:]],
            cases=cases,
            train_indices=train,
            val_indices=val,
            datasets=summaries,
            skipped=skipped,
            validating_on_training_cases=on_training,
        )
        data.check_label_overlap()
        return data

    def check_label_overlap(self) -> None:
        """Validation needs structures that training teaches; several datasets should share one."""
        trained = torch.zeros(len(self.class_names), dtype=torch.bool)
        for i in self.train_indices:
            trained |= self.cases[i].annotated
        if self.val_indices and not self.validating_on_training_cases:
            validated = torch.zeros_like(trained)
            for i in self.val_indices:
                validated |= self.cases[i].annotated
            if not bool((trained[1:] & validated[1:]).any()):
                raise ConfigError(
                    "the validation cases share no labelled structure with the training cases; "
                    "fix the splits (meta.csv / datalist) so both label the same structures"
                )
        if len(self.datasets) > 1:
            by_dataset: dict[str, torch.Tensor] = {}
            for case in self.cases:
                by_dataset[case.dataset] = (
                    by_dataset.get(case.dataset, torch.zeros_like(trained)) | case.annotated
                )
            for name, annotated in by_dataset.items():
                others = torch.zeros_like(trained)
                for other, mask in by_dataset.items():
                    if other != name:
                        others |= mask
                if not bool((annotated[1:] & others[1:]).any()):
                    LOG.warning(
                        "dataset %s labels no structure that another dataset labels: it is trained with "
                        "partial labels (its unlabelled structures are masked, not background)",
                        name,
                    )


def patch_transforms(
    preprocessing: PreprocessingConfig,
    patch_size: Sequence[int],
    foreground_oversampling: float,
    augment: bool,
    mirror: bool = False,
) -> tuple[Compose, Compose]:
    """The random part of :func:`voila.data.transforms.training_transforms`, split in two.

    Returns ``(crop, augmentation)``: padding + foreground-oversampled crop, then the random
    rotations/zoom/intensity, and flips if ``mirror`` (empty when ``augment`` is False). The
    deterministic prefix, shared with inference, is applied once per case when the data is prepared.
    """
    full = training_transforms(preprocessing, patch_size, foreground_oversampling, mirror=mirror).transforms
    prefix = deterministic_transforms(preprocessing, label_keys=("label",)).transforms
    if [type(t) for t in full[: len(prefix)]] != [type(t) for t in prefix]:
        raise RuntimeError(
            "voila.data.transforms.training_transforms no longer starts with the deterministic transforms"
        )
    rest = list(full[len(prefix) :])
    crop_end = next(i for i, t in enumerate(rest) if isinstance(t, RandCropByPosNegLabeld)) + 1
    augmentation = [t for t in rest[crop_end:] if augment or not isinstance(t, Randomizable)]
    return Compose(rest[:crop_end]), Compose(augmentation)


def item_seed(seed: int, epoch: int, item: int) -> int:
    """The augmentation seed of one training item (independent of process, worker and resume)."""
    return int(np.random.SeedSequence([seed, epoch, item]).generate_state(1)[0])


class PatchDataset(torch.utils.data.Dataset):
    """Map-style dataset over keys ``(case_index, item_seed)`` → one random training patch.

    Returns ``image`` float32 ``(1, P, P, P)``, ``label`` int64 ``(P, P, P)`` (class indices) and
    ``annotated`` bool ``(N,)``.
    """

    def __init__(self, data: TrainingData, crop: Compose, augmentation: Compose) -> None:
        self.data = data
        self.crop = crop
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.data.cases)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        case_index, seed = int(key[0]), int(key[1])
        case = self.data.cases[case_index]
        image, label = case.volumes()
        self.crop.set_random_state(seed=seed)
        self.augmentation.set_random_state(seed=(seed + 1) % (2**32))
        patch = self.crop({"image": image, "label": label})
        patch = patch[0] if isinstance(patch, list) else patch
        # Cropped copies, so no random transform can ever touch the cached volume.
        sample = {
            "image": patch["image"].clone().float(),
            "label": patch["label"].clone().float(),
        }
        sample = self.augmentation(sample)
        image_patch = torch.as_tensor(sample["image"]).float().contiguous()
        label_patch = torch.as_tensor(sample["label"])[0].round().long().contiguous()
        return {"image": image_patch, "label": label_patch, "annotated": case.annotated.clone()}


def epoch_keys(
    train_indices: Sequence[int],
    epoch: int,
    seed: int,
    items_per_rank: int,
    world_size: int,
    rank: int,
) -> list[tuple[int, int]]:
    """This rank's keys for one epoch: shuffled passes over the training cases, rank-interleaved."""
    total = items_per_rank * world_size
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0])
    )
    passes = math.ceil(total / len(train_indices))
    order: list[int] = []
    for _ in range(passes):
        order += [train_indices[int(i)] for i in torch.randperm(len(train_indices), generator=generator)]
    return [(order[item], item_seed(seed, epoch, item)) for item in range(rank, total, world_size)]


def _union_class_names(
    datasets: Sequence[Dataset],
    vocabulary: Vocabulary,
    base_classes: Sequence[str] = (),
    wanted: dict[str, str] | None = None,
) -> list[str]:
    """Background and ``base_classes`` (in their order), then the vocabulary structures the
    datasets label (vocabulary order), then free-text classes; labels that differ only in
    spelling (``Tumor_Core``, ``tumor core``) are one class. ``wanted``: the class keys to learn
    (key -> the name as asked for); each must be a label of some dataset."""
    by_key: dict[str, str] = {}
    labelled: list[str] = []
    for dataset in datasets:
        for label_name in dataset.class_names[1:]:
            if label_name == IGNORE_LABEL:
                continue
            labelled.append(label_name)
            name = class_name(label_name, vocabulary)
            if wanted is None or class_key(name, vocabulary) in wanted:
                by_key.setdefault(class_key(name, vocabulary), name)
    missing = [asked for key, asked in (wanted or {}).items() if key not in by_key]
    if missing:
        shown = ", ".join(sorted(set(labelled))[:12]) + (" ..." if len(set(labelled)) > 12 else "")
        raise DatasetError(
            f"--structures {', '.join(repr(m) for m in missing)}: no dataset labels "
            f"{'it' if len(missing) == 1 else 'them'}; the datasets label: {shown}"
        )
    by_key.pop(BACKGROUND, None)
    base = [name for name in base_classes if name != BACKGROUND]
    for name in base:
        by_key.pop(class_key(name, vocabulary), None)
    names = set(by_key.values())
    known = [n for n in vocabulary.names if n in names]
    free = sorted(n for n in names if n not in vocabulary)
    if not known and not free and not base:
        raise DatasetError("the datasets name no structure besides background; nothing to train")
    return [BACKGROUND, *base, *known, *free]


def _assign_splits(dataset: Dataset, val_fraction: float, seed: int) -> dict[str, str]:
    """Dataset splits as given; without any validation case, hold out ``val_fraction`` of the
    training cases (at least one when there are five or more)."""
    splits = {case.case_id: case.split for case in dataset.cases}
    train = sorted(case_id for case_id, split in splits.items() if split == "train")
    if any(split == "val" for split in splits.values()) or val_fraction <= 0 or len(train) < 5:
        return splits
    count = max(1, int(round(len(train) * val_fraction)))
    generator = torch.Generator().manual_seed(seed)
    for i in torch.randperm(len(train), generator=generator)[:count]:
        splits[train[int(i)]] = "val"
    return splits


def _prepare_case(
    case: Case,
    dataset: Dataset,
    split: str,
    lookup: np.ndarray,
    class_names: list[str],
    index_of: dict[str, int],
    vocabulary: Vocabulary,
    transforms: Compose,
    label_dtype: torch.dtype,
    annotated_region: str = "file",
) -> PreparedCase:
    image, affine = read_image(case.image)
    labels, annotated_names = load_case_label(case, dataset.class_names)
    if labels.shape != image.shape:
        raise DatasetError(f"label shape {labels.shape} differs from image shape {image.shape}")
    if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
        raise DatasetError("the image contains NaN or infinite voxels")
    global_labels = lookup[labels.astype(np.int64)].astype(np.float32)
    ignore_index = len(class_names)
    region = _annotated_region(case, labels, affine, image.shape, annotated_region)
    if region is not None:
        global_labels[~region] = ignore_index
    annotated = torch.zeros(len(class_names), dtype=torch.bool)
    annotated[0] = True
    for name in annotated_names:
        index = index_of.get(class_key(name, vocabulary))
        if index is not None:
            annotated[index] = True
    affine_t = torch.from_numpy(np.asarray(affine, dtype=np.float64))
    output = transforms(
        {
            "image": MetaTensor(torch.from_numpy(image.astype(np.float32)), affine=affine_t),
            "label": MetaTensor(torch.from_numpy(global_labels), affine=affine_t.clone()),
        }
    )
    prepared_image = MetaTensor(
        output["image"].as_tensor().float().contiguous(), affine=output["image"].affine
    )
    prepared_label = MetaTensor(
        output["label"].as_tensor().round().to(label_dtype).contiguous(), affine=output["label"].affine
    )
    return PreparedCase(case.case_id, dataset.name, split, annotated, prepared_image, prepared_label)


def _annotated_region(
    case: Case, labels: np.ndarray, affine: np.ndarray, shape, mode: str
) -> np.ndarray | None:
    """Which voxels of a case were annotated (None: all of them): its region mask, and with
    ``mode="slices"`` only the axial slices (across the array axis nearest head-feet) holding a label."""
    region = None
    if case.region is not None:
        mask, mask_affine = read_image(case.region)
        if not same_grid(mask.shape, mask_affine, shape, affine):
            raise DatasetError(
                f"{case.region.name} is not on the grid of {case.image.name}; resample it onto the image"
            )
        region = mask != 0
    if mode == "slices":
        axis = int(np.argmax(np.abs(np.asarray(affine)[2, :3])))
        labelled = np.any(labels > 0, axis=tuple(a for a in range(3) if a != axis))
        slices = np.zeros(shape, dtype=bool)
        index = [slice(None)] * 3
        index[axis] = labelled
        slices[tuple(index)] = True
        region = slices if region is None else region & slices
    return region


def _cache_key(preprocessing: PreprocessingConfig, class_names: list[str]) -> str:
    text = json.dumps([preprocessing.to_dict(), class_names], sort_keys=True)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _to_disk(case: PreparedCase, cache_dir: Path | None, key: str) -> PreparedCase:
    """Store the preprocessed volumes as an ``.npz`` (no pickle) and drop them from memory."""
    from voila.data.io import atomic_path

    if cache_dir is None:
        raise ValueError("cache='disk' needs a cache_dir")
    cache_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{case.dataset}__{case.case_id}")
    path = cache_dir / f"{safe}__{key}.npz"
    assert case.image is not None and case.label is not None
    with atomic_path(path) as partial, open(partial, "wb") as handle:
        np.savez(
            handle,
            image=case.image.as_tensor().numpy(),
            label=case.label.as_tensor().numpy(),
            affine=np.asarray(case.image.affine, dtype=np.float64),
        )
    return PreparedCase(case.case_id, case.dataset, case.split, case.annotated, cache_file=path)
