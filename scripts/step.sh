#!/usr/bin/env bash
# Runs one step of `make` (the build, the tests), keeping its whole output in target/NAME.log
# and on the terminal; when it fails, ends with a digest that names what broke (the command,
# cargo's errors, the failed tests and their panics) instead of leaving it somewhere in
# thousands of lines of compiler or test output.
#
#   scripts/step.sh NAME COMMAND...
set -uo pipefail

name=$1
shift
mkdir -p target
log=target/$name.log

"$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}

if [ "$name" = test ]; then
	# One closing line for the whole run, whatever the number of test binaries.
	awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1); if ($(i) ~ /^ignored;?$/) s += $(i-1) } }
		END { printf "\ntests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log" >"$log.total"
	# On the terminal and at the end of the log, where .ci/run reads it back.
	tee -a "$log" <"$log.total"
	rm -f "$log.total"
fi
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
	test)
		grep -E '^test .* FAILED$' "$log" | sort -u
		echo "---- why:"
		grep -E -A4 "^thread '.*' panicked at|^---- .* stdout ----" "$log" | head -120
		grep -E '^error: test failed|^error: [0-9]+ targets failed' -A8 "$log" | head -20
		;;
	esac
} >&2
exit "$rc"
