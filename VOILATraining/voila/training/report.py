"""What a run shows: ``metrics.csv``, TensorBoard scalars, ``curves.png`` and ``validation.png``.

``validation.png`` is the paper's Fig. 4 view of one validation case: CT | reference label |
prediction | CAS complexity heatmap, on the axial slice with the most labelled voxels. Pictures
are drawn with matplotlib's Agg backend and written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from voila.data.io import atomic_path

BASE_COLUMNS = [
    "epoch",
    "step",
    "minutes",
    "lr",
    "loss",
    "ce",
    "f1",
    "cas_mse",
    "cas_kld",
    "cas_prior",
    "val_dice",
]


class MetricsTable:
    """``metrics.csv``: one row per epoch; per-structure validation Dice in ``dice_<class>`` columns."""

    def __init__(self, path: Path, class_names: Sequence[str]) -> None:
        self.path = path
        self.columns = BASE_COLUMNS + [f"dice_{name}" for name in class_names[1:]]
        self.rows: list[dict[str, Any]] = []

    def load(self, before_epoch: int) -> None:
        """Read existing rows of earlier epochs (a resumed run rewrites the ones it repeats)."""
        if not self.path.is_file():
            return
        with open(self.path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if int(row["epoch"]) < before_epoch:
                    self.rows.append({k: _number(v) for k, v in row.items() if k in self.columns})
        self.write()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow(
                {
                    k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                    for k, v in row.items()
                }
            )
        with atomic_path(self.path) as partial:
            partial.write_text(buffer.getvalue(), encoding="utf-8")


def _number(text: str) -> float | None:
    if text == "":
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def plot_curves(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Training loss and validation mean Dice against epochs, counted from 1 as the log and
    ``validation.png`` count them (``metrics.csv`` keeps the 0-based epoch index)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100)
    loss_axis, dice_axis = figure.subplots(1, 2)
    epochs = [row["epoch"] + 1 for row in rows]
    for key, style in (("loss", "-"), ("ce", "--"), ("f1", ":")):
        values = [row.get(key) for row in rows]
        if any(v is not None for v in values):
            loss_axis.plot(epochs, [np.nan if v is None else v for v in values], style, label=key)
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss")
    loss_axis.set_yscale("log")
    loss_axis.legend()
    loss_axis.grid(alpha=0.3)
    validated = [(row["epoch"] + 1, row["val_dice"]) for row in rows if row.get("val_dice") is not None]
    if validated:
        dice_axis.plot(*zip(*validated), "o-", color="tab:green")
        best = max(validated, key=lambda item: item[1])
        dice_axis.set_title(f"best mean Dice {best[1]:.3f} (epoch {best[0]})")
    dice_axis.set_xlabel("epoch")
    dice_axis.set_ylabel("validation mean Dice")
    dice_axis.set_ylim(0, 1)
    dice_axis.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, path)


def plot_validation(
    path: Path,
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    heatmap: np.ndarray | None,
    colors: np.ndarray,
    title: str,
) -> None:
    """CT | reference | prediction | complexity heatmap on one axial slice.

    Volumes are ``(D, H, W)`` model-grid arrays in RAS orientation (axis 2 is inferior→superior);
    ``colors`` ``(N, 3)`` in [0, 1] per class index. Shown in the radiological convention
    (patient's right on the left of the picture, anterior up).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    counts = (reference > 0).sum(axis=(0, 1))
    k = int(counts.argmax()) if counts.max() > 0 else reference.shape[2] // 2
    cmap = ListedColormap(np.vstack([[0, 0, 0], colors[1:]]) if len(colors) > 1 else [[0, 0, 0]])

    def axial(volume: np.ndarray) -> np.ndarray:
        return volume[:, :, k].T

    figure = Figure(figsize=(16, 4.6), dpi=100)
    axes = figure.subplots(1, 4)
    panels = [
        ("CT", axial(image), {"cmap": "gray"}),
        (
            "reference",
            axial(reference),
            {"cmap": cmap, "vmin": 0, "vmax": max(len(colors) - 1, 1), "interpolation": "nearest"},
        ),
        (
            "prediction",
            axial(prediction),
            {"cmap": cmap, "vmin": 0, "vmax": max(len(colors) - 1, 1), "interpolation": "nearest"},
        ),
    ]
    if heatmap is not None:
        panels.append(("CAS complexity (1 = hard)", axial(heatmap), {"cmap": "magma", "vmin": 0, "vmax": 1}))
    for axis, (name, data, options) in zip(axes, panels):
        shown = axis.imshow(data, origin="lower", **options)
        axis.invert_xaxis()
        axis.set_title(name)
        axis.set_xticks([])
        axis.set_yticks([])
        if name.startswith("CAS"):
            figure.colorbar(shown, ax=axis, fraction=0.046)
    for axis in axes[len(panels) :]:
        axis.axis("off")
    figure.suptitle(f"{title} — axial slice {k}")
    figure.tight_layout()
    _save(figure, path)


def _save(figure: Any, path: Path) -> None:
    with atomic_path(path) as partial:
        figure.savefig(partial, format="png")


class TensorBoardLog:
    """TensorBoard scalars under ``<run>/tensorboard``; a resumed run purges the steps it repeats."""

    def __init__(self, folder: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int, prefix: str) -> None:
        for key, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
