"""scripts/cluster.sh: a head, two one-CPU workers and an MLflow server on loopback, with
token authentication; a sweep submitted as a Ray job lands in that MLflow server; `down`
leaves nothing behind.

The cluster gets ports picked here and a state folder of its own, so it never meets another
Ray or MLflow on the machine. Whether its processes are gone is checked here independently of
the script: every process that carries the cluster's id in its environment, names its Ray
temp folder on its command line, or shares a session with one of those.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from test_submit import free_ports, http_get
from test_sweep import write_sweep
from tokbench.sweep.state import SweepState

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "cluster.sh"
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 300


def base_env(state: Path) -> dict:
    """The caller's environment without Ray client settings (other tests set RAY_AUTH_MODE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TOKBENCH_", "MLFLOW_"))}
    env.update({"TOKBENCH_CLUSTER_DIR": str(state), "TOKBENCH_BIN": str(BIN), "TOKBENCH_CLUSTER_OBJECT_STORE_MB": "80",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    return env


def cluster_sh(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def read_state(state: Path) -> dict:
    return dict(line.split("=", 1) for line in (state / "cluster.env").read_text().splitlines())


def _stat(pid: str) -> list[str] | None:
    try:
        # After the command name: state, ppid, pgrp, session, ...
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def processes_of(cluster_id: str, ray_temp: str, sessions: set[int] = frozenset()) -> dict[int, int]:
    """pid → session id of every live process of the cluster (see the module docstring)."""
    marker = f"TOKBENCH_CLUSTER_ID={cluster_id}".encode()
    found, sid_of = {}, {}
    for entry in os.listdir("/proc"):
        stat = entry.isdigit() and _stat(entry)
        if not stat or stat[0] == "Z":
            continue
        sid_of[int(entry)] = int(stat[3])
        try:
            if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0") or \
                    ray_temp.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found[int(entry)] = int(stat[3])
        except OSError:
            continue
    sessions = (set(sessions) | set(found.values())) - {os.getsid(0)}
    found.update({pid: sid for pid, sid in sid_of.items() if sid in sessions})
    return found


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster-state")
    ray_port, dashboard_port, mlflow_port = free_ports(3)
    env = base_env(state)
    started = time.monotonic()
    up = cluster_sh(env, "up", "--workers", "2", "--cpus-per-worker", "1", "--ray-port", str(ray_port),
                    "--dashboard-port", str(dashboard_port), "--mlflow-port", str(mlflow_port))
    info = {"state": state, "env": env, "up": up, "up_seconds": time.monotonic() - started,
            "ports": {"ray": ray_port, "dashboard": dashboard_port, "mlflow": mlflow_port}}
    try:
        assert up.returncode == 0, f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
        info["recorded"] = read_state(state)
        yield info
    finally:
        if (state / "cluster.env").exists():
            recorded = read_state(state)
            cluster_sh(env, "down")
            left = processes_of(recorded["CLUSTER_ID"], recorded["RAY_TEMP"])
            assert not left, f"processes of the test cluster still running: {sorted(left)}"


def client_env(cluster: dict) -> dict:
    """The environment `up` tells a client to export, parsed from its output."""
    line = next(line for line in cluster["up"].stdout.splitlines() if line.strip().startswith("export "))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "TOKBENCH_"))}
    env.update(dict(word.split("=", 1) for word in shlex.split(line.strip())[1:]))
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def printed_command(cluster: dict, start: str) -> list[str]:
    """The words of the command line `up` prints that starts with ``start``."""
    return shlex.split(next(line.strip() for line in cluster["up"].stdout.splitlines() if line.strip().startswith(start)))


def test_up_prints_the_addresses_and_how_to_submit(cluster):
    out, ports, state = cluster["up"].stdout, cluster["ports"], cluster["state"]
    print(f"cluster.sh up: {cluster['up_seconds']:.0f} s")
    assert f"http://127.0.0.1:{ports['dashboard']}" in out
    assert f"MLflow UI, tracking URI    http://127.0.0.1:{ports['mlflow']}" in out
    assert f"127.0.0.1:{ports['ray']}" in out
    assert f"scripts/submit_sweep.sh search_spaces/demo.yaml --address http://127.0.0.1:{ports['dashboard']}" in out
    assert f"ray job logs -f <submission id> --address http://127.0.0.1:{ports['dashboard']}" in out
    env = client_env(cluster)
    assert env["RAY_AUTH_MODE"] == "token" and Path(env["RAY_AUTH_TOKEN_PATH"]) == state / "auth_token"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
    assert env["TOKBENCH_STORAGE_PATH"] == str(state / "results")
    assert oct((state / "auth_token").stat().st_mode & 0o777) == "0o600"
    # The job server takes that token, and only that token.
    token = (state / "auth_token").read_text().strip()
    assert http_get(f"http://127.0.0.1:{ports['dashboard']}/api/jobs/", token)[0] == 200
    assert http_get(f"http://127.0.0.1:{ports['dashboard']}/api/jobs/", None)[0] == 401


