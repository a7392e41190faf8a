"""Train / val / test assignment: predefined, cross-tissue, or random stratified."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from tokbench.data.config import SplitConfig
from tokbench.data.prepared import SPLIT_CODES
from tokbench.errors import TokbenchError

log = logging.getLogger("tokbench.data")

SPLIT_KINDS = ("predefined", "cross_tissue", "random")
VAL_SOURCES = ("train", "test")


def stratified_pick(cells: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Pick about ``fraction`` of ``cells`` within each label (rounded), at least one cell
    of every label with two or more cells, and never a label's last cell. Sorted indices."""
    picked = []
    for label in np.unique(labels[cells]):
        members = cells[labels[cells] == label]
        if len(members) < 2 or fraction <= 0:
            continue
        n = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        picked.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)


def _values_in(column: pd.Series, wanted: list[str], key: str, where: str, role: str) -> np.ndarray:
    present = set(column.unique())
    unknown = [v for v in wanted if v not in present]
    if unknown:
        raise TokbenchError(
            f"{where}: split.{role} value(s) {unknown} not found in obs[{key!r}]; "
            f"values present: {sorted(present)}"
        )
    return column.isin(wanted).to_numpy()


def assign_splits(obs: pd.DataFrame, labels: np.ndarray, cfg: SplitConfig, where: str) -> tuple[np.ndarray, dict]:
    """Return the split code of every cell (0 train, 1 val, 2 test, -1 unused) and a report.

    ``labels`` are the cells' class names (used for stratification). ``where`` names the
    file in error messages. Raises :class:`TokbenchError` for a missing column, unknown
    split values, overlapping train/test values, or a split without cells.
    """
    if cfg.kind not in SPLIT_KINDS:
        raise TokbenchError(f"split.kind: {cfg.kind!r} is not one of {', '.join(SPLIT_KINDS)}")
    # A cross_tissue split without explicit validation tissues carves validation from val_from.
    carved = cfg.kind == "cross_tissue" and not cfg.val
    if cfg.val_from not in VAL_SOURCES:
        raise TokbenchError(
            f"split.val_from: {cfg.val_from!r} is not one of {', '.join(VAL_SOURCES)} (the tissues validation "
            "cells are carved from: the training ones, or the held-out ones)"
        )
    if cfg.val_from != "train" and not carved:
        raise TokbenchError(
            f"split.val_from={cfg.val_from} applies to a cross_tissue split without split.val "
            f"(got split.kind={cfg.kind}, split.val={list(cfg.val)}); drop one of them"
        )
    n = len(obs)
    rng = np.random.default_rng(cfg.seed)
    split = np.full(n, -1, dtype=np.int8)
    if cfg.kind == "random":
        all_cells = np.arange(n)
        test = stratified_pick(all_cells, labels, cfg.test_fraction, rng)
        rest = np.setdiff1d(all_cells, test)
        val = stratified_pick(rest, labels, cfg.val_fraction / max(1e-12, 1 - cfg.test_fraction), rng)
        split[:] = SPLIT_CODES["train"]
        split[test], split[val] = SPLIT_CODES["test"], SPLIT_CODES["val"]
    else:
        if not cfg.key or cfg.key not in obs.columns:
            raise TokbenchError(
                f"{where}: split.key obs column {cfg.key!r} not found; obs columns: {', '.join(map(str, obs.columns))}"
            )
        column = obs[cfg.key].astype(str)
        if cfg.kind == "predefined":
            roles = {r: list(getattr(cfg, r)) or [r] for r in ("train", "val", "test")}
        else:
            roles = {"train": list(cfg.train), "val": list(cfg.val), "test": list(cfg.test)}
            for role in ("train", "test"):
                if not roles[role]:
                    raise TokbenchError(
                        f"split.{role}: a cross_tissue split needs the obs[{cfg.key!r}] values to "
                        f"{role} on; values present: {sorted(column.unique())}"
                    )
        overlap = set(roles["train"]) & set(roles["test"])
        if overlap:
            raise TokbenchError(f"split: value(s) {sorted(overlap)} are listed for both train and test")
        for role, values in roles.items():
            if values:
                split[_values_in(column, values, cfg.key, where, role)] = SPLIT_CODES[role]
        if carved:
            # By default validation is carved from the training tissues, so the held-out
            # tissue is never seen, not even for early stopping; val_from=test carves it from
            # the held-out tissues instead (model selection on the target tissue).
            pool = np.flatnonzero(split == SPLIT_CODES[cfg.val_from])
            val = stratified_pick(pool, labels, cfg.val_fraction, rng)
            split[val] = SPLIT_CODES["val"]
    for role, code in SPLIT_CODES.items():
        if not (split == code).any():
            raise TokbenchError(f"{where}: split {role!r} has no cells (split.kind={cfg.kind}); check split.{role}")
    train_labels = set(labels[split == SPLIT_CODES["train"]])
    unseen = sorted(set(labels[split == SPLIT_CODES["test"]]) - train_labels)
    if unseen:
        log.warning(
            "%s: test labels never seen in training: %s (%d test cells); they stay in the test set "
            "and can only be misclassified", where, unseen, int(np.isin(labels[split == SPLIT_CODES['test']], unseen).sum())
        )
    report = {
        "kind": cfg.kind,
        "val_from": cfg.val_from if carved else None,
        "cells": {role: int((split == code).sum()) for role, code in SPLIT_CODES.items()},
        "unused_cells": int((split < 0).sum()),
        "test_labels_unseen_in_train": unseen,
    }
    return split, report
