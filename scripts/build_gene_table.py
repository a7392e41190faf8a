"""Build tokbench's human gene table from the annotation database a Debian package ships.

Source: Debian's ``r-bioc-org.hs.eg.db`` (version pinned below), Bioconductor's
``org.Hs.eg.db``, whose SQLite database
``/usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite`` joins NCBI Entrez Gene
(2022-09-12: symbol, chromosome, gene type), Ensembl (2022-06-28: ``ENSEMBL``) and the UCSC
GRCh38 (hg38) gene positions (2022-08-31: ``CHRLOC``/``CHRLOCEND``, negative on the minus
strand). One row per gene that has an Ensembl id and a chromosome among 1-22, X, Y and MT:

- ``start``/``end``: the lowest ``|start|`` and highest ``|end|`` of the gene's UCSC
  locations on its own chromosome (alt/fix contigs ignored), 1-based bp;
- genes on a chromosome but without a UCSC location (most MT genes: UCSC lists chrM
  separately) get ``start``/``end`` -1: they keep their chromosome group and sort after the
  positioned genes of that group;
- a gene with several Ensembl ids keeps the lowest; an Ensembl id claimed by several genes
  goes to the one whose symbol sorts first; mitochondrial genes get the HGNC ``MT-`` prefix
  that 10x and Ensembl use (``ND1`` -> ``MT-ND1``, ``COX1`` -> ``MT-CO1``, ``CYTB`` ->
  ``MT-CYB``).

Run from the repository root (needs ``apt-get`` for the download, or give the ``.deb``)::

    python scripts/build_gene_table.py
    python scripts/build_gene_table.py --deb r-bioc-org.hs.eg.db_3.16.0-1_all.deb
    python scripts/build_gene_table.py --sqlite /usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite

and commit the resulting ``tokbench/data/resources/genes_grch38.tsv.gz`` and
``gene_aliases_grch38.tsv.gz``. The second file maps earlier symbols (Entrez Gene's
``alias`` table: ``H2AFY`` -> ``MACROH2A1``, ``IGJ`` -> ``JCHAIN``) to the Ensembl id of the
one gene that uses them, for datasets annotated with older symbols; an alias that names
several genes, is a current symbol or is shorter than three characters is left out.
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

PACKAGE = "r-bioc-org.hs.eg.db"
VERSION = "3.16.0-1"
MEMBER = "usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite"
OUT = Path(__file__).resolve().parents[1] / "tokbench" / "data" / "resources" / "genes_grch38.tsv.gz"
ALIASES = "gene_aliases_grch38.tsv.gz"
CHROMOSOMES = [str(i) for i in range(1, 23)] + ["X", "Y", "MT"]
# Entrez Gene's mitochondrial symbols -> the HGNC ones 10x Genomics and Ensembl use.
_MT_RENAME = {"COX1": "MT-CO1", "COX2": "MT-CO2", "COX3": "MT-CO3", "CYTB": "MT-CYB"}


def fetch_database(dest: Path, deb: Path | None) -> Path:
    """Download the pinned Debian package (``apt-get download``, no dependencies, no install)
    unless ``deb`` is given, unpack it into ``dest`` and return the SQLite file."""
    if deb is None:
        subprocess.run(["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=dest, check=True)
        deb = next(dest.glob(f"{PACKAGE}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest / "root")], check=True)
    return dest / "root" / MEMBER


def build(database: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read ``org.Hs.eg.sqlite``; return the tidy gene table (genomic order) and the aliases."""
    with sqlite3.connect(database) as db:
        alias = pd.read_sql("SELECT _id, alias_symbol AS alias FROM alias", db)
        genes = pd.read_sql("SELECT g._id, i.symbol, c.chromosome FROM genes g JOIN gene_info i USING (_id) "
                            "JOIN chromosomes c USING (_id)", db)
        ensembl = pd.read_sql("SELECT _id, ensembl_id FROM ensembl", db)
        where = pd.read_sql("SELECT _id, seqname, start_location, end_location FROM chromosome_locations", db)
    genes = genes[genes["chromosome"].isin(CHROMOSOMES)]
    genes = genes[~genes.duplicated("_id", keep=False)]  # genes placed on two chromosomes (X/Y PAR): ambiguous
    ensembl = ensembl.sort_values(["_id", "ensembl_id"]).drop_duplicates("_id")
    table = genes.merge(ensembl, on="_id")
    genes_ids = table[["_id", "ensembl_id"]]
    mt = table["chromosome"] == "MT"
    table.loc[mt, "symbol"] = [_MT_RENAME.get(s, s if s.startswith("MT-") else f"MT-{s}")
                               for s in table.loc[mt, "symbol"]]
    table = table.sort_values("symbol").drop_duplicates("ensembl_id").drop_duplicates("symbol")
    where = where.merge(table[["_id", "chromosome"]], on="_id")
    where = where[where["seqname"] == where["chromosome"]]
    span = where.assign(start=where["start_location"].abs(), end=where["end_location"].abs())
    span = span.groupby("_id").agg(start=("start", "min"), end=("end", "max"))
    table = table.join(span, on="_id")
    table[["start", "end"]] = table[["start", "end"]].fillna(-1).astype("int64")
    rank = table["chromosome"].map({c: i for i, c in enumerate(CHROMOSOMES)})
    placed_last = table["start"] < 0
    table = table.assign(_rank=rank, _unplaced=placed_last)
    table = table.sort_values(["_rank", "_unplaced", "start", "symbol"])
    table = table[["symbol", "ensembl_id", "chromosome", "start", "end"]].reset_index(drop=True)
    if table["symbol"].duplicated().any() or table["ensembl_id"].duplicated().any():
        raise SystemExit("gene table has duplicated symbols or Ensembl ids; refusing to write it")
    return table, _aliases(alias, genes_ids, table)


def _aliases(alias: pd.DataFrame, genes_ids: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Alias -> Ensembl id, for aliases of exactly one gene of the table that are no current symbol."""
    alias = alias.merge(genes_ids, on="_id").merge(table[["ensembl_id"]], on="ensembl_id")
    alias["key"] = alias["alias"].str.upper()
    alias = alias.drop_duplicates(["key", "ensembl_id"])
    alias = alias[~alias["key"].duplicated(keep=False) & ~alias["key"].isin(table["symbol"].str.upper())]
    alias = alias[alias["key"].str.len() >= 3]  # two-character aliases (G1, P2) collide with made-up ids
    return alias[["alias", "ensembl_id"]].sort_values("alias").reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help=f"a local {PACKAGE} .deb (skips the download)")
    parser.add_argument("--sqlite", type=Path, help="an org.Hs.eg.sqlite file (skips download and unpacking)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        database = args.sqlite or fetch_database(Path(tmp), args.deb)
        table, aliases = build(database)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, sep="\t", index=False, compression={"method": "gzip", "mtime": 0})
    aliases.to_csv(args.out.parent / ALIASES, sep="\t", index=False, compression={"method": "gzip", "mtime": 0})
    counts = table["chromosome"].value_counts()
    print(f"wrote {len(table)} genes on {table['chromosome'].nunique()} chromosomes to {args.out} "
          f"(Y: {counts.get('Y', 0)}, MT: {counts.get('MT', 0)}, "
          f"without a position: {int((table['start'] < 0).sum())}); "
          f"{len(aliases)} aliases")


if __name__ == "__main__":
    main()
