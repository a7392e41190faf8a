"""Batches tokenised in a background thread (``trainer.prefetch``): the same training as
tokenising inside the step, one batch ahead, errors surfaced, no thread left behind."""

from __future__ import annotations

import threading
import traceback
from contextlib import closing

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from test_training import TopKTokenizer, assert_same_test, make_data, make_trainer, without_timings
from tokbench.errors import TokbenchError
from tokbench.training import TrainerConfig, validate_trainer_config
from tokbench.training.loop import PREFETCH_THREAD, prefetched


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(PREFETCH_THREAD)]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_prefetch_trains_exactly_as_tokenising_inside_the_step(tmp_path):
    kw = dict(max_epochs=2, early_stopping=False, bucket_by_length=True, bucket_batches=2)
    inline = make_trainer(tmp_path / "inline", prefetch=False, **kw)
    inline.fit()
    ahead = make_trainer(tmp_path / "ahead", prefetch=True, **kw)
    ahead.fit()
    assert without_timings(ahead.history) == without_timings(inline.history)
    assert_same_weights(ahead.model, inline.model)
    assert_same_test(ahead.test(), inline.test())
    assert prefetch_threads() == []
    assert ahead.history[0]["tokenise_fraction"] > 0


def test_prefetch_with_the_real_tokenizer_is_bit_identical(tiny_atlas, tmp_path):
    """Geneformer's order and scGPT's sampling and bins: random draws from (seed, epoch, cell)
    streams only, so a background thread changes neither the sentences nor the dropout masks."""
    from tokbench.training.experiment import experiment_path, load_experiment
    from tokbench.training.run import build_runner, load_data

    base = tiny_overrides(tiny_atlas, tmp_path) + ["fc=scgpt", "fe=bin_scgpt", "trainer.early_stopping=false",
                                                   "trainer.device=cpu", "tracking.enabled=false"]
    runs = {}
    for prefetch in (False, True):
        cfg = load_experiment(experiment_path("cross_tissue"), base + [f"trainer.prefetch={str(prefetch).lower()}"])
        runner = build_runner(cfg, tmp_path / f"run_{prefetch}", data=load_data(cfg))
        runner.fit()
        runs[prefetch] = runner
    assert without_timings(runs[True].history) == without_timings(runs[False].history)
    assert_same_weights(runs[True].model, runs[False].model)


def test_tokenising_leaves_the_global_random_generators_alone(tiny_atlas, tmp_path):
    """What makes prefetching safe: the tokenizer never draws from the generators the
    training thread's dropout uses."""
    from tokbench.training.experiment import experiment_path, load_experiment
    from tokbench.training.run import build_runner, load_data

    for fc in ("geneformer", "scgpt", "uce"):
        cfg = load_experiment(experiment_path("cross_tissue"), tiny_overrides(tiny_atlas, tmp_path) + [
            f"fc={fc}", "trainer.device=cpu", "tracking.enabled=false"])
        runner = build_runner(cfg, tmp_path / fc, data=load_data(cfg))
        torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
        runner.tokenizer.sentences(runner.train_cells[:40], 3, "cpu")
        assert torch.equal(torch.get_rng_state(), torch_state), fc
        assert np.array_equal(np.random.get_state()[1], numpy_state), fc


class FailingTokenizer(TopKTokenizer):
    """Raises on the third batch it is asked for."""

    calls = 0

    def sentences(self, cells, epoch, device="cpu"):
        FailingTokenizer.calls += 1
        if FailingTokenizer.calls == 3:
            raise ValueError("gene table out of date")
        return super().sentences(cells, epoch, device)


def test_an_error_while_tokenising_reaches_the_training_thread(tmp_path):
    data = make_data()
    FailingTokenizer.calls = 0
    trainer = make_trainer(tmp_path, data, FailingTokenizer(data, 32), max_epochs=2)
    with pytest.raises(ValueError, match="gene table out of date") as caught:
        trainer.step()
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert "sentences" in frames and "step" in frames  # the thread's frames and the caller's
    assert prefetch_threads() == []


def test_one_item_ahead_and_the_thread_stops_on_early_exit():
    made, lock = [], threading.Lock()

    def make(i):
        with lock:
            made.append(i)
        return i * 10

    stream = prefetched(list(range(6)), make)
    with closing(stream):
        for i, value in enumerate(stream):
            assert value == 10 * i
            # item i is in the caller's hands: at most item i + 1 has been started
            assert max(made) <= i + 1
            if i == 2:
                break
    assert prefetch_threads() == [] and max(made) <= 3
    assert list(prefetched([], make)) == []
    assert prefetch_threads() == []


def test_prefetch_must_be_a_boolean():
    with pytest.raises(TokbenchError, match=r"trainer\.prefetch: expected true or false, got 'yes'"):
        validate_trainer_config(TrainerConfig(prefetch="yes"))
