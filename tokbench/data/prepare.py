"""From an ``.h5ad`` file to a cached, memory-mapped :class:`PreparedData`.

The build is a list of steps in scanpy's style. Each takes an :class:`~anndata.AnnData` that
holds the file's annotations (``obs`` and ``var``, no matrix: the counts stay on disk and
are read from the :class:`H5adSource` one chunk of rows at a time, so memory is one chunk),
reads the ``obs``/``var`` columns earlier steps wrote and adds its own:

1. :func:`read_annotations`: ``var["gene_id"]``;
2. :func:`map_gene_ids`: ``var["symbol"]``, ``["chromosome"]``, ``["start"]``, ``["gene_mapped"]``;
3. :func:`assign_split`: ``obs["split_code"]`` (0 train, 1 val, 2 test, -1 unused);
4. :func:`count_qc` (first pass over the counts): refuses negative or non-finite counts;
   ``obs["n_genes_by_counts"]``, ``obs["total_counts"]``, ``var["n_cells_by_counts"]``,
   ``var["n_cells_train"]``;
5. :func:`filter_cells_and_genes`: ``obs["kept"]``, ``var["kept"]`` (all-zero cells and
   genes out, and genes in fewer than ``min_cells`` *training* cells);
6. :func:`highly_variable_genes` (only with ``n_top_genes``): ``var["highly_variable"]``,
   chosen on the normalised *training* cells alone, so test cells never influence the gene set;
7. :func:`write_normalised` (second pass): scanpy's ``normalize_total`` and ``log1p`` on
   every kept cell, appended to the cache's CSR arrays; ``obs["library_size"]``;
8. :func:`write_annotations`: labels, splits, cell names and the gene table of the entry.

Beside the matrix the cache keeps two counts per cell, so tokenizers can use raw counts
(UCE's sampling weights) and the whole cell's total (Geneformer's normalisation):
``library_size.npy`` (the count total ``normalize_total`` divided by) and
``total_counts.npy`` (every gene of the input, before any filter).
"""

from __future__ import annotations

import contextlib
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

# The obs columns the steps add; the label and split columns must be named otherwise.
OBS_COLUMNS_ADDED = ("split_code", "n_genes_by_counts", "total_counts", "kept", "library_size")

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
    """Write every file of a cache entry into ``out`` and return its metadata.

    ``ds`` and ``split_cfg`` are the resolved options, recorded as they are in the metadata
    (they are what the cache key hashed); the steps read them through the typed configs.
    """
    started = time.perf_counter()
    config, split = DatasetConfig(**ds), SplitConfig(**split_cfg)
    split_key = split.key if split.kind != "random" else None
    where, chunk_size = str(path), int(config.chunk_size)
    with H5adSource(path, layer=config.layer) as counts:
        adata = read_annotations(counts, label_key=config.label_key, gene_key=config.gene_key, split_key=split_key)
        map_gene_ids(adata, min_fraction=config.min_gene_fraction_mapped, where=where)
        assign_split(adata, split, label_key=config.label_key, where=where)
        count_qc(adata, counts, chunk_size=chunk_size, where=where)
        filter_cells_and_genes(adata, min_cells=config.min_cells, where=where)
        if config.n_top_genes:
            highly_variable_genes(adata, counts, n_top_genes=int(config.n_top_genes),
                                  target_sum=config.target_sum, chunk_size=chunk_size)
        write_normalised(adata, counts, out, target_sum=config.target_sum, log1p=config.log1p,
                         chunk_size=chunk_size, where=where)
    write_annotations(adata, out, label_key=config.label_key, split_key=split_key)
    stored = stored_genes(adata)
    return {
        "input": str(path),
        "fingerprint": fingerprint,
        "key": key,
        "dataset": ds,
        "split_config": split_cfg,
        "label_key": config.label_key,
        "split_key": split_key,
        "split_key_values": adata.uns["split_key_values"],
        "class_names": adata.uns["class_names"],
        "n_cells": int(adata.obs["kept"].sum()),
        "n_genes": int(stored.sum()),
        "nnz": adata.uns["nnz"],
        "input_shape": [adata.n_obs, adata.n_vars],
        "gene_id_kind": adata.uns["gene_id_kind"],
        "genes_mapped_fraction": float(adata.var["gene_mapped"].to_numpy()[stored].mean()),
        "preprocessing": _preprocessing_record(adata, config),
        "splits": adata.uns["splits"],
        "label_counts": adata.uns["label_counts"],
        "empty_sentences": adata.uns["empty_sentences"],
        "build_seconds": round(time.perf_counter() - started, 3),
        "tokbench_version": tokbench.__version__,
        "scanpy_version": importlib.metadata.version("scanpy"),
    }


