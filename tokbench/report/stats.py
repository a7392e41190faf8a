"""The numbers of every leaderboard (the console's at the end of ``tokbench sweep``, the
page's, and ``leaderboard.csv``), from one tidy table with a row per trial: the leaderboard,
the Fg x Fc x Fe grid, main effects of each tokenizer part, the best tokenizer against each
other one (bootstrap interval, paired t-test, seeds needed for power), and the compute each
tokenizer used.

Two adapters build the trial table: ``tokbench.report.collect`` from MLflow runs and
``tokbench.sweep.report`` from the sweep's state file; both feed ``leaderboard`` here, so
the console and the page cannot disagree.

Which trials count (the same rule everywhere, see ``counted``): a trial contributes its
scores when it finished (end state ``completed`` or ``stopped_early``) AND has a test MCC.
Failed, running and finished-but-unscored trials are counted in their own columns and never
contribute a partial score. Among counted trials, aggregates never skip a missing value: a
counted trial without a test accuracy makes its tokenizer's mean accuracy NaN ("missing" on
the page, empty in the CSV), never 0, and never a mean over fewer trials than it claims.

Intervals come from ``scipy.stats.bootstrap`` and are given only with at least
``MIN_REPLICATES`` seeds: below that a bootstrap interval is no more than the range of the
values, so the interval is left empty and ``interval_note`` says why.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from tokbench.report.collect import FACTORS, FINISHED_STATES

# Tokenizer parts shown as main effects: the three encoders' choices and the constructor's steps.
EFFECT_FACTORS = ("fg", "fe", "fc", "order", "select", "combine")
# Fewest seeds (replicates) for which an interval is shown.
MIN_REPLICATES = 3
NO_INTERVAL = f"n seeds < {MIN_REPLICATES}: no interval"
CI_LEVEL = 0.95
# scipy's default; the page stays reproducible because the generator is seeded.
N_RESAMPLES = 9999
# The power analysis: seeds a difference of the observed size needs for this power at this alpha.
POWER, ALPHA = 0.8, 0.05
# Where statsmodels' solver fails, whole seed counts up to this are tried one by one.
MAX_SEEDS_SCANNED = 1000
# The trial table both adapters build (more columns may follow).
TRIAL_TABLE_COLUMNS = ["tokenizer", "baseline", *FACTORS, "seed", "end_state", "finished", "epochs_run",
                       "test_mcc", "test_accuracy", "val_mcc_best", "degenerate"]
BOARD_COLUMNS = [
    "tokenizer", "baseline", *FACTORS, "trials", "seeds", "test_mcc_mean", "test_mcc_sd",
    "test_mcc_ci_low", "test_mcc_ci_high", "interval_note", "test_accuracy_mean", "test_accuracy_sd",
    "val_mcc_mean", "val_mcc_sd", "gap", "diff_vs_best", "p_vs_best", "n_vs_best", "seeds_for_power",
    "degenerate", "degenerate_unknown", "epochs_run", "stopped_early", "running", "failed", "unscored",
]
PAIRWISE_COLUMNS = ["best", "other", "paired", "n", "mean_diff", "ci_low", "ci_high", "level", "interval_note",
                    "test", "statistic", "p_value", "effect_size", "seeds_for_power"]
# Values of the `degenerate` tag/record field that mean "predicted more than one class".
NOT_DEGENERATE = "no"


def mean_all(values: pd.Series) -> float:
    """Mean that is NaN when any value is NaN (or there is none)."""
    return float(values.mean(skipna=False)) if len(values) else math.nan


def sd_all(values: pd.Series) -> float:
    """Sample standard deviation (ddof=1); NaN with a missing value or fewer than two."""
    return float(values.std(ddof=1, skipna=False)) if len(values) > 1 else math.nan


def sum_all(values: pd.Series) -> float:
    """Sum that is NaN when any value is NaN: a total never silently leaves a trial out."""
    return float(values.astype(float).sum(skipna=False))


def counted(trials: pd.DataFrame) -> pd.Series:
    """Which trials contribute scores to every leaderboard: finished (``finished`` true, which
    the adapters set for end state ``completed`` or ``stopped_early``) and with a test MCC."""
    if trials.empty:
        return pd.Series(False, index=trials.index, dtype=bool)
    ended = trials["end_state"].isin(FINISHED_STATES) & trials["finished"].astype(bool)
    return ended & pd.to_numeric(trials["test_mcc"], errors="coerce").notna()


def finished(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials that contribute scores (see ``counted``)."""
    return trials[counted(trials)]


