"""Pretrained gene vectors: read the file formats users have, match them to the dataset's genes.

Formats (``format: auto`` picks by suffix, ``.gz`` allowed for text and tables):

- ``torch`` (``.pt``, ``.pth``): ``torch.save({gene_id: 1-D tensor, ...})``.
- ``text`` (``.txt``, ``.vec``, ``.w2v``): gene2vec / word2vec text, ``GENE v1 v2 ...`` per
  line, optionally a first line ``n_genes dim``.
- ``csv`` / ``tsv`` / ``parquet``: one row per gene, the gene id in ``gene_column`` (default:
  the first column), every other column a vector component.
- ``npy``: a 2-D array plus ``gene_list``, a text file with one gene id per line.

Ids may be HGNC symbols or Ensembl ids (with or without version); they are matched to the
dataset's own gene ids, then through the GRCh38 gene table by Ensembl id and by symbol.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tokbench.data.genes import map_genes
from tokbench.errors import TokbenchError

log = logging.getLogger(__name__)

SUFFIXES = {
    ".pt": "torch",
    ".pth": "torch",
    ".torch": "torch",
    ".txt": "text",
    ".vec": "text",
    ".w2v": "text",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".npy": "npy",
}
FORMATS = sorted(set(SUFFIXES.values()))


@dataclass
class GeneVectors:
    """Gene ids (str, unique) and their vectors (float32, one row per id)."""

    ids: np.ndarray
    vectors: np.ndarray
    path: str

    @property
    def dim(self) -> int:
        """Length of each vector."""
        return self.vectors.shape[1]


def detect_format(path: Path) -> str:
    """The format named by the file's suffix (ignoring a trailing ``.gz``)."""
    name = path.name.lower().removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix not in SUFFIXES:
        raise TokbenchError(
            f"fg.path: cannot tell the format of {path} from its suffix; set fg.format to one of "
            f"{', '.join(FORMATS)} (suffixes: {', '.join(SUFFIXES)})"
        )
    return SUFFIXES[suffix]