# --- the steps ------------------------------------------------------------------------


def read_annotations(counts: H5adSource, *, label_key: str, gene_key: str | None,
                     split_key: str | None = None) -> ad.AnnData:
    """An AnnData of the file's ``obs`` and ``var`` (cell and gene names as strings), with
    no matrix: the counts stay in ``counts``. Adds ``var["gene_id"]``, the dataset's own gene
    ids (``var_names``, or ``var[gene_key]``), and ``uns["gene_id_source"]``, where they came from.

    Raises :class:`TokbenchError` when ``obs[label_key]`` or ``var[gene_key]`` is missing, or
    when the label or split column (``split_key``) has the name of a column the later steps add.
    """
    counts.column("obs", label_key)  # fails early, naming the obs columns there are
    for option, column in (("dataset.label_key", label_key), ("split.key", split_key)):
        if column in OBS_COLUMNS_ADDED:
            raise TokbenchError(
                f"{counts.path}: {option}={column!r} is a name tokbench uses for its own per-cell "
                f"values ({', '.join(OBS_COLUMNS_ADDED)}); copy obs[{column!r}] to a column of another name"
            )
    gene_ids = counts.gene_ids(gene_key)
    obs, var = counts.obs.copy(), counts.var.copy()
    obs.index, var.index = obs.index.astype(str), var.index.astype(str)
    with warnings.catch_warnings():
        # Duplicated cell or gene names are kept as they are (the cache stores positions,
        # not names; `tokbench data inspect` reports duplicated gene ids); anndata's advice
        # to make them unique is about an object the user never sees.
        warnings.filterwarnings("ignore", message=r"(Observation|Variable) names are not unique", category=UserWarning)
        adata = ad.AnnData(obs=obs, var=var)
    adata.var["gene_id"] = gene_ids
    adata.uns["gene_id_source"] = "var_names" if gene_key is None else f"var[{gene_key!r}]"
    return adata


def map_gene_ids(adata: ad.AnnData, *, min_fraction: float, where: str) -> None:
    """Map ``var["gene_id"]`` (symbols or Ensembl ids) onto the GRCh38 gene table.

    Adds ``var["symbol"]`` (``""`` where unmapped), ``var["chromosome"]`` (``""`` where
    unknown), ``var["start"]`` (bp, -1 where unknown), ``var["gene_mapped"]`` and
    ``uns["gene_id_kind"]`` (``"symbol"`` or ``"ensembl"``). Raises :class:`TokbenchError`
    when fewer than ``min_fraction`` (0..1) of the ids map.
    """
    mapping = map_genes(adata.var["gene_id"].to_numpy(), where=f"{where}: {adata.uns['gene_id_source']}",
                        min_fraction=min_fraction)
    adata.var["symbol"] = mapping.symbol
    adata.var["chromosome"] = mapping.chromosome
    adata.var["start"] = mapping.start
    adata.var["gene_mapped"] = mapping.mapped
    adata.uns["gene_id_kind"] = mapping.id_kind


def assign_split(adata: ad.AnnData, split: SplitConfig, *, label_key: str, where: str) -> None:
    """Add ``obs["split_code"]`` (int8: 0 train, 1 val, 2 test, -1 unused) as ``split`` says,
    stratified by ``obs[label_key]``, and ``uns["splits"]``, the split's report. Cells
    without a label are unused (and a warning counts them)."""
    raw_labels = adata.obs[label_key]
    labelled = raw_labels.notna().to_numpy()
    if not labelled.all():
        log.warning("%s: %d cells have no value in obs[%r]; dropped", where, int((~labelled).sum()), label_key)
    codes, report = assign_splits(adata.obs, _label_names(adata, label_key), split, where)
    codes[~labelled] = -1
    adata.obs["split_code"] = codes
    adata.uns["splits"] = report


