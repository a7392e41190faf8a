"""The preprocessed dataset every later layer works from: memory-mapped CSR plus metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tokbench.fileio import atomic_path

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass
class PreparedData:
    """A preprocessed dataset, usually memory-mapped from the on-disk cache.

    ``indptr``/``indices``/``data`` are the CSR arrays of the log-normalised matrix
    (cells x genes; ``data`` is float32 ``log1p(normalised counts)``; ``indices`` int32,
    sorted within each row). Gene metadata is aligned with columns; cell metadata with rows.

    Two per-cell counts let the tokenizers go back to what the published models read:
    ``library_size`` is the count total that ``normalize_total`` divided by (the genes kept
    after the empty-gene and ``min_cells`` filters, before HVG selection), so a stored value
    x is the raw count ``round(expm1(x) * library_size / target_sum)``; ``total_counts`` is
    the whole cell's count total in the input file (every gene, before any filter), the
    ``n_counts`` Geneformer normalises by. Both are None for data built in memory without
    counts; then the tokenizers fall back to the stored values (and say so).
    """

    indptr: np.ndarray  # int64, n_cells + 1
    indices: np.ndarray  # int32, nnz
    data: np.ndarray  # float32, nnz
    gene_ids: np.ndarray  # str: the dataset's own ids (var_names or var[gene_key])
    gene_symbols: np.ndarray  # str: HGNC symbol, "" where unmapped
    gene_chromosome: np.ndarray  # str: "1".."22", "X", "Y", "MT", "" where unknown
    gene_start: np.ndarray  # int64: GRCh38 start (bp), -1 where unknown
    labels: np.ndarray  # int64 class id per cell (index into class_names)
    class_names: list[str]  # sorted
    split: np.ndarray  # int8 per cell: 0 train, 1 val, 2 test, -1 unused
    obs: pd.DataFrame  # label and split/tissue columns, one row per cell
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # cache directory it was mapped from
    library_size: np.ndarray | None = None  # float64 per cell: counts normalize_total divided by
    total_counts: np.ndarray | None = None  # float64 per cell: counts over every input gene

    @property
    def target_sum(self) -> float:
        """The ``normalize_total`` target of the stored values (counts per cell, default 1e4)."""
        return float(self.meta.get("dataset", {}).get("target_sum", 1e4))

    @property
    def log1p(self) -> bool:
        """Whether the stored values are ``log1p`` of the normalised counts (the default)."""
        return bool(self.meta.get("dataset", {}).get("log1p", True))

    def raw_counts(self, values: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """Integer counts (float64) behind stored ``values``, one cell index per value.

        ``round(expm1(x) * library_size / target_sum)`` (without the expm1 when the data
        was not log-transformed). Raises ``ValueError`` when the data has no library sizes.
        """
        if self.library_size is None:
            raise ValueError("this PreparedData has no library_size (built without counts)")
        linear = np.asarray(values, dtype=np.float64)
        if self.log1p:
            linear = np.expm1(linear)
        return np.rint(linear * (np.asarray(self.library_size)[cells] / self.target_sum))

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

    def gene_median_normalised(self) -> np.ndarray:
        """Geneformer's gene medians: per gene, the median over *training* cells of the nonzero
        ``count / total_counts * target_sum`` (linear space; an even number of values averages
        the two middle ones, as ``np.median``).

        float64, one per gene; genes never expressed in training get NaN. Without
        ``total_counts`` the stored values' own ``expm1`` is used (normalised over the kept
        genes). Stored beside the cache (``gene_median_normalised.npy``) when writable.
        """
        stored = self.path / "gene_median_normalised.npy" if self.path else None
        if stored is not None and stored.exists():
            return np.load(stored)
        train = self.split_indices("train")
        indptr, indices, values = self.rows(train)
        cell = np.repeat(train, np.diff(indptr))
        median = _grouped_median(indices, self.normalised_by_total(values, cell), self.n_genes)
        _store(stored, median)
        return median

    def normalised_by_total(self, values: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """``count / total_counts * target_sum`` (float64) for stored ``values`` of ``cells``
        (one cell index per value): Geneformer's normalisation by the whole cell's count."""
        if self.total_counts is None or self.library_size is None:
            linear = np.asarray(values, dtype=np.float64)
            return np.expm1(linear) if self.log1p else linear
        return self.raw_counts(values, cells) / np.asarray(self.total_counts)[cells] * self.target_sum

    def gene_median_nonzero(self) -> np.ndarray:
        """Per-gene median of the nonzero log-normalised values over *training* cells.

        float32, one per gene; genes never expressed in training get NaN. Computed once and
        stored beside the cache (``gene_median_nonzero.npy``) when the cache is writable.
        """
        stored = self.path / "gene_median_nonzero.npy" if self.path else None
        if stored is not None and stored.exists():
            return np.load(stored)
        _, indices, values = self.rows(self.split_indices("train"))
        median = _grouped_median(indices, values, self.n_genes).astype(np.float32)
        _store(stored, median)
        return median


def _grouped_median(genes: np.ndarray, values: np.ndarray, n_genes: int) -> np.ndarray:
    """Median of ``values`` per gene (float64; NaN for genes without a value); an even count
    averages the two middle values, as ``np.median``."""
    order = np.lexsort((values, genes))
    genes, values = np.asarray(genes)[order], np.asarray(values, dtype=np.float64)[order]
    counts = np.bincount(genes, minlength=n_genes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    median = np.full(n_genes, np.nan, dtype=np.float64)
    has = counts > 0
    lo = starts[has] + (counts[has] - 1) // 2
    hi = starts[has] + counts[has] // 2
    median[has] = (values[lo] + values[hi]) / 2
    return median


def _store(path: Path | None, array: np.ndarray) -> None:
    """Save ``array`` atomically beside the cache; a read-only cache just skips it."""
    if path is None:
        return
    try:
        with atomic_path(path) as tmp:
            np.save(tmp, array)
    except OSError:
        pass
