"""The read side of MLflow, for the report: open a store, search its runs, read metric
histories and artifacts, and publish a finished page as artifacts of a run.

Everything goes through ``MlflowClient``, so any tracking backend works (a SQLite file or
an ``mlflow server``). Runs come back as :class:`RunRecord`, plain data with no MLflow
types, so ``tokbench.report`` builds its tables without importing MLflow.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional

from tokbench.errors import TokbenchError
from tokbench.tracking.mlflow_runs import resolve_tracking_uri

# How long one tracking request may take while reading a report, in seconds.
HTTP_TIMEOUT_S = 20
# Runs and experiments per search request (MLflow's largest page for SQL stores).
PAGE_SIZE = 1000


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as plain data: ids, name, status (``FINISHED``, ``FAILED``, ``KILLED``,
    ``RUNNING`` or ``SCHEDULED``), start and end times in milliseconds since the epoch
    (None while unknown or running), and the latest value of every tag, metric and param."""

    run_id: str
    run_name: str
    experiment_id: str
    status: str
    start_time: Optional[int]
    end_time: Optional[int]
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


def _record(run) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(info.run_id, info.run_name, info.experiment_id, info.status, info.start_time or None,
                     info.end_time or None, dict(data.tags), dict(data.metrics), dict(data.params))


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


def _tag_filter(tags: Mapping[str, str]) -> str:
    """MLflow's search filter for runs carrying every tag of ``tags`` with that value."""
    clauses = []
    for key, value in tags.items():
        if "'" in value or "`" in key:
            raise TokbenchError(f"tag {key}={value!r}: tag filters take no quote characters")
        clauses.append(f"tags.`{key}` = '{value}'")
    return " and ".join(clauses)


class TrackingReader:
    """Reads one tracking store; open it with :func:`open_tracking`."""

    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._experiment_names: dict[str, str] = {}

    def _experiments(self) -> list:
        found, token = [], None
        while True:
            page = self._client.search_experiments(max_results=PAGE_SIZE, page_token=token)
            found.extend(page)
            token = page.token
            if not token:
                return found

    def experiment_names(self) -> list[str]:
        """The names of every experiment in the store, sorted."""
        return sorted(e.name for e in self._experiments())

    def experiment_id(self, name: str) -> Optional[str]:
        """The id of experiment ``name``; None when the store has none by that name."""
        found = self._client.get_experiment_by_name(name)
        return None if found is None else found.experiment_id

    def experiment_name(self, experiment_id: str) -> str:
        """The name of the experiment with id ``experiment_id``."""
        if experiment_id not in self._experiment_names:
            self._experiment_names[experiment_id] = self._client.get_experiment(experiment_id).name
        return self._experiment_names[experiment_id]

    def search_runs(self, experiment_ids: Optional[list[str]] = None,
                    tags: Optional[Mapping[str, str]] = None) -> list[RunRecord]:
        """Every run of ``experiment_ids`` (default: every experiment in the store) that
        carries all of ``tags``, following MLflow's result pages."""
        if experiment_ids is None:
            experiment_ids = [e.experiment_id for e in self._experiments()]
        if not experiment_ids:
            return []
        filter_string = _tag_filter(tags or {})
        runs, token = [], None
        while True:
            page = self._client.search_runs(experiment_ids, filter_string, max_results=PAGE_SIZE, page_token=token)
            runs.extend(_record(run) for run in page)
            token = page.token
            if not token:
                return runs

    def metric_history(self, run_id: str, key: str) -> dict[int, float]:
        """``{step: value}`` of one metric of a run, steps ascending; where a step was
        logged more than once, the last value logged wins."""
        points = sorted(self._client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        return {m.step: m.value for m in points}

    def artifact_names(self, run_id: str, folder: Optional[str] = None) -> set[str]:
        """The paths of the run's artifacts directly under ``folder`` (default: the top level)."""
        return {a.path for a in self._client.list_artifacts(run_id, folder)}

    def download_artifact(self, run_id: str, name: str, dst_dir: str | Path) -> Path:
        """Download artifact ``name`` of the run into ``dst_dir``; return its local path."""
        return Path(self._client.download_artifacts(run_id, name, str(dst_dir)))

    def read_artifact_text(self, run_id: str, name: str) -> Optional[str]:
        """The text of a run's top-level artifact, or None when the run has none by that name."""
        if name not in self.artifact_names(run_id):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return self.download_artifact(run_id, name, tmp).read_text()


def open_tracking(uri: str | None) -> TrackingReader:
    """A reader of the store at ``uri`` (its ``.uri`` absolute); refuses, naming the URI, a
    SQLite file that does not exist (MLflow would create an empty one) and an HTTP server
    that does not answer (probed with a 5 s request instead of MLflow's minutes of retries)."""
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
    return TrackingReader(resolved)


def publish_folder(tracking_uri: str, run_id: str, folder: str | Path, artifact_path: str) -> str:
    """Upload every file under ``folder`` as artifacts of run ``run_id`` under
    ``artifact_path``; return that artifact folder's URI. The run's status is left as it is."""
    from mlflow.tracking import MlflowClient

    with quick_http():
        client = MlflowClient(tracking_uri=tracking_uri)
        client.log_artifacts(run_id, str(folder), artifact_path)
        return f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
