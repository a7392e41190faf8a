"""The component registry and parts of the user's own: catalogue, checks, both sentence
paths, `tokbench train`, and a sweep whose workers get the user's module only through
Ray's runtime environment (the tutorial in examples/novel_tokenizer, shrunk)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import tiny_overrides
from tokbench.errors import TokbenchError
from tokbench.tokenizers import build_tokenizer, catalogue, kernels, registry
from tokbench.tokenizers.base import N_SPECIAL
from tokbench.tokenizers.constructor import SentenceBuilder
from tokbench.tokenizers.parts import ascending, descending

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "novel_tokenizer"

# A user module of the tests' own: an order and a selection written only with the Entries
# interface, exercising its random numbers and raw counts.
USER_MODULE = '''
from dataclasses import dataclass

import torch

from tokbench.tokenizers.parts import Order, Select, ascending, descending, param, register


@register
class CountOrder(Order):
    name = "count_desc"
    description = "descending raw count, then a random tie-break"
    reference = "a test order"

    def rank(self, entries):
        counts = entries.raw_counts()
        score = entries.value if counts is None else counts
        # ties broken at random: a fraction of one count below the next
        return descending(score + 0.5 * entries.uniform(3).to(torch.float32))


@dataclass
class OddParams:
    size: int = param(6, "L", low=1)


@register
class OddGenesFirst(Select):
    name = "odd_first"
    description = "odd gene indices first, at random among them"
    reference = "a test selection"
    Params = OddParams

    def key(self, entries):
        odd = (entries.gene % 2 == 1).to(torch.int64)
        return (1 - odd) * (1 << 30) + (entries.uniform(0) * (1 << 29)).to(torch.int64)
'''


@pytest.fixture(scope="module")
def user_module(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user_code")
    (folder / "test_user_parts.py").write_text(textwrap.dedent(USER_MODULE))
    shutil.copy(EXAMPLE / "my_tokenizers.py", folder / "my_tokenizers.py")
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    for name in ("test_user_parts", "my_tokenizers"):  # the registry is the process's: leave it as found
        registry.forget_module(name)
        sys.modules.pop(name, None)


# -- the registry --------------------------------------------------------------------------


def test_every_registered_component_is_in_the_catalogue_with_its_parameters():
    text = catalogue()
    for kind in registry.KINDS:
        components = registry.registered(kind)
        assert components, kind
        for name, cls in components.items():
            assert f"    {name} " in text and cls.description in text
            assert cls.reference, f"{kind} {name} names no reference"
            # the defaults are valid parameters; required ones are named in the error
            required = [f.name for f in dataclasses.fields(cls.Params) if f.default is dataclasses.MISSING]
            if required:
                with pytest.raises(TokbenchError, match=f"needs {registry.CONFIG_PATH[kind]}.{required[0]}="):
                    registry.parse(kind, {"name": name})
            else:
                assert registry.parse(kind, {"name": name})[0] is cls
            for field_name, default, help_text in registry.param_help(cls):
                assert help_text, f"{kind} {name}.{field_name} has no help"
                assert f"{field_name}=" in text


def test_parameters_are_typed_and_ranged_by_the_component():
    with pytest.raises(TokbenchError, match=r"fe.n_bins: .*could not be converted to Integer"):
        registry.parse("fe", {"name": "bin_scgpt", "n_bins": "many"})
    with pytest.raises(TokbenchError, match=r"fc.select.size must be >= 1 \(got 0\)"):
        registry.parse("select", {"name": "truncate", "size": 0}, "fc.select")
    with pytest.raises(TokbenchError, match=r"fg.missing='keep' is not valid; valid: drop, learn"):
        registry.parse("fg", {"name": "pretrained", "path": "x.pt", "missing": "keep"})
    _, params = registry.parse("fe", {"name": "bin_scgpt"})
    assert params.n_bins == 51  # the default, written once in the component's Params


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"name": "nope_module:Fe"}, r"fe.name: no module 'nope_module' on the search path"),
        ({"name": "tokbench.tokenizers.parts:Nothing"}, r"has no 'Nothing'"),
        ({"name": "tokbench.tokenizers.parts:Sum"}, r"is not a subclass of tokbench.tokenizers.parts.ExpressionEncoder"),
        ({"name": "zeroo"}, r"fe.name='zeroo': no such expression encoder \(Fe\); valid: zero, linear"),
    ],
)
def test_unknown_or_wrong_components_are_refused_naming_what_is_valid(section, message):
    with pytest.raises(TokbenchError, match=message):
        registry.parse("fe", section)


def test_a_registered_name_cannot_be_taken_twice():
    from tokbench.tokenizers.parts import Order

    with pytest.raises(TypeError, match="order name 'random' is taken by tokbench.tokenizers.parts.RandomOrder"):
        registry.register(type("Other", (Order,), {"name": "random", "description": "x"}))


def test_float_scores_become_exact_ranks():
    scores = torch.tensor([3.5, -2.0, 0.0, 1e-30, -1e30, 7.25, -0.5], dtype=torch.float32)
    up, down = ascending(scores), descending(scores)
    assert up.min() >= 0 and down.max() < 2**31 - 1
    assert torch.equal(torch.argsort(up, stable=True), torch.argsort(scores, stable=True))
    assert torch.equal(torch.argsort(down, stable=True), torch.argsort(-scores, stable=True))


# -- user parts build the same sentences on both paths --------------------------------------


def random_rows(seed: int, n_cells: int = 40, n_genes: int = 400):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 120, n_cells)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([np.sort(rng.choice(n_genes, n, replace=False)) for n in lengths]).astype(np.int32)
    values = np.log1p(rng.integers(1, 9, len(indices))).astype(np.float32)
    return indptr, indices, values


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("order", "select"), [("count_desc", "truncate"), ("gene_index", "odd_first"),
                                               ("count_desc", "odd_first"), ("count_desc", "sample")])
def test_user_orders_and_selections_match_between_the_compiled_and_torch_paths(user_module, seed, order, select):
    registry.load_plugins(["test_user_parts"])
    indptr, indices, values = random_rows(seed)
    cells = np.arange(len(indptr) - 1, dtype=np.int64) * 13 + 5
    scale = np.random.default_rng(seed).uniform(0.5, 4, cells[-1] + 1)
    order_part = registry.build("order", {"name": order})
    select_part = registry.build("select", {"name": select, "size": 6 if select == "odd_first" else 30})
    for bins in (None, ("scgpt", 11)):
        builder = SentenceBuilder(order=order_part, select=select_part, n_genes=400, seed=seed, bins=bins,
                                  count_scale=scale, total_scale=1 / scale)
        for epoch in (0, 3):
            fast = builder.build(indptr, indices, values, cells, epoch)
            with kernels.force_torch():
                reference = builder.build(indptr, indices, values, cells, epoch)
            for name in ("gene_tokens", "expression", "special", "padding_mask", "expression_bins"):
                a, b = getattr(fast, name), getattr(reference, name)
                assert (a is None and b is None) or torch.equal(a, b), (name, bins, epoch)


def test_a_user_selection_keeps_the_genes_its_keys_put_first(user_module):
    registry.load_plugins(["test_user_parts"])
    indptr, indices, values = random_rows(5)
    builder = SentenceBuilder(order="gene_index", select=registry.build("select", {"name": "odd_first", "size": 6}),
                              n_genes=400, seed=0)
    sentences = builder.build(indptr, indices, values, np.arange(len(indptr) - 1), 0)
    for row in range(len(indptr) - 1):
        genes = indices[indptr[row]:indptr[row + 1]]
        odd = genes[genes % 2 == 1]
        got = sentences.gene_tokens[row][sentences.gene_tokens[row] >= N_SPECIAL].numpy() - N_SPECIAL
        # written independently: all odd genes when at most 6, else 6 of them; then even ones
        expected_odd = min(len(odd), 6)
        assert (got % 2 == 1).sum() == expected_odd and len(got) == min(len(genes), 6)
        assert np.all(np.diff(got) > 0)  # gene-index order
        assert set(got[got % 2 == 1]) <= set(odd)


def test_bad_ranks_from_a_user_order_are_refused_naming_the_class(user_module):
    from tokbench.tokenizers.parts import Order

    class Floats(Order):
        description = "returns floats"

        def rank(self, entries):
            return entries.value

    class Negative(Order):
        description = "returns negative ranks"

        def rank(self, entries):
            return -entries.gene - 1

    indptr, indices, values = random_rows(1, n_cells=4)
    for cls, message in ((Floats, "returned torch.float32; return int64 ranks"), (Negative, "ranks must lie in")):
        builder = SentenceBuilder(order=cls(), select="truncate", size=10, n_genes=400, seed=0)
        with pytest.raises(TokbenchError, match=message):
            builder.build(indptr, indices, values, np.arange(4), 0)


def test_the_tutorial_parts_do_what_they_say(user_module, tiny_atlas, tmp_path):
    from tokbench.training.experiment import experiment_path, load_experiment
    from tokbench.training.run import load_data

    registry.load_plugins(["my_tokenizers"])
    cfg = load_experiment(experiment_path("cross_tissue"), tiny_overrides(tiny_atlas, tmp_path))
    data = load_data(cfg)
    fc = {"name": "custom", "select": {"name": "truncate", "size": 20}, "order": {"name": "variance"},
          "combine": {"name": "sum"}}
    tokenizer = build_tokenizer({"name": "unit_vectors", "path": tiny_atlas["gene_embeddings"]},
                                {"name": "log_bins", "n_bins": 6}, fc, data, 16, 0)
    # the order: training-cell variance, written here with numpy from the stored rows
    train = np.asarray(data.split_indices("train"))
    indptr, indices, values = data.rows(train)
    dense = np.zeros((len(train), data.n_genes))
    for i in range(len(train)):
        lo, hi = indptr[i] - indptr[0], indptr[i + 1] - indptr[0]
        dense[i, np.asarray(indices)[lo:hi]] = np.asarray(values)[lo:hi]
    variance = dense.var(axis=0)
    s = tokenizer.sentences(np.array([0, 1, 2]), 0)
    for row in range(3):
        genes = s.gene_tokens[row][s.gene_tokens[row] >= N_SPECIAL].numpy() - N_SPECIAL
        lo, hi = data.indptr[row], data.indptr[row + 1]
        expressed = np.asarray(data.indices[lo:hi])[np.asarray(data.data[lo:hi]) > 0]
        expected = sorted(expressed, key=lambda g: (-np.float32(variance[g]), g))[:20]
        assert list(genes) == expected
    # the Fe: a learned offset, and a vector per token; the Fg: unit-length file vectors
    out = tokenizer.embedder(s)
    assert out.shape == (3, s.gene_tokens.shape[1], 16) and torch.isfinite(out).all()
    assert any(name.endswith("offset") for name, _ in tokenizer.embedder.named_parameters())
    norms = torch.linalg.vector_norm(tokenizer.embedder.genes.vectors, dim=1)
    has = tokenizer.embedder.genes.has_vector
    torch.testing.assert_close(norms[has], torch.ones(int(has.sum())))


def test_tokbench_train_runs_a_user_part_from_a_plugins_file(user_module, tiny_atlas, tmp_path, monkeypatch):
    from tokbench.train_command import train

    experiment = tmp_path / "mine.yaml"
    experiment.write_text(yaml.safe_dump({
        "plugins": [str(user_module / "my_tokenizers.py")],
        "fe": {"name": "log_bins", "n_bins": 8},
        "fc": {"preset": "geneformer", "order": {"name": "variance"}},
    }))
    # the rest of the built-in experiment, as a user's own file would hold it
    base = yaml.safe_load((REPO / "tokbench" / "configs" / "experiments" / "cross_tissue.yaml").read_text())
    experiment.write_text(yaml.safe_dump({**base, **yaml.safe_load(experiment.read_text())}))
    result = train(str(experiment), tiny_overrides(tiny_atlas, tmp_path) + [f"run_dir={tmp_path / 'run'}"],
                   progress=False)
    assert np.isfinite(result["test_mcc"]) and result["best_epoch"] >= 1
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("cross_tissue").experiment_id])[0]
    assert run.data.tags["fe"] == "log_bins" and run.data.tags["order"] == "variance"
    source = registry.plugin_source("my_tokenizers")
    assert run.data.tags["plugin.my_tokenizers"] == source.sha256
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plugins")] == ["plugins/my_tokenizers.py"]


# -- a sweep on a two-node cluster: the tutorial, shrunk -------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """Two one-CPU worker nodes, and Ray not yet initialised: the sweep connects itself and
    brings its runtime environment (the head node runs no trial)."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * 1024**2,
                                                      "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=80 * 1024**2)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def forget_my_tokenizers():
    """After the test: the tutorial's module out of the registry, sys.modules and sys.path."""
    path = list(sys.path)
    yield
    registry.forget_module("my_tokenizers")
    sys.modules.pop("my_tokenizers", None)
    sys.path[:] = path


