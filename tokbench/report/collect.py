"""MLflow runs → tidy tables: one row per trial, one row per (trial, epoch), and the sweep
(parent) runs with their sweep file.

Reads through ``tokbench.tracking.reading`` (runs as plain ``RunRecord``s): this module
never touches MLflow itself, and any tracking backend works. A metric a run lacks is NaN
here and stays NaN downstream: the page shows it as "missing", never as 0.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from tokbench.errors import TokbenchError
from tokbench.tracking.reading import RunRecord, TrackingReader, open_tracking, quick_http

# The tokenizer parts every trial row carries (tags written by tokbench.tracking.record).
FACTORS = ("fg", "fe", "fc", "order", "select", "combine")
# A finished trial: ran to its end (max_epochs or early stopping) or was stopped by ASHA.
FINISHED_STATES = ("completed", "stopped_early")

TRIAL_COLUMNS = [
    "run_id", "run_name", "sweep_id", "trial_id", "tokenizer", "baseline", *FACTORS, "method",
    "dataset", "split", "seed", "status", "end_state", "finished", "epochs_run", "max_epochs",
    "stopped_at_epoch", "test_mcc", "test_accuracy", "val_mcc_best", "degenerate", "test_predicted_classes",
    "train_seconds", "wall_seconds",
]
CURVE_COLUMNS = ["run_id", "tokenizer", "seed", "end_state", "epoch", "val_mcc"]


@dataclass
class SweepRun:
    """A sweep's parent run: its id, state and the sweep file it was started from."""

    sweep_id: str
    run_id: str
    status: str
    experiment: str
    sweep_yaml: Optional[str]


@dataclass
class RunSet:
    """Everything the report reads from MLflow, as tables."""

    title: str
    tracking_uri: str
    trials: pd.DataFrame
    curves: pd.DataFrame
    sweeps: list[SweepRun] = field(default_factory=list)
    reader: Optional[TrackingReader] = None


def find_runs(reader: TrackingReader, *, sweep_id: str | None = None,
              experiment: str | None = None) -> tuple[str, list[RunRecord]]:
    """``(title, runs)`` of one sweep (every experiment searched for its ``sweep_id`` tag) or
    of one experiment; an unknown name fails with the names that do exist."""
    if bool(sweep_id) == bool(experiment):
        raise TokbenchError("report: pass exactly one of --sweep SWEEP_ID or --experiment NAME")
    if experiment:
        experiment_id = reader.experiment_id(experiment)
        if experiment_id is None:
            names = reader.experiment_names()
            raise TokbenchError(
                f"no MLflow experiment {experiment!r} at {reader.uri}; experiments there: {', '.join(names) or 'none'}"
            )
        return f"experiment {experiment}", reader.search_runs([experiment_id])
    if "'" in sweep_id:
        raise TokbenchError(f"--sweep {sweep_id!r}: a sweep id has no quote characters")
    runs = reader.search_runs(tags={"sweep_id": sweep_id})
    if not runs:
        known = sorted({r.tags["sweep_id"] for r in reader.search_runs(tags={"tokbench.kind": "sweep"})})
        raise TokbenchError(f"no sweep {sweep_id!r} at {reader.uri}; sweeps there: {', '.join(known) or 'none'}")
    return f"sweep {sweep_id}", runs


def _is_sweep_run(run: RunRecord) -> bool:
    return run.tags.get("tokbench.kind") == "sweep"


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _int_or_none(value) -> Optional[int]:
    number = _float(value)
    return None if math.isnan(number) else int(number)


def _history(reader: TrackingReader, run_id: str, key: str) -> pd.Series:
    """The metric's values by step (epoch); the last value logged wins for a repeated step."""
    return pd.Series(reader.metric_history(run_id, key), dtype=float)


def _end_state(run: RunRecord) -> str:
    tag = run.tags.get("end_state")
    if tag and tag != "running":
        return tag
    return {"FAILED": "failed", "KILLED": "failed", "RUNNING": "running", "SCHEDULED": "running"}.get(
        run.status, tag or "completed")


