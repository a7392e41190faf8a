#!/usr/bin/env bash
# A tokbench cluster on this machine, on loopback only: the topology of docker/compose.yaml
# without Docker. A Ray head (GCS, dashboard, job server; no CPUs, so trials run on the
# workers), N Ray worker nodes (separate `ray start` processes, each with its own CPUs and
# --temp-dir) and an MLflow server (artifacts served by the server), all with Ray 2.60 token
# authentication on. The MLflow backend store is a SQLite file, or with --backend postgres a
# PostgreSQL server of this cluster's own (Debian's postgresql package, on 127.0.0.1, its data
# in the state folder), reached through psycopg2-binary as in docker/mlflow.Dockerfile.
#
#   scripts/cluster.sh up [--workers N] [--cpus-per-worker K] [--ray-port P]
#                         [--dashboard-port P] [--mlflow-port P]
#                         [--backend sqlite|postgres] [--postgres-port P]
#   scripts/cluster.sh status
#   scripts/cluster.sh down
#
# `up` prints the addresses and the exact lines to submit a sweep and follow it. It fails,
# saying what to fix, on a taken port, a missing PostgreSQL, or an MLflow server that exits
# while starting (at once, with the last lines of its log, not after the 120 s wait).
#
# Environment (flags win):
#   TOKBENCH_CLUSTER_DIR          state: token, ports, logs, the MLflow database and artifacts,
#                                 Ray results (default: .cluster/ in the repository)
#   TOKBENCH_CLUSTER_WORKERS      worker nodes (default 2)
#   TOKBENCH_CLUSTER_WORKER_CPUS  CPUs per worker node (default 1)
#   TOKBENCH_CLUSTER_WORKER_GPUS  GPUs per worker node (default 0: the nodes share this
#                                 machine's GPUs, and Ray would count each GPU once per node)
#   TOKBENCH_CLUSTER_OBJECT_STORE_MB  object store per node, MiB (default 256)
#   TOKBENCH_RAY_PORT             GCS port (default 6379)
#   TOKBENCH_DASHBOARD_PORT       dashboard and job server port (default 8265)
#   TOKBENCH_MLFLOW_PORT          MLflow server port (default 5000)
#   TOKBENCH_MLFLOW_BACKEND       MLflow backend store, sqlite or postgres (default sqlite)
#   TOKBENCH_POSTGRES_PORT        PostgreSQL port (default: one free now)
#   TOKBENCH_POSTGRES_BIN         folder holding initdb, postgres, pg_isready, psql (default:
#                                 the newest /usr/lib/postgresql/*/bin)
#   TOKBENCH_BIN                  folder holding the ray, mlflow and python to run (default:
#                                 the repository's .venv/bin)
#
# Every process of the cluster is started in a session of its own (setsid) and carries
# TOKBENCH_CLUSTER_ID in its environment; `down` ends exactly those sessions and their
# descendants, never another Ray on this machine (a bare `ray stop` would end every Ray
# process of the user). Ray's temporary folders live under /tmp/tokbench-ray-*: Ray's Unix
# socket paths must stay below 108 bytes, which a deep state folder would exceed; `down`
# removes them, logs included (MLflow's log and `ray start` output stay in the state's logs/).
# PostgreSQL refuses to run as root: started by root, it runs as Debian's `postgres` user,
# which owns its data folder ($TOKBENCH_CLUSTER_DIR/postgres) and must be able to reach it.
# Its password is in the state's postgres.pgpass (mode 600), given to MLflow as PGPASSFILE,
# never on a command line.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
usage="usage: $(basename "$0") up [--workers N] [--cpus-per-worker K] [--ray-port P] [--dashboard-port P] [--mlflow-port P] [--backend sqlite|postgres] [--postgres-port P] | status | down"

die() {
  echo "error: $*" >&2
  exit 1
}

# Process bookkeeping and readiness checks, in the Python of the cluster's environment.
read -r -d '' HELPER <<'PY' || true
import json, os, signal, socket, sys, time, urllib.request

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