def read_gene_vectors(
    path: str | Path, format: str = "auto", gene_column: str | None = None, gene_list: str | None = None
) -> GeneVectors:
    """Read a gene-vector file; every problem is a :class:`TokbenchError` naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TokbenchError(f"fg.path: gene-vector file {path} does not exist")
    kind = detect_format(path) if format == "auto" else format
    if kind not in FORMATS:
        raise TokbenchError(f"fg.format={format!r} is not a known format; valid: auto, {', '.join(FORMATS)}")
    if gene_column is not None and kind not in ("csv", "tsv", "parquet"):
        raise TokbenchError(f"fg.gene_column applies to csv/tsv/parquet tables, not to {kind} file {path}")
    if gene_list is not None and kind != "npy":
        raise TokbenchError(f"fg.gene_list applies to .npy files, not to {kind} file {path}")
    try:
        if kind == "torch":
            ids, vectors = _read_torch(path)
        elif kind == "text":
            ids, vectors = _read_text(path)
        elif kind == "npy":
            ids, vectors = _read_npy(path, gene_list)
        else:
            ids, vectors = _read_table(path, kind, gene_column)
    except TokbenchError:
        raise
    except Exception as err:  # a corrupt or mislabelled file: say which, and why
        raise TokbenchError(f"fg.path: cannot read {path} as {kind}: {type(err).__name__}: {err}") from None
    if len(ids) == 0 or vectors.shape[1] == 0:
        raise TokbenchError(f"fg.path: {path} holds no gene vectors")
    if not np.isfinite(vectors).all():
        bad = ids[~np.isfinite(vectors).all(1)][:5]
        raise TokbenchError(f"fg.path: {path} has NaN or infinite values (genes {', '.join(map(str, bad))})")
    ids = np.asarray([str(g).strip() for g in ids], dtype=object)
    _, first = np.unique(ids, return_index=True)
    if len(first) < len(ids):
        log.warning("%s: %d duplicated gene ids; the first row of each is used", path, len(ids) - len(first))
        keep = np.sort(first)
        ids, vectors = ids[keep], vectors[keep]
    return GeneVectors(ids, np.ascontiguousarray(vectors, dtype=np.float32), str(path))


def _read_torch(path: Path):
    table = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(table, dict):
        raise TokbenchError(f"fg.path: {path} holds a {type(table).__name__}; expected a dict {{gene_id: 1-D tensor}}")
    ids, rows, dim = [], [], None
    for gene, vector in table.items():
        vector = torch.as_tensor(vector)
        if vector.ndim != 1:
            raise TokbenchError(
                f"fg.path: {path}: the vector of {gene!r} has shape {tuple(vector.shape)}; expected 1-D"
            )
        if dim is None:
            dim = len(vector)
        elif len(vector) != dim:
            raise TokbenchError(
                f"fg.path: {path}: the vector of {gene!r} has {len(vector)} values, the first had {dim}"
            )
        ids.append(str(gene))
        rows.append(vector.to(torch.float32))
    vectors = torch.stack(rows).numpy() if rows else np.zeros((0, 0), np.float32)
    return np.asarray(ids, dtype=object), vectors


def _read_text(path: Path):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as handle:
        lines = handle.read().splitlines()
    ids, rows, dim, expected = [], [], None, None
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if dim is None and len(parts) == 2 and all(p.isdigit() for p in parts) and not ids:
            expected = int(parts[1])  # word2vec header: n_genes dim
            continue
        if dim is None:
            dim = len(parts) - 1
            if expected is not None and dim != expected:
                raise TokbenchError(f"fg.path: {path}:{number}: {dim} values, but the header says {expected}")
        elif len(parts) - 1 != dim:
            raise TokbenchError(f"fg.path: {path}:{number}: {len(parts) - 1} values, the first row had {dim}")
        ids.append(parts[0])
        rows.append(parts[1:])
    try:
        vectors = np.array(rows, dtype=np.float32) if rows else np.zeros((0, 0), np.float32)
    except ValueError as err:
        raise TokbenchError(f"fg.path: {path}: non-numeric vector value ({err})") from None
    return np.asarray(ids, dtype=object), vectors


def _read_table(path: Path, kind: str, gene_column: str | None):
    if kind == "parquet":
        frame = pd.read_parquet(path)
        if not isinstance(frame.index, pd.RangeIndex) and gene_column is None:
            frame = frame.reset_index()  # genes written as the index
    else:
        frame = pd.read_csv(path, sep="," if kind == "csv" else "\t")
    if frame.shape[1] < 2:
        raise TokbenchError(
            f"fg.path: {path} has {frame.shape[1]} column(s); expected a gene column and vector columns"
        )
    column = frame.columns[0] if gene_column is None else gene_column
    if column not in frame.columns:
        shown = ", ".join(map(str, frame.columns[:10]))
        raise TokbenchError(f"fg.gene_column={column!r} is not a column of {path}; columns: {shown}")
    values = frame.drop(columns=[column])
    text = [str(c) for c, dtype in values.dtypes.items() if not pd.api.types.is_numeric_dtype(dtype)]
    if text:
        raise TokbenchError(
            f"fg.path: {path}: non-numeric columns {', '.join(text[:5])}; only the gene column "
            f"({column!r}) may hold text (set fg.gene_column)"
        )
    vectors = values.to_numpy(dtype=np.float32)
    missing = np.isnan(vectors).any(1)
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise TokbenchError(
            f"fg.path: {path}: the vector of {frame[column].iloc[row]!r} (row {row + 1}) has empty values; "
            f"every row needs {vectors.shape[1]} values"
        )
    return frame[column].astype(str).to_numpy(dtype=object), vectors


def _read_npy(path: Path, gene_list: str | None):
    if gene_list is None:
        raise TokbenchError(
            f"fg.gene_list: {path} is a .npy array; set fg.gene_list to a file with one gene id per line"
        )
    genes = Path(gene_list).expanduser()
    if not genes.is_file():
        raise TokbenchError(f"fg.gene_list: gene list {genes} does not exist")
    vectors = np.load(path, allow_pickle=False)
    if vectors.ndim != 2:
        raise TokbenchError(f"fg.path: {path} holds an array of shape {vectors.shape}; expected (genes, dim)")
    ids = [line.strip() for line in genes.read_text().splitlines() if line.strip()]
    if len(ids) != len(vectors):
        raise TokbenchError(f"fg.gene_list: {genes} lists {len(ids)} genes but {path} has {len(vectors)} rows")
    return np.asarray(ids, dtype=object), vectors.astype(np.float32)


def _normalise(gene_id: str) -> str:
    gene_id = str(gene_id).strip().upper()
    return gene_id.split(".")[0] if gene_id.startswith("ENSG") else gene_id


def match_genes(dataset_ids: np.ndarray, dataset_symbols: np.ndarray, file_ids: np.ndarray) -> np.ndarray:
    """Row of ``file_ids`` for each dataset gene (int64, -1 where the file lacks it).

    A dataset gene matches a file row by its own id first (case-insensitive, Ensembl
    version ignored), then by the Ensembl id or the symbol both map to in the gene table.
    """
    file_map = map_genes(file_ids, where="pretrained gene ids", min_fraction=0.0)
    by_id: dict[str, int] = {}
    by_table: dict[str, int] = {}
    for row, (raw, symbol, ensembl) in enumerate(zip(file_ids, file_map.symbol, file_map.ensembl_id)):
        by_id.setdefault(_normalise(raw), row)
        for key in (ensembl, str(symbol).upper()):
            if key:
                by_table.setdefault(key, row)
    data_map = map_genes(dataset_ids, where="dataset gene ids", min_fraction=0.0)
    rows = np.full(len(dataset_ids), -1, dtype=np.int64)
    for j, raw in enumerate(dataset_ids):
        row = by_id.get(_normalise(raw))
        if row is None:
            for key in (data_map.ensembl_id[j], str(dataset_symbols[j]).upper(), str(data_map.symbol[j]).upper()):
                if key and key in by_table:
                    row = by_table[key]
                    break
        if row is not None:
            rows[j] = row
    return rows


def pca(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Project centred ``vectors`` (n, D) on their first ``k`` principal axes (float32 (n, k)).

    Exact (eigendecomposition of the covariance) up to D = 1024, randomised
    (``torch.pca_lowrank``, seeded) above. Each axis's sign makes its largest loading positive.
    """
    x = torch.as_tensor(vectors, dtype=torch.float64)
    centred = x - x.mean(0)
    if x.shape[1] <= 1024:
        _, axes = torch.linalg.eigh(centred.T @ centred)
        axes = axes.flip(1)[:, :k]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, _, axes = torch.pca_lowrank(centred, q=min(k + 8, *x.shape), center=False, niter=6)
        axes = axes[:, :k]
    signs = torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
    return (centred @ (axes * signs)).to(torch.float32).numpy()
