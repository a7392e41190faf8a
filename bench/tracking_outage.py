"""A tracking server that is killed mid-sweep and comes back a minute later: nothing is lost.

    python bench/tracking_outage.py --outage 60
    python bench/tracking_outage.py --outage 60 --trials 48 --epochs 20 --epoch-seconds 1

A sweep of no-op trials (bench/tracking_load.py's trainable, paced at ``--epoch-seconds`` per
epoch, so the sweep outlasts the outage) runs through the real sweep driver against an
``mlflow server`` on a fresh SQLite file. Once the first result is in, the server (and its
workers) is killed with SIGKILL, as a crash would; ``--outage`` seconds later a new server is
started on the same store and port. Meanwhile the driver's outbox
(``<storage>/<sweep>.tracking.db``) is sampled every quarter second.

Afterwards MLflow is compared with Ray's own results (the sweep state): one run per trial,
every per-epoch metric of every trial at every epoch exactly once and with Ray's values,
every tag and param on every run, every run FINISHED with its end state. Printed (JSON):
the outage's length, the records queued at most, the time from the restart until the queue
was first empty (catching up), how long the trials still ran after the server came back, the
sweep's wall time, and the checks. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tracking_load  # noqa: E402
from tracking_load import (NoOpTrainable, check_complete, free_port, start_mlflow_server, stop_server,  # noqa: E402
                           timed_fit, write_load_sweep, write_tiny_h5ad)

# The trainable's own per-epoch metrics (tracking_load.NoOpTrainable.step) and Ray's counter.
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_mcc", "best_val_mcc",
                 "epoch_seconds", "training_iteration")
# Compared value by value with the history Ray's results left in the sweep state.
HISTORY_METRICS = ("train_loss", "val_mcc", "val_accuracy", "val_macro_f1")


def paced(seconds: float) -> type:
    """NoOpTrainable sleeping ``seconds`` per epoch (a class made here travels by value)."""

    class PacedNoOp(NoOpTrainable):
        def step(self):
            time.sleep(seconds)
            return super().step()

    return PacedNoOp


def queued(outbox: Path) -> int | None:
    """Records in the outbox file now (None before the driver has made it)."""
    if not outbox.exists():
        return None
    try:
        with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM ops").fetchone()[0]
    except sqlite3.Error:  # the schema is being created
        return None


class Outage(threading.Thread):
    """Kills the server once the first result is in, restarts it ``seconds`` later, and
    samples the outbox throughout (times in seconds of ``time.monotonic``)."""

    def __init__(self, server, store: str, artifacts: Path, port: int, seconds: float, outbox: Path):
        super().__init__(daemon=True)
        self.server, self.store, self.artifacts, self.port = server, store, artifacts, port
        self.seconds, self.outbox = seconds, outbox
        self.killed_at = self.up_at = self.caught_up_at = self.restart_s = None
        self.max_queued, self.done, self.error = 0, threading.Event(), None

    def run(self):
        from tokbench.sweep import mlflow_callback

        try:
            while not mlflow_callback.RESULT_SECONDS:
                time.sleep(0.1)
            stop_server(self.server)
            self.killed_at = time.monotonic()
            while time.monotonic() < self.killed_at + self.seconds:
                self._sample()
                time.sleep(0.25)
            restart = time.monotonic()
            self.server = start_mlflow_server(self.store, self.artifacts, self.port, workers=1)
            # The server is back once /health answers; the outage is kill to that moment.
            self.up_at = time.monotonic()
            self.restart_s = self.up_at - restart
            while not self.done.is_set():
                if self._sample() == 0 and self.caught_up_at is None:
                    self.caught_up_at = time.monotonic()
                time.sleep(0.25)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    def _sample(self) -> int | None:
        n = queued(self.outbox)
        if n is not None:
            self.max_queued = max(self.max_queued, n)
        return n


def check_against_ray(uri: str, sweep: str, exp_dir: Path, trials: int, epochs: int) -> dict:
    """MLflow against the sweep state: the counts of what is missing, twice or different (all 0
    when nothing was lost)."""
    from mlflow.tracking import MlflowClient

    from tokbench.sweep.state import SweepState

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("load")
    runs = client.search_runs([experiment.experiment_id], f"tags.sweep_id = '{sweep}'", max_results=5000)
    parents = [r for r in runs if r.data.tags.get("tokbench.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    state = SweepState.load(exp_dir).doc["trials"]
    by_trial: dict[str, list] = {}
    for run in children:
        by_trial.setdefault(run.data.tags.get("trial_id"), []).append(run)
    tag_keys = set().union(*(r.data.tags for r in children)) if children else set()
    param_keys = set().union(*(r.data.params for r in children)) if children else set()
    bad = {"trials_in_ray": len(state), "runs": len(children), "parent_finished": [p.info.status for p in parents] == ["FINISHED"],
           "trials_without_run": len(set(state) - set(by_trial)), "trials_with_several_runs": 0,
           "runs_not_finished": 0, "runs_missing_tags": 0, "runs_missing_params": 0, "wrong_end_state": 0,
           "metric_histories_checked": 0, "epochs_missing": 0, "epochs_twice": 0, "values_unlike_ray": 0}
    for trial_id, record in state.items():
        found = by_trial.get(trial_id, [])
        if len(found) != 1:
            bad["trials_with_several_runs"] += len(found) > 1
            continue
        run = found[0]
        bad["runs_not_finished"] += run.info.status != "FINISHED"
        bad["runs_missing_tags"] += set(run.data.tags) != tag_keys
        bad["runs_missing_params"] += set(run.data.params) != param_keys
        bad["wrong_end_state"] += (run.data.tags.get("end_state"), run.data.tags.get("epochs_run")) != ("completed", str(epochs))
        ray_history = {h["epoch"]: h for h in record.get("history", [])}
        for key in EPOCH_METRICS:
            points = client.get_metric_history(run.info.run_id, key)
            bad["metric_histories_checked"] += 1
            steps = [p.step for p in points]
            bad["epochs_missing"] += len(set(range(1, epochs + 1)) - set(steps))
            bad["epochs_twice"] += len(steps) - len(set(steps))
            if key in HISTORY_METRICS:
                bad["values_unlike_ray"] += sum(ray_history.get(p.step, {}).get(key) != p.value for p in points)
    bad["ok"] = (bad["trials_in_ray"] == bad["runs"] == trials and bad["parent_finished"]
                 and not any(bad[k] for k in ("trials_without_run", "trials_with_several_runs", "runs_not_finished",
                                              "runs_missing_tags", "runs_missing_params", "wrong_end_state",
                                              "epochs_missing", "epochs_twice", "values_unlike_ray")))
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage", type=float, default=60.0, help="seconds from the kill to the restart")
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--epoch-seconds", type=float, default=1.0, help="each trial's time per epoch")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--cpu", type=float, default=0.25, help="CPUs per trial (concurrency = num-cpus / cpu)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

    import ray

    from tokbench.sweep import mlflow_callback
    from tokbench.sweep.launch import run_sweep
    from tokbench.tracking.outbox import outbox_path

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        h5ad = str(write_tiny_h5ad(folder / "tiny.h5ad"))
        port, store = free_port(), f"sqlite:///{folder / 'server.db'}"
        server = start_mlflow_server(store, folder / "artifacts", port, workers=1)
        uri = f"http://127.0.0.1:{port}"
        path = write_load_sweep(folder, h5ad, args.trials, args.epochs, uri, args.cpu)
        exp_dir = folder / "results" / "outage"
        outage = Outage(server, store, folder / "artifacts", port, args.outage, outbox_path(exp_dir))
        ray.cloudpickle.register_pickle_by_value(tracking_load)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        mlflow_callback.RESULT_SECONDS.clear()
        fit_seconds: list[float] = []
        fit_spans: list[tuple[float, float]] = []
        started = time.monotonic()
        try:
            outage.start()
            with timed_fit(fit_seconds, fit_spans):
                run_sweep(path, name="outage", num_cpus=args.num_cpus, trainable=paced(args.epoch_seconds), verbose=0)
            ended = time.monotonic()
            outage.done.set()
            outage.join(timeout=30)
            if outage.error is not None:
                raise outage.error
            if outage.up_at is None:
                sys.exit("the sweep ended before the server was restarted; give it more trials or epochs")
            fit_start, fit_end = fit_spans[0]
            figures = {
                "trials": args.trials, "epochs": args.epochs, "epoch_seconds": args.epoch_seconds,
                "concurrent_trials": int(args.num_cpus / args.cpu),
                "outage_s": round(outage.up_at - outage.killed_at, 1),
                "server_restart_s": round(outage.restart_s, 1),
                # From the start of the trials' scheduling (Tuner.fit).
                "killed_after_s": round(outage.killed_at - fit_start, 1),
                "max_queued_records": outage.max_queued,
                # Restart to the first empty queue; None: the end-of-sweep flush emptied it.
                "catch_up_s": round(outage.caught_up_at - outage.up_at, 1) if outage.caught_up_at else None,
                # Negative: the trials were all done before the server was back, and the
                # end-of-sweep flush waited for it.
                "scheduling_left_at_restart_s": round(fit_end - outage.up_at, 1),
                "fit_s": round(fit_seconds[0], 1),
                "wall_s": round(ended - started, 1),
                "results": len(mlflow_callback.RESULT_SECONDS),
                "complete": check_complete(uri, "outage", args.trials, args.epochs),
                "against_ray": check_against_ray(uri, "outage", exp_dir, args.trials, args.epochs),
            }
        finally:
            outage.done.set()
            stop_server(outage.server)
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    if not figures["against_ray"]["ok"]:
        sys.exit("MLflow does not match Ray's results after the outage (see against_ray above)")


if __name__ == "__main__":
    main()
