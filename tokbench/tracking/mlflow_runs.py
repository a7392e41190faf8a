"""One MLflow run per training run, written through ``MlflowClient`` (no global active run),
so a sweep driver can keep many runs open at once."""

from __future__ import annotations

import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

from tokbench.errors import TokbenchError

# MLflow refuses param values longer than this.
_MAX_PARAM = 6000
# MLflow 3's experiment type: without it the UI opens an experiment on the GenAI traces
# overview; with it, on the training runs and their charts.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(client, name: str) -> str:
    """The id of experiment ``name``, created (as a model-training experiment) when missing."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND_TAG not in found.tags:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def resolve_tracking_uri(uri: str | None, base_dir: str | Path | None = None) -> str:
    """An absolute, reachable tracking URI.

    Which store: ``uri`` when it is given (a config's or sweep file's ``tracking.uri``,
    ``tokbench report --tracking-uri``); when it is ``""``/None, the ``MLFLOW_TRACKING_URI``
    environment variable (MLflow's own; the tokbench cluster manifests set it on every node);
    when that is unset or empty too, ``sqlite:///<base_dir or cwd>/mlflow.db``. A relative
    SQLite path is made absolute against ``base_dir`` (trials run in their own working
    directories); an ``http(s)://`` server is probed at ``/health`` (5 s) and refused with a
    clear error when it does not answer.
    """
    where, unset = f"tracking.uri {uri!r}", "leave tracking.uri empty"
    if not uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        where, unset = f"MLFLOW_TRACKING_URI={uri!r}", "unset MLFLOW_TRACKING_URI"
    base = Path(base_dir or os.getcwd()).resolve()
    if not uri:
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        path = path if path.is_absolute() else base / path
        if not path.parent.exists():
            raise TokbenchError(f"{where}: directory {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise TokbenchError(f"{where}: directory {path.parent} is not writable")
        return f"sqlite:///{path}"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TokbenchError(
                f"{where}: MLflow server not reachable ({reason}); start one with "
                f"`mlflow server --backend-store-uri sqlite:////abs/mlflow.db --host 127.0.0.1 --port 5000` "
                f"or {unset} for a local SQLite file"
            ) from exc
        return uri.rstrip("/")
    raise TokbenchError(f"{where}: expected sqlite:///PATH or http(s)://HOST:PORT")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``; lists become their string form."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:_MAX_PARAM]
    return flat


def dataset_inputs(datasets: Iterable[Mapping[str, Any]]) -> list:
    """MLflow ``DatasetInput``s from dicts of name, digest, source (a path), context (the
    split, shown as the input's context) and optional source_type, schema, profile."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [
        DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type=d.get("source_type", "local"),
                             source=json.dumps({"uri": d["source"]}), schema=d.get("schema"), profile=d.get("profile")),
                     tags=[InputTag("mlflow.data.context", d["context"])] if d.get("context") else [])
        for d in datasets
    ]


class RunLogger:
    """An MLflow run: params, tags, per-epoch metrics, artifacts, and an honest end state.

    Use as a context manager: leaving it by an exception marks the run ``FAILED`` (and
    re-raises); otherwise ``FINISHED``. ``parent_run_id`` nests the run under a sweep's run.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str = "",
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
    ):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        if run_id is not None:  # reattach, e.g. after a resume
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        experiment_id = get_or_create_experiment(self.client, experiment)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=run_name or None, tags=all_tags)
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values stringified), 100 per request as MLflow allows."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values stringified)."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the numeric, finite entries of ``metrics`` at ``step`` (others are skipped)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_inputs(self, datasets: Iterable[Mapping[str, Any]]) -> None:
        """Log dataset inputs (see :func:`dataset_inputs`), so the UI's Dataset column shows them."""
        self.client.log_inputs(self.run_id, datasets=dataset_inputs(datasets))

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        """Upload files (or directories) to the run's artifact store."""
        for path in paths:
            path = Path(path)
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``status`` (FINISHED, FAILED or KILLED)."""
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
