#!/usr/bin/env bash
# Build the pinned Go programs into .tools/bin (see tools/pins.env):
#   tools/build.sh opa spire jaeger
# Each tool is built once per pin: .tools/bin/.<tool>.pin records the pin it was built
# from, so a second run does nothing until the pin changes. A binary of the pinned
# version already on PATH is reused (symlinked) instead of building.
# Builds use `go mod download` + `go build` inside the downloaded module, because
# SPIRE's and Jaeger's go.mod carry replace directives that `go install pkg@v` refuses.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=pins.env
. "$root/tools/pins.env"
bin="$root/.tools/bin"
mkdir -p "$bin"

say() { printf 'tools: %s\n' "$*" >&2; }

no_go() {
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
    *) say "unknown tool '$name' (known: opa spire jaeger)"; exit 2;;
  esac
  pin="$module@$version"
  stamp_ok "$name" "$pin" && return 0
  started=$(date +%s)
  case "$name" in
    opa)
      if reuse opa "Version: ${version#v}" opa; then :
      else
        command -v go >/dev/null || no_go opa "$version"
        say "building opa $version (first build: about 2 minutes)"
        LDFLAGS="" go_build "$OPA_MODULE" "$version" .
      fi;;
    spire)
      if reuse spire "${version#v}" spire-server spire-agent; then :
      else
        command -v go >/dev/null || no_go spire "$version"
        say "building spire-server and spire-agent $version (first build: about 4 minutes)"
        LDFLAGS="" go_build "$SPIRE_MODULE" "$version" ./cmd/spire-server ./cmd/spire-agent
      fi;;
    jaeger)
      command -v go >/dev/null || no_go jaeger "$version"
      say "building jaeger from $JAEGER_MODULE $version (first build: about 4 minutes)"
      LDFLAGS="" go_build "$JAEGER_MODULE" "$version" ./cmd/jaeger;;
  esac
  printf '%s' "$pin" > "$bin/.$name.pin"
  say "$name ready in $(( $(date +%s) - started )) s"
}

[ $# -gt 0 ] || set -- opa spire jaeger
for tool in "$@"; do build_tool "$tool"; done