def count_qc(adata: ad.AnnData, counts: H5adSource, *, chunk_size: int, where: str) -> None:
    """First pass over the counts, ``chunk_size`` cells at a time: refuse negative or
    non-finite values, warn about non-integer ones, and count.

    Adds ``obs["n_genes_by_counts"]`` (genes with a nonzero count), ``obs["total_counts"]``
    (float64 count total over every gene of the file: Geneformer's ``n_counts``),
    ``var["n_cells_by_counts"]`` (cells expressing the gene) and ``var["n_cells_train"]``
    (training cells expressing it). Needs ``obs["split_code"]``.
    """
    n_cells, n_genes = adata.shape
    split = adata.obs["split_code"].to_numpy()
    cell_nnz = np.zeros(n_cells, dtype=np.int64)
    cell_total = np.zeros(n_cells, dtype=np.float64)
    gene_cells_all = np.zeros(n_genes, dtype=np.int64)
    gene_cells_train = np.zeros(n_genes, dtype=np.int64)
    non_integer = False
    for start, block in counts.row_chunks(chunk_size):
        values = block.data
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            row = start + int(np.searchsorted(block.indptr, np.flatnonzero(bad)[0], side="right") - 1)
            raise TokbenchError(
                f"{where}: {counts.matrix_name} has a negative or non-finite count "
                f"({float(values[bad][0])}) in cell {adata.obs_names[row]!r}; expected raw counts"
            )
        non_integer = non_integer or bool(np.any(values != np.round(values)))
        nz = block.copy()
        nz.eliminate_zeros()
        rows = slice(start, start + block.shape[0])
        cell_nnz[rows] = np.diff(nz.indptr)
        cell_total[rows] = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
        gene_cells_all += np.bincount(nz.indices, minlength=n_genes)
        gene_cells_train += np.bincount(nz[split[rows] == SPLIT_CODES["train"]].indices, minlength=n_genes)
    if non_integer:
        log.warning("%s: %s holds non-integer values; tokbench expects raw counts (set dataset.layer)",
                    where, counts.matrix_name)
    adata.obs["n_genes_by_counts"] = cell_nnz
    adata.obs["total_counts"] = cell_total
    adata.var["n_cells_by_counts"] = gene_cells_all
    adata.var["n_cells_train"] = gene_cells_train


def filter_cells_and_genes(adata: ad.AnnData, *, min_cells: int, where: str) -> None:
    """Mark what the cache keeps (nothing is subset: the counts stay on disk).

    ``obs["kept"]``: cells in a split that express at least one gene. ``var["kept"]``: genes
    expressed in some cell and in at least ``min_cells`` training cells. ``uns["dropped"]``
    counts what went and why. Dropped empty cells and genes are logged; raises
    :class:`TokbenchError` when no gene, or no cell of some split, is left. Needs
    :func:`count_qc`'s columns.
    """
    split = adata.obs["split_code"].to_numpy()
    empty_cells = (adata.obs["n_genes_by_counts"].to_numpy() == 0) & (split >= 0)
    if empty_cells.any():
        log.warning("%s: %d cells express no gene; dropped", where, int(empty_cells.sum()))
    keep_cells = (split >= 0) & ~empty_cells
    empty_genes = adata.var["n_cells_by_counts"].to_numpy() == 0
    if empty_genes.any():
        log.warning("%s: %d genes are zero in every cell; dropped", where, int(empty_genes.sum()))
    keep_genes = ~empty_genes & (adata.var["n_cells_train"].to_numpy() >= min_cells)
    if not keep_genes.any():
        raise TokbenchError(f"{where}: no gene is expressed in at least min_cells={min_cells} training cells")
    for role, code in SPLIT_CODES.items():
        if not (keep_cells & (split == code)).any():
            raise TokbenchError(f"{where}: split {role!r} has no cells left after dropping empty cells")
    adata.obs["kept"] = keep_cells
    adata.var["kept"] = keep_genes
    adata.uns["dropped"] = {
        "empty_cells": int(empty_cells.sum()),
        "empty_genes": int(empty_genes.sum()),
        "genes_below_min_cells": int((~empty_genes & ~keep_genes).sum()),
        "min_cells": min_cells,
    }


