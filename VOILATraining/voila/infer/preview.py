"""A PNG a person wants to look at: three planes through the found structures, CT with coloured
segments on top, the heatmap (review map or CAS complexity) below. Radiological convention (patient's right on the
left of the image), labelled.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from voila.data.geometry import voxel_spacing

SOFT_TISSUE_WINDOW = (-160.0, 240.0)


def to_ras_axes(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip ``array`` so its axes run towards R, A, S; returns (array, voxel sizes)."""
    orientation = nib.orientations.io_orientation(affine)
    reoriented = nib.orientations.apply_orientation(array, orientation)
    spacing = voxel_spacing(affine)[orientation[:, 0].astype(int)]
    return reoriented, spacing


def _planes(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial (x, y), coronal (x, z), sagittal (y, z) slices, transposed for imshow(origin=lower)."""
    x, y, z = centre
    return [volume[:, :, z].T, volume[:, y, :].T, volume[x, :, :].T]


def write_preview(
    path: str | os.PathLike, ct: np.ndarray, affine: np.ndarray, result, title: str = "", atomic: bool = True
) -> None:
    """Write the preview PNG (atomically unless ``atomic`` is False: ``path`` is then already a
    temporary file of an :class:`voila.outputs.OutputSet`). ``result``: a :class:`SegmentationResult`."""
    import contextlib

    from voila.data.io import atomic_path

    ct_ras, spacing = to_ras_axes(np.asarray(ct, dtype=np.float32), affine)
    labels_ras, _ = to_ras_axes(result.labelmap, affine)
    heat_ras = to_ras_axes(result.heatmap, affine)[0] if result.heatmap is not None else None
    found = [p for p in result.prompts if p.found]
    mask = np.isin(labels_ras, [p.label for p in found])
    centre = np.argwhere(mask).mean(axis=0) if mask.any() else np.asarray(ct_ras.shape) / 2
    centre = [int(round(c)) for c in centre]

    colours = np.zeros((max([p.label for p in result.prompts], default=0) + 1, 4))
    for p in found:
        colours[p.label] = [*(np.asarray(p.color) / 255.0), 0.5]
    label_cmap = ListedColormap(colours)
    aspects = [spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1]]
    names = ["axial", "coronal", "sagittal"]
    side_labels = [("R", "L"), ("R", "L"), ("P", "A")]

    rows = 2 if heat_ras is not None else 1
    review = getattr(result, "heatmap_kind", None) != "complexity"
    heat_title = "review map" if review else "CAS complexity"
    figure, axes = plt.subplots(rows, 3, figsize=(15, 5.4 * rows), facecolor="black", squeeze=False)
    ct_planes = _planes(ct_ras, centre)
    overlays = [_planes(labels_ras, centre)]
    if heat_ras is not None:
        overlays.append(_planes(heat_ras, centre))
    heat_image = None
    for row in range(rows):
        for column in range(3):
            ax = axes[row][column]
            ax.imshow(
                ct_planes[column],
                cmap="gray",
                origin="lower",
                aspect=aspects[column],
                vmin=SOFT_TISSUE_WINDOW[0],
                vmax=SOFT_TISSUE_WINDOW[1],
                interpolation="bilinear",
            )
            overlay = overlays[row][column]
            if row == 0:
                ax.imshow(
                    overlay,
                    cmap=label_cmap,
                    origin="lower",
                    aspect=aspects[column],
                    vmin=0,
                    vmax=len(colours) - 1,
                    interpolation="nearest",
                )
            else:
                heat_image = ax.imshow(
                    np.ma.masked_less(overlay, 0.02),
                    cmap="inferno",
                    origin="lower",
                    aspect=aspects[column],
                    vmin=0,
                    vmax=1,
                    alpha=0.6,
                )
            if column < 2:
                ax.invert_xaxis()  # radiological convention: patient's right on the image's left
            left, right = side_labels[column]
            ax.text(0.02, 0.5, left, color="yellow", transform=ax.transAxes, fontsize=13, va="center")
            ax.text(0.96, 0.5, right, color="yellow", transform=ax.transAxes, fontsize=13, va="center")
            what = "segments" if row == 0 else heat_title
            ax.set_title(f"{names[column]} — {what}", color="white", fontsize=12)
            ax.axis("off")
    handles = [Patch(color=np.asarray(p.color) / 255.0, label=_legend_label(p)) for p in found]
    missing = [p.prompt for p in result.prompts if not p.found]
    if handles:
        figure.legend(
            handles=handles,
            loc="lower center",
            ncol=min(len(handles), 3),
            frameon=False,
            labelcolor="white",
            fontsize=11,
        )
    if heat_image is not None:
        bar = figure.colorbar(heat_image, ax=axes[1].tolist(), fraction=0.02, pad=0.01)
        bar.set_label(
            "share of such voxels wrong on unseen patients" if review else "CAS complexity (1 = hard)",
            color="white",
        )
        bar.ax.yaxis.set_tick_params(color="white", labelcolor="white")
    heading = title or "VOILA segmentation"
    if missing:
        heading += "   (not found: " + ", ".join(missing) + ")"
    figure.suptitle(heading, color="white", fontsize=14)
    with atomic_path(path) if atomic else contextlib.nullcontext(path) as temporary:
        figure.savefig(temporary, dpi=90, facecolor="black", format="png")
    plt.close(figure)


def _legend_label(p) -> str:
    """``liver: 1520 ml, pred. Dice 0.91`` and ``CHECK`` for a flagged structure."""
    text = f"{p.display_name}: {p.volume_ml:.0f} ml"
    if p.predicted_dice is not None:
        text += f", pred. Dice {p.predicted_dice:.2f}"
    return text + ("  CHECK" if p.check else "")
