"""The numbers of the comparison page, from the trial table of ``collect``: the leaderboard,
the Fg x Fc x Fe grid, main effects of each tokenizer part, the best tokenizer against each
other one with bootstrap intervals, and the compute each tokenizer used.

Aggregates never skip a missing value: one finished trial without a test score makes its
tokenizer's mean NaN ("missing" on the page), so a number on the page is always over every
finished trial it claims to cover.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

from tokbench.report.collect import FACTORS

# Tokenizer parts shown as main effects: the three encoders' choices and the constructor's steps.
EFFECT_FACTORS = ("fg", "fe", "fc", "order", "select", "combine")
BOARD_COLUMNS = [
    "tokenizer", "baseline", *FACTORS, "trials", "seeds", "test_mcc_mean", "test_mcc_sd",
    "test_accuracy_mean", "test_accuracy_sd", "val_mcc_mean", "val_mcc_sd", "gap",
    "stopped_early", "running", "failed",
]


def mean_all(values: pd.Series) -> float:
    """Mean that is NaN when any value is NaN (or there is none)."""
    return float(values.mean(skipna=False)) if len(values) else math.nan


def sd_all(values: pd.Series) -> float:
    """Sample standard deviation (ddof=1); NaN with a missing value or fewer than two."""
    return float(values.std(ddof=1, skipna=False)) if len(values) > 1 else math.nan


def sum_all(values: pd.Series) -> float:
    """Sum that is NaN when any value is NaN: a total never silently leaves a trial out."""
    return float(values.astype(float).sum(skipna=False))


def finished(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials that ended with a score: completed, or stopped early by ASHA."""
    return trials[trials["finished"].astype(bool)]


