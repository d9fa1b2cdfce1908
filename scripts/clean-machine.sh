#!/usr/bin/env bash
# `make clean-machine`: removes what killed test and CI runs left on this machine, by pid and
# by path, logging each: private containerds, shims, QEMU and its helpers, mounts and network
# namespaces of the tests (shimtest-sweep), and the pristine roots of CI runs that are gone
# (.ci/pristine-root sweep-stale). Prints the free disk before and after.
#
#   scripts/clean-machine.sh BIN_DIR
set -uo pipefail
bin_dir=$1

free() { df -h --output=target,avail,pcent / /var/tmp /tmp 2>/dev/null | sed "s/^/$1 /"; }
free "before:"
if [ -x "$bin_dir/shimtest-sweep" ]; then
	timeout 120 "$bin_dir/shimtest-sweep"
else
	echo "clean-machine: $bin_dir/shimtest-sweep is not built (make build): test leftovers not swept" >&2
fi
timeout 600 .ci/pristine-root sweep-stale
free "after: "
