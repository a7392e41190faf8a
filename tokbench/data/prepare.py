"""From an ``.h5ad`` file to a cached, memory-mapped :class:`PreparedData`.

Two passes over the count matrix, one chunk of rows at a time:

1. validate counts (finite, non-negative) and count, per gene, the training cells that
   express it; drop all-zero cells and genes, and genes below ``min_cells``;
2. (only with ``n_top_genes``) normalise the *training* cells and choose highly variable
   genes on them alone, so test cells never influence the gene set;
3. normalise every cell with scanpy (``normalize_total``, ``log1p``) and append it to the
   cache's CSR arrays.

Beside the matrix the cache keeps two counts per cell, so tokenizers can use raw counts
(UCE's sampling weights) and the whole cell's total (Geneformer's normalisation):
``library_size.npy`` (the count total ``normalize_total`` divided by) and
``total_counts.npy`` (every gene of the input, before any filter).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from omegaconf import OmegaConf

import tokbench
from tokbench.data import cache
from tokbench.data.config import DatasetConfig, SplitConfig
from tokbench.data.genes import map_genes
from tokbench.data.loading import H5adSource
from tokbench.data.prepared import SPLIT_CODES, PreparedData
from tokbench.data.splits import assign_splits
from tokbench.errors import TokbenchError

log = logging.getLogger("tokbench.data")

# Options that change where or how fast the cache is built, never what it holds.
_NOT_IN_KEY = ("path", "name", "cache_dir", "chunk_size")


def _as_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def prepare_dataset(dataset: DatasetConfig, split: SplitConfig, *, rebuild: bool = False) -> PreparedData:
    """Preprocess ``dataset`` with ``split`` into the node's cache (once) and map it.

    A later call with the same resolved options and an unchanged input file maps the cached
    arrays without reading the ``.h5ad`` again. ``rebuild`` forces a fresh build.
    """
    ds, sp_cfg = _as_dict(dataset), _as_dict(split)
    path = Path(ds["path"]).expanduser().resolve()
    if not path.exists():
        raise TokbenchError(f"{path}: no such file (dataset.path)")
    content = {k: v for k, v in ds.items() if k not in _NOT_IN_KEY}
    fingerprint = cache.file_fingerprint(path)
    key = cache.cache_key({"dataset": content, "split": sp_cfg}, fingerprint)
    root = Path(ds["cache_dir"]).expanduser().resolve() if ds["cache_dir"] else cache.default_cache_root()
    entry = root / key
    if rebuild and entry.exists():
        shutil.rmtree(entry)
    try:
        meta, built = cache.get_or_build(
            entry, lambda tmp: _build(path, ds, sp_cfg, tmp, fingerprint, key), _validate
        )
    except PermissionError as exc:
        raise TokbenchError(f"{root}: cache directory is not writable ({exc.strerror}); set dataset.cache_dir") from exc
    if built:
        log.info("cached %s as %s", path.name, entry)
    return open_prepared(entry, meta)


def open_prepared(entry: Path, meta: dict | None = None) -> PreparedData:
    """Map a complete cache entry (no copy of the matrix is made)."""
    meta = meta or cache.read_meta(entry)
    if meta is None:
        raise TokbenchError(f"{entry}: not a complete tokbench cache entry")
    load = lambda name: np.load(entry / f"{name}.npy", mmap_mode="r")  # noqa: E731
    genes = json.loads((entry / "genes.json").read_text())
    labels = np.asarray(load("labels"))
    split = np.asarray(load("split"))
    obs = pd.DataFrame(
        {
            meta["label_key"]: pd.Categorical.from_codes(labels, meta["class_names"]),
            "split": pd.Categorical.from_codes(np.where(split < 0, 3, split), ["train", "val", "test", "unused"]),
        }
    )
    if meta.get("split_key"):
        obs[meta["split_key"]] = pd.Categorical.from_codes(np.asarray(load("split_key_codes")), meta["split_key_values"])
    return PreparedData(
        indptr=load("indptr"),
        indices=load("indices"),
        data=load("data"),
        gene_ids=np.asarray(genes["gene_ids"], dtype=object),
        gene_symbols=np.asarray(genes["symbol"], dtype=object),
        gene_chromosome=np.asarray(genes["chromosome"], dtype=object),
        gene_start=np.asarray(genes["start"], dtype=np.int64),
        labels=labels,
        class_names=list(meta["class_names"]),
        split=split,
        obs=obs,
        meta=meta,
        path=entry,
        library_size=load("library_size"),
        total_counts=load("total_counts"),
    )


def _validate(entry: Path, meta: dict) -> None:
    shapes = {}
    for name in ("indptr", "indices", "data", "labels", "split", "library_size", "total_counts"):
        arr = np.load(entry / f"{name}.npy", mmap_mode="r")
        shapes[name] = arr.shape[0]
    n, nnz = meta["n_cells"], meta["nnz"]
    expected = {"indptr": n + 1, "indices": nnz, "data": nnz, "labels": n, "split": n,
                "library_size": n, "total_counts": n}
    for name, length in expected.items():
        if shapes[name] != length:
            raise ValueError(f"{name}.npy has {shapes[name]} entries, expected {length}")
    indptr = np.load(entry / "indptr.npy", mmap_mode="r")
    if int(indptr[-1]) != nnz:
        raise ValueError("indptr does not end at nnz")
    if not (entry / "genes.json").exists():
        raise ValueError("genes.json missing")


def _build(path: Path, ds: dict, split_cfg: dict, out: Path, fingerprint: dict, key: str) -> dict:
    started = time.perf_counter()
    chunk = int(ds["chunk_size"])
    with H5adSource(path, layer=ds["layer"]) as src:
        where = str(path)
        n_cells, n_genes = src.shape
        raw_labels = src.column("obs", ds["label_key"])
        gene_ids = src.gene_ids(ds["gene_key"])
        mapping = map_genes(
            gene_ids,
            where=f"{where}: {'var_names' if ds['gene_key'] is None else 'var[' + repr(ds['gene_key']) + ']'}",
            min_fraction=ds["min_gene_fraction_mapped"],
        )
        labelled = raw_labels.notna().to_numpy()
        if not labelled.all():
            log.warning("%s: %d cells have no value in obs[%r]; dropped", where, int((~labelled).sum()), ds["label_key"])
        labels_str = np.asarray(raw_labels.astype(str), dtype=object)
        split, split_report = assign_splits(src.obs, labels_str, SplitConfig(**split_cfg), where)
        split[~labelled] = -1

        # Pass 1: validate counts, find empty cells and genes, count training cells per gene.
        cell_nnz = np.zeros(n_cells, dtype=np.int64)
        cell_total = np.zeros(n_cells, dtype=np.float64)  # every gene of the file: Geneformer's n_counts
        gene_cells_all = np.zeros(n_genes, dtype=np.int64)
        gene_cells_train = np.zeros(n_genes, dtype=np.int64)
        non_integer = False
        for start, block in src.row_chunks(chunk):
            values = block.data
            bad = ~np.isfinite(values) | (values < 0)
            if bad.any():
                row = start + int(np.searchsorted(block.indptr, np.flatnonzero(bad)[0], side="right") - 1)
                raise TokbenchError(
                    f"{where}: {src.matrix_name} has a negative or non-finite count "
                    f"({values[bad][0]!r}) in cell {src.obs.index[row]!r}; expected raw counts"
                )
            non_integer = non_integer or bool(np.any(values != np.round(values)))
            nz = block.copy()
            nz.eliminate_zeros()
            cell_nnz[start : start + block.shape[0]] = np.diff(nz.indptr)
            cell_total[start : start + block.shape[0]] = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
            gene_cells_all += np.bincount(nz.indices, minlength=n_genes)
            train_rows = split[start : start + block.shape[0]] == SPLIT_CODES["train"]
            gene_cells_train += np.bincount(nz[train_rows].indices, minlength=n_genes)
        if non_integer:
            log.warning("%s: %s holds non-integer values; tokbench expects raw counts (set dataset.layer)", where, src.matrix_name)

        empty_cells = (cell_nnz == 0) & (split >= 0)
        if empty_cells.any():
            log.warning("%s: %d cells express no gene; dropped", where, int(empty_cells.sum()))
        keep_cells = (split >= 0) & ~empty_cells
        empty_genes = gene_cells_all == 0
        if empty_genes.any():
            log.warning("%s: %d genes are zero in every cell; dropped", where, int(empty_genes.sum()))
        keep_genes = ~empty_genes & (gene_cells_train >= ds["min_cells"])
        below_min = int((~empty_genes & ~keep_genes).sum())
        if not keep_genes.any():
            raise TokbenchError(f"{where}: no gene is expressed in at least min_cells={ds['min_cells']} training cells")
        for role, code in SPLIT_CODES.items():
            if not (keep_cells & (split == code)).any():
                raise TokbenchError(f"{where}: split {role!r} has no cells left after dropping empty cells")

        steps = [
            {"step": "drop_empty", "cells_dropped": int(empty_cells.sum()), "genes_dropped": int(empty_genes.sum())},
            {"step": "filter_genes", "min_cells": ds["min_cells"], "on": "train", "genes_dropped": below_min},
            {"step": "normalize_total", "target_sum": ds["target_sum"]},
        ]
        if ds["log1p"]:
            steps.append({"step": "log1p"})

        gene_cols = np.flatnonzero(keep_genes)
        hvg_cols = np.arange(len(gene_cols))
        if ds["n_top_genes"]:
            hvg_cols = _highly_variable(src, chunk, keep_cells & (split == SPLIT_CODES["train"]), gene_cols, ds)
            steps.append({"step": "highly_variable_genes", "flavor": "seurat", "n_top_genes": int(ds["n_top_genes"]), "on": "train"})
        out_genes = gene_cols[hvg_cols]

        # Pass 2: normalise every kept cell and append it to the CSR arrays.
        cells = np.flatnonzero(keep_cells)
        capacity = int(cell_nnz[cells].sum())
        indices = cache.NpyAppender(out / "indices.npy", np.int32, capacity)
        data = cache.NpyAppender(out / "data.npy", np.float32, capacity)
        row_nnz = np.zeros(len(cells), dtype=np.int64)
        library_size = np.zeros(len(cells), dtype=np.float64)
        done = 0
        for start, block in src.row_chunks(chunk):
            rows = keep_cells[start : start + block.shape[0]]
            if not rows.any():
                continue
            kept = block[rows][:, gene_cols]
            library_size[done : done + kept.shape[0]] = np.asarray(kept.sum(axis=1), dtype=np.float64).ravel()
            normalised = _normalise(kept, ds)[:, hvg_cols]
            normalised.eliminate_zeros()
            normalised.sort_indices()
            indices.append(normalised.indices)
            data.append(normalised.data)
            row_nnz[done : done + normalised.shape[0]] = np.diff(normalised.indptr)
            done += normalised.shape[0]
        indices.close()
        data.close()
        indptr = np.zeros(len(cells) + 1, dtype=np.int64)
        np.cumsum(row_nnz, out=indptr[1:])
        np.save(out / "indptr.npy", indptr)
        np.save(out / "library_size.npy", library_size)
        np.save(out / "total_counts.npy", cell_total[cells])

        kept_labels = labels_str[cells]
        class_names = sorted(set(kept_labels))
        class_index = {name: i for i, name in enumerate(class_names)}
        np.save(out / "labels.npy", np.array([class_index[x] for x in kept_labels], dtype=np.int64))
        np.save(out / "split.npy", split[cells])
        np.save(out / "obs_names.npy", np.asarray(src.obs.index.astype(str))[cells].astype(str))
        split_key = split_cfg.get("key") if split_cfg["kind"] != "random" else None
        split_key_values = []
        if split_key:
            column = src.obs[split_key].astype(str).to_numpy()[cells]
            split_key_values = sorted(set(column))
            np.save(out / "split_key_codes.npy", np.searchsorted(split_key_values, column).astype(np.int64))
        (out / "genes.json").write_text(
            json.dumps(
                {
                    "gene_ids": [str(g) for g in gene_ids[out_genes]],
                    "symbol": [str(g) for g in mapping.symbol[out_genes]],
                    "chromosome": [str(g) for g in mapping.chromosome[out_genes]],
                    "start": [int(s) for s in mapping.start[out_genes]],
                }
            )
        )
        empty_after = int((row_nnz == 0).sum())
        if empty_after:
            log.warning("%s: %d cells express none of the selected genes; they keep an empty sentence", where, empty_after)
        kept_split = split[cells]
        label_counts = {
            role: {name: int(((kept_split == code) & (kept_labels == name)).sum()) for name in class_names}
            for role, code in SPLIT_CODES.items()
        }
        return {
            "input": str(path),
            "fingerprint": fingerprint,
            "key": key,
            "dataset": ds,
            "split_config": split_cfg,
            "label_key": ds["label_key"],
            "split_key": split_key,
            "split_key_values": split_key_values,
            "class_names": class_names,
            "n_cells": int(len(cells)),
            "n_genes": int(len(out_genes)),
            "nnz": int(indptr[-1]),
            "input_shape": [n_cells, n_genes],
            "gene_id_kind": mapping.id_kind,
            "genes_mapped_fraction": float(mapping.mapped[out_genes].mean()),
            "preprocessing": steps,
            "splits": split_report,
            "label_counts": label_counts,
            "empty_sentences": empty_after,
            "build_seconds": round(time.perf_counter() - started, 3),
            "tokbench_version": tokbench.__version__,
            "scanpy_version": importlib.metadata.version("scanpy"),
        }


def _normalise(counts: sp.csr_matrix, ds: dict) -> sp.csr_matrix:
    """scanpy ``normalize_total`` + ``log1p`` on one chunk of cells (float32 CSR)."""
    chunk = ad.AnnData(X=counts.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(chunk, target_sum=ds["target_sum"])
        if ds["log1p"]:
            sc.pp.log1p(chunk)
    return sp.csr_matrix(chunk.X, dtype=np.float32)


def _highly_variable(src: H5adSource, chunk: int, train_cells: np.ndarray, gene_cols: np.ndarray, ds: dict) -> np.ndarray:
    """Column positions (within ``gene_cols``) of the top highly variable genes of the training cells."""
    n_top = int(ds["n_top_genes"])
    if n_top >= len(gene_cols):
        return np.arange(len(gene_cols))
    blocks = []
    for start, block in src.row_chunks(chunk):
        rows = train_cells[start : start + block.shape[0]]
        if rows.any():
            blocks.append(_normalise(block[rows][:, gene_cols], {**ds, "log1p": True}))
    train = ad.AnnData(X=sp.vstack(blocks, format="csr"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(train, n_top_genes=n_top, flavor="seurat", subset=False)
    return np.flatnonzero(train.var["highly_variable"].to_numpy())
