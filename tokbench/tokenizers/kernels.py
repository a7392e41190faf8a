"""Array kernels of the sentence builder: counter-based random bits, row sorts, flat search.

Every random choice of a tokenizer is a pure function of ``(seed, epoch, cell, item)``:
the bits come from a splitmix64 mixer applied to those counters, never from a generator
with state, so a cell gets the same draw whatever batch, loader worker, process or
machine tokenises it, and a new epoch gets a new draw.

The kernels take and return torch tensors and serve the array path of the sentence
builder, which runs on GPUs (on a CPU, :mod:`compiled` builds the sentences and the array
path is the reference that tests compare it with, under ``force_torch``). The random bits
run through numpy on the CPU (zero copy; unsigned 64-bit arithmetic), with results
bit-identical to the torch operations.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB

# Independent random streams: one per kind of choice, so e.g. the order of a cell's genes
# is not correlated with which genes were sampled.
STREAM_SELECT, STREAM_ORDER, STREAM_CHROMOSOME, STREAM_BIN, STREAM_DRAW = 1, 2, 3, 4, 5

_use_numpy = True


@contextlib.contextmanager
def force_torch():
    """Inside the block, build sentences on the CPU with the array path's torch operations
    (the GPU code path) instead of :mod:`compiled`, and random bits without numpy."""
    global _use_numpy
    previous, _use_numpy = _use_numpy, False
    try:
        yield
    finally:
        _use_numpy = previous


def compiled_enabled(device: torch.device) -> bool:
    """Whether CPU work on ``device`` may use the numpy and compiled kernels."""
    return _use_numpy and device.type == "cpu"


def _numpy_ok(t: torch.Tensor) -> bool:
    return compiled_enabled(t.device)


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 value torch stores for it."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def mix64(x: int) -> int:
    """splitmix64's finaliser on one Python integer (a bijection on 64-bit patterns)."""
    z = x & MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, stream: int, epoch: int) -> int:
    """The 64-bit key of one random stream of one epoch (as a signed int64 value)."""
    key = mix64(mix64(seed * _GOLDEN + stream) + (epoch + 1) * _GOLDEN)
    return _signed(key)


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    # Logical right shift of int64 bit patterns (torch's >> is arithmetic).
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix_torch(z: torch.Tensor) -> torch.Tensor:
    z = z ^ _lsr(z, 30)
    z = z * _signed(_MUL1)
    z = z ^ _lsr(z, 27)
    z = z * _signed(_MUL2)
    return z ^ _lsr(z, 31)


def _mix_numpy(z: np.ndarray) -> np.ndarray:
    # In place on a fresh uint64 array: numpy's unsigned arithmetic wraps modulo 2**64.
    z ^= z >> np.uint64(30)
    z *= np.uint64(_MUL1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_MUL2)
    z ^= z >> np.uint64(31)
    return z


def cell_keys(key: int, cells: torch.Tensor) -> torch.Tensor:
    """Per-cell keys (int64 (B,)) of stream ``key`` for the global cell indices ``cells``."""
    if _numpy_ok(cells):
        c = cells.numpy().astype(np.uint64) * np.uint64(_GOLDEN) + np.uint64(key & MASK64)
        return torch.from_numpy(_mix_numpy(c).view(np.int64))
    return _mix_torch(cells.to(torch.int64) * _signed(_GOLDEN) + key)


def item_bits(keys: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """64 random bits (int64) for each item (gene id, draw number, ...) under its cell's key.

    ``keys`` comes from :func:`cell_keys` and broadcasts against ``items``. The bits are
    ``mix(cell_key + item * G)`` with splitmix64's golden-ratio increment G.
    """
    if _numpy_ok(items):
        z = items.numpy().astype(np.uint64)
        z *= np.uint64(_GOLDEN)
        z += keys.numpy().view(np.uint64)
        return torch.from_numpy(_mix_numpy(z).view(np.int64))
    return _mix_torch(items.to(torch.int64) * _signed(_GOLDEN) + keys)


def top_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The top ``n`` bits (n <= 63) of int64 bit patterns, as a non-negative int64."""
    return _lsr(bits, 64 - n)


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """Uniform float64 numbers in the open interval (0, 1) from 64 random bits (53 used)."""
    return (top_bits(bits, 53).to(torch.float64) + 0.5) * (2.0**-53)


def sort_rows(keys: torch.Tensor) -> torch.Tensor:
    """Each row of an int64 (B, K) tensor sorted ascending.

    Keys must be distinct within a row (so the result does not depend on the algorithm).
    """
    if keys.shape[-1] <= 1:
        return keys
    return torch.sort(keys, dim=-1).values


def repeat(values: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
    """``values[i]`` repeated ``counts[i]`` times (1-D, ``total`` = sum of counts)."""
    return torch.repeat_interleave(values, counts, output_size=total)


def searchsorted_right(sorted_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """For each query, the number of entries of the 1-D ``sorted_values`` that are <= it."""
    return torch.searchsorted(sorted_values, queries, right=True)
