#!/usr/bin/env bash
# Submit a tokbench sweep to a running Ray cluster as a Ray job, and return at once.
#
#   scripts/submit_sweep.sh SEARCH_SPACE.yaml [--address http://HOST:8265] [-- extra `tokbench sweep` args]
#
# The job runs `tokbench sweep FILE --address auto [extra args]` on the cluster, in a copy of
# this repository (uploaded without .venv, .git, demo/, ray_results/, mlruns/ and caches).
# FILE is passed relative to the repository when it lies inside it; a file elsewhere is passed
# by its absolute path, which must then exist on the node that runs the job (the head node).
# The paths in the sweep file (data, storage_path, tracking.uri) are read on the cluster too.
#
# The cluster nodes must run the project's Docker image, where tokbench and its dependencies
# are installed: the upload carries the code, not the Python environment.
#
# Environment:
#   RAY_API_SERVER_ADDRESS, RAY_ADDRESS  the job server when --address is not given
#                                        (default http://127.0.0.1:8265)
#   RAY_AUTH_MODE    token unless set: Ray 2.60 clusters enable token authentication by
#                    default; set it to disabled for a cluster started without a token
#   RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token
#                    where the token is looked for, in Ray's order
#   TOKBENCH_CACHE   forwarded to the job when set
#   MLFLOW_TRACKING_URI, TOKBENCH_STORAGE_PATH
#                    forwarded to the job when set: where a sweep file that leaves
#                    tracking.uri and storage_path empty records its runs and results. They
#                    take the place of the values the cluster's nodes set themselves, so they
#                    must name a server and a shared path as seen from the cluster; leave them
#                    unset to use the nodes' own.
set -euo pipefail

usage="usage: $(basename "$0") SEARCH_SPACE.yaml [--address http://HOST:8265] [-- extra tokbench sweep args]"

die() {
  echo "error: $*" >&2
  exit 1
}

# A JSON string literal; paths and ids carry no control characters.
json_string() {
  local s=${1//\\/\\\\}
  printf '"%s"' "${s//\"/\\\"}"
}

sweep_file=""
address=""
extra_args=()
while (($#)); do
  case $1 in
    --address)
      (($# >= 2)) || die "--address needs a value, e.g. http://127.0.0.1:8265"
      address=$2
      shift 2
      ;;
    --address=*)
      address=${1#--address=}
      shift
      ;;
    -h | --help)
      echo "$usage"
      exit 0
      ;;
    --)
      shift
      extra_args=("$@")
      break
      ;;
    -*)
      die "unknown option $1; $usage"
      ;;
    *)
      [[ -z $sweep_file ]] || die "one sweep file only (got $sweep_file and $1); $usage"
      sweep_file=$1
      shift
      ;;
  esac
done
[[ -n $sweep_file ]] || die "no sweep file; $usage"
[[ -f $sweep_file ]] || die "$sweep_file: no such file"
command -v ray >/dev/null || die "the ray command is not on PATH; activate the project's venv (. .venv/bin/activate)"

