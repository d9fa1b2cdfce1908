#!/usr/bin/env bash
# `make deps`: checks the one thing we assume (a Rust toolchain, new enough) and installs every
# Debian package the build, the tests, the demo and the benchmarks need. Idempotent: a package
# already installed is not touched, and nothing runs apt when nothing is missing.
#
#   scripts/deps.sh MIN_RUST_VERSION PACKAGE... [--no-recommends PACKAGE...]
#
# Packages after `--no-recommends` are installed without their Recommends (apt's
# --no-install-recommends); those before it as apt installs them by default.
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
missing_norec=()
norec=
for p in "$@"; do
	if [ "$p" = --no-recommends ]; then
		norec=1
		continue
	fi
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' && continue
	if [ -n "$norec" ]; then missing_norec+=("$p"); else missing+=("$p"); fi
done
[ ${#missing[@]} -eq 0 ] && [ ${#missing_norec[@]} -eq 0 ] && exit 0

all=("${missing[@]}" "${missing_norec[@]}")
echo "make deps: installing ${all[*]}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; }
if ! {
	apt-get update -q &&
		{ [ ${#missing[@]} -eq 0 ] || install "${missing[@]}"; } &&
		{ [ ${#missing_norec[@]} -eq 0 ] || install --no-install-recommends "${missing_norec[@]}"; }
} >"$log" 2>&1; then
	grep -E '^(E|W):' "$log" >&2 || tail -20 "$log" >&2
	fail "apt-get could not install: ${all[*]}"
fi
for p in "${all[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' ||
		fail "package $p is still not installed after apt-get install"
done