def leaderboard(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per tokenizer (and the baseline) over its finished trials: mean and sd over
    seeds of test MCC and test accuracy (the held-out tissue), of the best validation MCC
    (the split's validation cells), the gap val - test, and how many trials were stopped by ASHA,
    are still running or failed. Best test MCC first; missing means last."""
    done = finished(trials)
    if done.empty:
        return pd.DataFrame(columns=BOARD_COLUMNS)
    grouped = done.groupby("tokenizer", sort=False)
    board = grouped[["baseline", *FACTORS]].first()
    board["trials"] = grouped.size()
    board["seeds"] = grouped["seed"].nunique()
    for metric, name in (("test_mcc", "test_mcc"), ("test_accuracy", "test_accuracy"), ("val_mcc_best", "val_mcc")):
        board[f"{name}_mean"] = grouped[metric].agg(mean_all)
        board[f"{name}_sd"] = grouped[metric].agg(sd_all)
    board["gap"] = board["val_mcc_mean"] - board["test_mcc_mean"]
    states = trials.groupby("tokenizer")["end_state"]
    for column, state in (("stopped_early", "stopped_early"), ("running", "running"), ("failed", "failed")):
        board[column] = states.agg(lambda s, state=state: int((s == state).sum())).reindex(board.index).fillna(0).astype(int)
    board = board.reset_index().sort_values("test_mcc_mean", ascending=False, na_position="last", kind="stable")
    return board[BOARD_COLUMNS].reset_index(drop=True)


def best_tokenizer(board: pd.DataFrame) -> Optional[str]:
    """The tokenizer with the highest mean test MCC (the baseline only when it is all there
    is); None when no tokenizer has a complete score."""
    scored = board[board["test_mcc_mean"].notna()]
    if scored.empty:
        return None
    tokenizers = scored[~scored["baseline"].astype(bool)]
    pool = tokenizers if not tokenizers.empty else scored
    return str(pool.sort_values("test_mcc_mean", ascending=False, kind="stable")["tokenizer"].iloc[0])


def best_trial(trials: pd.DataFrame, tokenizer: Optional[str]) -> Optional[pd.Series]:
    """The finished trial of ``tokenizer`` with the highest test MCC (its confusion matrix
    is shown); None when there is none."""
    if tokenizer is None:
        return None
    rows = finished(trials)
    rows = rows[(rows["tokenizer"] == tokenizer) & rows["test_mcc"].notna()]
    if rows.empty:
        return None
    return rows.sort_values("test_mcc", ascending=False, kind="stable").iloc[0]


def _tokenizers_only(board: pd.DataFrame) -> pd.DataFrame:
    return board[~board["baseline"].astype(bool)]


def heatmap_table(board: pd.DataFrame) -> pd.DataFrame:
    """Mean test MCC per (Fe, Fg, Fc preset), averaged over the tokenizers sharing those three
    parts (several when combinations differ only in overrides). The baseline has no parts."""
    rows = _tokenizers_only(board)
    if rows.empty:
        return pd.DataFrame(columns=["fe", "fg", "fc", "test_mcc_mean", "tokenizers"])
    grouped = rows.groupby(["fe", "fg", "fc"], sort=True)["test_mcc_mean"]
    return grouped.agg(test_mcc_mean=mean_all, tokenizers="size").reset_index()


def main_effects(board: pd.DataFrame, factors: tuple[str, ...] = EFFECT_FACTORS) -> pd.DataFrame:
    """For every tokenizer part and each of its choices: the mean test MCC of the tokenizers
    using that choice, each tokenizer weighted equally (so averaged over the other parts as
    the sweep crossed them), their sd and count. Parts the sweep did not vary are kept: one
    level says so."""
    rows = _tokenizers_only(board)
    out = []
    for factor in factors:
        for level, group in rows.groupby(factor, sort=True):
            out.append({"factor": factor, "level": level, "test_mcc_mean": mean_all(group["test_mcc_mean"]),
                        "test_mcc_sd": sd_all(group["test_mcc_mean"]), "tokenizers": len(group)})
    return pd.DataFrame(out, columns=["factor", "level", "test_mcc_mean", "test_mcc_sd", "tokenizers"])


def bootstrap_mean_ci(values, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its percentile bootstrap interval at
    ``level`` from ``n_resamples`` resamples with replacement (numpy generator seeded with
    ``seed``, so the page is reproducible). NaN throughout when a value is missing or there
    is none."""
    values = np.asarray(values, dtype=float)
    if values.size == 0 or np.isnan(values).any():
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(values.mean()), float(low), float(high)


def bootstrap_diff_ci(first, second, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean(first) - mean(second), low, high)`` with both groups resampled independently:
    the unpaired comparison, for tokenizers that share no seed."""
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if first.size == 0 or second.size == 0 or np.isnan(first).any() or np.isnan(second).any():
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    diffs = (first[rng.integers(0, first.size, size=(n_resamples, first.size))].mean(axis=1)
             - second[rng.integers(0, second.size, size=(n_resamples, second.size))].mean(axis=1))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    return float(first.mean() - second.mean()), float(low), float(high)


def seed_scores(trials: pd.DataFrame, metric: str = "test_mcc") -> pd.Series:
    """``metric`` per (tokenizer, seed) over finished trials; several trials with one seed
    (random search, or one experiment holding several sweeps) are averaged first."""
    done = finished(trials)
    done = done[done["seed"].notna()]
    return done.groupby(["tokenizer", "seed"])[metric].agg(mean_all)


def pairwise_vs_best(trials: pd.DataFrame, best: Optional[str], *, metric: str = "test_mcc",
                     n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """``best`` minus every other tokenizer in ``metric``: the mean difference over the seeds
    both have (paired by seed) with a bootstrap interval of that mean; tokenizers sharing no
    seed with ``best`` get the unpaired difference of means instead. Positive = best ahead."""
    columns = ["best", "other", "paired", "n", "mean_diff", "ci_low", "ci_high", "level"]
    if best is None:
        return pd.DataFrame(columns=columns)
    scores = seed_scores(trials, metric)
    if best not in scores.index.get_level_values(0):
        return pd.DataFrame(columns=columns)
    reference = scores.loc[best]
    rows = []
    for other in scores.index.get_level_values(0).unique():
        if other == best:
            continue
        theirs = scores.loc[other]
        common = reference.index.intersection(theirs.index)
        if len(common):
            diff, low, high = bootstrap_mean_ci(reference[common].to_numpy() - theirs[common].to_numpy(),
                                                n_resamples, seed, level)
            n, paired = len(common), True
        else:
            diff, low, high = bootstrap_diff_ci(reference.to_numpy(), theirs.to_numpy(), n_resamples, seed, level)
            n, paired = min(len(reference), len(theirs)), False
        rows.append({"best": best, "other": other, "paired": paired, "n": n, "mean_diff": diff,
                     "ci_low": low, "ci_high": high, "level": level})
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("mean_diff", na_position="last", kind="stable").reset_index(drop=True)


def compute_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per tokenizer, over all its trials: epochs run, the epoch budget (max_epochs per
    trial), epochs ASHA saved (max_epochs - epochs run of each trial it stopped), training
    seconds (sum of epoch_seconds) and wall seconds (each run's start to end)."""
    columns = ["tokenizer", "baseline", "trials", "epochs_run", "epoch_budget", "epochs_saved_by_asha",
               "stopped_early", "train_seconds", "wall_seconds"]
    if trials.empty:
        return pd.DataFrame(columns=columns)
    frame = trials.assign(
        saved=np.where(trials["end_state"] == "stopped_early",
                       trials["max_epochs"].astype(float) - trials["epochs_run"].astype(float), 0.0),
        stopped=(trials["end_state"] == "stopped_early").astype(int),
    )
    grouped = frame.groupby("tokenizer", sort=False)
    table = pd.DataFrame({
        "baseline": grouped["baseline"].first(),
        "trials": grouped.size(),
        "epochs_run": grouped["epochs_run"].sum(),
        "epoch_budget": grouped["max_epochs"].agg(sum_all),
        "epochs_saved_by_asha": grouped["saved"].agg(sum_all),
        "stopped_early": grouped["stopped"].sum(),
        "train_seconds": grouped["train_seconds"].agg(sum_all),
        "wall_seconds": grouped["wall_seconds"].agg(sum_all),
    }).reset_index()
    return table[columns].sort_values("tokenizer", kind="stable").reset_index(drop=True)
