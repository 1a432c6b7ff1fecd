#!/usr/bin/env bash
# Build the pinned Go programs into .tools/bin (see tools/pins.env):
#   tools/build.sh opa spire jaeger
# and our own benchmark load generator (bench/loadgen, `make bench`):
#   tools/build.sh loadgen
# Each tool is built once per pin: .tools/bin/.<tool>.pin records the pin it was built
# from, so a second run does nothing until the pin changes. A binary of the pinned
# version already on PATH is reused (symlinked) instead of building.
# Builds use `go mod download` + `go build` inside the downloaded module, because
# SPIRE's and Jaeger's go.mod carry replace directives that `go install pkg@v` refuses.
# The load generator is our source: its stamp is a hash of bench/loadgen's go.mod, go.sum
# and *.go, so it is rebuilt only when they change; its module versions are pinned in go.mod.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=pins.env
. "$root/tools/pins.env"
bin="$root/.tools/bin"
mkdir -p "$bin"

say() { printf 'tools: %s\n' "$*" >&2; }

no_go() {
  if [ "$1" = loadgen ]; then
    say "cannot build the benchmark's load generator (bench/loadgen, our own Go source): no Go toolchain (go) on PATH."
    say "Install Go 1.26+ (https://go.dev/dl/); \`make bench\` and the tests need it."
    exit 1
  fi
  say "cannot build $1: no Go toolchain (go) on PATH, and no $1 $2 on PATH to reuse."
  say "Install Go 1.26+ (https://go.dev/dl/; the pinned OPA needs it), or put the official $1 $2 release binary on PATH:"
  case "$1" in
    opa) say "  https://github.com/open-policy-agent/opa/releases/tag/$2 (opa_linux_amd64_static)";;
    spire) say "  https://github.com/spiffe/spire/releases/tag/$2 (spire-$2-linux-amd64-musl.tar.gz)";;
    jaeger) say "  https://github.com/jaegertracing/jaeger/releases (the jaeger v2 binary matching $2)";;
  esac
  exit 1
}

# go_build MODULE VERSION OUT PKG...: build packages of a downloaded module into $bin.
go_build() {
  local module=$1 version=$2; shift 2
  local dir
  dir=$(GOFLAGS=-mod=mod go mod download -json "$module@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] || { say "go mod download $module@$version failed"; exit 1; }
  (cd "$dir" && GOFLAGS=-buildvcs=false CGO_ENABLED=0 go build -trimpath -ldflags "-s -w $LDFLAGS" -o "$bin/" "$@")
}

# The load generator's pin: a hash of its sources (names and contents).
loadgen_pin() {
  (cd "$root/bench/loadgen" && sha256sum go.mod go.sum ./*.go | sha256sum | cut -c1-16 | sed 's/^/bench\/loadgen@sha256:/')
}

stamp_ok() { [ -f "$bin/.$1.pin" ] && [ "$(cat "$bin/.$1.pin")" = "$2" ]; }

# reuse NAME VERSION-REGEX BINARY...: symlink binaries from PATH whose --version matches.
reuse() {
  local name=$1 want=$2 cmd; shift 2
  for cmd in "$@"; do
    local found; found=$(PATH="${PATH//$bin:/}" command -v "$cmd" 2>/dev/null) || return 1
    [ "$found" -ef "$bin/$cmd" ] && return 1
    "$found" version 2>/dev/null | grep -q -- "$want" || "$found" --version 2>/dev/null | grep -q -- "$want" || return 1
  done
  for cmd in "$@"; do ln -sf "$(command -v "$cmd")" "$bin/$cmd"; done
  say "$name: reusing $* from PATH"
}

build_tool() {
  local name=$1 module version pin started
  case "$name" in
    opa) module=$OPA_MODULE version=$OPA_VERSION;;
    spire) module=$SPIRE_MODULE version=$SPIRE_VERSION;;
    jaeger) module=$JAEGER_MODULE version=$JAEGER_VERSION;;
    loadgen) module=bench/loadgen version=source;;
    *) say "unknown tool '$name' (known: opa spire jaeger loadgen)"; exit 2;;
  esac
  pin="$module@$version"
  [ "$name" = loadgen ] && pin=$(loadgen_pin)
  stamp_ok "$name" "$pin" && return 0
  started=$(date +%s)
  case "$name" in
    opa)
      if reuse opa "Version: ${version#v}" opa; then :
      else
        command -v go >/dev/null || no_go opa "$version"
        say "building opa $version (first build: about 3 minutes on 2 cores)"
        LDFLAGS="" go_build "$OPA_MODULE" "$version" .
      fi;;
    spire)
      if reuse spire "${version#v}" spire-server spire-agent; then :
      else
        command -v go >/dev/null || no_go spire "$version"
        say "building spire-server and spire-agent $version (first build: about 5 minutes on 2 cores)"
        LDFLAGS="" go_build "$SPIRE_MODULE" "$version" ./cmd/spire-server ./cmd/spire-agent
      fi;;
    jaeger)
      command -v go >/dev/null || no_go jaeger "$version"
      say "building jaeger from $JAEGER_MODULE $version (first build: 6-9 minutes on 2 cores)"
      LDFLAGS="" go_build "$JAEGER_MODULE" "$version" ./cmd/jaeger;;
    loadgen)
      command -v go >/dev/null || no_go loadgen
      say "building sidecar-loadgen from bench/loadgen (first build: under a minute)"
      # Built beside the target and renamed: other worktrees share .tools/bin.
      (cd "$root/bench/loadgen" && GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 \
        go build -trimpath -ldflags "-s -w" -o "$bin/.sidecar-loadgen.$$" .)
      mv -f "$bin/.sidecar-loadgen.$$" "$bin/sidecar-loadgen";;
  esac
  printf '%s' "$pin" > "$bin/.$name.pin"
  say "$name ready in $(( $(date +%s) - started )) s"
}

[ $# -gt 0 ] || set -- opa spire jaeger
for tool in "$@"; do build_tool "$tool"; done
