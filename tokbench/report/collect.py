"""MLflow runs → tidy tables: one row per trial, one row per (trial, epoch), and the sweep
(parent) runs with their sweep file.

Reads through ``MlflowClient`` only, so any tracking backend works (a SQLite file or an
``mlflow server``). A metric a run lacks is NaN here and stays NaN downstream: the page
shows it as "missing", never as 0.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd

from tokbench.errors import TokbenchError
from tokbench.tracking.mlflow_runs import resolve_tracking_uri

# The tokenizer parts every trial row carries (tags written by tokbench.tracking.record).
FACTORS = ("fg", "fe", "fc", "order", "select", "combine")
# A finished trial: ran to its end (max_epochs or early stopping) or was stopped by ASHA.
FINISHED_STATES = ("completed", "stopped_early")
# How long one tracking request may take while reading a report, in seconds.
HTTP_TIMEOUT_S = 20

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
    client: object = None


def open_tracking(uri: str | None):
    """``(absolute tracking URI, MlflowClient)`` for reading; refuses, naming the URI, a
    SQLite file that does not exist (MLflow would create an empty one) and an HTTP server
    that does not answer (probed with a 5 s request instead of MLflow's minutes of retries)."""
    from mlflow.tracking import MlflowClient

    if uri and uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        resolved = f"sqlite:///{path if path.is_absolute() else Path.cwd() / path}"
    else:
        resolved = resolve_tracking_uri(uri)
    if resolved.startswith("sqlite:///"):
        path = Path(resolved[len("sqlite:///"):])
        if not path.is_file():
            raise TokbenchError(
                f"tracking URI {resolved}: no MLflow database at {path}; pass --tracking-uri of the store "
                f"the sweep wrote to (its sweep file's tracking.uri; when empty, the MLFLOW_TRACKING_URI it ran with, "
                f"else sqlite:///<dir it ran in>/mlflow.db)"
            )
    return resolved, MlflowClient(tracking_uri=resolved)


@contextlib.contextmanager
def quick_http() -> Iterator[None]:
    """Bound MLflow's HTTP retries and timeout while the report reads, so a server that goes
    away mid-read fails in seconds, and silence its download progress bars; settings the
    user made win, and the environment is restored afterwards."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_TIMEOUT_S),
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    saved = {k: os.environ.get(k) for k in wanted}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _search_all(client, experiment_ids: list[str], filter_string: str = "") -> list:
    """Every run matching ``filter_string``, following MLflow's result pages."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiments(client) -> list:
    found, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def find_runs(client, uri: str, *, sweep_id: str | None = None, experiment: str | None = None) -> tuple[str, list]:
    """``(title, runs)`` of one sweep (every experiment searched for its ``sweep_id`` tag) or
    of one experiment; an unknown name fails with the names that do exist."""
    if bool(sweep_id) == bool(experiment):
        raise TokbenchError("report: pass exactly one of --sweep SWEEP_ID or --experiment NAME")
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in _experiments(client))
            raise TokbenchError(
                f"no MLflow experiment {experiment!r} at {uri}; experiments there: {', '.join(names) or 'none'}"
            )
        return f"experiment {experiment}", _search_all(client, [found.experiment_id])
    if "'" in sweep_id:
        raise TokbenchError(f"--sweep {sweep_id!r}: a sweep id has no quote characters")
    ids = [e.experiment_id for e in _experiments(client)]
    runs = _search_all(client, ids, f"tags.sweep_id = '{sweep_id}'") if ids else []
    if not runs:
        known = sorted({r.data.tags["sweep_id"] for r in _search_all(client, ids, "tags.`tokbench.kind` = 'sweep'")}) if ids else []
        raise TokbenchError(f"no sweep {sweep_id!r} at {uri}; sweeps there: {', '.join(known) or 'none'}")
    return f"sweep {sweep_id}", runs


def _is_sweep_run(run) -> bool:
    return run.data.tags.get("tokbench.kind") == "sweep"


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _int_or_none(value) -> Optional[int]:
    number = _float(value)
    return None if math.isnan(number) else int(number)


