"""Read ``.h5ad`` files in row chunks, without loading or densifying the whole matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import anndata.io
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from tokbench.errors import TokbenchError


class H5adSource:
    """An open ``.h5ad`` file: ``obs``/``var`` in memory, the count matrix read on demand.

    The matrix is ``X`` or ``layers[layer]``, stored sparse (CSR preferred) or dense. Rows are
    read ``chunk_size`` at a time, so memory stays proportional to one chunk.
    """

    def __init__(self, path: str | Path, layer: str | None = None):
        self.path = Path(path).expanduser().resolve()
        if not self.path.exists():
            raise TokbenchError(f"{self.path}: no such file")
        if self.path.is_dir() or not h5py.is_hdf5(self.path):
            raise TokbenchError(f"{self.path}: not an .h5ad file (not HDF5); write it with AnnData.write_h5ad")
        self._file = h5py.File(self.path, "r")
        missing = [k for k in ("obs", "var") if k not in self._file]
        if missing or ("X" not in self._file and layer is None):
            self.close()
            raise TokbenchError(f"{self.path}: not an .h5ad file (missing {', '.join(missing) or 'X'})")
        self.obs: pd.DataFrame = anndata.io.read_elem(self._file["obs"])
        self.var: pd.DataFrame = anndata.io.read_elem(self._file["var"])
        self.layer = layer
        if layer is None:
            elem = self._file["X"]
        else:
            layers = list(self._file["layers"].keys()) if "layers" in self._file else []
            if layer not in layers:
                self.close()
                raise TokbenchError(
                    f"{self.path}: layer {layer!r} not found; layers present: {layers or 'none'} "
                    "(leave dataset.layer unset to read X)"
                )
            elem = self._file["layers"][layer]
        self._dense = isinstance(elem, h5py.Dataset)
        self._matrix = elem if self._dense else anndata.io.sparse_dataset(elem)
        self.shape: tuple[int, int] = tuple(int(n) for n in self._matrix.shape)
        self.matrix_name = "X" if layer is None else f"layers[{layer!r}]"

    @property
    def nnz(self) -> int | None:
        """Stored nonzeros of a sparse matrix (None for dense storage)."""
        return None if self._dense else int(self._matrix.group["indptr"][-1])

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` as a float64-free CSR matrix (float32 values, sorted indices)."""
        block = self._matrix[start:stop]
        block = sp.csr_matrix(block, dtype=np.float32)
        block.sum_duplicates()
        block.sort_indices()
        return block

    def row_chunks(self, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield ``(first_row, csr_chunk)`` over all rows, ``chunk_size`` rows at a time."""
        for start in range(0, self.shape[0], chunk_size):
            yield start, self.read_rows(start, min(start + chunk_size, self.shape[0]))

    def column(self, frame: str, key: str) -> pd.Series:
        """Column ``key`` of ``obs`` or ``var``; a clear error listing the columns if absent."""
        table = self.obs if frame == "obs" else self.var
        if key not in table.columns:
            raise TokbenchError(
                f"{self.path}: {frame} column {key!r} not found; {frame} columns: "
                f"{', '.join(map(str, table.columns)) or 'none'}"
            )
        return table[key]

    def gene_ids(self, gene_key: str | None) -> np.ndarray:
        """Gene ids from ``var_names`` or ``var[gene_key]``, as strings."""
        ids = self.var.index if gene_key is None else self.column("var", gene_key)
        return np.asarray(ids.astype(str), dtype=object)

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        self._file.close()

    def __enter__(self) -> "H5adSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