def trial_row(run: RunRecord, val_mcc: pd.Series, epoch_seconds: pd.Series, now_ms: int) -> dict:
    """One trial as a flat row. Test scores are the best-validation-weights scores
    (``final_test_*`` of a sweep trial, else ``test_*`` of a ``tokbench train`` run); the best
    validation MCC is the maximum of the run's per-epoch ``val_mcc``; seconds are the sum of
    ``epoch_seconds`` (training) and the run's wall-clock life (start to end, or to now)."""
    tags, metrics, params = run.tags, run.metrics, run.params
    method = tags.get("method") or params.get("method", "")
    baseline = method == "logreg" or tags.get("fg") == "-"
    end_state = _end_state(run)
    end_ms = run.end_time or now_ms
    return {
        "run_id": run.run_id,
        "run_name": run.run_name,
        "sweep_id": tags.get("sweep_id", ""),
        "trial_id": tags.get("trial_id", ""),
        "tokenizer": tags.get("combination") or tags.get("tokenizer") or run.run_name,
        "baseline": baseline,
        **{part: tags.get(part, "") for part in FACTORS},
        "method": method,
        "dataset": tags.get("dataset", ""),
        "split": tags.get("split", ""),
        "seed": _int_or_none(tags.get("seed", params.get("seed"))),
        "status": run.status,
        "end_state": end_state,
        "finished": run.status == "FINISHED" and end_state in FINISHED_STATES,
        "epochs_run": _int_or_none(tags.get("epochs_run")) if "epochs_run" in tags else len(val_mcc),
        "max_epochs": _int_or_none(params.get("baseline.max_epochs" if baseline else "trainer.max_epochs")),
        "stopped_at_epoch": _int_or_none(tags.get("stopped_at_epoch")),
        "test_mcc": _float(metrics.get("final_test_mcc", metrics.get("test_mcc"))),
        "test_accuracy": _float(metrics.get("final_test_accuracy", metrics.get("test_accuracy"))),
        "val_mcc_best": float(np.nanmax(val_mcc.to_numpy())) if val_mcc.notna().any() else math.nan,
        # "no", "val", "test" or "val+test" (a single predicted class there); runs recorded
        # before the check carry no tag: unknown (None), never "no".
        "degenerate": tags.get("degenerate") or None,
        "test_predicted_classes": _float(metrics.get("test_predicted_classes")),
        "train_seconds": float(epoch_seconds.sum()) if len(epoch_seconds) else math.nan,
        "wall_seconds": (end_ms - run.start_time) / 1000 if run.start_time else math.nan,
    }


def sweep_runs(reader: TrackingReader, runs: list[RunRecord]) -> list[SweepRun]:
    """The sweep (parent) runs among ``runs``, oldest first, with their ``sweep.yaml``."""
    parents = sorted((r for r in runs if _is_sweep_run(r)), key=lambda r: r.start_time or 0)
    return [SweepRun(run.tags.get("sweep_id", run.run_name), run.run_id, run.status,
                     reader.experiment_name(run.experiment_id), reader.read_artifact_text(run.run_id, "sweep.yaml"))
            for run in parents]


def load_runs(tracking_uri: str | None, *, sweep_id: str | None = None, experiment: str | None = None,
              now_ms: Optional[int] = None) -> RunSet:
    """Read one sweep's or one experiment's runs into a ``RunSet``: trials (child runs and
    ``tokbench train`` runs), their validation-MCC curves, and the sweep runs."""
    now_ms = now_ms or int(time.time() * 1000)
    with quick_http():
        reader = open_tracking(tracking_uri)
        title, runs = find_runs(reader, sweep_id=sweep_id, experiment=experiment)
        rows, curves = [], []
        for run in runs:
            if _is_sweep_run(run):
                continue
            val_mcc = _history(reader, run.run_id, "val_mcc")
            row = trial_row(run, val_mcc, _history(reader, run.run_id, "epoch_seconds"), now_ms)
            rows.append(row)
            curves.extend(
                {"run_id": row["run_id"], "tokenizer": row["tokenizer"], "seed": row["seed"],
                 "end_state": row["end_state"], "epoch": int(step), "val_mcc": value}
                for step, value in val_mcc.items()
            )
        sweeps = sweep_runs(reader, runs)
    trials = pd.DataFrame(rows, columns=TRIAL_COLUMNS)
    # Whole numbers stay whole (seed 0, not 0.0) even where one run lacks them.
    trials = trials.astype({c: "Int64" for c in ("seed", "epochs_run", "max_epochs", "stopped_at_epoch")})
    trials = trials.sort_values(["tokenizer", "seed", "run_id"], na_position="last").reset_index(drop=True)
    return RunSet(title, reader.uri, trials, pd.DataFrame(curves, columns=CURVE_COLUMNS), sweeps, reader)


def confusion_tables(reader: TrackingReader, run_id: str) -> tuple[Optional[pd.DataFrame], Optional[pd.DataFrame]]:
    """The trial's test confusion matrix (rows true, columns predicted, cell-type names as
    labels) and per-class table (cell_type, cells, correct, accuracy), from the files
    ``write_confusion_report`` logged; None for each file the run lacks."""
    with quick_http():
        present = reader.artifact_names(run_id)
        out = []
        with tempfile.TemporaryDirectory() as tmp:
            for name, index_col in (("test_confusion_matrix.csv", 0), ("test_per_class.csv", None)):
                if name not in present:
                    out.append(None)
                    continue
                out.append(pd.read_csv(reader.download_artifact(run_id, name, tmp), index_col=index_col))
    return out[0], out[1]
