#!/usr/bin/env bash
# Runs one step of `make` (the build, a tool's install), keeping its whole output in
# target/NAME.log and on the terminal; when it fails, ends with a digest that names what broke
# (the command, cargo's errors) instead of leaving it somewhere in thousands of lines of
# compiler output. The tests have their own runner, scripts/test.sh.
#
#   scripts/step.sh NAME COMMAND...
set -uo pipefail

name=$1
shift
mkdir -p target
log=target/$name.log

"$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}

[ "$rc" -eq 0 ] && exit 0

{
	echo
	echo "==== make $name failed (exit status $rc): $*"
	echo "==== full output: $PWD/$log"
	case $name in
	build)
		# cargo's own error blocks: each starts at `error` and runs to the next blank line.
		awk '/^error/ { on = 1 } on { print } /^$/ { on = 0 }' "$log" | head -80
		if grep -q 'could not find native static library\|linking with .* failed\|pkg-config\|No such file or directory' "$log"; then
			echo "==== a system library or tool the build needs is missing: is its Debian package in the Makefile's APT_PKGS?"
		fi
		;;
	esac
} >&2
exit "$rc"
