"""A durable, ordered outbox between a sweep driver and MLflow.

Every record a sweep sends to MLflow (run creation, params, tags, metrics, dataset inputs,
artifacts, end states) is first committed to a small SQLite file beside the sweep state,
then written by one background thread with ``MlflowClient.log_batch``. Tune's event loop
only pays for a local insert, so a slow or absent server slows tracking, never scheduling;
a server that is down keeps the records queued (in order) until it answers again, and a
driver that is killed leaves them on disk for ``--resume`` or ``tokbench sweep --sync``.

Replays are idempotent: a metric keeps the timestamp it was queued with, and MLflow's SQL
store drops a metric identical in (key, value, timestamp, step); tags, params and end
states are set to the same values again; artifacts overwrite themselves; a run is created
by a record that first looks the run up by its ``tokbench.run_key`` tag when an earlier
attempt may have reached the server. Records are deleted once written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

log = logging.getLogger("tokbench.tracking")

# MLflow's log_batch limits (entities per request).
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_MAX_PARAM_VALUE = 6000
# Records read from the file per round of the writer.
_WINDOW = 5000
# Error codes MLflow answers for a record that will never be accepted as it is: retrying
# would block every record behind it, so it is set aside (and reported) instead.
_REFUSED_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                  "INVALID_STATE", "BAD_REQUEST"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ops (seq INTEGER PRIMARY KEY AUTOINCREMENT, run_key TEXT NOT NULL,
                                kind TEXT NOT NULL, payload TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS runs (run_key TEXT PRIMARY KEY, run_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (run_key TEXT NOT NULL, step INTEGER NOT NULL, PRIMARY KEY (run_key, step));
CREATE TABLE IF NOT EXISTS files (id TEXT NOT NULL, name TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS refused (seq INTEGER PRIMARY KEY, run_key TEXT, kind TEXT, payload TEXT, error TEXT);
"""

# The run key of a sweep's parent run (trial runs are keyed by their trial id).
PARENT_KEY = "parent"

_OPEN: dict[str, "Outbox"] = {}
_OPEN_LOCK = threading.Lock()


def outbox_path(experiment_dir: Path) -> Path:
    """``<storage>/<sweep>.tracking.db``, beside the sweep state (and, like it, outside the
    directory Ray syncs over)."""
    experiment_dir = Path(experiment_dir)
    return experiment_dir.parent / f"{experiment_dir.name}.tracking.db"


