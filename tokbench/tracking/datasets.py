"""A run's dataset as MLflow sees it: the ``.h5ad`` it reads, named, with the data cache key
as digest, so runs on the same preprocessed data share one dataset in the UI."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


@functools.lru_cache(maxsize=64)
def _describe(dataset_json: str, split_json: str, context: str) -> tuple:
    from tokbench.data import cache
    # The digest must be the cache entry's own name: the same fields, the same fingerprint.
    from tokbench.data.prepare import _NOT_IN_KEY

    ds, sp = json.loads(dataset_json), json.loads(split_json)
    path = Path(ds["path"]).expanduser().resolve()
    content = {k: v for k, v in ds.items() if k not in _NOT_IN_KEY}
    digest = cache.cache_key({"dataset": content, "split": sp}, cache.file_fingerprint(path))
    name = ds.get("name") or path.stem
    return (("name", name), ("digest", digest), ("source", str(path)), ("source_type", "local"), ("context", context))


def dataset_input(cfg: DictConfig, context: str) -> dict:
    """``{name, digest, source, source_type, context}`` of the run's dataset; ``context`` is the
    split (for example ``cross_tissue:blood+lung->gut``). Cached per config: a sweep driver asks
    once per trial, and the fingerprint reads 2 MiB of the file."""
    ds = OmegaConf.to_container(cfg.dataset, resolve=True)
    sp = OmegaConf.to_container(cfg.split, resolve=True)
    return dict(_describe(json.dumps(ds, sort_keys=True), json.dumps(sp, sort_keys=True), context))
