#!/usr/bin/env bash
# Puts toxiproxy-server and toxiproxy-cli in .tools/bin (idempotent). Uses binaries already on PATH when
# their version fits; otherwise builds the pinned release with `go install`.
set -euo pipefail
TAG="${TOXIPROXY_TAG:-v2.12.0}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/.tools/bin"
STAMP="$BIN/.toxiproxy-$TAG"
mkdir -p "$BIN"

if [[ -f "$STAMP" && -x "$BIN/toxiproxy-server" && -x "$BIN/toxiproxy-cli" ]]; then
  exit 0
fi

# A PATH binary fits when it reports 2.x at or above our pin's minor version.
fits() {
  local out
  out="$("$1" --version 2>/dev/null || true)"
  [[ "$out" =~ version[[:space:]]v?2\.([0-9]+) ]] && (( BASH_REMATCH[1] >= 5 ))
}
server_on_path="$(command -v toxiproxy-server || true)"
cli_on_path="$(command -v toxiproxy-cli || true)"
if [[ -n "$server_on_path" && -n "$cli_on_path" && "$server_on_path" != "$BIN/"* ]] && fits "$server_on_path"; then
  ln -sf "$server_on_path" "$BIN/toxiproxy-server"
  ln -sf "$cli_on_path" "$BIN/toxiproxy-cli"
  touch "$STAMP"
  echo "toxiproxy: using $server_on_path"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "toxiproxy: not on PATH and Go is missing. Install Go (https://go.dev/doc/install, or 'apt-get install golang')" \
       "and run 'make bootstrap' again, or put toxiproxy-server and toxiproxy-cli ($TAG) on PATH." >&2
  exit 2
fi

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
echo "toxiproxy: building $TAG with go install (first run only; about 1-2 minutes)"
GOBIN="$build" GOFLAGS=-mod=mod go install "github.com/Shopify/toxiproxy/v2/cmd/server@$TAG"
GOBIN="$build" GOFLAGS=-mod=mod go install "github.com/Shopify/toxiproxy/v2/cmd/cli@$TAG"
install -m 0755 "$build/server" "$BIN/toxiproxy-server"
install -m 0755 "$build/cli" "$BIN/toxiproxy-cli"
rm -f "$BIN"/.toxiproxy-*
touch "$STAMP"
echo "toxiproxy: installed $TAG in $BIN"
