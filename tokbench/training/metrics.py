"""Annotation metrics (torchmetrics) and the confusion-matrix report files."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)

from tokbench.fileio import write_atomic


class AnnotationMetrics:
    """Accumulates predictions of one split and computes the annotation metrics.

    ``accuracy`` is micro-averaged (fraction of cells right); ``macro_f1`` averages F1 over
    classes that occur in the targets or the predictions (absent classes are ignored, which
    matters for a cross-tissue test split lacking some types); ``mcc`` is the multiclass
    Matthews correlation; ``confusion_matrix`` counts cells, rows = true class, columns =
    predicted class, in class-id order; ``per_class_accuracy`` is its diagonal over its row
    sums (recall; NaN for classes with no cell in the split); ``predicted_classes`` and
    ``true_classes`` count the distinct classes predicted and present, so a model that
    answers one class for every cell can be told apart from one that learned.
    """

    def __init__(self, n_classes: int, device: torch.device | str = "cpu"):
        self.n_classes = n_classes
        # validate_args=False: the checks read values back from the device on every update.
        kw = dict(num_classes=n_classes, validate_args=False)
        self.accuracy = MulticlassAccuracy(average="micro", **kw).to(device)
        self.macro_f1 = MulticlassF1Score(average="macro", **kw).to(device)
        self.mcc = MulticlassMatthewsCorrCoef(**kw).to(device)
        self.confusion = MulticlassConfusionMatrix(**kw).to(device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.n_cells = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: ``logits`` float (B, n_classes), ``target`` int64 (B,) class ids."""
        logits = logits.float()
        self.loss_sum += torch.nn.functional.cross_entropy(logits, target, reduction="sum").double()
        self.n_cells += len(target)
        preds = logits.argmax(dim=-1)
        for metric in (self.accuracy, self.macro_f1, self.mcc, self.confusion):
            metric.update(preds, target)

    def compute(self) -> dict:
        """``accuracy``, ``macro_f1``, ``mcc``, ``loss`` (mean cross-entropy, nats) as floats;
        ``confusion_matrix`` (int64 numpy, n x n); ``per_class_accuracy`` (float64 numpy, n);
        ``n_cells``; ``predicted_classes`` and ``true_classes`` (ints: distinct classes among
        the predictions and among the targets)."""
        confusion = self.confusion.compute().cpu().numpy().astype(np.int64)
        support = confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(support > 0, np.diag(confusion) / support, np.nan)
        return {
            "accuracy": float(self.accuracy.compute()),
            "macro_f1": float(self.macro_f1.compute()),
            "mcc": float(self.mcc.compute()),
            "loss": float(self.loss_sum) / max(self.n_cells, 1),
            "confusion_matrix": confusion,
            "per_class_accuracy": per_class,
            "n_cells": self.n_cells,
            "predicted_classes": int((confusion.sum(axis=0) > 0).sum()),
            "true_classes": int((support > 0).sum()),
        }


DEGENERATE_SPLITS = ("val", "test")


def degenerate_splits(metrics: Mapping) -> list[str]:
    """The splits on which the model predicted a single class for every cell although the
    split holds cells of more than one class: ``[]``, ``["val"]``, ``["test"]`` or both.

    ``metrics`` is one flat mapping such as an epoch result merged with the test result
    (``{**history[best_epoch - 1], **test_result}``, or a sweep trial's result at its best
    epoch): ``val_predicted_classes`` / ``val_true_classes`` are read for ``"val"`` and
    ``test_predicted_classes`` / ``test_true_classes`` for ``"test"``. A split whose
    predicted count is missing is not judged; a missing true count falls back to the row
    sums of ``<split>_confusion_matrix`` and, without one, counts as several classes.
    """
    flagged = []
    for split in DEGENERATE_SPLITS:
        predicted = metrics.get(f"{split}_predicted_classes")
        if predicted is None:
            continue
        true = metrics.get(f"{split}_true_classes")
        if true is None:
            confusion = metrics.get(f"{split}_confusion_matrix")
            true = int((np.asarray(confusion).sum(axis=1) > 0).sum()) if confusion is not None else 2
        if int(predicted) <= 1 and int(true) > 1:
            flagged.append(split)
    return flagged


