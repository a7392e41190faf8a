"""Expression bin ids of the binned Fe parts, computed with the cell sentences.

Bin id 0 is what special tokens (CLS, PAD, chromosome tokens) carry; an expressed gene
never gets it, so a bin embedding can never confuse a special token with a value.
"""

from __future__ import annotations

import numpy as np
import torch

from tokbench.tokenizers import kernels


def scbert_edges(n_bins: int) -> np.ndarray:
    """float32 class edges of scBERT's bins on log1p values: ``log1p(2**k - 1)``, k = 1..n_bins.

    scBERT's class of a normalised count c is ``min(floor(log2(1 + c)), n_bins)``
    (``preprocess.py``: ``sc.pp.log1p(base=2)``; ``finetune.py``: values above
    ``CLASS - 2`` set to it, then ``.long()``). On the stored ``x = log1p(c)`` that is the
    number of k with ``c >= 2**k - 1``, i.e. ``x >= log1p(2**k - 1)``: comparing with edges
    computed like the stored values (float32 log1p) is exact at the class boundaries, where
    ``floor(x / ln 2)`` in floating point can fall one class short.
    """
    return np.log1p(np.float32(2.0) ** np.arange(1, n_bins + 1, dtype=np.float32) - np.float32(1)).astype(np.float32)


def scbert_bins(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """scBERT bin ids of log-normalised values: ``1 + class``, class = edges at or below x.

    Ids run 1..n_bins+1 (scBERT's classes 0..n_bins shifted by one to keep 0 for special
    tokens; a zero-expressed gene is class 0, id 1), so the embedding table has
    ``n_bins + 2`` rows.
    """
    return torch.bucketize(values, edges.to(values.device), right=True) + 1


def scgpt_bins(
    value_keys: torch.Tensor,
    n_entries: int,
    n_expressed: torch.Tensor,
    entries: torch.Tensor,
    tie_bits: torch.Tensor,
    n_bins: int,
) -> torch.Tensor:
    """scGPT's per-cell quantile bins of the given entries, ids in 1..n_bins-1.

    ``value_keys`` (B, W) holds one key ``value_bits * 2**32 + entry`` per stored value of
    each cell (the whole cell, not just the selected genes), with value bits 0x7FFFFFFF for
    values that are not expressed; ``n_entries`` bounds the entry ids; ``n_expressed`` (B,)
    counts the expressed values; ``entries`` (B, K) are the entries to bin; ``tie_bits``
    (B, K) are random bits for the tie-break.

    As in scGPT's ``binning``: the edges are ``np.quantile(nonzero, linspace(0, 1, B-1))``
    (linear interpolation); a value gets ``digitize(x, edges)`` (edges <= x, call it
    ``left``) unless it equals one or more edges, in which case it is placed uniformly at
    random in ``right+1 .. left`` (``right`` = edges < x). The counts of edges <= x and < x
    only depend on the rank of x among the cell's values: with ``m = B-2`` and ``n``
    values, edge k sits at rank ``h_k = (n-1)k/m``, so ``left = floor((r_hi-1)m/(n-1)) + 1``
    and ``right = ceil(r_lo m/(n-1))`` where ``r_lo``/``r_hi`` count the values < x / <= x.
    Computing from ranks keeps every step in exact integer arithmetic (``np.quantile`` can
    differ only where its floating-point interpolation rounds onto a data value). The
    result is non-decreasing in x within a cell.
    """
    batch, width = value_keys.shape
    m = n_bins - 2
    if entries.shape[1] == 0 or width == 0:
        return torch.zeros_like(entries)
    ordered = kernels.sort_rows(value_keys)
    columns = torch.arange(width, device=value_keys.device)
    # Runs of equal values in sorted order, numbered from 1; start[r] is the first sorted
    # place of run r, so a value of run r has r_lo = start[r] and r_hi = start[r + 1].
    value_bits = ordered >> 32
    new_run = torch.ones_like(ordered, dtype=torch.bool)
    torch.ne(value_bits[:, 1:], value_bits[:, :-1], out=new_run[:, 1:])
    run = new_run.cumsum(1)
    start = torch.full((batch, width + 3), width, dtype=torch.int64, device=value_keys.device)
    start.scatter_(1, torch.where(new_run, run, width + 2), columns.expand(batch, width))
    run_of_entry = torch.zeros(n_entries, dtype=torch.int64, device=value_keys.device)
    run_of_entry.scatter_(0, (ordered & 0xFFFFFFFF).view(-1), run.view(-1))
    run_at = run_of_entry.index_select(0, entries.reshape(-1)).view(entries.shape)
    r_lo = start.gather(1, run_at).to(torch.float64)
    r_hi = start.gather(1, run_at + 1).to(torch.float64)
    # In float64: every product is an exact integer and one correctly rounded division of
    # exact integers floors/ceils exactly (much faster than int64 division). A cell with
    # one value (n = 1) has every edge equal to it: left = m + 1, right = 0.
    n = n_expressed.to(torch.float64)[:, None]
    spread = (n - 1).clamp(min=1)
    left = ((r_hi - 1) * m / spread).floor_() + torch.where(n > 1, 1.0, m + 1.0)
    right = (r_lo * m / spread).ceil_()
    # digits = ceil(left - r*(left-right)) with r uniform in [0, 1): uniform on right+1..left.
    draw = (kernels.uniform(tie_bits) * (left - right)).floor_()
    return (left - draw).to(torch.int64)