def _degenerate_counts(values: pd.Series) -> tuple[int, int]:
    """``(degenerate, unknown)``: trials flagged as predicting one class somewhere, and trials
    recorded without the flag (older runs); "no" counts in neither."""
    present = values.notna() & (values.astype(str) != "")
    return int((present & (values.astype(str) != NOT_DEGENERATE)).sum()), int((~present).sum())


def leaderboard(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per tokenizer (and the baseline) that has at least one trial that ended
    (finished or failed), over its counted trials (``counted``: finished with a test score):
    mean and sd (ddof=1) of test MCC and test accuracy (the held-out tissue), of the best
    validation MCC, the gap val - test; the bootstrap interval of the mean test MCC over seeds
    (only with at least ``MIN_REPLICATES`` seeds, else empty with ``interval_note``); the
    difference to the best tokenizer with its paired t-test p-value, n and the seeds that
    difference needs for 80% power (``pairwise_vs_best``); how many counted trials predicted a
    single class (``degenerate``) or carry no such flag (``degenerate_unknown``); epochs run
    (all trials); and how many trials were stopped by ASHA, are still running, failed, or
    finished without a test score (``unscored``). Best test MCC first; missing means last.
    Scores are Matthews correlations and accuracies (fractions), unitless."""
    if trials.empty:
        return pd.DataFrame(columns=BOARD_COLUMNS)
    trials = trials.assign(counted=counted(trials))
    ended = trials[trials["end_state"] != "running"]["tokenizer"].unique()
    if not len(ended):
        return pd.DataFrame(columns=BOARD_COLUMNS)
    everything = trials[trials["tokenizer"].isin(ended)]
    done = everything[everything["counted"]]
    grouped_all = everything.groupby("tokenizer", sort=False)
    board = grouped_all[["baseline", *FACTORS]].first()
    grouped = done.groupby("tokenizer", sort=False)
    board["trials"] = grouped.size().reindex(board.index).fillna(0).astype(int)
    board["seeds"] = grouped["seed"].nunique().reindex(board.index).fillna(0).astype(int)
    for metric, name in (("test_mcc", "test_mcc"), ("test_accuracy", "test_accuracy"), ("val_mcc_best", "val_mcc")):
        values = done[metric].astype(float)
        board[f"{name}_mean"] = values.groupby(done["tokenizer"]).agg(mean_all).reindex(board.index)
        board[f"{name}_sd"] = values.groupby(done["tokenizer"]).agg(sd_all).reindex(board.index)
    board["gap"] = board["val_mcc_mean"] - board["test_mcc_mean"]
    per_seed = seed_scores(everything)
    for tokenizer in board.index:
        values = per_seed.loc[tokenizer].to_numpy() if tokenizer in per_seed.index.get_level_values(0) else np.array([])
        _, low, high = bootstrap_mean_ci(values)
        board.loc[tokenizer, ["test_mcc_ci_low", "test_mcc_ci_high"]] = low, high
        board.loc[tokenizer, "interval_note"] = "" if not math.isnan(low) else interval_note(values)
    degenerate = done.groupby("tokenizer", sort=False)["degenerate"].agg(_degenerate_counts)
    board["degenerate"] = [degenerate[t][0] if t in degenerate.index else 0 for t in board.index]
    board["degenerate_unknown"] = [degenerate[t][1] if t in degenerate.index else 0 for t in board.index]
    board["epochs_run"] = pd.to_numeric(grouped_all["epochs_run"].sum(min_count=1), errors="coerce").fillna(0).astype(int)
    states = grouped_all["end_state"]
    for column, state in (("stopped_early", "stopped_early"), ("running", "running"), ("failed", "failed")):
        board[column] = states.agg(lambda s, state=state: int((s == state).sum())).astype(int)
    unscored = everything["end_state"].isin(FINISHED_STATES) & everything["finished"].astype(bool) & ~everything["counted"]
    board["unscored"] = unscored.groupby(everything["tokenizer"]).sum().reindex(board.index).fillna(0).astype(int)
    board = board.reset_index().sort_values("test_mcc_mean", ascending=False, na_position="last", kind="stable")
    pairs = pairwise_vs_best(trials, best_tokenizer(board)).set_index("other")
    for column, source in (("diff_vs_best", "mean_diff"), ("p_vs_best", "p_value"), ("n_vs_best", "n"),
                           ("seeds_for_power", "seeds_for_power")):
        board[column] = board["tokenizer"].map(pairs[source]) if len(pairs) else math.nan
    board = board.astype({"n_vs_best": "Int64", "seeds_for_power": "Int64"})
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


def interval_note(*groups) -> str:
    """Why there is no interval: "" when every group has at least ``MIN_REPLICATES``
    values, else ``NO_INTERVAL``; a group with a missing value says "missing value"."""
    if any(np.isnan(np.asarray(g, dtype=float)).any() for g in groups):
        return "missing value: no interval"
    return "" if all(np.asarray(g).size >= MIN_REPLICATES for g in groups) else NO_INTERVAL


def _bootstrap(samples: tuple[np.ndarray, ...], statistic, n_resamples: int, seed: int, level: float) -> tuple[float, float]:
    """``scipy.stats.bootstrap`` (BCa, scipy's default) of ``statistic`` over ``samples``,
    resampled independently, with a generator seeded by ``seed``; returns (low, high)."""
    if all(np.ptp(sample) == 0 for sample in samples):
        # Every resample gives the same value; BCa is undefined there (scipy returns NaN).
        value = float(statistic(*samples, axis=-1))
        return value, value
    with warnings.catch_warnings():
        # Few replicates: scipy warns that BCa is approximate; the page says n beside it.
        warnings.simplefilter("ignore", category=scipy_stats.DegenerateDataWarning)
        result = scipy_stats.bootstrap(samples, statistic, n_resamples=n_resamples, confidence_level=level,
                                       vectorized=True, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _mean(values, axis=-1):
    return np.mean(values, axis=axis)


def _mean_difference(first, second, axis=-1):
    return np.mean(first, axis=axis) - np.mean(second, axis=axis)


def bootstrap_mean_ci(values, n_resamples: int = N_RESAMPLES, seed: int = 0,
                      level: float = CI_LEVEL) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its ``scipy.stats.bootstrap``
    interval (BCa) at ``level`` from ``n_resamples`` resamples (generator seeded with ``seed``,
    so the page is reproducible). The interval is NaN with fewer than ``MIN_REPLICATES``
    values; everything is NaN when a value is missing or there is none."""
    values = np.asarray(values, dtype=float)
    if values.size == 0 or np.isnan(values).any():
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if values.size < MIN_REPLICATES:
        return mean, math.nan, math.nan
    low, high = _bootstrap((values,), _mean, n_resamples, seed, level)
    return mean, low, high


def bootstrap_diff_ci(first, second, n_resamples: int = N_RESAMPLES, seed: int = 0,
                      level: float = CI_LEVEL) -> tuple[float, float, float]:
    """``(mean(first) - mean(second), low, high)`` with both groups resampled independently
    (the unpaired comparison, for tokenizers that share no seed); the interval is NaN unless
    both groups have at least ``MIN_REPLICATES`` values."""
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if first.size == 0 or second.size == 0 or np.isnan(first).any() or np.isnan(second).any():
        return math.nan, math.nan, math.nan
    diff = float(first.mean() - second.mean())
    if min(first.size, second.size) < MIN_REPLICATES:
        return diff, math.nan, math.nan
    low, high = _bootstrap((first, second), _mean_difference, n_resamples, seed, level)
    return diff, low, high


def seeds_for_power(effect_size: float, *, paired: bool = True, power: float = POWER, alpha: float = ALPHA) -> float:
    """How many seeds (pairs of seeds when ``paired``, else seeds per tokenizer) a two-sided
    t-test needs to detect a standardised difference of ``effect_size`` (Cohen's d, of the
    paired differences when ``paired``) with ``power`` at ``alpha``, from statsmodels'
    ``TTestPower`` / ``TTestIndPower``, rounded up; NaN when the difference is zero or
    undefined or beyond reach. At least 2 (a t-test needs two)."""
    from statsmodels.stats.power import TTestIndPower, TTestPower
    # Imported before the filter below: on import it sets its own "always" filter, which
    # would otherwise take precedence inside the block.
    from statsmodels.tools.sm_exceptions import ConvergenceWarning  # noqa: F401

    if effect_size is None or not np.isfinite(effect_size) or effect_size == 0:
        return math.nan
    analysis = TTestPower() if paired else TTestIndPower()
    effect = abs(float(effect_size))
    with warnings.catch_warnings():
        # statsmodels warns and returns NaN where its root finder or the noncentral t fails
        # (very large effects); the scan below answers those.
        warnings.simplefilter("ignore")
        nobs = float(np.asarray(analysis.solve_power(effect_size=effect, alpha=alpha, power=power,
                                                     alternative="two-sided")).item())
        if np.isfinite(nobs):
            return float(max(2, math.ceil(nobs - 1e-9)))
        counts = np.arange(2, MAX_SEEDS_SCANNED + 1)
        reached = np.flatnonzero(analysis.power(effect, counts, alpha, alternative="two-sided") >= power)
    return float(counts[reached[0]]) if len(reached) else math.nan


def _t_test(reference: np.ndarray, other: np.ndarray, paired: bool) -> tuple[str, float, float, float]:
    """``(test name, statistic, p-value, effect size)``: ``scipy.stats.ttest_rel`` over paired
    seeds (effect = mean / sd of the differences), else Welch's ``ttest_ind`` (effect = the
    difference of means over the pooled sd); NaN where a group has fewer than two values or
    no spread."""
    name = "paired t-test" if paired else "Welch t-test"
    if min(reference.size, other.size) < 2:
        return name, math.nan, math.nan, math.nan
    with warnings.catch_warnings():
        # Identical scores: scipy warns and returns NaN (or inf for a constant difference).
        warnings.simplefilter("ignore", category=RuntimeWarning)
        if paired:
            result = scipy_stats.ttest_rel(reference, other)
            diffs = reference - other
            spread = float(np.std(diffs, ddof=1))
            effect = float(np.mean(diffs)) / spread if spread > 0 else math.nan
        else:
            result = scipy_stats.ttest_ind(reference, other, equal_var=False)
            pooled = math.sqrt((np.var(reference, ddof=1) + np.var(other, ddof=1)) / 2)
            effect = float(reference.mean() - other.mean()) / pooled if pooled > 0 else math.nan
    return name, float(result.statistic), float(result.pvalue), effect


def seed_scores(trials: pd.DataFrame, metric: str = "test_mcc") -> pd.Series:
    """``metric`` per (tokenizer, seed) over counted trials (``counted``); several trials with
    one seed (random search, or one experiment holding several sweeps) are averaged first."""
    done = finished(trials)
    done = done[done["seed"].notna()]
    return done.groupby(["tokenizer", "seed"])[metric].agg(mean_all)


def pairwise_vs_best(trials: pd.DataFrame, best: Optional[str], *, metric: str = "test_mcc",
                     n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = CI_LEVEL) -> pd.DataFrame:
    """``best`` minus every other tokenizer in ``metric``, over counted trials: the mean
    difference over the seeds both have (paired by seed) with its bootstrap interval (only
    with at least ``MIN_REPLICATES`` pairs, else ``interval_note`` says why), a paired t-test
    (``scipy.stats.ttest_rel``: statistic, p-value, n = pairs) and the seeds a difference of
    the observed size needs for 80% power at alpha 0.05 (``seeds_for_power``). Tokenizers
    sharing no seed with ``best`` get the unpaired difference of means, Welch's t-test and the
    seeds per tokenizer instead (n = the smaller group). Positive = best ahead."""
    if best is None:
        return pd.DataFrame(columns=PAIRWISE_COLUMNS)
    scores = seed_scores(trials, metric)
    if best not in scores.index.get_level_values(0):
        return pd.DataFrame(columns=PAIRWISE_COLUMNS)
    reference = scores.loc[best]
    rows = []
    for other in scores.index.get_level_values(0).unique():
        if other == best:
            continue
        theirs = scores.loc[other]
        common = reference.index.intersection(theirs.index)
        if len(common):
            first, second = reference[common].to_numpy(float), theirs[common].to_numpy(float)
            diff, low, high = bootstrap_mean_ci(first - second, n_resamples, seed, level)
            n, paired, note = len(common), True, interval_note(first - second)
        else:
            first, second = reference.to_numpy(float), theirs.to_numpy(float)
            diff, low, high = bootstrap_diff_ci(first, second, n_resamples, seed, level)
            n, paired, note = min(len(first), len(second)), False, interval_note(first, second)
        test, statistic, p_value, effect = _t_test(first, second, paired)
        rows.append({"best": best, "other": other, "paired": paired, "n": n, "mean_diff": diff,
                     "ci_low": low, "ci_high": high, "level": level, "interval_note": note, "test": test,
                     "statistic": statistic, "p_value": p_value, "effect_size": effect,
                     "seeds_for_power": seeds_for_power(effect, paired=paired)})
    table = pd.DataFrame(rows, columns=PAIRWISE_COLUMNS).astype({"seeds_for_power": "Int64"})
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
