#!/usr/bin/env bash
# A Docker engine of the tests' own, for the container backends (harness/fakes/containers.py).
#
#   tools/docker-engine.sh run -- COMMAND...   start an engine where one can, run COMMAND with DOCKER_HOST pointed
#                                              at it, then stop it, whatever COMMAND did (exit status: COMMAND's)
#   eval "$(tools/docker-engine.sh start)"     start one; prints the exports (DOCKER_HOST, QUANTLAB_CHAOS_DOCKER_DIR)
#   tools/docker-engine.sh stop [DIR]          stop it (default: $QUANTLAB_CHAOS_DOCKER_DIR): its containers, dockerd
#                                              and its containerd, its mounts, and its folder
#
# An engine that already answers (DOCKER_HOST, or the default socket) is used as it is, and never stopped. Otherwise,
# as root, dockerd (apt-get installs docker.io once where it is missing) runs with everything in a folder of its own,
# /tmp/quantlab-chaos-docker.XXXXXX: data, exec root, pid file, unix socket, config and key. It needs no network
# of its own: --bridge=none --iptables=false, and the fakes' containers use the host's network or join a test
# process's namespace. Where no engine can be had, the reason is printed and the Docker tests skip with it.
# An engine whose owner died without stopping it (SIGKILL of make) is stopped by the next start.
set -uo pipefail

PREFIX="${TMPDIR:-/tmp}/quantlab-chaos-docker."
START_TIMEOUT_S=60
STOP_TIMEOUT_S=20
VERBOSE="${V:-}"

say() { echo "docker-engine: $*" >&2; }

answers() {  # answers [DOCKER_HOST]: the engine there answers within a few seconds
  local host="${1:-}"
  command -v docker >/dev/null 2>&1 || return 1
  if [[ -n "$host" ]]; then DOCKER_HOST="$host" timeout 10 docker version >/dev/null 2>&1
  else timeout 10 docker version >/dev/null 2>&1; fi
}

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

# Every process whose command line names this engine's folder: its dockerd, containerd and shims, nothing else.
members() {
  local dir="$1" proc pid
  for proc in /proc/[0-9]*; do
    pid="${proc#/proc/}"
    [[ "$pid" == "$$" ]] && continue
    if { tr "\0" "\n" <"$proc/cmdline"; } 2>/dev/null | grep -qF -- "$dir/"; then echo "$pid"; fi
  done
}

stop_dir() {
  local dir="$1" pid waited sock="unix://$1/docker.sock" left
  [[ -d "$dir" && "$dir" == "$PREFIX"* ]] || { say "not an engine folder of ours: $dir"; return 1; }
  if answers "$sock"; then  # its containers first: dockerd would otherwise stop them one by one, slowly
    DOCKER_HOST="$sock" docker ps -aq 2>/dev/null | xargs -r env DOCKER_HOST="$sock" docker rm -f -v >/dev/null 2>&1
  fi
  pid="$(cat "$dir/dockerd.pid" 2>/dev/null || true)"
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null
    for ((waited = 0; waited < STOP_TIMEOUT_S * 10; waited++)); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null
  fi
  for ((waited = 0; waited < 50; waited++)); do  # containerd and shims follow dockerd out
    left="$(members "$dir")"
    [[ -z "$left" ]] && break
    (( waited == 30 )) && kill -KILL $left 2>/dev/null
    (( waited == 0 )) && kill -TERM $left 2>/dev/null
    sleep 0.1
  done
  # dockerd unmounts on a clean stop; after a SIGKILL its data root and namespace files are still mounted.
  grep -F " $dir" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r mnt; do
    umount -l "$mnt" 2>/dev/null || true
  done
  rm -rf "$dir"
  if [[ -e "$dir" ]]; then say "could not remove $dir"; return 1; fi
  return 0
}

sweep_stale() {
  local dir owner
  for dir in "$PREFIX"*; do
    [[ -d "$dir" ]] || continue
    owner="$(cat "$dir/owner" 2>/dev/null || true)"
    if ! alive "$owner"; then
      say "stopping a stale engine in $dir (its owner, pid ${owner:-?}, is gone)"
      stop_dir "$dir" || true
    fi
  done
}