def cluster_pids(cluster_id, temp_dir, extra_sids):
    """The cluster's sessions (found through marked processes), marked processes and their descendants."""
    marker = f"TOKBENCH_CLUSTER_ID={cluster_id}".encode()
    parent, sid, marked = {}, {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not alive(int(entry)):
            continue
        pid = int(entry)
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            parent[pid], sid[pid] = int(fields[1]), int(fields[3])  # ppid, session
            if marker in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") or \
                    (temp_dir and temp_dir.encode() in open(f"/proc/{pid}/cmdline", "rb").read()):
                marked.add(pid)
        except OSError:
            continue
    # Never the session this command runs in (a user's terminal, a test runner).
    own = {os.getsid(0), 0, 1}
    sessions = ({sid[p] for p in marked if p in sid} | set(extra_sids)) - own
    ours = marked | {p for p, s in sid.items() if s in sessions}
    grew = True
    while grew:
        children = {p for p, pp in parent.items() if pp in ours} - ours
        ours |= children
        grew = bool(children)
    return ours - {os.getpid(), os.getppid(), 1}

def mlflow_gone(pid):
    """True when the `mlflow server` process ``pid`` has exited, or a process it started has:
    it reaps its server subprocess (uvicorn) only when it ends itself, so a server that
    could not start (a port taken, a bad store) lingers as its zombie child while the parent
    lives on."""
    if not alive(pid):
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] == "Z":
            return True
    return False