def submit_and_wait(cluster: dict, sweep: Path, submission_id: str) -> None:
    """The sweep file, submitted with the no-upload line `up` prints; fails unless the job succeeds."""
    env = client_env(cluster)
    dashboard = f"http://127.0.0.1:{cluster['ports']['dashboard']}"
    command = printed_command(cluster, "ray job submit ")
    command[command.index(str(REPO / "search_spaces" / "demo.yaml"))] = str(sweep)
    command[command.index("--"):command.index("--")] = ["--no-wait", "--submission-id", submission_id]
    submit = subprocess.run([*command, "--name", "tiny"], env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = json.loads(http_get(f"{dashboard}/api/jobs/{submission_id}", token)[1])
        if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            break
        time.sleep(3)
    if job["status"] != "SUCCEEDED":
        logs = json.loads(http_get(f"{dashboard}/api/jobs/{submission_id}/logs", token)[1])["logs"]
        pytest.fail(f"job {submission_id} is {job['status']}: {job.get('message')}\n{logs[-4000:]}")


def test_a_submitted_sweep_runs_on_the_workers_and_lands_in_the_mlflow_server(cluster, tiny_atlas, tmp_path):
    env = client_env(cluster)
    # Like the shipped sweep files, it leaves tracking.uri and storage_path empty: the job's
    # MLFLOW_TRACKING_URI and TOKBENCH_STORAGE_PATH decide where it lands.
    sweep = write_sweep(tmp_path, tiny_atlas, grid={"fc": ["geneformer", "scgpt"]}, baseline=False,
                        scheduler={"name": "none"}, max_epochs=2,
                        tracking={"uri": "", "experiment": "tiny"}, storage_path="")
    # The no-upload line `up` prints, for this sweep file, with an id to follow it by.
    command = printed_command(cluster, "ray job submit ")
    runtime_env = json.loads(command[command.index("--runtime-env-json") + 1])
    assert runtime_env == {"env_vars": {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
                                        "TOKBENCH_STORAGE_PATH": env["TOKBENCH_STORAGE_PATH"]}}
    assert command[command.index("--"):] == ["--", "tokbench", "sweep", str(REPO / "search_spaces" / "demo.yaml"), "--address", "auto"]
    submit_and_wait(cluster, sweep, f"tokbench-test-{os.getpid()}")

    # Read back over HTTP from the cluster's MLflow server: one parent, one child per trial.
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{cluster['ports']['mlflow']}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("tokbench.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {c.data.tags["tokenizer"] for c in children} == {"learned/zero/geneformer", "learned/zero/scgpt"}
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert "final_test_mcc" in children[0].data.metrics
    # Artifacts went through the server into the cluster's artifact folder.
    assert client.list_artifacts(children[0].info.run_id)
    assert any((cluster["state"] / "mlartifacts").rglob("*"))
    # Results in the cluster's shared folder; the trials ran on both one-CPU workers.
    state = SweepState.load(cluster["state"] / "results" / "tiny")
    assert len({trial["node_id"] for trial in state.doc["trials"].values()}) == 2


def test_status_shows_what_runs(cluster):
    result = cluster_sh(cluster["env"], "status", timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"MLflow     http://127.0.0.1:{cluster['ports']['mlflow']}  up" in result.stdout
    assert len(re.findall(r"^\s+1 node_[0-9a-f]+", result.stdout, re.M)) == 3  # head + 2 workers
    assert "/2.0 CPU" in result.stdout


def test_up_again_while_it_runs_is_refused(cluster):
    before = read_state(cluster["state"])
    result = cluster_sh(cluster["env"], "up", "--ray-port", str(cluster["ports"]["ray"]),
                        "--dashboard-port", str(cluster["ports"]["dashboard"]), "--mlflow-port", str(cluster["ports"]["mlflow"]))
    assert result.returncode == 1
    assert f"a cluster started from {cluster['state']} is still running" in result.stderr
    assert "stop it with `scripts/cluster.sh down`" in result.stderr
    assert read_state(cluster["state"]) == before  # the running cluster's record is untouched


def test_up_with_a_taken_port_names_it_and_starts_nothing(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ray_port, dashboard_port = free_ports(2)
        env = base_env(tmp_path / "state")
        before = set(Path("/tmp").glob("tokbench-ray-*"))
        result = cluster_sh(env, "up", "--ray-port", str(ray_port), "--dashboard-port", str(dashboard_port),
                            "--mlflow-port", str(taken), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: port {taken} (MLflow) is taken on 127.0.0.1; "
                                     "pick another with --mlflow-port or TOKBENCH_MLFLOW_PORT")
    assert not (tmp_path / "state" / "cluster.env").exists()
    assert set(Path("/tmp").glob("tokbench-ray-*")) == before
    assert port_free(ray_port) and port_free(dashboard_port)


def test_an_mlflow_server_that_dies_at_start_fails_up_at_once_with_its_log(tmp_path):
    """A backend store MLflow cannot open: `up` reports the dead server as soon as it has
    died (not after its 120 s wait), with the log's last lines and the fix, and leaves
    nothing running."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "mlflow.db").write_text("not a database\n")
    ports = free_ports(3)
    before = set(Path("/tmp").glob("tokbench-ray-*"))
    started = time.monotonic()
    result = cluster_sh(base_env(state), "up", "--workers", "1", *[w for p, f in zip(ports, ("--ray-port", "--dashboard-port", "--mlflow-port")) for w in (f, str(p))], timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: the MLflow server (backend store sqlite:///{state / 'mlflow.db'}, port {ports[2]}) "
                                    "exited while starting; ")
    assert f"{state / 'mlflow.db'} is not an SQLite database; move it away" in result.stderr
    assert f"The last lines of {state / 'logs' / 'mlflow.log'}:" in result.stderr
    assert "file is not a database" in result.stderr
    # The Ray head's start-up and the clean-up, not the wait's timeout.
    assert elapsed < 60, f"up took {elapsed:.0f} s to notice"
    assert not (state / "cluster.env").exists()
    assert set(Path("/tmp").glob("tokbench-ray-*")) == before
    assert all(port_free(port) for port in ports)
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and str(state).encode() in _cmdline(pid)]


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def test_down_with_nothing_running_says_so(tmp_path):
    result = cluster_sh(base_env(tmp_path / "state"), "down", timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"no cluster running from {tmp_path / 'state'}; nothing to stop"
    status = cluster_sh(base_env(tmp_path / "state"), "status", timeout=60)
    assert status.returncode == 3 and "no cluster recorded" in status.stdout


def test_down_leaves_no_process_behind_and_submissions_then_fail_clearly(cluster, tiny_atlas, tmp_path):
    recorded = cluster["recorded"]
    running = processes_of(recorded["CLUSTER_ID"], recorded["RAY_TEMP"])
    assert len(running) > 10  # GCS, raylets, dashboard, agents, MLflow and its workers
    result = cluster_sh(cluster["env"], "down", timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"tokbench cluster in {cluster['state']} stopped" in result.stdout
    left = processes_of(recorded["CLUSTER_ID"], recorded["RAY_TEMP"], set(running.values()))
    assert not left, f"still running after down: {sorted(left)}"
    assert all(port_free(port) for port in cluster["ports"].values())
    assert not Path(recorded["RAY_TEMP"]).exists()
    assert (cluster["state"] / "mlflow.db").exists()  # the runs outlive the cluster

    # A submission to the stopped cluster fails with one clear line, naming the address.
    dashboard = f"http://127.0.0.1:{cluster['ports']['dashboard']}"
    submit = subprocess.run(["bash", str(REPO / "scripts" / "submit_sweep.sh"), str(write_sweep(tmp_path, tiny_atlas)),
                             "--address", dashboard], env=client_env(cluster), capture_output=True, text=True, timeout=60)
    assert submit.returncode != 0
    assert submit.stderr.strip().splitlines()[-1].startswith(f"error: no Ray job server answers at {dashboard}")
    again = cluster_sh(cluster["env"], "down", timeout=60)
    assert again.returncode == 0 and "nothing to stop" in again.stdout


# --- The PostgreSQL backend store ---------------------------------------------------------

POSTGRES_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)])


def _needs_postgres() -> None:
    """Skip (locally) or fail (in CI, where `make test` installs it) without Debian's postgresql."""
    if not POSTGRES_BIN or not (POSTGRES_BIN[-1] / "postgres").exists():
        message = "PostgreSQL not installed under /usr/lib/postgresql/*/bin (scripts/install_postgres.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def open_state():
    """A state folder the `postgres` user can reach: pytest's own tmp folders are closed to
    other users, and PostgreSQL, started by root, runs as that user."""
    top = Path(tempfile.mkdtemp(prefix="tokbench-pg-test-"))
    top.chmod(0o755)
    yield top / "state"
    shutil.rmtree(top, ignore_errors=True)


def test_up_with_postgres_not_installed_says_how_to_install_it(tmp_path):
    env = base_env(tmp_path / "state") | {"TOKBENCH_POSTGRES_BIN": str(tmp_path / "no-postgres")}
    result = cluster_sh(env, "up", "--backend", "postgres", *[w for p, f in zip(free_ports(3), ("--ray-port", "--dashboard-port", "--mlflow-port")) for w in (f, str(p))], timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: PostgreSQL is not installed (no initdb in {tmp_path / 'no-postgres'})")
    assert "`apt-get install postgresql` or scripts/install_postgres.sh" in result.stderr
    assert not (tmp_path / "state" / "cluster.env").exists()


def test_up_with_the_postgres_port_taken_names_the_flag_and_starts_nothing(open_state):
    _needs_postgres()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ray_port, dashboard_port, mlflow_port = free_ports(3)
        before = set(Path("/tmp").glob("tokbench-ray-*"))
        result = cluster_sh(base_env(open_state), "up", "--backend", "postgres", "--postgres-port", str(taken),
                            "--ray-port", str(ray_port), "--dashboard-port", str(dashboard_port),
                            "--mlflow-port", str(mlflow_port), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: port {taken} (PostgreSQL) is taken on 127.0.0.1; "
                                     "pick another with --postgres-port or TOKBENCH_POSTGRES_PORT")
    assert not (open_state / "cluster.env").exists() and not (open_state / "postgres").exists()
    assert set(Path("/tmp").glob("tokbench-ray-*")) == before


def test_a_sweep_against_the_postgres_backed_server_end_to_end(open_state, tiny_atlas, tmp_path):
    """One up / sweep / down cycle on PostgreSQL: runs read back over HTTP, nothing left after down."""
    _needs_postgres()
    ray_port, dashboard_port, mlflow_port, postgres_port = free_ports(4)
    env = base_env(open_state)
    up = cluster_sh(env, "up", "--backend", "postgres", "--postgres-port", str(postgres_port), "--workers", "1",
                    "--ray-port", str(ray_port), "--dashboard-port", str(dashboard_port), "--mlflow-port", str(mlflow_port))
    cluster = {"state": open_state, "env": env, "up": up,
               "ports": {"ray": ray_port, "dashboard": dashboard_port, "mlflow": mlflow_port, "postgres": postgres_port}}
    recorded = read_state(open_state) if (open_state / "cluster.env").exists() else None
    try:
        assert up.returncode == 0, f"cluster.sh up --backend postgres failed:\n{up.stdout}\n{up.stderr}"
        assert (f"MLflow backend store       PostgreSQL 127.0.0.1:{postgres_port}, database mlflow "
                f"(data in {open_state / 'postgres'})") in up.stdout
        assert recorded["BACKEND"] == "postgres" and int(recorded["POSTGRES_SID"]) > 0
        # The password stays off every command line; MLflow reads it from a file only its user can.
        assert oct((open_state / "postgres.pgpass").stat().st_mode & 0o777) == "0o600"
        password = (open_state / "postgres.pgpass").read_text().strip().rsplit(":", 1)[1]
        for pid in processes_of(recorded["CLUSTER_ID"], recorded["RAY_TEMP"], {int(recorded["POSTGRES_SID"])}):
            try:
                assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
        status = cluster_sh(env, "status", timeout=60)
        assert f"PostgreSQL 127.0.0.1:{postgres_port}  up" in status.stdout, status.stdout + status.stderr

        sweep = write_sweep(tmp_path, tiny_atlas, grid={"fc": ["geneformer"]}, baseline=False,
                            scheduler={"name": "none"}, max_epochs=2,
                            tracking={"uri": "", "experiment": "tiny"}, storage_path="")
        submit_and_wait(cluster, sweep, f"tokbench-pg-test-{os.getpid()}")
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
        runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        parents = [r for r in runs if r.data.tags.get("tokbench.kind") == "sweep"]
        (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED" and child.info.status == "FINISHED"
        assert child.data.tags["tokenizer"] == "learned/zero/geneformer" and "final_test_mcc" in child.data.metrics
        # Every epoch of the trial, once.
        assert max(len(client.get_metric_history(child.info.run_id, key)) for key in child.data.metrics) == 2
        assert client.list_artifacts(child.info.run_id)
    finally:
        if recorded is not None or (open_state / "cluster.env").exists():
            recorded = read_state(open_state) if (open_state / "cluster.env").exists() else recorded
            running = processes_of(recorded["CLUSTER_ID"], recorded["RAY_TEMP"], {int(recorded["POSTGRES_SID"] or 0)})
            down = cluster_sh(env, "down", timeout=120)
            assert down.returncode == 0, down.stderr
            left = processes_of(recorded["CLUSTER_ID"], recorded["RAY_TEMP"], set(running.values()))
            assert not left, f"still running after down: {sorted(left)}"
    # PostgreSQL is gone, its data stays for the next `up`.
    assert "database mlflow" in down.stdout
    assert all(port_free(port) for port in cluster["ports"].values())
    assert not any(str(open_state / "postgres").encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
                   for pid in os.listdir("/proc") if pid.isdigit() and _stat(pid) and _stat(pid)[0] != "Z"
                   and Path(f"/proc/{pid}/cmdline").exists())
    assert (open_state / "postgres" / "PG_VERSION").exists()
