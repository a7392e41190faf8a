"""Wall time, trial start-up overhead and compute saved by ASHA for a sweep (default: the demo).

    python bench/sweep.py                          # search_spaces/demo.yaml, 2 CPUs
    python bench/sweep.py --sweep search_spaces/demo.yaml --num-cpus 2

Runs the sweep twice in a temporary directory: as written (ASHA), then as a full grid
(scheduler none, every trial to max_epochs). Reports (a) the ASHA sweep's wall time,
(b) the median trial start-up overhead: from the moment a trial's CPU slot is free (the
sweep's start, or the end of the trial before it) to its first result, less that epoch and
its test scoring, so worker start or reuse, imports, data, tokenizer and model set-up and
Ray's scheduling all count; beside it the share of slot time spent training, validating
and testing, (c) epochs and compute seconds run by ASHA against the full grid, and whether
both pick the same best tokenizer: the highest mean validation MCC over seeds (what ASHA
selects on; the baseline is the reference, not a candidate) and the highest mean
cross-tissue test MCC (the leaderboard's first row). When the picks differ it prints the
regret: how far ASHA's pick scores below the full grid's best, both scored in the full grid.

With ``--keep DIR`` both runs stay in DIR; ``bench/asha_replay.py`` then replays other ASHA
settings on the full grid's MLflow runs (``DIR/full/mlflow.db``) in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml


def run(spec_path: Path, workdir: Path, num_cpus: int):
    import ray

    from tokbench.sweep.launch import run_sweep
    from tokbench.sweep.state import SweepState

    os.chdir(workdir)
    started = time.perf_counter()
    board = run_sweep(spec_path, num_cpus=num_cpus, verbose=0)
    wall = time.perf_counter() - started
    ray.shutdown()
    exp_dir = next(p for p in (workdir / "ray_results").iterdir() if p.is_dir())
    state = SweepState.load(exp_dir)
    return board, wall, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="run in this (new) directory and keep it: its full/mlflow.db "
                        "is what bench/asha_replay.py replays other ASHA settings on")
    args = parser.parse_args()
    spec = yaml.safe_load(args.sweep.read_text())
    base_dir = args.sweep.resolve().parent

    if args.keep:
        args.keep.mkdir(parents=True)
    with contextlib.nullcontext(str(args.keep.resolve())) if args.keep else tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["TOKBENCH_CACHE"] = str(tmp / "cache")
        # Both runs log and store results in their own working directory, not a cluster's.
        for name in ("MLFLOW_TRACKING_URI", "TOKBENCH_STORAGE_PATH"):
            os.environ.pop(name, None)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        results = {}
        for mode in ("asha", "full"):
            workdir = tmp / mode
            workdir.mkdir()
            variant = dict(spec, scheduler={"name": "none"} if mode == "full" else spec.get("scheduler", {}))
            base = dict(variant.get("base", {}))
            experiment = base.get("experiment", "cross_tissue")
            if experiment.endswith((".yaml", ".yml")) and not Path(experiment).is_absolute():
                base["experiment"] = str(base_dir / experiment)
            variant["base"] = base
            path = workdir / "sweep.yaml"
            path.write_text(yaml.safe_dump(variant))
            results[mode] = run(path, workdir, args.num_cpus)

    def tokenizers(board):
        # The candidates, and the trials ASHA schedules: the baseline is the exempt reference.
        return board[~board["tokenizer"].str.startswith("baseline")]

    def best(board, by):
        top = tokenizers(board).sort_values(by, ascending=False).iloc[0]
        return top["tokenizer"], top["val_mcc_mean"], top["test_mcc_mean"]

    def busy_seconds(state):
        # Slot time spent on the work itself: training, validation and test scoring.
        return sum((h.get("epoch_seconds") or 0.0) + (h.get("eval_test_seconds") or 0.0)
                   for t in state.doc["trials"].values() for h in t.get("history", []))

    def regret(pick, by):
        # How much worse ASHA's pick is than the full grid's best, both scored in the full grid.
        scores = tokenizers(results["full"][0]).set_index("tokenizer")[by]
        return scores.max() - scores[pick]

    asha_board, asha_wall, asha_state = results["asha"]
    full_board, full_wall, full_state = results["full"]
    trials = asha_state.doc["trials"].values()
    startups = sorted(t["startup_seconds"] for t in trials if "startup_seconds" in t)
    setups = [t["setup_seconds"] for t in trials if "setup_seconds" in t]
    workers = {t.get("worker_pid") for t in trials} - {None}
    asha_epochs, full_epochs = int(asha_board["epochs_run"].sum()), int(full_board["epochs_run"].sum())
    asha_tok, full_tok = (int(tokenizers(b)["epochs_run"].sum()) for b in (asha_board, full_board))
    asha_busy, full_busy = busy_seconds(asha_state), busy_seconds(full_state)
    asha_best, full_best = best(asha_board, "val_mcc_mean"), best(full_board, "val_mcc_mean")
    asha_test, full_test = best(asha_board, "test_mcc_mean"), best(full_board, "test_mcc_mean")

    rows = [
        ("sweep", f"{args.sweep.name}: {len(asha_state.doc['trials'])} trials, {args.num_cpus} CPUs"),
        ("(a) wall time, ASHA", f"{asha_wall:.0f} s (full grid: {full_wall:.0f} s)"),
        ("(b) trial start-up, median", f"{statistics.median(startups):.1f} s (min {startups[0]:.1f}, max {startups[-1]:.1f}): "
                                       "slot free to first epoch, less the epoch" if startups else "n/a"),
        ("    of which set-up, median", f"{statistics.median(setups):.1f} s (data, tokenizer, model); {len(workers)} worker "
                                        f"processes for {len(asha_state.doc['trials'])} trials" if setups else "n/a"),
        ("    slot utilisation, ASHA", f"{asha_busy / (asha_wall * args.num_cpus):.0%} of {args.num_cpus} x wall time "
                                       "trains, validates or tests"),
        ("(c) epochs, ASHA / full grid", f"{asha_epochs} / {full_epochs} = {asha_epochs / max(full_epochs, 1):.0%}"),
        ("    tokenizer trials only", f"{asha_tok} / {full_tok} = {asha_tok / max(full_tok, 1):.0%} (the baseline, exempt "
                                       f"from ASHA: {asha_epochs - asha_tok} / {full_epochs - full_tok})"),
        ("    compute, ASHA / full grid", f"{asha_busy:.0f} / {full_busy:.0f} s = {asha_busy / max(full_busy, 1e-9):.0%} "
                                           "(training, validation and test seconds)"),
        ("    trials stopped by ASHA", str(int(asha_board["stopped_early"].sum()))),
        ("    best, ASHA", f"{asha_best[0]} (val MCC {asha_best[1]:.3f}, test MCC {asha_best[2]:.3f})"),
        ("    best, full grid", f"{full_best[0]} (val MCC {full_best[1]:.3f}, test MCC {full_best[2]:.3f})"),
        ("    same winner", "yes" if asha_best[0] == full_best[0] else
         f"no: ASHA's pick is {regret(asha_best[0], 'val_mcc_mean'):.3f} val MCC below the full grid's best, in the full grid"),
        ("    best by test MCC, ASHA", f"{asha_test[0]} ({asha_test[2]:.3f})"),
        ("    best by test MCC, full grid", f"{full_test[0]} ({full_test[2]:.3f})"),
        ("    same winner by test MCC", "yes" if asha_test[0] == full_test[0] else
         f"no: ASHA's pick is {regret(asha_test[0], 'test_mcc_mean'):.3f} test MCC below the full grid's best, in the full grid"),
    ]
    if args.keep:
        rows.append(("full grid kept", f"--tracking-uri sqlite:///{args.keep.resolve() / 'full' / 'mlflow.db'} "
                                       f"--sweep {full_state.doc['sweep_id']}"))
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
