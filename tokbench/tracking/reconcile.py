"""The end-of-sweep check: MLflow against Ray's own results and the sweep state.

Ray's ``result.json`` of every trial (written by Tune's JSON logger, whatever MLflow did) and
the sweep state say what MLflow must hold: one run per trial, every reported epoch, the end
state. What is missing is queued in the outbox like any other record; nothing present is
sent again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokbench.tracking.outbox import Outbox

log = logging.getLogger("tokbench.tracking")

# Reported by Ray with every result, so a trial's runs always have it at step = epoch.
CHECK_KEY = "training_iteration"
_NOT_LOGGED = {"epoch", "should_stop"}
_TERMINAL = {"completed": "FINISHED", "stopped_early": "FINISHED", "failed": "FAILED"}


def ray_results(experiment_dir: Path) -> dict[str, dict[int, dict]]:
    """``trial_id -> {epoch: result}`` from every ``<trial>/result.json`` under the experiment
    directory; a trial restored from a checkpoint reports some epochs twice: the first one
    counts (it is the one the driver logged)."""
    trials: dict[str, dict[int, dict]] = {}
    for path in sorted(Path(experiment_dir).glob("*/result.json")):
        for line in path.read_text().splitlines():
            try:
                result = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed driver
                continue
            trial_id = result.get("trial_id")
            if not trial_id:
                continue
            epoch = int(result.get("epoch", result.get(CHECK_KEY, 0)))
            trials.setdefault(trial_id, {}).setdefault(epoch, result)
    return trials


def _metrics(result: dict) -> dict:
    return {k: v for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_LOGGED}


def find_gaps(outbox: Outbox, state, experiment_dir: Path, sweep=None, parent_key: str = "parent") -> dict:
    """Queue whatever MLflow lacks; return counts ``{"runs", "epochs", "end_states"}`` of what
    was queued. Run after the outbox was flushed (it reads MLflow). End states Ray knows and
    the state lacks are written into ``state`` too (the caller saves it)."""
    from tokbench.tracking.record import start_run

    client = outbox.client()
    results = ray_results(experiment_dir)
    trials = state.doc["trials"]
    queued = {"runs": 0, "epochs": 0, "end_states": 0}
    for trial_id in sorted(set(results) | set(trials)):
        record = trials.get(trial_id, {})
        if outbox.has_run(trial_id) or not results.get(trial_id):
            continue
        # A trial Ray ran but whose run was never queued (the driver died in between).
        first = next(iter(results[trial_id].values()))
        config = first.get("config") or {}
        label = record.get("label") or trial_id
        outbox.create_run(trial_id, state.doc["experiment"], run_name=f"{label} seed={record.get('seed', config.get('seed', ''))}",
                          tags={"sweep_id": state.doc["sweep_id"], "trial_id": trial_id, "combination": label,
                                "end_state": "running"}, parent_key=parent_key)
        if sweep is not None and "combination" in config:
            from tokbench.tracking.outbox import QueuedRun

            start_run(QueuedRun(outbox, trial_id), sweep.trial_config(config))
        queued["runs"] += 1
    if queued["runs"] and not outbox.flush(timeout=120):
        return queued
    runs = _sweep_runs(client, outbox, state)
    for trial_id, by_epoch in results.items():
        run_id = outbox.run_id(trial_id)
        if run_id is None:
            continue
        logged = {m.step for m in client.get_metric_history(run_id, CHECK_KEY)}
        for epoch, result in sorted(by_epoch.items()):
            if epoch and epoch not in logged:
                timestamp = int(float(result.get("timestamp", 0)) * 1000) or None
                outbox.log_metrics(trial_id, _metrics(result), step=epoch, timestamp_ms=timestamp, mark_step=True)
                queued["epochs"] += 1
    for trial_id, by_epoch in results.items():
        record = trials.setdefault(trial_id, {})
        last = by_epoch[max(by_epoch)]
        if record.get("end_state") in (None, "running") and last.get("done"):
            # Ray finished the trial, but the driver died before its state said so.
            record["end_state"] = "completed" if last.get("should_stop") else "stopped_early"
            record["epochs"] = record.get("epochs") or max(by_epoch)
    for trial_id, record in trials.items():
        run = runs.get(outbox.run_id(trial_id) or "")
        end_state = record.get("end_state")
        if run is None or end_state not in _TERMINAL:
            continue
        tags = {"end_state": end_state, "epochs_run": str(record.get("epochs", 0))}
        if run.data.tags.get("end_state") != end_state or run.info.status != _TERMINAL[end_state]:
            outbox.set_tags(trial_id, tags)
            outbox.end(trial_id, _TERMINAL[end_state])
            queued["end_states"] += 1
    if any(queued.values()):
        log.warning("tracking check: queued %d runs, %d epochs and %d end states MLflow lacked (from Ray's results in %s)",
                    queued["runs"], queued["epochs"], queued["end_states"], experiment_dir)
    return queued


def _sweep_runs(client, outbox: Outbox, state) -> dict:
    """The sweep's child runs by run id (one search, paged)."""
    from tokbench.tracking.mlflow_runs import get_or_create_experiment

    experiment_id = get_or_create_experiment(client, state.doc["experiment"])
    runs, token = {}, None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.sweep_id = '{state.doc['sweep_id']}'",
                                  max_results=1000, page_token=token)
        runs.update({r.info.run_id: r for r in page})
        token = page.token
        if not token:
            return runs
