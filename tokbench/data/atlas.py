"""The embedded default dataset: the synthetic atlas, generated once per node on first use.

Configs point at it with the ``atlas`` resolver: ``dataset.path: ${atlas:h5ad}`` and, for a
pretrained Fg, ``fg.path: ${atlas:embeddings}``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from tokbench.data.cache import default_cache_root, get_or_build
from tokbench.errors import TokbenchError

# Bump when the generator's output changes, so nodes regenerate rather than reuse.
ATLAS_VERSION = 2
ATLAS_OPTIONS = {"n_cells": 6000, "n_genes": 20_000, "n_tissues": 4, "n_cell_types": 8, "seed": 0}


def embedded_atlas(cache_root: str | Path | None = None) -> dict[str, Path]:
    """Paths of the default atlas (``h5ad``) and its gene-embedding file (``embeddings``).

    Generated into ``<cache_root>/atlas-v<version>/`` on first call, like any cache entry
    (built aside, renamed into place, one builder per node); later calls only map it.
    """
    root = Path(cache_root).expanduser().resolve() if cache_root else default_cache_root()
    folder = root / f"atlas-v{ATLAS_VERSION}"
    paths = {"h5ad": folder / "atlas.h5ad", "embeddings": folder / "atlas.gene_embeddings.pt"}

    def build(tmp: Path) -> dict:
        from tokbench.data.synth import write_atlas

        write_atlas(tmp / "atlas.h5ad", **ATLAS_OPTIONS)
        return {"atlas_options": ATLAS_OPTIONS}

    def validate(entry: Path, meta: dict) -> None:
        missing = [p.name for p in paths.values() if not p.exists()]
        if missing or meta.get("atlas_options") != ATLAS_OPTIONS:
            raise ValueError(f"atlas files missing or from other options: {missing}")

    get_or_build(folder, build, validate)
    return paths


def _atlas_resolver(which: str = "h5ad") -> str:
    if which not in ("h5ad", "embeddings"):
        raise TokbenchError(f"${{atlas:{which}}}: expected ${{atlas:h5ad}} or ${{atlas:embeddings}}")
    return str(embedded_atlas()[which])


def register_resolvers() -> None:
    """Register the ``atlas`` OmegaConf resolver (idempotent)."""
    if not OmegaConf.has_resolver("atlas"):
        OmegaConf.register_resolver("atlas", _atlas_resolver)
