"""Pretrained gene vectors: every file format, id mapping, PCA, missing-gene policies, errors."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from test_tokenizers import make_prepared

from tokbench.errors import TokbenchError
from tokbench.tokenizers import N_SPECIAL, FcConfig, FeConfig, FgConfig, build_tokenizer
from tokbench.tokenizers.config import OrderConfig, SelectConfig

DATASET_GENES = ["TP53", "CD3E", "MS4A1", "GAPDH", "ACTB", "CD19", "NKG7", "LYZ"]
# The file: six of the dataset's genes (two by Ensembl id, one with a version) plus one
# gene the dataset lacks; CD19 and LYZ are missing.
FILE_IDS = ["TP53", "ENSG00000198851", "MS4A1", "ENSG00000111640.15", "ACTB", "NKG7", "ALB"]
DIM = 4
VECTORS = np.arange(len(FILE_IDS) * DIM, dtype=np.float32).reshape(-1, DIM) / 10 + 1
MAPPED = {"TP53": 0, "CD3E": 1, "MS4A1": 2, "GAPDH": 3, "ACTB": 4, "NKG7": 5}  # dataset gene -> file row


@pytest.fixture(scope="module")
def genes8():
    matrix = np.tile(np.arange(1, 9, dtype=np.float32), (3, 1))
    return make_prepared(matrix, gene_ids=DATASET_GENES)


def write(path, kind: str) -> dict:
    """Write VECTORS in one format; return the extra Fg parameters it needs."""
    if kind == "torch":
        torch.save({g: torch.from_numpy(v) for g, v in zip(FILE_IDS, VECTORS)}, path / "genes.pt")
        return {"path": str(path / "genes.pt")}
    if kind == "text":
        lines = [f"{len(FILE_IDS)} {DIM}"] + [g + " " + " ".join(map(str, v)) for g, v in zip(FILE_IDS, VECTORS)]
        (path / "gene2vec.txt").write_text("\n".join(lines) + "\n")
        return {"path": str(path / "gene2vec.txt")}
    if kind == "text_noheader":
        lines = [g + "\t" + " ".join(map(str, v)) for g, v in zip(FILE_IDS, VECTORS)]
        (path / "gene2vec.vec").write_text("\n".join(lines))
        return {"path": str(path / "gene2vec.vec")}
    frame = pd.DataFrame(VECTORS, columns=[f"d{i}" for i in range(DIM)])
    frame.insert(0, "gene", FILE_IDS)
    if kind == "csv":
        frame.to_csv(path / "genes.csv", index=False)
        return {"path": str(path / "genes.csv")}
    if kind == "tsv_gz":
        with gzip.open(path / "genes.tsv.gz", "wt") as handle:
            frame.to_csv(handle, sep="\t", index=False)
        return {"path": str(path / "genes.tsv.gz")}
    if kind == "parquet":
        frame.set_index("gene").to_parquet(path / "genes.parquet")
        return {"path": str(path / "genes.parquet")}
    if kind == "parquet_column":  # genes in the last column: gene_column must name it
        frame[[*frame.columns[1:], "gene"]].to_parquet(path / "table.parquet", index=False)
        return {"path": str(path / "table.parquet"), "gene_column": "gene"}
    np.save(path / "genes.npy", VECTORS)
    (path / "genes.txt").write_text("\n".join(FILE_IDS) + "\n")
    return {"path": str(path / "genes.npy"), "gene_list": str(path / "genes.txt")}


def pretrained(genes8, d_model=DIM, **params):
    fg = FgConfig(name="pretrained", **params)
    fc = FcConfig(order=OrderConfig(name="gene_index"), select=SelectConfig(name="truncate", size=20))
    return build_tokenizer(fg, FeConfig(), fc, genes8, d_model, 0)


def gene_vector(tokenizer, gene: str) -> torch.Tensor:
    token = N_SPECIAL + DATASET_GENES.index(gene)
    return tokenizer.embedder.genes(torch.tensor([[token]]))[0, 0]


FORMATS = ["torch", "text", "text_noheader", "csv", "tsv_gz", "parquet", "parquet_column", "npy"]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_maps_symbols_and_ensembl_ids(tmp_path, genes8, kind, caplog):
    with caplog.at_level(logging.INFO, logger="tokbench.tokenizers.gene_vectors"):
        with caplog.at_level(logging.INFO, logger="tokbench.tokenizers.parts"):
            tokenizer = pretrained(genes8, **write(tmp_path, kind))
    assert "6 of 8 dataset genes mapped (75.0%)" in caplog.text
    assert tokenizer.genes_mapped == 6 and tokenizer.genes_total == 8
    for gene, row in MAPPED.items():  # same dim, frozen, no PCA: the file's own vector
        torch.testing.assert_close(gene_vector(tokenizer, gene), torch.from_numpy(VECTORS[row]))
    assert "genes.vectors" in dict(tokenizer.embedder.named_buffers())  # frozen by default
    assert not any("vectors" in name for name, _ in tokenizer.embedder.named_parameters())


def test_missing_genes_are_dropped_or_learned(tmp_path, genes8):
    params = write(tmp_path, "torch")
    dropped = pretrained(genes8, **params)
    tokens = dropped.sentences(np.arange(3), 0).gene_tokens
    present = {DATASET_GENES[t - N_SPECIAL] for t in tokens.flatten().tolist() if t >= N_SPECIAL}
    assert present == set(MAPPED)  # CD19 and LYZ never enter a sentence
    assert dropped.n_empty_cells == 0

    learned = pretrained(genes8, missing="learn", **params)
    tokens = learned.sentences(np.arange(3), 0).gene_tokens
    assert {DATASET_GENES[t - N_SPECIAL] for t in tokens[0, 1:].tolist()} == set(DATASET_GENES)
    # the missing genes' vectors train, the file's stay fixed
    out = learned.embedder(learned.sentences(np.arange(3), 0)).sum()
    out.backward()
    grad = learned.embedder.genes.learned.weight.grad
    cd19 = N_SPECIAL + DATASET_GENES.index("CD19")
    tp53 = N_SPECIAL + DATASET_GENES.index("TP53")
    assert grad[cd19].abs().sum() > 0 and grad[tp53].abs().sum() == 0


def test_fine_tuning_and_projection(tmp_path, genes8):
    params = write(tmp_path, "text")
    tuned = pretrained(genes8, frozen=False, **params)
    assert isinstance(tuned.embedder.genes.vectors, torch.nn.Parameter)
    projected = pretrained(genes8, d_model=6, **params)  # dims differ: a trained Linear(4, 6)
    assert isinstance(projected.embedder.genes.project, torch.nn.Linear)
    project = projected.embedder.genes.project
    expected = project(torch.from_numpy(VECTORS[MAPPED["ACTB"]]))
    torch.testing.assert_close(gene_vector(projected, "ACTB"), expected)


def test_pca_is_fitted_on_the_file_vectors(tmp_path, genes8):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(FILE_IDS), 6)).astype(np.float32)
    torch.save({g: torch.from_numpy(v) for g, v in zip(FILE_IDS, vectors)}, tmp_path / "wide.pt")
    tokenizer = pretrained(genes8, d_model=3, pca=True, path=str(tmp_path / "wide.pt"))
    assert isinstance(tokenizer.embedder.genes.project, torch.nn.Identity)
    centred = vectors.astype(np.float64) - vectors.mean(0)  # all file rows, ALB included
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ axes[:3].T
    got = torch.stack([gene_vector(tokenizer, g) for g in MAPPED]).detach().numpy()
    rows = [MAPPED[g] for g in MAPPED]
    signs = np.sign(got[0] / expected[rows][0])
    np.testing.assert_allclose(got, expected[rows] * signs, rtol=1e-4, atol=1e-5)
    # components come in order of variance
    assert np.all(np.diff(np.var(centred @ axes[:3].T, axis=0)) <= 0)


def test_bad_files_are_refused_before_training(tmp_path, genes8):
    with pytest.raises(TokbenchError, match="does not exist"):
        pretrained(genes8, path=str(tmp_path / "nope.pt"))
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(TokbenchError, match="cannot read .*broken.pt as torch"):
        pretrained(genes8, path=str(tmp_path / "broken.pt"))
    (tmp_path / "ragged.txt").write_text("TP53 1 2 3\nCD3E 1 2\n")
    with pytest.raises(TokbenchError, match=r"ragged.txt:2: 2 values, the first row had 3"):
        pretrained(genes8, path=str(tmp_path / "ragged.txt"))
    torch.save({"TP53": torch.ones(3), "CD3E": torch.ones(4)}, tmp_path / "ragged.pt")
    with pytest.raises(TokbenchError, match="has 4 values, the first had 3"):
        pretrained(genes8, path=str(tmp_path / "ragged.pt"))
    np.save(tmp_path / "vectors.npy", VECTORS)
    with pytest.raises(TokbenchError, match="set fg.gene_list"):
        pretrained(genes8, path=str(tmp_path / "vectors.npy"))
    (tmp_path / "short.txt").write_text("TP53\nCD3E\n")
    with pytest.raises(TokbenchError, match="lists 2 genes but .* has 7 rows"):
        pretrained(genes8, path=str(tmp_path / "vectors.npy"), gene_list=str(tmp_path / "short.txt"))
    pd.DataFrame({"gene": ["TP53"], "kind": ["x"], "d0": [1.0]}).to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(TokbenchError, match="non-numeric columns kind"):
        pretrained(genes8, path=str(tmp_path / "text.csv"))
    (tmp_path / "genes.bin").write_bytes(b"")
    with pytest.raises(TokbenchError, match="set fg.format to one of"):
        pretrained(genes8, path=str(tmp_path / "genes.bin"))
    with pytest.raises(TokbenchError, match="fg.missing='keep' is not valid; valid: drop, learn"):
        pretrained(genes8, missing="keep", **write(tmp_path, "torch"))


def test_too_few_mapped_genes_is_refused(tmp_path, genes8):
    params = write(tmp_path, "torch")
    with pytest.raises(TokbenchError, match=r"only 6 of 8 dataset genes \(75.0%\).*min_fraction_mapped=0.9"):
        pretrained(genes8, min_fraction_mapped=0.9, **params)
    torch.save({"ALB": torch.ones(DIM), "INS": torch.ones(DIM)}, tmp_path / "other.pt")
    with pytest.raises(TokbenchError, match="only 0 of 8"):
        pretrained(genes8, min_fraction_mapped=0.0, path=str(tmp_path / "other.pt"))
