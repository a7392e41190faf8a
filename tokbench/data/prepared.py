"""The preprocessed dataset every later layer works from: memory-mapped CSR plus metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass
class PreparedData:
    """A preprocessed dataset, usually memory-mapped from the on-disk cache.

    ``indptr``/``indices``/``data`` are the CSR arrays of the log-normalised matrix
    (cells x genes; ``data`` is float32 ``log1p(normalised counts)``; ``indices`` int32,
    sorted within each row). Gene metadata is aligned with columns; cell metadata with rows.
    """

    indptr: np.ndarray  # int64, n_cells + 1
    indices: np.ndarray  # int32, nnz
    data: np.ndarray  # float32, nnz
    gene_ids: np.ndarray  # str: the dataset's own ids (var_names or var[gene_key])
    gene_symbols: np.ndarray  # str: HGNC symbol, "" where unmapped
    gene_chromosome: np.ndarray  # str: "1".."22", "X", "" where unknown
    gene_start: np.ndarray  # int64: GRCh38 start (bp), -1 where unknown
    labels: np.ndarray  # int64 class id per cell (index into class_names)
    class_names: list[str]  # sorted
    split: np.ndarray  # int8 per cell: 0 train, 1 val, 2 test, -1 unused
    obs: pd.DataFrame  # label and split/tissue columns, one row per cell
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # cache directory it was mapped from

    @property
    def n_cells(self) -> int:
        """Number of cells (rows)."""
        return len(self.indptr) - 1

    @property
    def n_genes(self) -> int:
        """Number of genes (columns)."""
        return len(self.gene_ids)

    def split_indices(self, name: str) -> np.ndarray:
        """Row indices of the cells in split ``name`` (``train``, ``val`` or ``test``)."""
        return np.flatnonzero(self.split == SPLIT_CODES[name])

    def rows(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR arrays ``(indptr, indices, data)`` of the given rows, in the given order."""
        cells = np.asarray(cells, dtype=np.int64)
        starts, stops = self.indptr[cells], self.indptr[cells + 1]
        lengths = stops - starts
        indptr = np.zeros(len(cells) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # One gather over all rows: positions[k] is the flat index of the k-th value.
        positions = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return indptr, self.indices[positions], self.data[positions]

    def gene_median_nonzero(self) -> np.ndarray:
        """Per-gene median of the nonzero log-normalised values over *training* cells.

        float32, one per gene; genes never expressed in training get NaN. Computed once and
        stored beside the cache (``gene_median_nonzero.npy``) when the cache is writable.
        """
        stored = self.path / "gene_median_nonzero.npy" if self.path else None
        if stored is not None and stored.exists():
            return np.load(stored)
        _, indices, values = self.rows(self.split_indices("train"))
        order = np.lexsort((values, indices))
        indices, values = indices[order], values[order]
        counts = np.bincount(indices, minlength=self.n_genes)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        median = np.full(self.n_genes, np.nan, dtype=np.float32)
        has = counts > 0
        lo = starts[has] + (counts[has] - 1) // 2
        hi = starts[has] + counts[has] // 2
        median[has] = (values[lo].astype(np.float64) + values[hi]) / 2
        if stored is not None:
            try:
                tmp = stored.with_suffix(f".tmp{np.random.randint(1 << 30)}.npy")
                np.save(tmp, median)
                tmp.replace(stored)
            except OSError:
                pass
        return median
