"""Driver-side MLflow logging for a sweep: one parent run, one child run per trial.

Everything is written from the driver (one process), so a SQLite store is safe for
single-node sweeps and an ``mlflow server`` for clusters; trials never talk to MLflow.
Run ids live in the sweep state, so retries and ``--resume`` reuse the trial's run.
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
from tokbench.tracking.mlflow_runs import RunLogger
from tokbench.tracking.record import log_epoch, run_tags, start_run
from tokbench.training.experiment import to_yaml
from tokbench.training.metrics import write_confusion_report

log = logging.getLogger("tokbench.sweep")



@contextlib.contextmanager
def _logging_failures(trial, hook: str):
    # A tracking hiccup must never fail a trial: Ray would retry a finished trial for it.
    try:
        yield
    except Exception:  # noqa: BLE001
        log.exception("MLflow logging failed on trial %s (%s); the trial goes on", trial.trial_id, hook)


class MlflowSweepCallback(tune.Callback):
    """Creates, fills and closes the child run of every trial, nested under the sweep's run."""

    def __init__(self, sweep: Sweep, experiment_dir: Path, tracking_uri: str):
        self.sweep, self.experiment_dir, self.uri = sweep, Path(experiment_dir), tracking_uri
        self.setup()

    def setup(self, **info) -> None:
        # Ray pickles the run config (with its callbacks) and restores it on resume: read the
        # sweep state afresh from disk instead of trusting a pickled copy.
        self.state = SweepState.load(self.experiment_dir)
        self._loggers: dict[str, RunLogger] = {}
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

    def _logger(self, trial) -> RunLogger:
        if trial.trial_id in self._loggers:
            return self._loggers[trial.trial_id]
        record = self.state.trial(trial.trial_id)
        if record.get("run_id"):
            logger = RunLogger(self.uri, self.sweep.experiment_name, run_id=record["run_id"])
        else:
            cfg = self.sweep.trial_config(trial.config)
            combo = self.sweep.combinations[trial.config["combination"]]
            logger = RunLogger(
                self.uri,
                self.sweep.experiment_name,
                run_name=f"{combo['label']} seed={trial.config['seed']}",
                parent_run_id=self.state.doc["parent_run_id"],
            )
            start_run(logger, cfg)
            logger.set_tags(
                {
                    "sweep_id": self.state.doc["sweep_id"],
                    "trial_id": trial.trial_id,
                    "combination": combo["label"],
                    "end_state": "running",
                }
            )
            record.update(
                run_id=logger.run_id,
                label=combo["label"],
                seed=int(trial.config["seed"]),
                params=trial.config.get("params") or {},
                tags=run_tags(cfg),
                last_epoch=0,
                config_yaml=to_yaml(cfg),
            )
            self.state.save()
        self._loggers[trial.trial_id] = logger
        return logger

    def on_trial_start(self, iteration, trials, trial, **info):
        with _logging_failures(trial, "start"):
            self._logger(trial)
            record = self.state.trial(trial.trial_id)
            if "queued_at" not in record:
                record["queued_at"] = self._free_since.pop(0) if self._free_since else self._fit_started

    def on_trial_result(self, iteration, trials, trial, result, **info):
        with _logging_failures(trial, "result"):
            self._record_result(trial, result)

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
        log_epoch(logger, metrics)
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
        record["val_mcc_best"] = result.get("best_val_mcc", result.get("val_mcc"))
        record["train_seconds_total"] = record.get("train_seconds_total", 0.0) + float(result.get("epoch_seconds", 0.0))
        self.state.save()

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
        logger.set_tags(tags)
        test = record.get("test")
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
        self.state.save()

    def _fail(self, trial) -> None:
        logger = self._logger(trial)
        record = self.state.trial(trial.trial_id)
        record["end_state"] = "failed"
        logger.set_tags({"end_state": "failed", "epochs_run": record.get("epochs", 0)})
        logger.end("FAILED")
        self.state.save()
