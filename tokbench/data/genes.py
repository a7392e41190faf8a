"""The human (GRCh38) gene table shipped with tokbench: symbol <-> Ensembl id <-> position.

Built by ``scripts/build_gene_table.py`` from Bioconductor's ``org.Hs.eg.db`` SQLite
database as Debian's ``r-bioc-org.hs.eg.db`` 3.16.0-1 ships it: NCBI Entrez Gene symbols
and chromosomes (1-22, X, Y, MT), Ensembl gene ids, UCSC GRCh38 (hg38) start/end. Earlier
symbols (``H2AFY``, ``IGJ``, ...) map through Entrez Gene's alias table when they name a
single gene.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd

from tokbench.errors import TokbenchError

_ENSEMBL = re.compile(r"^ENSG\d{11}(\.\d+)?$")


@functools.cache
def gene_table() -> pd.DataFrame:
    """Return the gene table: columns ``symbol``, ``ensembl_id``, ``chromosome``, ``start``, ``end``.

    ``start``/``end`` are 1-based GRCh38 base-pair coordinates, -1 where the annotation
    has the chromosome but no position (most ``MT`` genes); ``chromosome`` is ``"1"``..
    ``"22"``, ``"X"``, ``"Y"`` or ``"MT"``. Rows are in genomic order (chromosomes 1..22, X,
    Y, MT; genes without a position last within their chromosome).
    """
    path = resources.files("tokbench.data") / "resources" / "genes_grch38.tsv.gz"
    with resources.as_file(path) as p:
        return pd.read_csv(p, sep="\t", dtype={"chromosome": str}, keep_default_na=False)


@functools.cache
def gene_aliases() -> pd.Series:
    """Earlier or alternative symbols (upper case) -> Ensembl id of the one gene they name."""
    path = resources.files("tokbench.data") / "resources" / "gene_aliases_grch38.tsv.gz"
    with resources.as_file(path) as p:
        aliases = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
    return pd.Series(aliases["ensembl_id"].to_numpy(), index=aliases["alias"].str.upper().to_numpy())


def chromosome_rank(chromosome: str) -> int:
    """Sort key of a chromosome name: 1..22, then X=23, Y=24, MT=25; unknown names are -1."""
    name = str(chromosome).removeprefix("chr")
    if name.isdigit():
        return int(name)
    return {"X": 23, "Y": 24, "M": 25, "MT": 25}.get(name, -1)


@dataclass(frozen=True)
class GeneMapping:
    """How a dataset's gene ids map onto the gene table.

    All arrays are aligned with the input ids. ``symbol`` and ``ensembl_id`` are ``""``,
    ``chromosome`` is ``""`` and ``start`` is ``-1`` where a gene is not in the table
    (``start`` is also -1 for a gene whose chromosome is known but position is not).
    """

    input_ids: np.ndarray
    symbol: np.ndarray
    ensembl_id: np.ndarray
    chromosome: np.ndarray
    start: np.ndarray
    id_kind: str  # "symbol" or "ensembl"

    @property
    def mapped(self) -> np.ndarray:
        """Boolean mask of genes found in the table."""
        return self.ensembl_id != ""

    @property
    def fraction_mapped(self) -> float:
        """Fraction of input genes found in the table (0..1)."""
        return float(self.mapped.mean()) if len(self.input_ids) else 0.0


def map_genes(gene_ids, *, where: str = "gene ids", min_fraction: float = 0.5) -> GeneMapping:
    """Map human gene symbols or Ensembl ids (versions allowed) onto the gene table.

    The id kind is detected from the ids themselves. Raises :class:`TokbenchError` naming
    ``where`` when fewer than ``min_fraction`` of the ids match either kind.
    """
    ids = np.asarray([str(g) for g in gene_ids], dtype=object)
    table = gene_table()
    looks_ensembl = np.array([bool(_ENSEMBL.match(g)) for g in ids], dtype=bool)
    kind = "ensembl" if len(ids) and looks_ensembl.mean() > 0.5 else "symbol"
    # Each id is looked up by its own kind, so a var index mixing symbols and Ensembl ids
    # (common after concatenating datasets) maps as far as it can.
    by_ensembl = pd.Index(table["ensembl_id"]).get_indexer([g.split(".")[0] for g in ids])
    upper = [g.upper() for g in ids]
    by_symbol = pd.Index(table["symbol"].str.upper()).get_indexer(upper)
    # An earlier symbol (older annotations, e.g. scanpy's pbmc68k_reduced) maps through
    # its alias when the current symbols miss it.
    aliases = gene_aliases()
    via_alias = pd.Index(table["ensembl_id"]).get_indexer(aliases.reindex(upper).fillna("").to_numpy())
    by_symbol = np.where(by_symbol >= 0, by_symbol, via_alias)
    rows = np.where(looks_ensembl, by_ensembl, by_symbol)
    hit = rows >= 0
    fraction = float(hit.mean()) if len(ids) else 0.0
    if fraction < min_fraction:
        examples = ", ".join(map(str, ids[~hit][:5]))
        raise TokbenchError(
            f"{where}: only {fraction:.0%} of {len(ids)} gene ids match human gene symbols or "
            f"Ensembl ids (GRCh38 table), below the required {min_fraction:.0%}; unmatched "
            f"examples: {examples}. Point gene_key at a var column holding symbols or Ensembl ids."
        )
    safe = np.where(hit, rows, 0)

    def take(col: str, missing):
        values = table[col].to_numpy()[safe]
        return np.where(hit, values, missing)

    return GeneMapping(
        input_ids=ids,
        symbol=take("symbol", "").astype(object),
        ensembl_id=take("ensembl_id", "").astype(object),
        chromosome=take("chromosome", "").astype(object),
        start=take("start", -1).astype(np.int64),
        id_kind=kind,
    )