address=${address:-${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}}
url=$address
[[ $url == *://* ]] || url="http://$url"
url=${url%/}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
sweep_path=$(cd "$(dirname "$sweep_file")" && pwd -P)/$(basename "$sweep_file")
if [[ $sweep_path == "$repo"/* ]]; then
  job_sweep_file=${sweep_path#"$repo"/}
else
  job_sweep_file=$sweep_path
  echo "note: $sweep_path is outside the repository; the job reads it at that path on the cluster" >&2
fi

# Token authentication. Ray looks for the token in this order; a wrong one is refused by the
# job server below, a missing one is reported here.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
token=""
if [[ $RAY_AUTH_MODE == token ]]; then
  if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
    token=$RAY_AUTH_TOKEN
    token_source="RAY_AUTH_TOKEN"
  elif [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
    [[ -s $RAY_AUTH_TOKEN_PATH ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH: no such file, or empty"
    token=$(<"$RAY_AUTH_TOKEN_PATH")
    token_source=$RAY_AUTH_TOKEN_PATH
  elif [[ -s $HOME/.ray/auth_token ]]; then
    token=$(<"$HOME/.ray/auth_token")
    token_source="$HOME/.ray/auth_token"
  else
    die "RAY_AUTH_MODE=token but no token: run \`ray get-auth-token\` on the cluster's head node and put its output in ~/.ray/auth_token here (or in RAY_AUTH_TOKEN), or set RAY_AUTH_MODE=disabled for a cluster without token authentication"
  fi
  token=${token//[[:space:]]/}
fi

# Is a job server there, and does it take the token? /api/version needs the token when the
# cluster has token authentication on. The header goes through stdin, not the command line.
if command -v curl >/dev/null; then
  headers=""
  [[ -z $token ]] || headers="Authorization: Bearer $token"
  status=$(printf '%s\n' "$headers" | curl --silent --max-time 10 --output /dev/null \
    --write-out '%{http_code}' --header @- "$url/api/version") || status=000
  case $status in
    200) ;;
    000) die "no Ray job server answers at $address; start a cluster with \`ray start --head --dashboard-host 127.0.0.1\` (job server on port 8265) or pass --address http://HOST:8265" ;;
    401) die "the Ray cluster at $address requires a token and none was sent; set RAY_AUTH_MODE=token and put the output of \`ray get-auth-token\` (run on its head node) in ~/.ray/auth_token or RAY_AUTH_TOKEN" ;;
    403) die "the Ray cluster at $address refused the token from ${token_source:-?} (authentication failed); put the output of \`ray get-auth-token\` (run on its head node) in ~/.ray/auth_token or RAY_AUTH_TOKEN" ;;
    404) die "$address answers but is not a Ray job server (HTTP 404 on /api/version); pass the dashboard address, http://HOST:8265" ;;
    *) die "the Ray job server at $address answered HTTP $status on /api/version" ;;
  esac
else
  ray job list --address "$address" >/dev/null 2>&1 ||
    die "no Ray job server answers at $address, or it refused the token; check with \`ray job list --address $address\`, start a cluster with \`ray start --head --dashboard-host 127.0.0.1\`"
fi

env_vars=""
forwarded=""
for name in TOKBENCH_CACHE MLFLOW_TRACKING_URI TOKBENCH_STORAGE_PATH; do
  [[ -n ${!name:-} ]] || continue
  env_vars+="${env_vars:+, }$(json_string "$name"): $(json_string "${!name}")"
  forwarded+="${forwarded:+ }$name=${!name}"
done
# Patterns are gitignore-style, relative to the repository.
excludes='".venv", ".git", "/demo", "ray_results", "mlruns", "/runs", "/cache", "__pycache__",
  ".pytest_cache", ".hypothesis", "*.egg-info", "mlflow.db", "/test-artifacts", "/bench/out"'
runtime_env="{\"excludes\": [$excludes], \"env_vars\": {$env_vars}}"

stem=$(basename "$sweep_file")
stem=${stem%.*}
stem=$(printf '%s' "$stem" | tr -c 'A-Za-z0-9_-' '-')
submission_id="tokbench-$stem-$(date -u +%Y%m%d-%H%M%S)-$(printf '%04x' "$((RANDOM % 65536))")"

# Separate words: `ray job submit` quotes each one into the job's shell command line.
entrypoint=(tokbench sweep "$job_sweep_file" --address auto ${extra_args[@]+"${extra_args[@]}"})

if ! output=$(ray job submit --no-wait --address "$address" --submission-id "$submission_id" \
  --working-dir "$repo" --runtime-env-json "$runtime_env" -- "${entrypoint[@]}" 2>&1); then
  echo "$output" >&2
  die "ray job submit to $address failed (output above)"
fi

client_env=""
[[ $RAY_AUTH_MODE != token ]] || client_env="RAY_AUTH_MODE=token "
cat <<EOF
submitted $submission_id to $address
  runs:    ${entrypoint[*]}${forwarded:+
  with:    $forwarded}
  follow:  ${client_env}ray job logs -f $submission_id --address $address
  status:  ${client_env}ray job status $submission_id --address $address
  stop:    ${client_env}ray job stop $submission_id --address $address
EOF
