"""Replay ASHA on a finished full-grid sweep: the epochs it would run and the winner it would pick.

    python bench/asha_replay.py --tracking-uri sqlite:///mlflow.db --sweep SWEEP_ID \\
        [--grace 1 2 3] [--rf 2 3 4] [--metric val_mcc --mode max] [--concurrency 2]

The sweep must have run every trial to its end (``scheduler: {name: none}``, as the full
grid of ``bench/sweep.py``). The replay starts the trials in trial order on
``--concurrency`` slots; each epoch lasts its logged ``epoch_seconds``; after every epoch the
trial's metric goes to the sweep's own scheduler (``ReferenceExemptASHA``: Ray's bracket
arithmetic, the baseline exempt), which continues or stops it, exactly as in a sweep. A
stopped trial keeps its best validation MCC so far and the test MCC of those best weights
(logged whenever the validation MCC improves). Winners are those of ``bench/sweep.py``: the
highest mean over seeds of the best validation MCC, and of the test MCC, baseline excluded.

One full grid (minutes per trial) then answers "what would ASHA with grace g and reduction
factor r have saved, and would it have kept the winner?" for every (g, r) in seconds.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
from dataclasses import dataclass
from types import SimpleNamespace

import pandas as pd

from tokbench.report.collect import load_runs


@dataclass
class Trial:
    trial_id: str
    tokenizer: str
    combination: int
    baseline: bool
    metric: pd.Series  # by epoch
    val_mcc: pd.Series
    test_mcc: pd.Series  # test MCC of the best weights so far, logged when they change
    seconds: pd.Series


def load_trials(tracking_uri: str, sweep_id: str, metric: str) -> list[Trial]:
    runs = load_runs(tracking_uri, sweep_id=sweep_id)
    reader = runs.reader
    combos = {name: i for i, name in enumerate(dict.fromkeys(runs.trials.sort_values("trial_id")["tokenizer"]))}
    trials = []
    for row in runs.trials.sort_values("trial_id").itertuples():
        def history(key: str) -> pd.Series:
            return pd.Series(reader.metric_history(row.run_id, key), dtype=float)

        if row.end_state != "completed":
            raise SystemExit(f"trial {row.trial_id} ({row.tokenizer}) ended {row.end_state}: replay needs a full grid")
        trials.append(Trial(row.trial_id, row.tokenizer, combos[row.tokenizer], bool(row.baseline),
                            history(metric), history("val_mcc"), history("test_mcc"), history("epoch_seconds")))
    return trials


def replay(trials: list[Trial], grace: int, rf: float, metric: str, mode: str, concurrency: int, max_epochs: int,
           jitter: float = 0.0, rng: random.Random | None = None):
    """Epochs each trial runs under ASHA(grace, rf) on ``concurrency`` slots. With ``jitter``
    j, every epoch lasts its logged time times a uniform draw from [1 - j, 1 + j]: the
    run-to-run timing noise that decides which trial reaches a rung first."""
    from tokbench.sweep.scheduler import ReferenceExemptASHA

    scheduler = ReferenceExemptASHA(
        exempt_combinations={t.combination for t in trials if t.baseline}, time_attr="training_iteration",
        metric=metric, mode=mode, max_t=max_epochs, grace_period=grace, reduction_factor=rf,
    )
    fakes = {t.trial_id: SimpleNamespace(trial_id=t.trial_id, config={"combination": t.combination}) for t in trials}
    pending, running, ran, order = list(trials), [], {}, itertools.count()
    rng = rng or random.Random(0)

    def duration(trial: Trial, epoch: int) -> float:
        return trial.seconds.get(epoch, 1.0) * (1.0 + jitter * (2.0 * rng.random() - 1.0))

    def start(now: float) -> None:
        trial = pending.pop(0)
        scheduler.on_trial_add(None, fakes[trial.trial_id])
        first = int(trial.metric.index.min())
        heapq.heappush(running, (now + duration(trial, first), next(order), trial, first))

    for _ in range(min(concurrency, len(pending))):
        start(0.0)
    while running:
        now, _, trial, epoch = heapq.heappop(running)
        result = {"training_iteration": epoch, metric: float(trial.metric[epoch])}
        action = scheduler.on_trial_result(None, fakes[trial.trial_id], result)
        last = epoch >= int(trial.metric.index.max())
        if action == "STOP" or last:
            scheduler.on_trial_complete(None, fakes[trial.trial_id], result)
            ran[trial.trial_id] = epoch
            if pending:
                start(now)
        else:
            heapq.heappush(running, (now + duration(trial, epoch + 1), next(order), trial, epoch + 1))
    return ran


def winners(trials: list[Trial], ran: dict) -> tuple[str, str]:
    rows = []
    for t in trials:
        if t.baseline:
            continue
        stop = ran[t.trial_id]
        test = t.test_mcc[t.test_mcc.index <= stop]
        rows.append({"tokenizer": t.tokenizer, "val": t.val_mcc[t.val_mcc.index <= stop].max(),
                     "test": test.iloc[-1] if len(test) else math.nan})
    board = pd.DataFrame(rows).groupby("tokenizer").mean()
    return board["val"].idxmax(), board["test"].idxmax()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--sweep", required=True, help="the full-grid sweep's id")
    parser.add_argument("--grace", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rf", type=float, nargs="+", default=[2, 3, 4])
    parser.add_argument("--metric", default="val_mcc")
    parser.add_argument("--mode", default="max", choices=["max", "min"])
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="replays per setting; with --jitter, how often each winner is kept")
    parser.add_argument("--jitter", type=float, default=0.0,
                        help="epoch times vary by up to this fraction between replays (e.g. 0.2)")
    args = parser.parse_args()

    trials = load_trials(args.tracking_uri, args.sweep, args.metric)
    full = {t.trial_id: int(t.metric.index.max()) for t in trials}
    max_epochs = max(full.values())
    full_val, full_test = winners(trials, full)
    print(f"{len(trials)} trials, full grid: {sum(full.values())} epochs; "
          f"best by val MCC {full_val}, by test MCC {full_test}")
    if args.repeats > 1:
        print(f"{args.repeats} replays per setting, epoch times +-{args.jitter:.0%}: mean epochs, and in how many "
              "replays each winner is the full grid's")
        print(f"{'metric':<14}{'grace':>6}{'rf':>5}{'epochs':>9}{'share':>7}{'max share':>10}"
              f"{'same best by val':>18}{'same best by test':>19}")
    else:
        print(f"{'metric':<14}{'grace':>6}{'rf':>5}{'epochs':>9}{'share':>7}{'stopped':>9}  "
              f"{'best by val MCC':<40}{'best by test MCC'}")
    for grace, rf in itertools.product(args.grace, args.rf):
        rng = random.Random(0)
        runs = [replay(trials, grace, rf, args.metric, args.mode, args.concurrency, max_epochs, args.jitter, rng)
                for _ in range(args.repeats)]
        epochs = [sum(ran.values()) for ran in runs]
        picked = [winners(trials, ran) for ran in runs]
        if args.repeats > 1:
            same_val = sum(val == full_val for val, _ in picked)
            same_test = sum(test == full_test for _, test in picked)
            mean = sum(epochs) / len(epochs)
            print(f"{args.metric:<14}{grace:>6}{rf:>5g}{mean:>9.1f}"
                  f"{mean / sum(full.values()):>7.0%}{max(epochs) / sum(full.values()):>10.0%}"
                  f"{f'{same_val}/{args.repeats}':>18}{f'{same_test}/{args.repeats}':>19}")
            continue
        ran, (val, test) = runs[0], picked[0]
        stopped = sum(ran[t] < full[t] for t in ran)
        print(f"{args.metric:<14}{grace:>6}{rf:>5g}{epochs[0]:>9}{epochs[0] / sum(full.values()):>7.0%}{stopped:>9}  "
              f"{val + (' (same)' if val == full_val else ''):<40}{test + (' (same)' if test == full_test else '')}")


if __name__ == "__main__":
    main()
