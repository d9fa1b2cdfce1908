#!/usr/bin/env bash
# `make deps`: checks the one thing we assume (a Rust toolchain, new enough) and installs every
# Debian package the build, the tests, the demo and the benchmarks need. Idempotent: a package
# already installed is not touched, and nothing runs apt when nothing is missing.
#
#   scripts/deps.sh MIN_RUST_VERSION PACKAGE...
set -euo pipefail

min=$1
shift

fail() {
	echo "make deps: $*" >&2
	exit 1
}

command -v cargo >/dev/null && command -v rustc >/dev/null ||
	fail "no Rust toolchain on PATH: install one with rustup (https://rustup.rs), version $min or newer"
have=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$min" "${have%%-*}" | sort -V | head -1)" != "$min" ]; then
	fail "rustc $have is too old: this workspace needs $min or newer (wasmtime 48's minimum); run \`rustup update stable\`"
fi

[ "$(id -u)" = 0 ] || fail "run as root: the packages are installed with apt-get, and the tests run containerd"
command -v apt-get >/dev/null || fail "apt-get not found: these steps are written for Debian 12 (bookworm)"

missing=()
for p in "$@"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "make deps: installing ${missing[*]}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } >"$log" 2>&1; then
	grep -E '^(E|W):' "$log" >&2 || tail -20 "$log" >&2
	fail "apt-get could not install: ${missing[*]}"
fi
for p in "${missing[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
		fail "package $p is still not installed after apt-get install"
done