def _history(client, run_id: str, key: str) -> pd.Series:
    """The metric's values by step (epoch); the last value logged wins for a repeated step."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return pd.Series({m.step: m.value for m in points}, dtype=float)


def _end_state(run) -> str:
    tag = run.data.tags.get("end_state")
    if tag and tag != "running":
        return tag
    return {"FAILED": "failed", "KILLED": "failed", "RUNNING": "running", "SCHEDULED": "running"}.get(
        run.info.status, tag or "completed")


def trial_row(run, val_mcc: pd.Series, epoch_seconds: pd.Series, now_ms: int) -> dict:
    """One trial as a flat row. Test scores are the best-validation-weights scores
    (``final_test_*`` of a sweep trial, else ``test_*`` of a ``tokbench train`` run); the best
    validation MCC is the maximum of the run's per-epoch ``val_mcc``; seconds are the sum of
    ``epoch_seconds`` (training) and the run's wall-clock life (start to end, or to now)."""
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    method = tags.get("method") or params.get("method", "")
    baseline = method == "logreg" or tags.get("fg") == "-"
    end_state = _end_state(run)
    end_ms = run.info.end_time or now_ms
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "sweep_id": tags.get("sweep_id", ""),
        "trial_id": tags.get("trial_id", ""),
        "tokenizer": tags.get("combination") or tags.get("tokenizer") or run.info.run_name,
        "baseline": baseline,
        **{part: tags.get(part, "") for part in FACTORS},
        "method": method,
        "dataset": tags.get("dataset", ""),
        "split": tags.get("split", ""),
        "seed": _int_or_none(tags.get("seed", params.get("seed"))),
        "status": run.info.status,
        "end_state": end_state,
        "finished": run.info.status == "FINISHED" and end_state in FINISHED_STATES,
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
        "wall_seconds": (end_ms - run.info.start_time) / 1000 if run.info.start_time else math.nan,
    }


def _read_artifact(client, run_id: str, name: str) -> Optional[str]:
    """The text of a run's top-level artifact, or None when the run has none by that name."""
    if name not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, name, tmp)).read_text()


def sweep_runs(client, runs: list) -> list[SweepRun]:
    """The sweep (parent) runs among ``runs``, oldest first, with their ``sweep.yaml``."""
    parents = sorted((r for r in runs if _is_sweep_run(r)), key=lambda r: r.info.start_time or 0)
    names = {}
    out = []
    for run in parents:
        exp_id = run.info.experiment_id
        if exp_id not in names:
            names[exp_id] = client.get_experiment(exp_id).name
        out.append(SweepRun(run.data.tags.get("sweep_id", run.info.run_name), run.info.run_id, run.info.status,
                            names[exp_id], _read_artifact(client, run.info.run_id, "sweep.yaml")))
    return out


def load_runs(tracking_uri: str | None, *, sweep_id: str | None = None, experiment: str | None = None,
              now_ms: Optional[int] = None) -> RunSet:
    """Read one sweep's or one experiment's runs into a ``RunSet``: trials (child runs and
    ``tokbench train`` runs), their validation-MCC curves, and the sweep runs."""
    now_ms = now_ms or int(time.time() * 1000)
    with quick_http():
        uri, client = open_tracking(tracking_uri)
        title, runs = find_runs(client, uri, sweep_id=sweep_id, experiment=experiment)
        rows, curves = [], []
        for run in runs:
            if _is_sweep_run(run):
                continue
            val_mcc = _history(client, run.info.run_id, "val_mcc")
            row = trial_row(run, val_mcc, _history(client, run.info.run_id, "epoch_seconds"), now_ms)
            rows.append(row)
            curves.extend(
                {"run_id": row["run_id"], "tokenizer": row["tokenizer"], "seed": row["seed"],
                 "end_state": row["end_state"], "epoch": int(step), "val_mcc": value}
                for step, value in val_mcc.items()
            )
        sweeps = sweep_runs(client, runs)
    trials = pd.DataFrame(rows, columns=TRIAL_COLUMNS)
    # Whole numbers stay whole (seed 0, not 0.0) even where one run lacks them.
    trials = trials.astype({c: "Int64" for c in ("seed", "epochs_run", "max_epochs", "stopped_at_epoch")})
    trials = trials.sort_values(["tokenizer", "seed", "run_id"], na_position="last").reset_index(drop=True)
    return RunSet(title, uri, trials, pd.DataFrame(curves, columns=CURVE_COLUMNS), sweeps, client)


def confusion_tables(client, run_id: str) -> tuple[Optional[pd.DataFrame], Optional[pd.DataFrame]]:
    """The trial's test confusion matrix (rows true, columns predicted, cell-type names as
    labels) and per-class table (cell_type, cells, correct, accuracy), from the files
    ``write_confusion_report`` logged; None for each file the run lacks."""
    with quick_http():
        present = {a.path for a in client.list_artifacts(run_id)}
        out = []
        with tempfile.TemporaryDirectory() as tmp:
            for name, index_col in (("test_confusion_matrix.csv", 0), ("test_per_class.csv", None)):
                if name not in present:
                    out.append(None)
                    continue
                path = client.download_artifacts(run_id, name, tmp)
                out.append(pd.read_csv(path, index_col=index_col))
    return out[0], out[1]