def predicted_class_names(confusion: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """Names of the classes that received at least one prediction (columns with cells)."""
    columns = np.asarray(confusion).sum(axis=0)
    return [name for name, n in zip(class_names, columns) if n > 0]


def draw_confusion_matrix(ax, confusion: np.ndarray, class_names: Sequence[str], *, normalize: bool = True):
    """Draw a confusion matrix on the matplotlib ``ax``, class names on both axes, with a
    colour bar beside it; return the image.

    ``confusion`` counts cells, rows = true class, columns = predicted class, in the order of
    ``class_names``. With ``normalize`` each row is divided by its cell count (rows without
    cells stay blank) and the colour scale runs 0..1 (fraction of the true class); otherwise
    the colour is the cell count. The counts are printed in the squares when there are at
    most 25 classes (beyond that they no longer fit). The one drawing of a confusion matrix:
    the run artifact (:func:`plot_confusion_matrix`) and the report page both use it.
    """
    confusion = np.asarray(confusion)
    n = len(class_names)
    shown = confusion.astype(np.float64)
    if normalize:
        with np.errstate(invalid="ignore", divide="ignore"):
            shown = shown / shown.sum(axis=1, keepdims=True)
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                       label="fraction of true class" if normalize else "cells")
    ax.set_xticks(range(n), labels=list(class_names), rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels=list(class_names), fontsize=8)
    ax.set_xlabel("predicted cell type")
    ax.set_ylabel("true cell type")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    dark = normalize and shown[i, j] > 0.5
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    return image


def plot_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], path: str | Path,
                          normalize: bool = True, title: str = "") -> Path:
    """Render a confusion matrix (:func:`draw_confusion_matrix`) to the PNG ``path``,
    written atomically; return ``path``.

    The figure grows with the number of classes (0.45 inch each, at least 4 inches).
    Uses the Agg canvas directly, so no GUI backend and no pyplot global state are touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    side = max(4.0, 0.45 * len(class_names) + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw_confusion_matrix(ax, confusion, class_names, normalize=normalize)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    write_atomic(path, buffer.getvalue())
    return path


def write_confusion_report(result: dict, out_dir: str | Path, prefix: str = "test") -> dict[str, Path]:
    """Write ``<prefix>_confusion_matrix.csv``, ``<prefix>_per_class.csv`` and
    ``<prefix>_confusion_matrix.png`` into ``out_dir`` from a ``test()`` result.

    ``result`` needs ``class_names`` and ``<prefix>_confusion_matrix``. The per-class CSV has
    one row per class: name, cells (support), correctly annotated cells, accuracy (empty
    where the class has no cell). Returns the written paths by kind.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(result["class_names"])
    confusion = np.asarray(result[f"{prefix}_confusion_matrix"])

    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["true \\ predicted", *names])
    for name, row in zip(names, confusion):
        writer.writerow([name, *map(int, row)])
    matrix_csv = out_dir / f"{prefix}_confusion_matrix.csv"
    write_atomic(matrix_csv, table.getvalue())

    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["cell_type", "cells", "correct", "accuracy"])
    for i, name in enumerate(names):
        support, correct = int(confusion[i].sum()), int(confusion[i, i])
        writer.writerow([name, support, correct, f"{correct / support:.6f}" if support else ""])
    per_class_csv = out_dir / f"{prefix}_per_class.csv"
    write_atomic(per_class_csv, table.getvalue())

    png = plot_confusion_matrix(confusion, names, out_dir / f"{prefix}_confusion_matrix.png",
                                title=f"{prefix} (rows: true, normalised)")
    return {"confusion_csv": matrix_csv, "per_class_csv": per_class_csv, "confusion_png": png}
