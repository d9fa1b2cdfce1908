#!/usr/bin/env bash
# cargo-nextest VERSION as ROOT/bin/cargo-nextest: the machine's own when it is exactly that
# version (linked), else built from crates.io (`cargo install --locked`, without its
# self-update, which would pull in an HTTP client we never use).
#
#   scripts/install-nextest.sh VERSION ROOT
set -euo pipefail
version=$1
root=$2
mkdir -p "$root/bin"
if have=$(command -v cargo-nextest) &&
	[ "$("$have" --version 2>/dev/null | awk 'NR == 1 { print $2 }')" = "$version" ]; then
	ln -sfn "$have" "$root/bin/cargo-nextest"
	echo "cargo-nextest $version: $have"
	exit 0
fi
# From /, so the workspace's .cargo/config.toml (a static target) does not apply.
cd /
cargo install --locked --root "$root" --no-default-features --features default-no-update \
	"cargo-nextest@$version"
