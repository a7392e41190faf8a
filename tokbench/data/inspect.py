"""``tokbench data inspect``: what is in an ``.h5ad`` file and what is wrong with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tokbench.data.genes import map_genes
from tokbench.data.loading import H5adSource
from tokbench.errors import TokbenchError


def inspect_h5ad(
    path: str | Path,
    *,
    label_key: str | None = "cell_type",
    split_key: str | None = None,
    layer: str | None = None,
    gene_key: str | None = None,
    chunk_size: int = 8192,
) -> str:
    """Describe an ``.h5ad`` file: cells, genes, sparsity, labels per split/tissue, problems.

    Reads the matrix in row chunks. Problems in the data are listed, not raised; a missing
    file or column raises :class:`TokbenchError`.
    """
    with H5adSource(path, layer=layer) as src:
        n_cells, n_genes = src.shape
        labels = src.column("obs", label_key) if label_key else None
        groups = src.column("obs", split_key) if split_key else None
        ids = src.gene_ids(gene_key)
        problems: list[str] = []
        try:
            mapping = map_genes(ids, where="genes", min_fraction=0.0)
            mapped = f"{mapping.fraction_mapped:.1%} map to the GRCh38 gene table (as {mapping.id_kind}s)"
            if mapping.fraction_mapped < 0.5:
                problems.append(f"only {mapping.fraction_mapped:.0%} of gene ids are human symbols or Ensembl ids")
        except TokbenchError as exc:  # pragma: no cover - min_fraction=0 never raises
            mapped = str(exc)
        nnz = 0
        cell_nnz = np.zeros(n_cells, dtype=np.int64)
        gene_cells = np.zeros(n_genes, dtype=np.int64)
        negative = non_finite = non_integer = 0
        totals = np.zeros(n_cells)
        for start, block in src.row_chunks(chunk_size):
            values = block.data
            non_finite += int((~np.isfinite(values)).sum())
            negative += int((values < 0).sum())
            non_integer += int((np.isfinite(values) & (values != np.round(values))).sum())
            block.eliminate_zeros()
            nnz += block.nnz
            cell_nnz[start : start + block.shape[0]] = np.diff(block.indptr)
            gene_cells += np.bincount(block.indices, minlength=n_genes)
            totals[start : start + block.shape[0]] = np.asarray(block.sum(axis=1)).ravel()
        if negative:
            problems.append(f"{negative} negative values in {src.matrix_name}")
        if non_finite:
            problems.append(f"{non_finite} non-finite values in {src.matrix_name}")
        if non_integer:
            problems.append(f"{src.matrix_name} is not integer counts ({non_integer} non-integer values); point dataset.layer at raw counts")
        if (cell_nnz == 0).any():
            problems.append(f"{int((cell_nnz == 0).sum())} cells express no gene (dropped when prepared)")
        if (gene_cells == 0).any():
            problems.append(f"{int((gene_cells == 0).sum())} genes are zero in every cell (dropped when prepared)")
        if labels is not None and labels.isna().any():
            problems.append(f"{int(labels.isna().sum())} cells have no label in obs[{label_key!r}]")
        if len(pd.Index(ids).unique()) < len(ids):
            problems.append(f"{len(ids) - len(pd.Index(ids).unique())} duplicated gene ids")

        lines = [
            f"file      {src.path}",
            f"matrix    {src.matrix_name}: {n_cells:,} cells x {n_genes:,} genes, {nnz:,} nonzero "
            f"({nnz / max(1, n_cells * n_genes):.2%} dense, {1 - nnz / max(1, n_cells * n_genes):.2%} sparse)",
            f"per cell  genes expressed median {np.median(cell_nnz):.0f} (min {cell_nnz.min()}, max {cell_nnz.max()}); "
            f"total counts median {np.median(totals):.0f}",
            f"genes     {mapped}",
        ]
        if labels is not None:
            table = _label_table(labels, groups, split_key)
            lines += ["", f"labels (obs[{label_key!r}])" + (f" by obs[{split_key!r}]" if groups is not None else ""), table.to_string()]
            if groups is not None:
                problems += _split_problems(labels, groups, split_key)
        lines += ["", "problems" if problems else "problems  none found"]
        lines += [f"  - {p}" for p in problems]
        return "\n".join(lines)


def _label_table(labels: pd.Series, groups: pd.Series | None, split_key: str | None) -> pd.DataFrame:
    labels = labels.astype(str).rename("label")
    if groups is None:
        return labels.value_counts().sort_index().to_frame("cells")
    table = pd.crosstab(labels, groups.astype(str).rename(split_key), margins=True, margins_name="total")
    return table


def _split_problems(labels: pd.Series, groups: pd.Series, split_key: str) -> list[str]:
    labels, groups = labels.astype(str), groups.astype(str)
    values = set(groups.unique())
    problems = []
    if {"train", "test"} <= values:
        unseen = sorted(set(labels[groups == "test"]) - set(labels[groups == "train"]))
        if unseen:
            problems.append(f"test labels not present in train: {unseen}")
    for value in sorted(values):
        classes = labels[groups == value].nunique()
        if classes < 2:
            problems.append(f"obs[{split_key!r}] == {value!r} holds only {classes} label(s)")
    return problems