def main(cmd, *args):
    if cmd == "taken":  # ports that cannot be bound on loopback now
        for port in args:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                print(port)
            finally:
                s.close()
    elif cmd == "free":  # n distinct ports free now, held together while picking
        sockets = [socket.socket() for _ in range(int(args[0]))]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        print(" ".join(str(s.getsockname()[1]) for s in sockets))
        for s in sockets:
            s.close()
    elif cmd == "pids":
        cluster_id, temp_dir, *sids = args
        print(" ".join(map(str, sorted(cluster_pids(cluster_id, temp_dir, map(int, sids))))))
    elif cmd == "stop":  # SIGTERM, a grace period, SIGKILL; exit 1 naming survivors
        cluster_id, temp_dir, *sids = args
        pids = set()
        # gcs_server and raylets wait for each other on SIGTERM; 5 s is enough for the rest.
        for sig, grace_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            # Gathered before signalling: once a raylet is gone, its workers are orphans.
            pids |= cluster_pids(cluster_id, temp_dir, map(int, sids))
            for pid in filter(alive, pids):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while any(map(alive, pids)) and time.monotonic() < deadline:
                time.sleep(0.2)
        survivors = set(filter(alive, pids)) | cluster_pids(cluster_id, temp_dir, map(int, sids))
        if survivors:
            print(" ".join(map(str, sorted(survivors))))
            sys.exit(1)
    elif cmd == "exited":  # exit 0 when the MLflow server (pid) is gone, 1 while it runs
        # Seen twice, half a second apart: a short-lived helper process it runs is a zombie
        # for an instant before it is reaped.
        gone = mlflow_gone(int(args[0]))
        if gone:
            time.sleep(0.5)
        sys.exit(0 if gone and mlflow_gone(int(args[0])) else 1)
    elif cmd == "wait":  # until the job server sees n alive nodes and MLflow answers; 3: MLflow died
        dashboard, token_file, n_nodes, mlflow, timeout_s, mlflow_pid = args
        token = open(token_file).read().strip()
        deadline, nodes, mlflow_ok, gone_seen = time.monotonic() + float(timeout_s), 0, False, 0
        while time.monotonic() < deadline:
            gone_seen = gone_seen + 1 if mlflow_gone(int(mlflow_pid)) else 0
            if gone_seen >= 2:
                sys.exit(3)
            try:
                request = urllib.request.Request(f"{dashboard}/nodes?view=summary", headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    summary = json.load(response)["data"]["summary"]
                nodes = sum(node["raylet"]["state"] == "ALIVE" for node in summary)
            except (OSError, ValueError, KeyError):
                pass
            try:
                with urllib.request.urlopen(f"{mlflow}/health", timeout=5):
                    mlflow_ok = True
            except OSError:
                pass
            if nodes >= int(n_nodes) and mlflow_ok:
                return
            time.sleep(1)
        sys.exit(f"after {timeout_s} s: {nodes} of {n_nodes} Ray nodes alive, MLflow server {'up' if mlflow_ok else 'not answering'}")

main(*sys.argv[1:])
PY

state=$(realpath -m "${TOKBENCH_CLUSTER_DIR:-$repo/.cluster}")
env_file=$state/cluster.env

bin=${TOKBENCH_BIN:-$repo/.venv/bin}
if [[ ! -x $bin/ray ]]; then
  if command -v ray >/dev/null; then
    bin=$(dirname "$(command -v ray)")
  else
    die "no ray in $bin nor on PATH; install the project first (make install) or set TOKBENCH_BIN to the folder holding ray and mlflow"
  fi
fi
[[ -x $bin/mlflow && -x $bin/python ]] || die "$bin has ray but not mlflow and python; set TOKBENCH_BIN to the project's environment (.venv/bin)"

helper() {
  "$bin/python" -c "$HELPER" "$@"
}

# The recorded cluster, if any: sets the variables written by `up`.
load_state() {
  [[ -f $env_file ]] || return 1
  # shellcheck source=/dev/null
  source "$env_file"
}

cluster_pids() {
  helper pids "$CLUSTER_ID" "$RAY_TEMP" "${MLFLOW_SID:-0}" "${POSTGRES_SID:-0}"
}

# PostgreSQL's fast shutdown (SIGINT to the postmaster: clients cut, a checkpoint, a clean
# exit), so the SIGKILL of `helper stop` never meets a database mid-write. Only a postmaster
# in this cluster's session is signalled: its pid file may name a reused pid.
stop_postgres() {
  local pid sid i
  [[ -n ${PG_DATA:-} && -f $PG_DATA/postmaster.pid ]] || return 0
  pid=$(head -n 1 "$PG_DATA/postmaster.pid")
  sid=$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ') || return 0
  [[ $sid == "${POSTGRES_SID:-}" ]] || return 0
  kill -INT "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
}

# Every process of the recorded cluster, ended; the state's bookkeeping removed. Returns 1
# (after saying which) when some process would not end.
stop_recorded() {
  local survivors
  stop_postgres
  if ! survivors=$(helper stop "$CLUSTER_ID" "$RAY_TEMP" "${MLFLOW_SID:-0}" "${POSTGRES_SID:-0}"); then
    echo "error: processes of the cluster still running after SIGKILL: $survivors" >&2
    return 1
  fi
  [[ $RAY_TEMP != /tmp/tokbench-ray-* ]] || rm -rf "$RAY_TEMP"
  rm -f "$env_file" "$state/ray"
}

# The cluster's PostgreSQL server, from cmd_up (whose locals it reads): a data folder made on
# first use, the server on 127.0.0.1:$postgres_port only (no Unix socket: Debian's socket
# folder is the system server's), and the `mlflow` database.
start_postgres() {
  local pwfile=$state/.postgres-initdb-password password exists i
  if [[ ! -f $PG_DATA/PG_VERSION ]]; then
    password=$("$bin/python" -c 'import secrets; print(secrets.token_hex(24))')
    mkdir -p "$PG_DATA"
    chmod 700 "$PG_DATA"
    (umask 077 && printf '%s\n' "$password" >"$pwfile" && printf '127.0.0.1:*:*:mlflow:%s\n' "$password" >"$pgpass")
    ((${#as_pg[@]} == 0)) || chown postgres: "$PG_DATA" "$pwfile"
    if ! "${as_pg[@]}" "$pg_bin/initdb" --pgdata "$PG_DATA" --username mlflow --pwfile "$pwfile" \
      --auth scram-sha-256 --no-locale --encoding UTF8 >"$logs/postgres-initdb.log" 2>&1; then
      rm -f "$pwfile"
      die "initdb of $PG_DATA failed: $(tail -n 3 "$logs/postgres-initdb.log")"
    fi
    rm -f "$pwfile"
  fi
  [[ -f $pgpass ]] || die "$PG_DATA holds a PostgreSQL database but its password file $pgpass is gone; restore it, or remove $PG_DATA to start an empty one (its runs are lost)"
  setsid "${cluster_env[@]}" "${as_pg[@]}" "$pg_bin/postgres" -D "$PG_DATA" -p "$postgres_port" \
    -c listen_addresses=127.0.0.1 -c unix_socket_directories= </dev/null >>"$logs/postgres.log" 2>&1 &
  POSTGRES_SID=$!  # as for MLflow: setsid execs in place
  write_state
  for ((i = 0; ; i++)); do
    "$pg_bin/pg_isready" --quiet --host 127.0.0.1 --port "$postgres_port" && break
    kill -0 "$POSTGRES_SID" 2>/dev/null || die "PostgreSQL did not start: $(tail -n 3 "$logs/postgres.log")"
    ((i < 300)) || die "PostgreSQL did not accept connections on 127.0.0.1:$postgres_port within 60 s; see $logs/postgres.log"
    sleep 0.2
  done
  local psql=(env "PGPASSFILE=$pgpass" "$pg_bin/psql" --no-psqlrc --quiet --host 127.0.0.1 --port "$postgres_port"
    --username mlflow --dbname postgres --tuples-only --no-align)
  exists=$("${psql[@]}" --command "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" 2>>"$logs/postgres.log") ||
    die "cannot query PostgreSQL on 127.0.0.1:$postgres_port as mlflow; see $logs/postgres.log"
  if [[ $exists != 1 ]]; then
    "${psql[@]}" --command "CREATE DATABASE mlflow" >/dev/null 2>>"$logs/postgres.log" ||
      die "cannot create the mlflow database; see $logs/postgres.log"
  fi
}

# The MLflow server died while `up` waited for it (from cmd_up, whose locals it reads): the
# last lines of its log and what to do, instead of waiting out the timeout.
mlflow_died() {
  local log=$logs/mlflow.log hint="fix what they name and run \`scripts/cluster.sh up\` again"
  if grep -q "address already in use" "$log" 2>/dev/null; then
    hint="port $mlflow_port was taken by another process after \`up\` checked it; pick another with --mlflow-port or TOKBENCH_MLFLOW_PORT"
  elif grep -q "^ModuleNotFoundError" "$log" 2>/dev/null; then
    hint="$bin/python lacks a module the backend store $store_uri needs (PostgreSQL: \`$bin/python -m pip install psycopg2-binary==2.9.11\`); install it and run \`scripts/cluster.sh up\` again"
  elif grep -q "file is not a database" "$log" 2>/dev/null; then
    hint="$state/mlflow.db is not an SQLite database; move it away (MLflow then starts an empty one) or set TOKBENCH_CLUSTER_DIR to another state folder"
  fi
  die "the MLflow server (backend store $store_uri, port $mlflow_port) exited while starting; $hint. The last lines of $log:
$(tail -n 6 "$log" | cut -c 1-400 | sed 's/^/  /')"
}

# Where the recorded cluster's MLflow keeps its runs, in words.
describe_store() {
  if [[ ${BACKEND:-sqlite} == postgres ]]; then
    echo "PostgreSQL 127.0.0.1:$POSTGRES_PORT, database mlflow (data in $PG_DATA)"
  else
    echo "SQLite $state/mlflow.db"
  fi
}

cmd_up() {
  local workers=${TOKBENCH_CLUSTER_WORKERS:-2}
  local cpus=${TOKBENCH_CLUSTER_WORKER_CPUS:-1}
  local gpus=${TOKBENCH_CLUSTER_WORKER_GPUS:-0}
  local object_store_mb=${TOKBENCH_CLUSTER_OBJECT_STORE_MB:-256}
  local ray_port=${TOKBENCH_RAY_PORT:-6379}
  local dashboard_port=${TOKBENCH_DASHBOARD_PORT:-8265}
  local mlflow_port=${TOKBENCH_MLFLOW_PORT:-5000}
  local backend=${TOKBENCH_MLFLOW_BACKEND:-sqlite}
  local postgres_port=${TOKBENCH_POSTGRES_PORT:-}
  while (($#)); do
    (($# >= 2)) || die "$1 needs a value; $usage"
    case $1 in
      --workers) workers=$2 ;;
      --cpus-per-worker) cpus=$2 ;;
      --ray-port) ray_port=$2 ;;
      --dashboard-port) dashboard_port=$2 ;;
      --mlflow-port) mlflow_port=$2 ;;
      --backend) backend=$2 ;;
      --postgres-port) postgres_port=$2 ;;
      *) die "unknown option $1; $usage" ;;
    esac
    shift 2
  done
  local name value
  for name in workers cpus gpus object_store_mb ray_port dashboard_port mlflow_port; do
    value=${!name}
    [[ $value =~ ^[0-9]+$ ]] || die "$name must be a whole number, got '$value'"
  done
  ((workers >= 1)) || die "--workers must be at least 1 (the head runs no trials)"
  ((cpus >= 1)) || die "--cpus-per-worker must be at least 1"
  [[ $backend == sqlite || $backend == postgres ]] ||
    die "--backend (or TOKBENCH_MLFLOW_BACKEND) must be sqlite or postgres, got '$backend'"
  [[ $backend == postgres || -z ${postgres_port} ]] ||
    die "--postgres-port (or TOKBENCH_POSTGRES_PORT) needs --backend postgres"

  # PostgreSQL's binaries, its user and the driver MLflow reaches it through: all checked
  # before anything starts.
  local pg_bin="" as_pg=()
  if [[ $backend == postgres ]]; then
    [[ -z $postgres_port || $postgres_port =~ ^[0-9]+$ ]] ||
      die "postgres_port must be a whole number, got '$postgres_port'"
    if [[ -n ${TOKBENCH_POSTGRES_BIN:-} ]]; then
      pg_bin=$TOKBENCH_POSTGRES_BIN
    else
      pg_bin=$(compgen -G "/usr/lib/postgresql/*/bin" | sort -V | tail -n 1 || true)
    fi
    local tool
    for tool in initdb postgres pg_isready psql; do
      [[ -n $pg_bin && -x $pg_bin/$tool ]] ||
        die "PostgreSQL is not installed (no $tool in ${pg_bin:-/usr/lib/postgresql/*/bin}), which --backend postgres needs; install it with \`apt-get install postgresql\` or scripts/install_postgres.sh, set TOKBENCH_POSTGRES_BIN to the folder holding initdb and postgres, or use --backend sqlite"
    done
    "$bin/python" -c 'import psycopg2' 2>/dev/null ||
      die "$bin/python has no psycopg2, MLflow's PostgreSQL driver; install it with \`$bin/python -m pip install psycopg2-binary==2.9.11\` (the version of docker/mlflow.Dockerfile) or \`pip install -e '.[dev]'\`"
    if ((EUID == 0)); then
      # initdb and postgres refuse root; Debian's package creates this user.
      id -u postgres >/dev/null 2>&1 ||
        die "running as root, PostgreSQL needs the unprivileged user 'postgres' (created by Debian's postgresql package); install it with \`apt-get install postgresql\` or run scripts/cluster.sh as another user"
      mkdir -p "$state"
      runuser -u postgres -- test -x "$state" ||
        die "the 'postgres' user PostgreSQL runs as cannot reach the state folder $state (a folder above it is closed to other users); set TOKBENCH_CLUSTER_DIR to a folder it can reach, or open the folders above it with chmod o+x"
      as_pg=(runuser -u postgres --)
    fi
    [[ -n $postgres_port ]] || postgres_port=$(helper free 1)
  fi

  # A cluster from this state folder still running? Then stop here; a dead one is cleared.
  if load_state; then
    if [[ -n $(cluster_pids) ]]; then
      die "a cluster started from $state is still running (dashboard http://127.0.0.1:$DASHBOARD_PORT, MLflow http://127.0.0.1:$MLFLOW_PORT); stop it with \`scripts/cluster.sh down\`${TOKBENCH_CLUSTER_DIR:+ (with TOKBENCH_CLUSTER_DIR=$TOKBENCH_CLUSTER_DIR)}, or start another with its own TOKBENCH_CLUSTER_DIR and ports"
    fi
    stop_recorded
  fi

  # Every port the user picks is checked before anything starts.
  local taken port problems=() ports=("$ray_port" "$dashboard_port" "$mlflow_port")
  declare -A flag=([$ray_port]="--ray-port or TOKBENCH_RAY_PORT" [$dashboard_port]="--dashboard-port or TOKBENCH_DASHBOARD_PORT"
    [$mlflow_port]="--mlflow-port or TOKBENCH_MLFLOW_PORT")
  declare -A what=([$ray_port]="Ray GCS" [$dashboard_port]="Ray dashboard" [$mlflow_port]="MLflow")
  if [[ $backend == postgres ]]; then
    flag[$postgres_port]="--postgres-port or TOKBENCH_POSTGRES_PORT"
    what[$postgres_port]="PostgreSQL"
    ports+=("$postgres_port")
  fi
  ((${#flag[@]} == ${#ports[@]})) ||
    die "--ray-port $ray_port, --dashboard-port $dashboard_port, --mlflow-port $mlflow_port${postgres_port:+ and --postgres-port $postgres_port} must differ"
  taken=$(helper taken "${ports[@]}")
  for port in $taken; do
    problems+=("port $port (${what[$port]}) is taken on 127.0.0.1; pick another with ${flag[$port]}")
  done
  if ((${#problems[@]})); then
    printf 'error: %s\n' "${problems[@]}" >&2
    exit 1
  fi

  CLUSTER_ID=$("$bin/python" -c 'import secrets; print(secrets.token_hex(8))')
  RAY_TEMP=$(mktemp -d /tmp/tokbench-ray-XXXXXX)
  RAY_PORT=$ray_port DASHBOARD_PORT=$dashboard_port MLFLOW_PORT=$mlflow_port WORKERS=$workers MLFLOW_SID=0
  BACKEND=$backend POSTGRES_PORT=$postgres_port POSTGRES_SID=0 PG_DATA=""
  [[ $backend == sqlite ]] || PG_DATA=$state/postgres
  local token_file=$state/auth_token logs=$state/logs
  mkdir -p "$logs" "$state/results" "$state/mlartifacts"
  (umask 077 && "$bin/python" -c 'import secrets; print(secrets.token_hex(32))' >"$token_file")
  ln -sfn "$RAY_TEMP" "$state/ray"
  write_state() {
    cat >"$env_file" <<EOF
CLUSTER_ID=$CLUSTER_ID
RAY_TEMP=$RAY_TEMP
RAY_PORT=$RAY_PORT
DASHBOARD_PORT=$DASHBOARD_PORT
MLFLOW_PORT=$MLFLOW_PORT
MLFLOW_SID=$MLFLOW_SID
BACKEND=$BACKEND
POSTGRES_PORT=$POSTGRES_PORT
POSTGRES_SID=$POSTGRES_SID
PG_DATA=$PG_DATA
WORKERS=$WORKERS
WORKER_CPUS=$cpus
EOF
  }
  write_state  # before the first process, so a failed `up` can still be taken down
  # Whatever fails from here on, nothing started is left running.
  up_done=false
  trap '$up_done || { echo "error: the cluster did not start; logs in $logs and $RAY_TEMP/*/session_latest/logs" >&2; stop_recorded || true; }' EXIT

  # What every process of the cluster gets: the marker `down` finds it by, token
  # authentication, the environment's tools first on PATH (the job driver runs `tokbench`),
  # and, as on the compose and Kubernetes nodes, where a sweep file that leaves tracking.uri
  # and storage_path empty records its runs and results.
  local mlflow_uri=http://127.0.0.1:$mlflow_port dashboard=http://127.0.0.1:$dashboard_port
  local cluster_env=(env -u RAY_AUTH_TOKEN -u RAY_ADDRESS -u RAY_API_SERVER_ADDRESS "TOKBENCH_CLUSTER_ID=$CLUSTER_ID"
    RAY_AUTH_MODE=token "RAY_AUTH_TOKEN_PATH=$token_file" RAY_USAGE_STATS_ENABLED=0 "PATH=$bin:$PATH"
    "MLFLOW_TRACKING_URI=$mlflow_uri" "TOKBENCH_STORAGE_PATH=$state/results")

  # The backend store. SQLite allows one writer, hence one server worker; PostgreSQL takes
  # the workers docker/compose.yaml and docker/kuberay/mlflow.yaml run.
  local store_uri=sqlite:///$state/mlflow.db mlflow_workers=1 pgpass=$state/postgres.pgpass
  if [[ $backend == postgres ]]; then
    start_postgres
    store_uri=postgresql+psycopg2://mlflow@127.0.0.1:$postgres_port/mlflow mlflow_workers=2
  fi

  # The server options of docker/compose.yaml and docker/kuberay/mlflow.yaml (a deployment
  # test compares them), on loopback.
  setsid "${cluster_env[@]}" "PGPASSFILE=$pgpass" "$bin/mlflow" server --host 127.0.0.1 --port "$mlflow_port" \
    --workers "$mlflow_workers" --backend-store-uri "$store_uri" --artifacts-destination "$state/mlartifacts" \
    --serve-artifacts --allowed-hosts "localhost,localhost:*,127.0.0.1,127.0.0.1:*" \
    </dev/null >"$logs/mlflow.log" 2>&1 &
  MLFLOW_SID=$!  # setsid in a non-interactive shell execs in place: its pid is the session's id
  write_state

  # Every node's own ports are picked free: the defaults (the agent's 52365, the client
  # server's 10001) would collide between nodes on one machine, or with another Ray here.
  node_args() {
    local p
    read -r -a p <<<"$(helper free 6)"
    printf '%s\n' --node-ip-address 127.0.0.1 --node-manager-port "${p[0]}" --object-manager-port "${p[1]}" \
      --dashboard-agent-listen-port "${p[2]}" --dashboard-agent-grpc-port "${p[3]}" \
      --runtime-env-agent-port "${p[4]}" --metrics-export-port "${p[5]}" \
      --min-worker-port 0 --max-worker-port 0 --object-store-memory "$((object_store_mb * 1024 * 1024))" \
      --disable-usage-stats
  }
  local args client_port
  mapfile -t args < <(node_args)
  client_port=$(helper free 1)
  setsid "${cluster_env[@]}" "$bin/ray" start --head --port "$ray_port" --num-cpus 0 --num-gpus 0 \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
    --ray-client-server-port "$client_port" --temp-dir "$RAY_TEMP/head" "${args[@]}" \
    </dev/null >"$logs/ray-head.log" 2>&1 ||
    die "the Ray head did not start: $(tail -n 3 "$logs/ray-head.log")"
  # MLflow has been starting meanwhile; one that failed at once (a bad store, a missing
  # driver) is reported before the workers start.
  ! helper exited "$MLFLOW_SID" || mlflow_died

  # Workers join in parallel; each its own temp dir, so nodes never share (and clean up)
  # each other's job working directories.
  local i pids=()
  for ((i = 1; i <= workers; i++)); do
    mapfile -t args < <(node_args)
    setsid "${cluster_env[@]}" "$bin/ray" start --address "127.0.0.1:$ray_port" --num-cpus "$cpus" \
      --num-gpus "$gpus" --temp-dir "$RAY_TEMP/worker$i" "${args[@]}" \
      </dev/null >"$logs/ray-worker$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || die "Ray worker $((i + 1)) did not start; see $logs/ray-worker$((i + 1)).log"
  done
  local waited=0
  helper wait "$dashboard" "$token_file" "$((workers + 1))" "$mlflow_uri" 120 "$MLFLOW_SID" || waited=$?
  ((waited != 3)) || mlflow_died
  ((waited == 0)) || die "the cluster did not come up"
  up_done=true

  cat <<EOF
tokbench cluster up (state in $state)
  Ray dashboard, job server  $dashboard
  Ray GCS                    127.0.0.1:$ray_port
  MLflow UI, tracking URI    $mlflow_uri
  MLflow backend store       $(describe_store)
  nodes                      head (no CPUs) + $workers worker(s) x $cpus CPU
  token                      $token_file

Every client needs the token. MLFLOW_TRACKING_URI and TOKBENCH_STORAGE_PATH name this
cluster's MLflow server and results folder: a sweep file that leaves tracking.uri and
storage_path empty records its runs there (submit_sweep.sh passes both to the job), and
\`tokbench report\` reads from that server:
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$token_file MLFLOW_TRACKING_URI=$mlflow_uri TOKBENCH_STORAGE_PATH=$state/results

Submit a sweep, logging to this MLflow server:
  scripts/submit_sweep.sh search_spaces/demo.yaml --address $dashboard
or, as the nodes run this checkout's environment, with no upload:
  ray job submit --address $dashboard --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "$mlflow_uri", "TOKBENCH_STORAGE_PATH": "$state/results"}}' -- tokbench sweep "$repo/search_spaces/demo.yaml" --address auto
Follow it:  ray job logs -f <submission id> --address $dashboard
Status:     scripts/cluster.sh status      Stop: scripts/cluster.sh down
EOF
  [[ -z ${TOKBENCH_CLUSTER_DIR:-} ]] || echo "(status and down need TOKBENCH_CLUSTER_DIR=$TOKBENCH_CLUSTER_DIR too)"
}

cmd_status() {
  if ! load_state; then
    echo "no cluster recorded in $state (start one with scripts/cluster.sh up)"
    exit 3
  fi
  local pids
  pids=$(cluster_pids)
  if [[ -z $pids ]]; then
    echo "no cluster running from $state (its processes are gone; scripts/cluster.sh up starts a new one)"
    exit 3
  fi
  echo "tokbench cluster in $state: $(wc -w <<<"$pids") processes"
  if curl --silent --fail --max-time 5 --output /dev/null "http://127.0.0.1:$MLFLOW_PORT/health"; then
    echo "  MLflow     http://127.0.0.1:$MLFLOW_PORT  up"
  else
    echo "  MLflow     http://127.0.0.1:$MLFLOW_PORT  NOT ANSWERING (log: $state/logs/mlflow.log)"
  fi
  if [[ ${BACKEND:-sqlite} == postgres ]]; then
    local pg_isready
    pg_isready=$(compgen -G "/usr/lib/postgresql/*/bin/pg_isready" | sort -V | tail -n 1 || true)
    pg_isready=${TOKBENCH_POSTGRES_BIN:+$TOKBENCH_POSTGRES_BIN/pg_isready}${TOKBENCH_POSTGRES_BIN:-$pg_isready}
    if [[ -x $pg_isready ]] && "$pg_isready" --quiet --host 127.0.0.1 --port "$POSTGRES_PORT"; then
      echo "  PostgreSQL 127.0.0.1:$POSTGRES_PORT  up (data: $PG_DATA)"
    else
      echo "  PostgreSQL 127.0.0.1:$POSTGRES_PORT  NOT ANSWERING (log: $state/logs/postgres.log)"
    fi
  fi
  echo "  dashboard  http://127.0.0.1:$DASHBOARD_PORT"
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$state/auth_token "$bin/ray" status --address "127.0.0.1:$RAY_PORT" 2>&1 |
    sed 's/^/  /' || echo "  Ray GCS at 127.0.0.1:$RAY_PORT NOT ANSWERING"
}

cmd_down() {
  if ! load_state; then
    echo "no cluster running from $state; nothing to stop"
    return 0
  fi
  local n
  n=$(wc -w <<<"$(cluster_pids)")
  stop_recorded || exit 1
  echo "tokbench cluster in $state stopped ($n processes ended); MLflow runs stay in $(describe_store)"
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  status) cmd_status ;;
  down) cmd_down ;;
  -h | --help) echo "$usage" ;;
  *) die "$usage" ;;
esac