def state_dir(tmp_path: Path) -> Path:
    return next(p for p in (tmp_path / "results").iterdir() if p.is_dir())


@pytest.mark.slow
def test_the_tutorial_sweep_runs_on_a_cluster_whose_workers_get_the_module_from_ray(cluster, tiny_atlas, tmp_path,
                                                                                    capfd, monkeypatch,
                                                                                    forget_my_tokenizers):
    import ray

    from tokbench.sweep.launch import run_sweep
    from tokbench.sweep.state import SweepState

    # The user's folder: the module and the sweep file, nowhere on the workers' path.
    folder = tmp_path / "my_project"
    folder.mkdir()
    shutil.copy(EXAMPLE / "my_tokenizers.py", folder / "my_tokenizers.py")
    spec = yaml.safe_load((EXAMPLE / "sweep.yaml").read_text())
    spec["base"]["overrides"] += tiny_overrides(tiny_atlas, tmp_path)[:3] + [
        "model.d_model=16", "trainer.batch_size=64", "dataset.n_top_genes=200", "fc.select.size=32"]
    keep = {"geneformer", "geneformer + my Fe log_bins", "geneformer + my order variance",
            "geneformer + my Fg unit_vectors"}
    spec["combinations"] = [c for c in spec["combinations"] if c["label"] in keep]
    for combo in spec["combinations"]:
        if isinstance(combo["fg"], dict):
            combo["fg"]["path"] = tiny_atlas["gene_embeddings"]
    spec.update(seeds=[0], max_epochs=2, scheduler={"name": "none"},
                tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "novel"},
                storage_path=str(tmp_path / "results"))
    (folder / "sweep.yaml").write_text(yaml.safe_dump(spec))
    sys.modules.pop("my_tokenizers", None)  # the driver imports it from the user's folder too

    monkeypatch.setenv("TOKBENCH_CONSOLE_INTERVAL", "2")
    board = run_sweep(folder / "sweep.yaml", address=cluster.address, verbose=1)

    # The console: the progress table names the tokenizers; Ray's result boxes are gone.
    out = capfd.readouterr().out
    assert "sweep novel_tokenizer: 5 of 5 trials ended (0 stopped by ASHA, 0 failed)" in out
    assert "geneformer + my order variance" in out and "Trial status" not in out and "╭" not in out
    report = Path(os.environ["TOKBENCH_REPORT_DIR"]) / f"report-{state_dir(tmp_path).name}" / "report.html"
    assert f"report: {report}" in out and report.exists()

    assert ray.is_initialized() and "py_modules" in ray.get_runtime_context().runtime_env
    state = SweepState.load(state_dir(tmp_path))
    ends = {r["label"]: r["end_state"] for r in state.doc["trials"].values()}
    assert set(ends) == keep | {"baseline:logreg"} and set(ends.values()) == {"completed"}, ends
    assert len(board) == 5
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("novel").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("tokbench.kind") == "sweep")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    digest = registry.plugin_source("my_tokenizers").sha256
    assert parent.data.tags["plugin.my_tokenizers"] == digest
    assert "plugins/my_tokenizers.py" in [a.path for a in client.list_artifacts(parent.info.run_id, "plugins")]
    mine = [r for r in children if r.data.tags["combination"] != "baseline:logreg"]
    assert len(mine) == 4 and all(r.data.tags["plugin.my_tokenizers"] == digest for r in mine)
    assert {r.data.tags["order"] for r in mine} == {"expression", "variance"}
    assert any(a.path == "report" for a in client.list_artifacts(parent.info.run_id))
