"""Cells per second of each tokenizer preset, from CSR batches to padded cell sentences.

Synthetic stream: 20,000 genes (real GRCh38 symbols and positions, so the chromosome order
has work to do), ~2,000 expressed genes per cell, log-normalised values from negative-
binomial counts, batches of 256 cells. The timed step is exactly what a data-loader worker
does per batch: ``tokenizer.sentences_from_csr`` (dense layout, selection, order, bins,
padding). CPU figures use one thread; with CUDA the same batches are timed on the GPU.

    python bench/tokenize_speed.py [--batches 16] [--batch-size 256] [--presets geneformer scgpt]
                                   [--distinct-values]

The row ``user_variance`` is Geneformer's Fc with the order of the tutorial's own module
(``examples/novel_tokenizer/my_tokenizers.py:VarianceOrder``): an order written in torch
only, whose ranks the compiled kernel sorts (what a user's part costs).

(Not ``bench/tokenize.py``: run as a script, that name would shadow the standard library's
``tokenize``, which numpy imports.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from tokbench.data.genes import gene_table
from tokbench.data.prepared import PreparedData
from tokbench.tokenizers import build_tokenizer, load_component

PRESET_FE = {
    "geneformer": "zero",
    "geneformer_random": "zero",
    "log_expression": "zero",
    "scgpt": "bin_scgpt",
    "scbert": "bin_scbert",
    "uce": "zero",
    "uce_noresample": "zero",
    "uce_sum": "linear",
    "user_variance": "zero",
}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "novel_tokenizer"


def fc_config(preset: str):
    """The Fc of a row: a preset, or Geneformer's with the tutorial's user order."""
    if preset != "user_variance":
        return load_component("fc", preset)
    sys.path.insert(0, str(EXAMPLE))
    fc = load_component("fc", "geneformer")
    fc.order = {"name": "my_tokenizers:VarianceOrder"}
    return fc


def synthetic_batch(rng: np.random.Generator, batch_size: int, n_genes: int, expressed: int):
    """One CSR batch: about ``expressed`` genes per cell, values log1p(counts / total * 1e4),
    and each cell's total count (the library size the raw-count tokenizers read back)."""
    mask = rng.random((batch_size, n_genes), dtype=np.float32) < expressed / n_genes
    rows, cols = np.nonzero(mask)
    counts = rng.negative_binomial(2, 0.4, size=len(rows)).astype(np.float32) + 1
    indptr = np.zeros(batch_size + 1, dtype=np.int64)
    np.cumsum(mask.sum(1), out=indptr[1:])
    totals = np.add.reduceat(counts, indptr[:-1])
    values = np.log1p(counts / np.repeat(totals, np.diff(indptr)) * 1e4).astype(np.float32)
    return indptr, cols.astype(np.int32), values, totals.astype(np.float64)


def synthetic_dataset(n_genes: int, indptr, indices, values, totals) -> PreparedData:
    """A PreparedData over real gene symbols (positions from the shipped gene table) whose
    per-cell counts are ``totals`` (every cell of the stream, in stream order)."""
    genes = gene_table().iloc[:n_genes]
    n_cells = len(indptr) - 1
    return PreparedData(
        indptr=indptr, indices=indices, data=values,
        gene_ids=genes["symbol"].to_numpy(dtype=object), gene_symbols=genes["symbol"].to_numpy(dtype=object),
        gene_chromosome=genes["chromosome"].to_numpy(dtype=object), gene_start=genes["start"].to_numpy(np.int64),
        labels=np.zeros(n_cells, np.int64), class_names=["cell"], split=np.zeros(n_cells, np.int8),
        obs=pd.DataFrame(index=pd.RangeIndex(n_cells)), library_size=totals, total_counts=totals,
    )


def cells_per_second(tokenizer, batches, device: str, repeats: int) -> float:
    """Tokenise the batches ``repeats`` times (fresh epochs); return cells per second."""
    def run(epoch: int) -> int:
        cells = 0
        for i, (indptr, indices, values, _) in enumerate(batches):
            ids = np.arange(len(indptr) - 1, dtype=np.int64) + i * (len(indptr) - 1)
            sentences = tokenizer.sentences_from_csr(indptr, indices, values, ids, epoch, device)
            cells += len(ids)
        if device != "cpu":
            sentences.gene_tokens.sum().item()  # wait for the queued kernels
        return cells

    run(-1)  # warm-up: allocator, caches, kernel compilation
    start, cells = time.perf_counter(), 0
    for epoch in range(repeats):
        cells += run(epoch)
    return cells / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=16, help="distinct batches in the stream")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the stream (one epoch each)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--expressed", type=int, default=2_000, help="mean expressed genes per cell")
    parser.add_argument("--presets", nargs="*", default=list(PRESET_FE))
    parser.add_argument("--distinct-values", action="store_true",
                        help="scale each value by a random factor in [0.5, 1.5): no two values of a cell are "
                             "equal, unlike log-normalised counts (the worst case for bin_scgpt's ranks)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(rng, args.batch_size, args.genes, args.expressed) for _ in range(args.batches)]
    if args.distinct_values:
        batches = [(p, i, (v * rng.uniform(0.5, 1.5, len(v))).astype(np.float32), t) for p, i, v, t in batches]
    indptr, indices, values, _ = batches[0]
    data = synthetic_dataset(args.genes, indptr, indices, values, np.concatenate([b[3] for b in batches]))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    mean_nnz = np.mean([np.diff(b[0]).mean() for b in batches])
    print(f"{args.genes} genes, {mean_nnz:.0f} expressed per cell"
          + (" (every value distinct)" if args.distinct_values else "") + f", batches of {args.batch_size}; "
          f"CPU: 1 thread" + (f"; GPU: {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print(f"{'preset':<20}{'fe':<12}{'max_length':>11}" + "".join(f"{d + ' cells/s':>16}" for d in devices))
    for preset in args.presets:
        fe = PRESET_FE.get(preset, "zero")
        fc = fc_config(preset)
        if fc.select.name == "panel":  # scBERT's sentence is the whole panel, zeros included
            fc = OmegaConf.merge(fc, OmegaConf.from_dotlist([f"select.size={args.genes}"]))
        tokenizer = build_tokenizer(load_component("fg", "learned"), load_component("fe", fe),
                                    fc, data, d_model=64, seed=0)
        rates = [cells_per_second(tokenizer, batches, device, args.repeats) for device in devices]
        print(f"{preset:<20}{fe:<12}{tokenizer.max_length:>11}" + "".join(f"{r:>16,.0f}" for r in rates))


if __name__ == "__main__":
    main()
