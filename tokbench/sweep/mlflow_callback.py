"""Driver-side MLflow logging for a sweep: one parent run, one child run per trial.

Everything is written from the driver (one process), so a SQLite store is safe for
single-node sweeps and an ``mlflow server`` for clusters; trials never talk to MLflow.
The callback never waits for MLflow either: each record goes to the sweep's durable outbox
(:mod:`tokbench.tracking.outbox`), whose writer thread sends it in batches and keeps it while
the server is away. A trial's run is keyed by its trial id there, so retries, ``--resume``
and replays end with exactly one MLflow run per trial.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from ray import tune

from tokbench.sweep.spec import Sweep
from tokbench.sweep.state import SweepState
from tokbench.tracking.outbox import PARENT_KEY, QueuedRun, open_outbox
from tokbench.tracking.record import _NOT_LOGGED, run_tags, start_run
from tokbench.training.experiment import to_yaml
from tokbench.training.metrics import degenerate_splits, write_confusion_report

log = logging.getLogger("tokbench.sweep")

# Seconds the callback spent on each reported result in this process (the driver's cost per
# result, read by bench/tracking_load.py).
RESULT_SECONDS: list[float] = []


@contextlib.contextmanager
def _logging_failures(trial, hook: str):
    # Records only reach a local file here; should even that fail, the trial must go on
    # (Ray would retry a finished trial for it) and the final check against Ray's results
    # fills the gap.
    try:
        yield
    except Exception:  # noqa: BLE001
        log.exception("recording trial %s failed (%s); the trial goes on, the end-of-sweep check fills the gap",
                      trial.trial_id, hook)


class MlflowSweepCallback(tune.Callback):
    """Creates, fills and closes the child run of every trial, nested under the sweep's run."""

    def __init__(self, sweep: Sweep, experiment_dir: Path, tracking_uri: str):
        self.sweep, self.experiment_dir, self.uri = sweep, Path(experiment_dir), tracking_uri
        self.setup()

    def setup(self, **info) -> None:
        # Ray pickles the run config (with its callbacks) and restores it on resume: read the
        # sweep state afresh from disk instead of trusting a pickled copy.
        self.state = SweepState.load(self.experiment_dir)
        self.outbox = open_outbox(self.experiment_dir, self.uri).start()
        if self.state.doc.get("parent_run_id"):
            self.outbox.bind(PARENT_KEY, self.state.doc["parent_run_id"])
        self._loggers: dict[str, QueuedRun] = {}
        # When trial resources became free, oldest first: the sweep's start for the first
        # trials, then each trial's end. A trial's start-up is measured from the moment its
        # slot was free, so it counts worker start, imports and set-up, which happen before
        # Ray reports the trial started.
        self._free_since: list[float] = []
        self._fit_started = time.time()

    def __getstate__(self) -> dict:
        return {"sweep": self.sweep, "experiment_dir": self.experiment_dir, "uri": self.uri}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.setup()

    def _logger(self, trial) -> QueuedRun:
        key = trial.trial_id
        if key in self._loggers:
            return self._loggers[key]
        record = self.state.trial(key)
        logger = QueuedRun(self.outbox, key)
        if record.get("run_id") and not self.outbox.has_run(key):
            self.outbox.bind(key, record["run_id"])  # a state written before the outbox existed
        if self.outbox.has_run(key):
            self.outbox.reopen(key)  # a resumed sweep or a restarted driver: the same run again
        else:
            cfg = self.sweep.trial_config(trial.config)
            combo = self.sweep.combinations[trial.config["combination"]]
            self.outbox.create_run(
                key,
                self.sweep.experiment_name,
                run_name=f"{combo['label']} seed={trial.config['seed']}",
                tags={"sweep_id": self.state.doc["sweep_id"], "trial_id": key,
                      "combination": combo["label"], "end_state": "running"},
                parent_key=PARENT_KEY,
            )
            start_run(logger, cfg)
            record.update(
                label=combo["label"],
                seed=int(trial.config["seed"]),
                params=trial.config.get("params") or {},
                tags=run_tags(cfg),
                last_epoch=0,
                config_yaml=to_yaml(cfg),
            )
            self.state.save()
        self._loggers[key] = logger
        return logger

    def on_trial_start(self, iteration, trials, trial, **info):
        with _logging_failures(trial, "start"):
            self._logger(trial)
            record = self.state.trial(trial.trial_id)
            if "queued_at" not in record:
                record["queued_at"] = self._free_since.pop(0) if self._free_since else self._fit_started

    def on_trial_result(self, iteration, trials, trial, result, **info):
        started = time.perf_counter()
        with _logging_failures(trial, "result"):
            self._record_result(trial, result)
        RESULT_SECONDS.append(time.perf_counter() - started)

    def on_step_end(self, iteration, trials, **info):
        # Saves deferred by save_soon() land within about a second, whatever the trials do.
        if self.state.dirty:
            self.state.save_soon()

    def on_experiment_end(self, trials, **info):
        self.state.flush()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._free_since.append(time.time())
        with _logging_failures(trial, "complete"):
            self._complete(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._free_since.append(time.time())
        with _logging_failures(trial, "error"):
            self._fail(trial)

    def _record_result(self, trial, result: dict) -> None:
        logger = self._logger(trial)
        record = self.state.trial(trial.trial_id)
        epoch = int(result.get("epoch", 0))
        if epoch <= record.get("last_epoch", 0):
            return  # re-run of an epoch after a restore: already logged
        metrics = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        if "startup_seconds" not in record and "queued_at" in record:
            # Slot free to first epoch result, minus the epoch and its test scoring: worker
            # start (or reuse), imports, data, tokenizer and model set-up, Ray's scheduling.
            work = float(result.get("epoch_seconds", 0.0)) + float(result.get("eval_test_seconds", 0.0))
            record["startup_seconds"] = metrics["startup_seconds"] = time.time() - record["queued_at"] - work
        if not self.outbox.has_step(trial.trial_id, epoch):
            # The outbox marks the epoch in the same transaction as its metrics: a state saved
            # a moment before the driver died never makes an epoch appear twice in MLflow.
            self.outbox.log_metrics(trial.trial_id, {k: v for k, v in metrics.items() if k not in _NOT_LOGGED},
                                    step=epoch, mark_step=True)
        record["last_epoch"] = epoch
        record["epochs"] = epoch
        record["node_id"] = result.get("node_id")
        record["worker_pid"] = result.get("pid")
        history = record.setdefault("history", [])
        history.append({k: result.get(k) for k in ("epoch", "train_loss", "val_accuracy", "val_macro_f1", "val_mcc",
                                                    "epoch_seconds", "eval_test_seconds")})
        if "setup_seconds" in result:
            record["setup_seconds"] = result["setup_seconds"]
        if "test_details" in result:
            record["test"] = {k: result[k] for k in result if k.startswith("test_") and k != "test_details"}
            record["test"].update(json.loads(result["test_details"]))
            record["best_epoch"] = epoch
            # The validation classes of the weights the test scored, for the degenerate check.
            record["best_val_classes"] = {k: result[k] for k in ("val_predicted_classes", "val_true_classes")
                                          if k in result}
        record["val_mcc_best"] = result.get("best_val_mcc", result.get("val_mcc"))
        record["train_seconds_total"] = record.get("train_seconds_total", 0.0) + float(result.get("epoch_seconds", 0.0))
        self.state.save_soon()

    def _complete(self, trial) -> None:
        logger = self._logger(trial)
        record = self.state.trial(trial.trial_id)
        last = trial.last_result or {}
        # Ray marks every finished trial `done`; only the loop's own flag tells a trial that
        # ran to early stopping or max_epochs from one the scheduler cut short.
        completed = bool(last.get("should_stop"))
        record["end_state"] = "completed" if completed else "stopped_early"
        tags = {"end_state": record["end_state"], "epochs_run": record.get("epochs", 0)}
        if not completed:
            tags["stopped_at_epoch"] = record.get("epochs", 0)
        test = record.get("test")
        if test:
            # A model that predicts one class scores MCC 0 however long it trained: say so.
            splits = degenerate_splits({**record.get("best_val_classes", {}), **test})
            record["degenerate"] = tags["degenerate"] = "+".join(splits) or "no"
            if splits:
                log.warning("%s seed %s predicted a single class on %s", record.get("label", trial.trial_id),
                            record.get("seed"), " and ".join(splits))
        logger.set_tags(tags)
        if test:
            logger.log_metrics(
                {f"final_{k}": v for k, v in test.items() if isinstance(v, (int, float))},
                step=record.get("best_epoch", 0),
            )
            with tempfile.TemporaryDirectory() as tmp:
                result = dict(test)
                result["test_confusion_matrix"] = np.asarray(test["test_confusion_matrix"])
                files = list(write_confusion_report(result, tmp).values())
                config = Path(tmp) / "config.yaml"
                config.write_text(record.get("config_yaml", ""))
                logger.log_artifacts(files + [config])
        logger.end("FINISHED")
        record["run_id"] = self.outbox.run_id(trial.trial_id)
        # At once: Ray records the trial as finished right after this, and a resumed sweep
        # never reports it again.
        self.state.save()

    def _fail(self, trial) -> None:
        logger = self._logger(trial)
        record = self.state.trial(trial.trial_id)
        record["end_state"] = "failed"
        logger.set_tags({"end_state": "failed", "epochs_run": record.get("epochs", 0)})
        logger.end("FAILED")
        record["run_id"] = self.outbox.run_id(trial.trial_id)
        self.state.save()
