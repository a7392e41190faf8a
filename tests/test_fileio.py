"""Atomic writes: the old file or the whole new one, no temporary left behind, no random draws."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from tokbench.fileio import atomic_path, write_atomic


def _folder(path):
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("payload, expected", [("grüße\n", "grüße\n".encode()), (b"\x00\x01png", b"\x00\x01png")])
def test_write_replaces_the_file_with_text_or_bytes(tmp_path, payload, expected):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    write_atomic(target, payload)
    assert target.read_bytes() == expected
    assert _folder(target) == ["state.json"]


def test_parent_folder_is_created_and_durable_is_optional(tmp_path):
    target = tmp_path / "a" / "b" / "config.yaml"
    write_atomic(target, "x: 1\n", durable=False)
    assert target.read_text() == "x: 1\n"


def test_an_exception_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="renderer failed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a fi")
            raise RuntimeError("renderer failed")
    assert target.read_bytes() == b"old"
    assert _folder(target) == ["report.png"]


def test_an_exception_before_any_write_leaves_no_file(tmp_path):
    target = tmp_path / "new.json"
    with pytest.raises(KeyError):
        with atomic_path(target):
            raise KeyError("nothing written")
    assert _folder(target) == []


def test_the_temporary_keeps_the_suffix_so_writers_do_not_append_theirs(tmp_path):
    # np.save appends ".npy" to a name without it; the temporary must already end in it.
    target = tmp_path / "gene_median_nonzero.npy"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".npy" and tmp != target
        np.save(tmp, np.arange(3))
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert _folder(target) == ["gene_median_nonzero.npy"]


def test_a_write_draws_nothing_from_the_global_random_streams(tmp_path):
    # Checkpoints save these states: a cache or report write between a save and a resume
    # must not shift the resumed run's random stream.
    np.random.seed(7)
    torch.manual_seed(7)
    random.seed(7)
    numpy_state, torch_state, python_state = np.random.get_state(), torch.get_rng_state(), random.getstate()
    write_atomic(tmp_path / "a.txt", "text")
    with atomic_path(tmp_path / "b.npy") as tmp:
        np.save(tmp, np.zeros(2))
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and (after[1] == numpy_state[1]).all() and after[2:] == numpy_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state


def test_two_writers_of_one_file_never_collide(tmp_path):
    # A fixed temporary name lets one writer rename the other's half-written file.
    target = tmp_path / "config.yaml"
    payloads = [f"writer: {i}\n" * 2000 for i in range(2)]
    errors = []

    def write(payload):
        try:
            for _ in range(40):
                write_atomic(target, payload, durable=False)
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert target.read_text() in payloads
    assert _folder(target) == ["config.yaml"]
