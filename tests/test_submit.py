"""scripts/submit_sweep.sh against a real two-node Ray cluster with token authentication on.

The cluster is addressed on loopback only, on ports picked here, with its own --temp-dir, so
it never meets another Ray instance on the machine. Teardown ends exactly the processes it
started (an environment marker they inherit, and their descendants), never every Ray on the
machine as `ray stop` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_sweep import mlflow_runs, write_sweep
from tokbench.sweep.state import SweepState

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "submit_sweep.sh"
BIN = Path(sys.executable).parent  # the venv's `ray` and `tokbench`, activated or not
MARKER = "TOKBENCH_TEST_RAY_CLUSTER"
JOB_TIMEOUT_S = 360


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback right now (all held open together while picking)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cluster_processes(marker: str, temp_dir: Path) -> set[int]:
    """Pids of the test cluster: processes that inherited ``MARKER=marker`` or name ``temp_dir``,
    and all their descendants.

    Ray workers and agents write their process titles over their argv and environment, so they
    are found through their parents (the raylets), which keep both.
    """
    needle = f"{MARKER}={marker}".encode()
    parents, ours = {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not _alive(int(proc.name)):
            continue
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if needle in (proc / "environ").read_bytes().split(b"\0") or str(temp_dir).encode() in (proc / "cmdline").read_bytes():
                ours.add(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    grew = True
    while grew:
        descendants = {pid for pid, ppid in parents.items() if ppid in ours} - ours
        ours |= descendants
        grew = bool(descendants)
    ours.discard(os.getpid())
    return ours


def stop_cluster(marker: str, temp_dir: Path) -> set[int]:
    """`ray stop` for this cluster only: SIGTERM, a short grace period, SIGKILL; returns survivors.

    The pids are gathered before any signal: once a raylet is gone its workers and agents are
    orphans and no longer found through it.
    """
    pids: set[int] = set()
    for sig, grace_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        pids |= cluster_processes(marker, temp_dir)
        for pid in filter(_alive, pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.2)
    return set(filter(_alive, pids)) | cluster_processes(marker, temp_dir)


def ray_start(args: list[str], env: dict) -> None:
    result = subprocess.run([str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ray start {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def node_ports() -> list[str]:
    """Per-node ports, all picked here: a second Ray on this machine may hold any default."""
    ports = free_ports(6)
    return [
        "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
        "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
        "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
        "--min-worker-port", "0", "--max-worker-port", "0",  # workers bind ports the OS picks
        "--num-cpus", "1", "--object-store-memory", str(80 * 1024**2), "--disable-usage-stats",
    ]


@pytest.fixture(scope="module")
def token_cluster():
    """A head node (with the job server) and a worker node, both one CPU, with a fresh token."""
    marker = secrets.token_hex(8)
    # Short: Ray's Unix socket paths live under the temp dir and must stay below 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="tbray-", dir="/tmp"))
    token = secrets.token_hex(16)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS", "RAY_API_SERVER"))}
    # The token file is named explicitly, so ~/.ray/auth_token (the user's own) plays no part.
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), MARKER: marker,
                "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    gcs_port, dashboard_port, client_port = free_ports(3)
    try:
        ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
                   "--ray-client-server-port", str(client_port), "--temp-dir", str(temp_dir), *node_ports()], env)
        # Its own temp dir: nodes sharing one would share (and clean up) each other's job working dirs.
        ray_start(["--address", f"127.0.0.1:{gcs_port}", "--node-ip-address", "127.0.0.1",
                   "--temp-dir", str(temp_dir / "worker"), *node_ports()], env)
        address = f"http://127.0.0.1:{dashboard_port}"
        wait_for_nodes(address, token, 2)
        yield {"address": address, "env": env, "token": token, "marker": marker}
    finally:
        survivors = stop_cluster(marker, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"Ray processes of the test cluster still running: {sorted(survivors)}"


def http_get(url: str, token: str | None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for_nodes(address: str, token: str, n: int, timeout_s: float = 90) -> None:
    """Until the job server answers and ``n`` nodes are alive."""
    deadline = time.monotonic() + timeout_s
    alive = 0
    while time.monotonic() < deadline:
        try:
            status, body = http_get(f"{address}/nodes?view=summary", token)
        except OSError:
            status, body = 0, ""
        if status == 200:
            summary = json.loads(body)["data"]["summary"]
            alive = sum(node["raylet"]["state"] == "ALIVE" for node in summary)
            if alive >= n:
                return
        time.sleep(1)
    raise AssertionError(f"{alive} of {n} Ray nodes alive at {address} after {timeout_s} s")


def submit(sweep: Path, address: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(sweep), "--address", address, *extra], env=env,
                          capture_output=True, text=True, timeout=120)


def test_submitted_sweep_runs_on_the_cluster_and_lands_in_mlflow(token_cluster, tiny_atlas, tmp_path):
    # The sweep file leaves tracking.uri and storage_path empty; the nodes do not set
    # MLFLOW_TRACKING_URI or TOKBENCH_STORAGE_PATH, so only the client's, forwarded, say where.
    sweep = write_sweep(tmp_path, tiny_atlas, grid={"fc": ["geneformer", "scgpt"]}, baseline=False,
                        scheduler={"name": "none"}, max_epochs=2,
                        tracking={"uri": "", "experiment": "tiny"}, storage_path="")
    forwarded = {"TOKBENCH_CACHE": str(tmp_path / "tokbench-cache"),
                 "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                 "TOKBENCH_STORAGE_PATH": str(tmp_path / "results")}
    env = {**token_cluster["env"], **forwarded}
    env.pop("RAY_AUTH_MODE")  # the script's default must be token
    result = submit(sweep, token_cluster["address"], env, "--", "--name", "submitted")
    assert result.returncode == 0, result.stderr
    submission_id = re.search(r"^submitted (\S+) to ", result.stdout, re.M).group(1)
    assert f"with:    {' '.join(f'{k}={v}' for k, v in forwarded.items())}" in result.stdout
    assert f"ray job logs -f {submission_id} --address {token_cluster['address']}" in result.stdout
    assert "RAY_AUTH_MODE=token" in result.stdout

    job_url = f"{token_cluster['address']}/api/jobs/{submission_id}"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        _, body = http_get(job_url, token_cluster["token"])
        job = json.loads(body)
        if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            break
        time.sleep(3)
    if job["status"] != "SUCCEEDED":
        _, logs = http_get(f"{job_url}/logs", token_cluster["token"])
        pytest.fail(f"job {submission_id} is {job['status']}: {job.get('message')}\n{json.loads(logs)['logs'][-4000:]}")

    assert job["entrypoint"] == f"tokbench sweep {sweep} --address auto --name submitted"
    assert job["runtime_env"]["env_vars"] == forwarded
    _, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    assert {c.data.tags["tokenizer"] for c in children} == {"learned/zero/geneformer", "learned/zero/scgpt"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    state = SweepState.load(tmp_path / "results" / "submitted")
    # One trial per one-CPU node: the worker node ran the uploaded code too.
    assert len({trial["node_id"] for trial in state.doc["trials"].values()}) == 2


@pytest.mark.parametrize(
    "credentials, message",
    [
        ({"RAY_AUTH_TOKEN": "0" * 32}, r"refused the token from RAY_AUTH_TOKEN \(authentication failed\)"),
        ({"RAY_AUTH_MODE": "disabled"}, r"requires a token and none was sent"),
        ({"HOME": "{tmp_path}"}, r"RAY_AUTH_MODE=token but no token: run `ray get-auth-token`"),  # no ~/.ray/auth_token
    ],
    ids=["wrong-token", "auth-disabled-on-client", "no-token-anywhere"],
)
def test_submission_without_the_token_is_refused(token_cluster, tiny_atlas, tmp_path, credentials, message):
    env = {k: v for k, v in token_cluster["env"].items() if not k.startswith("RAY_AUTH_")}
    env.update({k: v.format(tmp_path=tmp_path) for k, v in credentials.items()})
    jobs_before = len(json.loads(http_get(f"{token_cluster['address']}/api/jobs/", token_cluster["token"])[1]))
    result = submit(write_sweep(tmp_path, tiny_atlas), token_cluster["address"], env)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr
    assert len(json.loads(http_get(f"{token_cluster['address']}/api/jobs/", token_cluster["token"])[1])) == jobs_before
    # The job server itself, not only the script, turns such requests away.
    assert http_get(f"{token_cluster['address']}/api/jobs/", None)[0] == 401
    assert http_get(f"{token_cluster['address']}/api/jobs/", "0" * 32)[0] == 403
    assert http_get(f"{token_cluster['address']}/api/jobs/", token_cluster["token"])[0] == 200


def test_no_job_server_at_the_address_is_one_clear_line(tiny_atlas, tmp_path):
    (port,) = free_ports(1)
    env = {**os.environ, "RAY_AUTH_TOKEN": "0" * 32, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = submit(write_sweep(tmp_path, tiny_atlas), f"http://127.0.0.1:{port}", env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no Ray job server answers at http://127.0.0.1:{port}; start a cluster with "
        "`ray start --head --dashboard-host 127.0.0.1` (job server on port 8265) or pass --address http://HOST:8265"
    )