def open_outbox(experiment_dir: Path, tracking_uri: str) -> "Outbox":
    """The one outbox of a sweep in this process (the driver and its callback share it, so
    a record is never written by two threads)."""
    path = str(outbox_path(experiment_dir).resolve())
    with _OPEN_LOCK:
        box = _OPEN.get(path)
        if box is None or box.closed:
            box = _OPEN[path] = Outbox(Path(path), tracking_uri)
        return box


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    # WAL: the callback's inserts and the writer's reads never wait for each other;
    # NORMAL sync survives a killed process (what a driver suffers), at a fraction of FULL's cost.
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def is_refusal(exc: BaseException) -> bool:
    """True when MLflow answered that the record itself is wrong (not that it is unreachable)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and getattr(exc, "error_code", "") in _REFUSED_CODES


class Outbox:
    """Queue records for MLflow runs named by a ``run_key`` (a trial id, ``"parent"``), write
    them in order from a background thread, and say when tracking falls behind or catches up.

    ``behind_after`` seconds of failed writes make the console say tracking is behind.
    """

    def __init__(self, path: Path, tracking_uri: str, behind_after: float = 2.0):
        self.path, self.uri = Path(path), tracking_uri
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.path)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()  # one statement at a time on the shared connection
        self._run_ids: dict[str, str] = dict(self._db.execute("SELECT run_key, run_id FROM runs"))
        self._steps: set[tuple[str, int]] = set(self._db.execute("SELECT run_key, step FROM steps"))
        self._known_keys: set[str] = set(self._run_ids) | {k for (k,) in self._db.execute(
            "SELECT DISTINCT run_key FROM ops WHERE kind = 'create'")}
        self._wake = threading.Event()  # a record was queued
        self._kick = threading.Event()  # someone waits for the queue: retry now, not after the backoff
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._client = None
        self._experiment_ids: dict[str, str] = {}
        self.behind_after = behind_after
        self.behind_since: Optional[float] = None
        self.announced_behind = False
        self.last_error: Optional[str] = None
        self.written = 0
        self.closed = False

    # ----- the producer side (Tune's event loop) -----

    def _put(self, run_key: str, kind: str, payload: dict, step: Optional[int] = None) -> None:
        text = json.dumps(payload, default=str)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO ops (run_key, kind, payload) VALUES (?, ?, ?)", (run_key, kind, text))
                if step is not None:
                    self._db.execute("INSERT OR IGNORE INTO steps VALUES (?, ?)", (run_key, step))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if step is not None:
            self._steps.add((run_key, step))
        self._idle.clear()
        self._wake.set()

    def has_run(self, run_key: str) -> bool:
        """True when a run for ``run_key`` exists or its creation is queued."""
        return run_key in self._known_keys

    def run_id(self, run_key: str) -> Optional[str]:
        """The MLflow run id of ``run_key``, once its run has been created."""
        return self._run_ids.get(run_key)

    def run_ids(self) -> dict[str, str]:
        """Every known ``run_key -> run id``."""
        return dict(self._run_ids)

    def has_step(self, run_key: str, step: int) -> bool:
        """True when metrics at ``step`` of ``run_key`` were queued (or written) already."""
        return (run_key, int(step)) in self._steps

    def bind(self, run_key: str, run_id: str) -> None:
        """Record that ``run_key`` is the existing run ``run_id`` (e.g. the sweep's parent run)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?)", (run_key, run_id))
        self._run_ids[run_key] = run_id
        self._known_keys.add(run_key)

    def create_run(self, run_key: str, experiment: str, run_name: str = "", tags: Mapping[str, Any] | None = None,
                   parent_key: Optional[str] = None) -> None:
        """Queue the creation of the run of ``run_key`` (at most one, even across replays)."""
        self._known_keys.add(run_key)
        self._put(run_key, "create", {"experiment": experiment, "run_name": run_name,
                                      "tags": {k: str(v) for k, v in (tags or {}).items()}, "parent_key": parent_key})

    def reopen(self, run_key: str) -> None:
        """Queue marking the run RUNNING again (a resumed sweep, a restarted trial)."""
        self._put(run_key, "status", {"status": "RUNNING"})

    def log_params(self, run_key: str, params: Mapping[str, Any]) -> None:
        items = [(k, str(v)[:_MAX_PARAM_VALUE]) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS):  # one record must fit one request
            self._put(run_key, "data", {"params": dict(items[i : i + _MAX_PARAMS])})

    def set_tags(self, run_key: str, tags: Mapping[str, Any]) -> None:
        items = [(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_TAGS):
            self._put(run_key, "data", {"tags": dict(items[i : i + _MAX_TAGS])})

    def log_metrics(self, run_key: str, metrics: Mapping[str, Any], step: int = 0, *,
                    timestamp_ms: Optional[int] = None, mark_step: bool = False) -> None:
        """Queue the numeric, finite entries of ``metrics`` at ``step``; ``mark_step`` records
        the step as logged in the same transaction (see :meth:`has_step`)."""
        now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self._put(run_key, "data", {"metrics": values, "step": int(step), "timestamp": now},
                  step=int(step) if mark_step else None)

    def log_inputs(self, run_key: str, datasets: Iterable[Mapping[str, Any]]) -> None:
        """Queue dataset inputs: dicts of name, digest, source_type, source, context."""
        self._put(run_key, "inputs", {"datasets": [dict(d) for d in datasets]})

    def log_artifacts(self, run_key: str, paths: Iterable[str | Path], artifact_path: Optional[str] = None) -> None:
        """Keep the files (or directories) of ``paths`` in the outbox itself (callers often pass
        temporary files; a sweep's artifacts are reports and configs of kilobytes) and queue
        their upload."""
        files_id = uuid.uuid4().hex
        rows = []
        for path in map(Path, paths):
            members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for member in members:
                name = path.name if member == path else f"{path.name}/{member.relative_to(path)}"
                rows.append((files_id, name, member.read_bytes()))
        with self._lock:
            self._db.executemany("INSERT INTO files VALUES (?, ?, ?)", rows)
        self._put(run_key, "artifacts", {"files": files_id, "artifact_path": artifact_path})

    def end(self, run_key: str, status: str = "FINISHED") -> None:
        self._put(run_key, "status", {"status": status, "terminal": True})

    def pending(self) -> int:
        """Records not yet written."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM ops").fetchone()[0]

    def refused(self) -> list[dict]:
        """Records MLflow refused (kept for inspection, never retried)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, run_key, kind, payload, error FROM refused ORDER BY seq").fetchall()
        return [dict(zip(("seq", "run_key", "kind", "payload", "error"), row)) for row in rows]

    # ----- the writer -----

    def start(self) -> "Outbox":
        """Start the background writer (once)."""
        client_env_for_outbox()
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="tokbench-tracking", daemon=True)
            self._thread.start()
        return self

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every queued record to be written; True when none is left."""
        self.start()
        self._kick.set()
        deadline = time.monotonic() + timeout
        while self.pending():
            self._wake.set()
            if time.monotonic() >= deadline:
                return False
            self._idle.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
        return True

    def close(self) -> None:
        """Stop the writer (records still queued stay in the file)."""
        self._stop.set()
        self._wake.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.closed = True
        with _OPEN_LOCK:
            if _OPEN.get(str(self.path.resolve())) is self:
                del _OPEN[str(self.path.resolve())]

    def _loop(self) -> None:
        backoff = 0.25
        while not self._stop.is_set():
            with self._lock:
                rows = self._db.execute("SELECT seq, run_key, kind, payload, attempts FROM ops ORDER BY seq LIMIT ?",
                                        (_WINDOW,)).fetchall()
            if not rows:
                self._caught_up()
                self._idle.set()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self._write(rows)
            except Exception as exc:  # noqa: BLE001 - anything but a refusal: keep the records, retry
                self._fell_behind(exc)
                self._kick.wait(backoff)
                self._kick.clear()
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.25

    def _fell_behind(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.last_error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if self.behind_since is None:
            self.behind_since = now
            from mlflow.exceptions import MlflowException

            if not isinstance(exc, (MlflowException, OSError)):
                log.debug("tracking write failed", exc_info=exc)
        if not self.announced_behind and now - self.behind_since >= self.behind_after:
            self.announced_behind = True
            log.warning("tracking is behind: MLflow at %s does not answer (%s); %d records kept in %s, "
                        "retrying; the sweep goes on", self.uri, self.last_error, self.pending(), self.path)

    def _caught_up(self) -> None:
        if self.announced_behind:
            log.warning("tracking caught up: every queued record is in MLflow at %s (%.0f s behind)",
                        self.uri, time.monotonic() - self.behind_since)
        self.behind_since, self.announced_behind = None, False

    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _write(self, rows: list[tuple]) -> None:
        """Write ``rows`` in order: consecutive data records of one run merge into batches;
        any other record of that run first sends what its run has pending."""
        batches: dict[str, _Batch] = {}
        done: list[int] = []
        try:
            for seq, run_key, kind, payload, attempts in rows:
                record = json.loads(payload)
                if kind == "data":
                    batch = batches.setdefault(run_key, _Batch(run_key))
                    if not batch.fits(record):
                        self._send_batch(batch, done)
                        batches[run_key] = batch = _Batch(run_key)
                    batch.add(seq, record)
                    continue
                if run_key in batches:
                    self._send_batch(batches.pop(run_key), done)
                self._guarded(seq, run_key, kind, record, attempts)
                done.append(seq)
            for batch in list(batches.values()):
                self._send_batch(batch, done)
                batches.pop(batch.run_key)
        finally:
            self._forget(done)

    def _forget(self, seqs: list[int]) -> None:
        if not seqs:
            return
        with self._lock:
            for i in range(0, len(seqs), 500):
                chunk = seqs[i : i + 500]
                self._db.execute(f"DELETE FROM ops WHERE seq IN ({','.join('?' * len(chunk))})", chunk)
        self.written += len(seqs)
        seqs.clear()

    def _guarded(self, seq: int, run_key: str, kind: str, record: dict, attempts: int) -> None:
        try:
            self._apply(seq, run_key, kind, record, attempts)
        except Exception as exc:
            if not is_refusal(exc) and not isinstance(exc, _NoRun):
                raise
            self._refuse(seq, run_key, kind, record, exc)

    def _refuse(self, seq: int, run_key: str, kind: str, record: dict, exc: BaseException) -> None:
        log.error("MLflow refused a %s record of run %s (%s); it is kept in %s (table refused)",
                  kind, run_key, str(exc).splitlines()[0][:300], self.path)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO refused VALUES (?, ?, ?, ?, ?)",
                             (seq, run_key, kind, json.dumps(record), str(exc)[:2000]))

    def _send_batch(self, batch: "_Batch", done: list[int]) -> None:
        if not batch.seqs:
            return
        try:
            self._log_batch(batch.run_key, batch.metrics, batch.params, batch.tags)
        except Exception as exc:
            if not is_refusal(exc) and not isinstance(exc, _NoRun):
                raise
            # One bad record must not take its neighbours with it: send them one by one.
            for seq, record in batch.records:
                try:
                    single = _Batch(batch.run_key)
                    single.add(seq, record)
                    self._log_batch(batch.run_key, single.metrics, single.params, single.tags)
                except Exception as one:
                    if not is_refusal(one) and not isinstance(one, _NoRun):
                        raise
                    self._refuse(seq, batch.run_key, "data", record, one)
                done.append(seq)
            return
        done.extend(batch.seqs)

    def _resolve(self, run_key: str) -> str:
        run_id = self._run_ids.get(run_key)
        if run_id is None:
            raise _NoRun(f"no MLflow run was created for {run_key!r}")
        return run_id

    def _log_batch(self, run_key: str, metrics: dict, params: dict, tags: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run_id = self._resolve(run_key)
        metric_items = [Metric(k, v, ts, step) for (k, step, ts), v in metrics.items()]
        param_items = [Param(k, v) for k, v in params.items()]
        tag_items = [RunTag(k, v) for k, v in tags.items()]
        self.client().log_batch(run_id, metrics=metric_items, params=param_items, tags=tag_items)

    def _apply(self, seq: int, run_key: str, kind: str, record: dict, attempts: int) -> None:
        client = self.client()
        if kind == "create":
            self._create(seq, run_key, record, attempts)
        elif kind == "status":
            run_id = self._resolve(run_key)
            if record.get("terminal"):
                client.set_terminated(run_id, status=record["status"])
            else:
                client.update_run(run_id, status=record["status"])
        elif kind == "inputs":
            from tokbench.tracking.mlflow_runs import dataset_inputs

            client.log_inputs(self._resolve(run_key), datasets=dataset_inputs(record["datasets"]))
        elif kind == "artifacts":
            run_id = self._resolve(run_key)
            with self._lock:
                rows = self._db.execute("SELECT name, data FROM files WHERE id = ?", (record["files"],)).fetchall()
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in rows:
                    target = Path(tmp) / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                if rows:
                    client.log_artifacts(run_id, tmp, record.get("artifact_path"))
            with self._lock:
                self._db.execute("DELETE FROM files WHERE id = ?", (record["files"],))

    def _create(self, seq: int, run_key: str, record: dict, attempts: int) -> None:
        if run_key in self._run_ids:
            return
        client = self.client()
        experiment_id = self._experiment_id(record["experiment"])
        tags = dict(record["tags"], **{"tokbench.run_key": run_key})
        if record.get("parent_key"):
            tags["mlflow.parentRunId"] = self._resolve(record["parent_key"])
        run_id = None
        if attempts:
            # An earlier attempt may have created the run before the answer was lost.
            found = client.search_runs([experiment_id], filter_string=f"tags.`tokbench.run_key` = '{run_key}'",
                                       max_results=1)
            run_id = found[0].info.run_id if found else None
        if run_id is None:
            with self._lock:
                self._db.execute("UPDATE ops SET attempts = attempts + 1 WHERE seq = ?", (seq,))
            run_id = client.create_run(experiment_id, run_name=record.get("run_name") or None, tags=tags).info.run_id
        self.bind(run_key, run_id)

    def _experiment_id(self, name: str) -> str:
        if name not in self._experiment_ids:
            from tokbench.tracking.mlflow_runs import get_or_create_experiment

            self._experiment_ids[name] = get_or_create_experiment(self.client(), name)
        return self._experiment_ids[name]


class _NoRun(Exception):
    """A record for a run whose creation MLflow refused."""


class _Batch:
    """Consecutive data records of one run, merged into one ``log_batch`` (tags and params:
    the last value of a key wins, as it would have record by record)."""

    def __init__(self, run_key: str):
        self.run_key = run_key
        self.seqs: list[int] = []
        self.records: list[tuple[int, dict]] = []
        self.metrics: dict[tuple[str, int, int], float] = {}
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}

    def fits(self, record: dict) -> bool:
        m, p, t = len(record.get("metrics", ())), len(record.get("params", ())), len(record.get("tags", ()))
        if not self.seqs:
            return True
        return (len(self.metrics) + m <= _MAX_METRICS and len(self.params) + p <= _MAX_PARAMS
                and len(self.tags) + t <= _MAX_TAGS and len(self.metrics) + len(self.params) + len(self.tags) + m + p + t <= 1000)

    def add(self, seq: int, record: dict) -> None:
        self.seqs.append(seq)
        self.records.append((seq, record))
        for key, value in record.get("metrics", {}).items():
            self.metrics[(key, record["step"], record["timestamp"])] = value
        self.params.update(record.get("params", {}))
        self.tags.update(record.get("tags", {}))


def client_env_for_outbox() -> None:
    """Make MLflow's HTTP client fail fast in this process (unless the environment says
    otherwise): the outbox retries, and says so, itself, while MLflow's default (7 retries
    with backoff, 120 s timeout) would hold the writer for minutes per record without a word.
    MLflow reads these per request and offers no per-client setting."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


class QueuedRun:
    """A :class:`~tokbench.tracking.mlflow_runs.RunLogger` look-alike whose every call is a
    record in ``outbox`` (nothing here waits for MLflow)."""

    def __init__(self, outbox: Outbox, run_key: str):
        self.outbox, self.run_key = outbox, run_key

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run id, once the writer has created the run."""
        return self.outbox.run_id(self.run_key)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.outbox.log_params(self.run_key, params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.outbox.set_tags(self.run_key, tags)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.outbox.log_metrics(self.run_key, metrics, step or 0)

    def log_inputs(self, datasets: Iterable[Mapping[str, Any]]) -> None:
        self.outbox.log_inputs(self.run_key, datasets)

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        self.outbox.log_artifacts(self.run_key, paths, artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.outbox.end(self.run_key, status)