def highly_variable_genes(adata: ad.AnnData, counts: H5adSource, *, n_top_genes: int, target_sum: float,
                          chunk_size: int) -> None:
    """Add ``var["highly_variable"]``: the ``n_top_genes`` kept genes of highest normalised
    dispersion (scanpy's ``flavor="seurat"``) over the kept *training* cells alone, after
    ``normalize_total(target_sum)`` (counts per cell) and ``log1p``; every kept gene when
    there are no more than ``n_top_genes``. Needs :func:`filter_cells_and_genes`'s columns.
    """
    gene_cols = np.flatnonzero(adata.var["kept"].to_numpy())
    chosen = np.zeros(adata.n_vars, dtype=bool)
    if n_top_genes >= len(gene_cols):
        chosen[gene_cols] = True
    else:
        train_cells = adata.obs["kept"].to_numpy() & (adata.obs["split_code"].to_numpy() == SPLIT_CODES["train"])
        blocks = []
        for start, block in counts.row_chunks(chunk_size):
            rows = train_cells[start : start + block.shape[0]]
            if rows.any():
                blocks.append(_normalised(block[rows][:, gene_cols], target_sum=target_sum, log1p=True))
        train = ad.AnnData(X=sp.vstack(blocks, format="csr"))
        with _known_scanpy_warnings_ignored():
            sc.pp.highly_variable_genes(train, n_top_genes=n_top_genes, flavor="seurat", subset=False)
        chosen[gene_cols[train.var["highly_variable"].to_numpy()]] = True
    adata.var["highly_variable"] = chosen


def write_normalised(adata: ad.AnnData, counts: H5adSource, out: Path, *, target_sum: float, log1p: bool,
                     chunk_size: int, where: str) -> None:
    """Second pass over the counts: normalise every kept cell over the kept genes
    (``normalize_total(target_sum)``, counts per cell, then ``log1p`` when asked), keep the
    stored genes (:func:`stored_genes`) and append the rows to ``out``'s CSR arrays
    (``indptr.npy`` int64, ``indices.npy`` int32 sorted per row, ``data.npy`` float32), with
    ``library_size.npy`` (float64 count total that ``normalize_total`` divided by) and
    ``total_counts.npy`` (float64, every gene of the file) for the kept cells.

    Adds ``obs["library_size"]`` (NaN for cells not kept), ``uns["nnz"]`` and
    ``uns["empty_sentences"]`` (kept cells with none of the stored genes; logged).
    """
    keep_cells = adata.obs["kept"].to_numpy()
    kept_genes = adata.var["kept"].to_numpy()
    gene_cols = np.flatnonzero(kept_genes)
    stored_cols = np.flatnonzero(stored_genes(adata)[kept_genes])  # positions within gene_cols
    cells = np.flatnonzero(keep_cells)
    capacity = int(adata.obs["n_genes_by_counts"].to_numpy()[cells].sum())
    indices = cache.NpyAppender(out / "indices.npy", np.int32, capacity)
    data = cache.NpyAppender(out / "data.npy", np.float32, capacity)
    row_nnz = np.zeros(len(cells), dtype=np.int64)
    library_size = np.zeros(len(cells), dtype=np.float64)
    done = 0
    for start, block in counts.row_chunks(chunk_size):
        rows = keep_cells[start : start + block.shape[0]]
        if not rows.any():
            continue
        kept = block[rows][:, gene_cols]
        library_size[done : done + kept.shape[0]] = np.asarray(kept.sum(axis=1), dtype=np.float64).ravel()
        normalised = _normalised(kept, target_sum=target_sum, log1p=log1p)[:, stored_cols]
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
    np.save(out / "total_counts.npy", adata.obs["total_counts"].to_numpy()[cells])
    per_cell = np.full(adata.n_obs, np.nan)
    per_cell[cells] = library_size
    adata.obs["library_size"] = per_cell
    adata.uns["nnz"] = int(indptr[-1])
    adata.uns["empty_sentences"] = int((row_nnz == 0).sum())
    if adata.uns["empty_sentences"]:
        log.warning("%s: %d cells express none of the selected genes; they keep an empty sentence",
                    where, adata.uns["empty_sentences"])


