"""The leaderboard printed at the end of a sweep (the full comparison page is ``tokbench report``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tokbench.sweep.state import SweepState


def trial_table(state: SweepState) -> pd.DataFrame:
    """One row per trial: tokenizer label, seed, end state, epochs, best-weights test and val scores."""
    rows = []
    for trial_id, record in state.doc["trials"].items():
        test = record.get("test") or {}
        rows.append(
            {
                "trial_id": trial_id,
                "tokenizer": record.get("label", "?"),
                "seed": record.get("seed"),
                "end_state": record.get("end_state", "running"),
                "epochs_run": int(record.get("epochs", 0)),
                "best_epoch": record.get("best_epoch"),
                "val_mcc": record.get("val_mcc_best"),
                "test_mcc": test.get("test_mcc"),
                "test_accuracy": test.get("test_accuracy"),
                "seconds": record.get("train_seconds_total"),
            }
        )
    return pd.DataFrame(rows)


def leaderboard(state: SweepState) -> pd.DataFrame:
    """Per tokenizer: mean and standard deviation of test MCC over seeds, epochs run, how many
    trials ASHA stopped early or failed; best first. Missing scores stay NaN, never 0."""
    trials = trial_table(state)
    if trials.empty:
        return pd.DataFrame(columns=["tokenizer", "seeds", "test_mcc_mean", "test_mcc_std", "test_accuracy_mean",
                                     "val_mcc_mean", "epochs_run", "stopped_early", "failed"])
    grouped = trials.groupby("tokenizer", sort=False)
    board = pd.DataFrame(
        {
            "seeds": grouped["seed"].nunique(),
            "test_mcc_mean": grouped["test_mcc"].mean(),
            "test_mcc_std": grouped["test_mcc"].std(ddof=1),
            "test_accuracy_mean": grouped["test_accuracy"].mean(),
            "val_mcc_mean": grouped["val_mcc"].mean(),
            "epochs_run": grouped["epochs_run"].sum(),
            "stopped_early": grouped["end_state"].apply(lambda s: int((s == "stopped_early").sum())),
            "failed": grouped["end_state"].apply(lambda s: int((s == "failed").sum())),
        }
    ).reset_index()
    return board.sort_values("test_mcc_mean", ascending=False, na_position="last").reset_index(drop=True)


def print_leaderboard(board: pd.DataFrame, state: SweepState) -> None:
    """Print the leaderboard as a fixed-width table."""
    print(f"\nsweep {state.doc['sweep_id']}  (MLflow experiment {state.doc['experiment']!r}, {state.doc['tracking_uri']})")
    if board.empty:
        print("no trial finished")
        return
    header = f"{'tokenizer':<36} {'seeds':>5} {'test MCC':>16} {'test acc':>8} {'val MCC':>7} {'epochs':>6} {'ASHA-stopped':>12} {'failed':>6}"
    print(header)
    print("-" * len(header))
    for row in board.itertuples():
        std = "" if np.isnan(row.test_mcc_std) else f" ± {row.test_mcc_std:.3f}"
        mcc = "missing" if np.isnan(row.test_mcc_mean) else f"{row.test_mcc_mean:.3f}{std}"
        acc = "missing" if np.isnan(row.test_accuracy_mean) else f"{row.test_accuracy_mean:.3f}"
        val = "missing" if np.isnan(row.val_mcc_mean) else f"{row.val_mcc_mean:.3f}"
        print(f"{row.tokenizer:<36} {row.seeds:>5} {mcc:>16} {acc:>8} {val:>7} {row.epochs_run:>6} {row.stopped_early:>12} {row.failed:>6}")
