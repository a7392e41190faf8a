"""The embedded default dataset: the synthetic atlas, generated once per node on first use.

Configs point at it with the ``atlas`` resolver: ``dataset.path: ${atlas:h5ad}`` and, for a
pretrained Fg, ``fg.path: ${atlas:embeddings}``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from omegaconf import OmegaConf

from tokbench.data.cache import _locked, default_cache_root
from tokbench.errors import TokbenchError

# Bump when the generator's output changes, so nodes regenerate rather than reuse.
ATLAS_VERSION = 1
ATLAS_OPTIONS = {"n_cells": 6000, "n_genes": 2000, "n_tissues": 4, "n_cell_types": 8, "seed": 0}


def embedded_atlas(cache_root: str | Path | None = None) -> dict[str, Path]:
    """Paths of the default atlas (``h5ad``) and its gene-embedding file (``embeddings``).

    Generated into ``<cache_root>/atlas-v<version>/`` on first call (atomic, one builder per
    node); later calls only check that the files are there.
    """
    root = Path(cache_root).expanduser().resolve() if cache_root else default_cache_root()
    folder = root / f"atlas-v{ATLAS_VERSION}"
    paths = {"h5ad": folder / "atlas.h5ad", "embeddings": folder / "atlas.gene_embeddings.pt"}
    if all(p.exists() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{folder.name}.lock"):
        if all(p.exists() for p in paths.values()):
            return paths
        from tokbench.data.synth import write_atlas

        tmp = root / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            write_atlas(tmp / "atlas.h5ad", **ATLAS_OPTIONS)
            (tmp / "options.json").write_text(json.dumps(ATLAS_OPTIONS))
            if folder.exists():
                shutil.rmtree(folder)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return paths


def _atlas_resolver(which: str = "h5ad") -> str:
    if which not in ("h5ad", "embeddings"):
        raise TokbenchError(f"${{atlas:{which}}}: expected ${{atlas:h5ad}} or ${{atlas:embeddings}}")
    return str(embedded_atlas()[which])


def register_resolvers() -> None:
    """Register the ``atlas`` OmegaConf resolver (idempotent)."""
    if not OmegaConf.has_resolver("atlas"):
        OmegaConf.register_resolver("atlas", _atlas_resolver)