def write_annotations(adata: ad.AnnData, out: Path, *, label_key: str, split_key: str | None) -> None:
    """Write the kept cells' ``labels.npy`` (int64 class ids, classes sorted by name),
    ``split.npy`` (int8 split codes), ``obs_names.npy`` and, with a ``split_key``,
    ``split_key_codes.npy`` (int64 index into the sorted values of ``obs[split_key]``), and
    ``genes.json`` (id, symbol, chromosome and start of each stored gene, in column order).

    Adds ``uns["class_names"]``, ``uns["split_key_values"]`` and ``uns["label_counts"]``
    (cells per split and class).
    """
    cells = np.flatnonzero(adata.obs["kept"].to_numpy())
    split = adata.obs["split_code"].to_numpy()[cells]
    labels = _label_names(adata, label_key)[cells]
    class_names = sorted(set(labels))
    class_index = {name: i for i, name in enumerate(class_names)}
    np.save(out / "labels.npy", np.array([class_index[x] for x in labels], dtype=np.int64))
    np.save(out / "split.npy", split)
    np.save(out / "obs_names.npy", np.asarray(adata.obs_names)[cells].astype(str))
    split_key_values = []
    if split_key:
        column = adata.obs[split_key].astype(str).to_numpy()[cells]
        split_key_values = sorted(set(column))
        np.save(out / "split_key_codes.npy", np.searchsorted(split_key_values, column).astype(np.int64))
    genes = adata.var[stored_genes(adata)]
    (out / "genes.json").write_text(
        json.dumps(
            {
                "gene_ids": [str(g) for g in genes["gene_id"]],
                "symbol": [str(g) for g in genes["symbol"]],
                "chromosome": [str(g) for g in genes["chromosome"]],
                "start": [int(s) for s in genes["start"]],
            }
        )
    )
    adata.uns["class_names"] = class_names
    adata.uns["split_key_values"] = split_key_values
    adata.uns["label_counts"] = {
        role: {name: int(((split == code) & (labels == name)).sum()) for name in class_names}
        for role, code in SPLIT_CODES.items()
    }


def stored_genes(adata: ad.AnnData) -> np.ndarray:
    """Boolean mask of the genes the cache stores: kept, and highly variable when
    :func:`highly_variable_genes` ran."""
    stored = adata.var["kept"].to_numpy()
    if "highly_variable" in adata.var:
        stored = stored & adata.var["highly_variable"].to_numpy()
    return stored


# --- helpers --------------------------------------------------------------------------


def _label_names(adata: ad.AnnData, label_key: str) -> np.ndarray:
    """``obs[label_key]`` as an object array of strings (a missing label reads ``"nan"``;
    :func:`assign_split` leaves such cells unused)."""
    return np.asarray(adata.obs[label_key].astype(str), dtype=object)


def _preprocessing_record(adata: ad.AnnData, config: DatasetConfig) -> list[dict]:
    """The ``meta["preprocessing"]`` list: what was applied to the stored values, in order."""
    dropped = adata.uns["dropped"]
    steps = [
        {"step": "drop_empty", "cells_dropped": dropped["empty_cells"], "genes_dropped": dropped["empty_genes"]},
        {"step": "filter_genes", "min_cells": config.min_cells, "on": "train",
         "genes_dropped": dropped["genes_below_min_cells"]},
        {"step": "normalize_total", "target_sum": config.target_sum},
    ]
    if config.log1p:
        steps.append({"step": "log1p"})
    if config.n_top_genes:
        steps.append({"step": "highly_variable_genes", "flavor": "seurat", "n_top_genes": int(config.n_top_genes),
                      "on": "train"})
    return steps


@contextlib.contextmanager
def _known_scanpy_warnings_ignored():
    """Silence the scanpy warnings tokbench reports in its own words, and no other."""
    with warnings.catch_warnings():
        # A kept cell whose genes all failed min_cells has no count left; it is stored as an
        # empty row and counted in meta["empty_sentences"] (and logged), so scanpy's warning,
        # repeated once per chunk, would say nothing more.
        warnings.filterwarnings("ignore", message="Some cells have zero counts", category=UserWarning)
        yield


def _normalised(counts: sp.csr_matrix, *, target_sum: float, log1p: bool) -> sp.csr_matrix:
    """scanpy ``normalize_total(target_sum)`` (counts per cell), then ``log1p`` when asked,
    on one chunk of cells; float32 CSR."""
    chunk = ad.AnnData(X=counts.astype(np.float32))
    with _known_scanpy_warnings_ignored():
        sc.pp.normalize_total(chunk, target_sum=target_sum)
        if log1p:
            sc.pp.log1p(chunk)
    return sp.csr_matrix(chunk.X, dtype=np.float32)
