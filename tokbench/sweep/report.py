"""The leaderboard printed at the end of a sweep and logged as its ``leaderboard.csv`` (the full
comparison page is ``tokbench report``).

This module only adapts the sweep's state file to the trial table of
``tokbench.report.stats``; the leaderboard itself is ``stats.leaderboard``, the one the page
uses, so the console, the CSV and the page show the same numbers for the same trials.
"""

from __future__ import annotations

import math

import pandas as pd

from tokbench.report import stats
from tokbench.report.collect import FACTORS, FINISHED_STATES
from tokbench.sweep.state import SweepState


def _number(value) -> float:
    """A score as a float; NaN when absent or not a number (missing, never 0)."""
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _best_val_mcc(record: dict) -> float:
    """The best validation MCC of a trial: the maximum over its logged epochs (what the page
    reads from MLflow's ``val_mcc`` history), else the last ``val_mcc_best`` reported."""
    epochs = [_number(h.get("val_mcc")) for h in record.get("history") or []]
    epochs = [v for v in epochs if not math.isnan(v)]
    return max(epochs) if epochs else _number(record.get("val_mcc_best"))


def trial_table(state: SweepState) -> pd.DataFrame:
    """One row per trial of the sweep state, in the columns of ``stats.TRIAL_TABLE_COLUMNS``
    (plus ``trial_id`` and ``seconds``): tokenizer label, parts, seed, end state, epochs run,
    the best-validation-weights test MCC and accuracy, the best validation MCC and the
    ``degenerate`` flag (None for trials recorded before it existed). ``finished`` is the same
    rule as the MLflow adapter's: end state ``completed`` or ``stopped_early``."""
    rows = []
    for trial_id, record in state.doc["trials"].items():
        test = record.get("test") or {}
        tags = record.get("tags") or {}
        end_state = record.get("end_state", "running")
        rows.append(
            {
                "trial_id": trial_id,
                "tokenizer": record.get("label") or tags.get("tokenizer") or "?",
                "baseline": tags.get("method") == "logreg" or tags.get("fg") == "-",
                **{part: tags.get(part, "") for part in FACTORS},
                "seed": record.get("seed"),
                "end_state": end_state,
                "finished": end_state in FINISHED_STATES,
                "epochs_run": int(record.get("epochs", 0)),
                "test_mcc": _number(test.get("test_mcc")),
                "test_accuracy": _number(test.get("test_accuracy")),
                "val_mcc_best": _best_val_mcc(record),
                "degenerate": record.get("degenerate") or None,
                "seconds": _number(record.get("train_seconds_total")),
            }
        )
    frame = pd.DataFrame(rows, columns=["trial_id", *stats.TRIAL_TABLE_COLUMNS, "seconds"])
    return frame.astype({"seed": "Int64"})


def leaderboard(state: SweepState) -> pd.DataFrame:
    """The sweep's leaderboard (``stats.leaderboard`` over ``trial_table``): per tokenizer over
    its finished trials with a test score, test MCC mean, sd and bootstrap interval (three seeds
    or more), accuracy, validation MCC, the comparison with the best (paired t-test p-value,
    n, seeds needed for 80% power), degenerate-trial counts and the counts of ASHA-stopped,
    running, failed and unscored trials; best first, missing last."""
    return stats.leaderboard(trial_table(state))


def _cell(value, digits: int = 3) -> str:
    return "missing" if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def print_leaderboard(board: pd.DataFrame, state: SweepState) -> None:
    """Print the leaderboard as a fixed-width table: test MCC mean ± sd with its 95% interval
    ("n<3" where fewer than three seeds give none), the best's lead over each tokenizer with the
    t-test's p-value and n and the seeds that lead needs for 80% power, and a ``!`` count of
    trials that predicted a single class (``?`` for trials recorded without that check)."""
    print(f"\nsweep {state.doc['sweep_id']}  (MLflow experiment {state.doc['experiment']!r}, {state.doc['tracking_uri']})")
    if board.empty:
        print("no trial finished")
        return
    header = (f"{'tokenizer':<36} {'seeds':>5} {'test MCC':>15} {'95% interval':>15} {'test acc':>8} {'val MCC':>7} "
              f"{'vs best':>7} {'p (n)':>11} {'seeds@80%':>9} {'one class':>9} {'ASHA-stopped':>12} {'failed':>6} "
              f"{'unscored':>8}")
    print(header)
    print("-" * len(header))
    best = stats.best_tokenizer(board)
    for row in board.itertuples():
        sd = "" if math.isnan(row.test_mcc_sd) else f" ± {row.test_mcc_sd:.3f}"
        mcc = "missing" if math.isnan(row.test_mcc_mean) else f"{row.test_mcc_mean:.3f}{sd}"
        interval = (f"[{row.test_mcc_ci_low:.3f}, {row.test_mcc_ci_high:.3f}]" if not math.isnan(row.test_mcc_ci_low)
                    else f"n<{stats.MIN_REPLICATES}" if row.trials else "")
        if row.tokenizer == best or pd.isna(row.p_vs_best):
            versus, p_value = ("best", "") if row.tokenizer == best else (_cell(row.diff_vs_best), "")
            power = ""
        else:
            versus = _cell(row.diff_vs_best)
            p_value = f"{'<0.001' if row.p_vs_best < 0.001 else f'{row.p_vs_best:.3f}'} ({row.n_vs_best})"
            power = "" if pd.isna(row.seeds_for_power) else str(row.seeds_for_power)
        flag = f"!{row.degenerate}" if row.degenerate else "0"
        flag += f"+{row.degenerate_unknown}?" if row.degenerate_unknown else ""
        print(f"{row.tokenizer:<36} {row.seeds:>5} {mcc:>15} {interval:>15} {_cell(row.test_accuracy_mean):>8} "
              f"{_cell(row.val_mcc_mean):>7} {versus:>7} {p_value:>11} {power:>9} {flag:>9} {row.stopped_early:>12} "
              f"{row.failed:>6} {row.unscored:>8}")
    print(f"scores over finished trials with a test score; interval: {stats.CI_LEVEL:.0%} bootstrap of the mean over "
          f"seeds (none below {stats.MIN_REPLICATES} seeds)\n"
          f"vs best: the best's lead; p (n): paired t-test over the n seeds both have (Welch's when none); "
          f"seeds@80%: seeds that lead needs for {stats.POWER:.0%} power at alpha {stats.ALPHA}\n"
          f"one class: trials that predicted a single class (! flagged, ? recorded without the check)")
