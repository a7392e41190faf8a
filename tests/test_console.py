"""The sweep's progress table: tokenizer names, seeds, states, counts and the time left."""

from __future__ import annotations

import io
from types import SimpleNamespace

from omegaconf import OmegaConf

from tokbench.sweep.console import ConsoleProgress


def fake_sweep():
    spec = OmegaConf.create({"name": "demo", "max_epochs": 4})
    combinations = [{"label": "learned/zero/geneformer"}, {"label": "learned/bin_scgpt/scgpt"},
                    {"label": "baseline:logreg"}]
    return SimpleNamespace(spec=spec, combinations=combinations, n_trials=lambda: 6)


def trial(trial_id: str, combination: int, seed: int, last_result=None):
    return SimpleNamespace(trial_id=trial_id, config={"combination": combination, "seed": seed},
                           last_result=last_result or {})


def test_the_table_names_each_trial_and_counts_the_states():
    out = io.StringIO()
    console = ConsoleProgress(fake_sweep(), interval=3600, stream=out)
    a, b, c = trial("a", 0, 0), trial("b", 1, 0), trial("c", 2, 1)
    for t in (a, b, c):
        console.on_trial_start(0, [], t)
    console.on_trial_result(0, [], a, {"epoch": 2, "val_mcc": 0.8125})
    console.on_trial_result(0, [], b, {"epoch": 2, "val_mcc": 0.5})
    b.last_result = {"epoch": 2, "should_stop": False}
    console.on_trial_complete(0, [], b)  # cut short by the scheduler
    c.last_result = {"epoch": 1, "should_stop": True}
    console.on_trial_result(0, [], c, {"epoch": 1, "val_mcc": 0.7})
    console.on_trial_complete(0, [], c)
    console.on_step_end(0, [])
    assert out.getvalue() == ""  # not before the interval
    console.on_experiment_end([])
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sweep demo: 2 of 6 trials ended (1 stopped by ASHA, 0 failed), 1 running;")
    assert "at most ~" in lines[0]
    rows = {line.split("  ")[1].strip(): line for line in lines[2:]}
    assert rows["learned/zero/geneformer"].split()[-4:] == ["0", "2/4", "0.812", "running"]
    assert rows["learned/bin_scgpt/scgpt"].endswith("stopped by ASHA")
    assert rows["baseline:logreg"].endswith("done")


def test_a_failed_trial_is_shown_failed_and_a_long_sweep_shows_running_and_recent_rows():
    out = io.StringIO()
    console = ConsoleProgress(fake_sweep(), interval=0, stream=out, recent=1, all_rows=2)
    trials = [trial(str(i), i % 3, i) for i in range(4)]
    for t in trials:
        console.on_trial_start(0, [], t)
    console.on_trial_error(0, [], trials[0])
    trials[1].last_result = {"should_stop": True}
    console.on_trial_complete(0, [], trials[1])
    text = console.table()
    assert "1 failed" in text.splitlines()[0]
    shown = text.splitlines()[2:]
    assert len(shown) == 3 and shown[-1].endswith("done")  # two running, the last ended
    console.on_step_end(0, [])
    assert out.getvalue().count("sweep demo:") == 1