install_engine() {
  command -v dockerd >/dev/null 2>&1 && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    WHY="dockerd is not installed and there is no apt-get to install it (install Docker, or set DOCKER_HOST)"
    return 1
  fi
  say "installing docker.io with apt-get (once per machine; a minute or two)"
  local out=/dev/null
  [[ -n "$VERBOSE" ]] && out=/dev/stderr
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io; } >"$out" 2>&1 \
      || ! command -v dockerd >/dev/null 2>&1; then
    WHY="apt-get install docker.io failed (run 'apt-get install docker.io' to see why)"
    return 1
  fi
}

# Sets ENGINE_DIR and DOCKER_HOST on success; WHY when there is no engine.
start_engine() {
  local owner="$1" dir waited
  ENGINE_DIR="" WHY=""
  sweep_stale
  if [[ -n "${DOCKER_HOST:-}" ]] && answers "$DOCKER_HOST"; then
    say "using the engine at DOCKER_HOST=$DOCKER_HOST"
    return 0
  fi
  if [[ -z "${DOCKER_HOST:-}" ]] && answers; then
    say "using the engine that answers at the default socket"
    return 0
  fi
  if [[ "$(id -u)" != 0 ]]; then
    WHY="not root, so no Docker engine can be started here (start one, or set DOCKER_HOST)"
    return 1
  fi
  install_engine || return 1
  if ! command -v docker >/dev/null 2>&1; then
    WHY="the docker command-line client is missing (apt-get install docker.io brings it)"
    return 1
  fi
  dir="$(mktemp -d "${PREFIX}XXXXXX")" || { WHY="mktemp failed"; return 1; }
  chmod 0711 "$dir"
  echo "$owner" >"$dir/owner"
  # Its own config file and trust key, so nothing lands in /etc/docker.
  printf '{"deprecated-key-path": "%s/key.json"}\n' "$dir" >"$dir/daemon.json"
  setsid dockerd --config-file "$dir/daemon.json" --data-root "$dir/data" --exec-root "$dir/exec" \
    --pidfile "$dir/dockerd.pid" -H "unix://$dir/docker.sock" --storage-driver=vfs --iptables=false \
    --ip-masq=false --bridge=none --userland-proxy=false --log-level=warn </dev/null >"$dir/dockerd.log" 2>&1 &
  for ((waited = 0; waited < START_TIMEOUT_S * 10; waited++)); do
    if [[ -S "$dir/docker.sock" ]] && answers "unix://$dir/docker.sock"; then
      ENGINE_DIR="$dir"
      export DOCKER_HOST="unix://$dir/docker.sock"
      say "started dockerd $(dockerd --version | sed 's/^Docker version //; s/,.*//') for this run (in $dir)"
      return 0
    fi
    if ! alive "$(cat "$dir/dockerd.pid" 2>/dev/null || echo $!)"; then break; fi
    sleep 0.1
  done
  WHY="dockerd did not answer within ${START_TIMEOUT_S} s: $(tail -n 3 "$dir/dockerd.log" 2>/dev/null | tr '\n' ' ')"
  stop_dir "$dir" || true
  return 1
}

case "${1:-}" in
  run)
    shift
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -gt 0 ]] || { say "usage: $0 run -- COMMAND..."; exit 2; }
    if start_engine "$$"; then
      if [[ -n "$ENGINE_DIR" ]]; then
        trap 'stop_dir "$ENGINE_DIR" && say "stopped the engine; $ENGINE_DIR removed"' EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
        trap 'exit 129' HUP
      fi
    else
      say "no Docker engine for this run: $WHY; the Docker tests skip"
    fi
    export TESTCONTAINERS_RYUK_DISABLED=true  # Ryuk is an image to pull; the harness's reaper removes containers
    "$@"
    exit $?
    ;;
  start)
    if ! start_engine "${QUANTLAB_CHAOS_DOCKER_OWNER:-$PPID}"; then
      say "no Docker engine: $WHY"
      exit 1
    fi
    echo "export DOCKER_HOST='$DOCKER_HOST' TESTCONTAINERS_RYUK_DISABLED=true"
    [[ -n "$ENGINE_DIR" ]] && echo "export QUANTLAB_CHAOS_DOCKER_DIR='$ENGINE_DIR'"
    exit 0
    ;;
  stop)
    dir="${2:-${QUANTLAB_CHAOS_DOCKER_DIR:-}}"
    [[ -n "$dir" ]] || { say "nothing to stop (no DIR and no QUANTLAB_CHAOS_DOCKER_DIR: the engine was not ours)"; exit 0; }
    stop_dir "$dir" && say "stopped the engine; $dir removed"
    ;;
  *)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
