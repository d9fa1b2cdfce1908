#!/usr/bin/env bash
# `make test [AREA=...]` and `make test-unit`: the tests through cargo-nextest, each in its
# own process with a time bound (.config/nextest.toml), so a hung test is ended, named as
# timed out, and the run goes on. Around them: what earlier killed runs left is swept first
# and what this one left is swept last (shimtest-sweep); the run ends with the failed tests'
# output, the ten slowest tests, the wall time and one closing line, `tests: ...`, which
# .ci/run reads back from target/test.log. A JUnit report is in target/nextest/default/.
#
#   scripts/test.sh NEXTEST [AREA]
#
# Areas (unit tests of the crate, and the end-to-end test files of integration/tests):
#   unit     every crate's unit and doc tests; no containerd, no VM
#   sdk      shim-common, protocol; conformance skeleton harness output stdio ordering
#   runc     shim-runc-v2; lifecycle (runc::); runc bad_input checkpoint restart stats_oom tty exec_soak
#   wasm     shim-wasm, containerd-client; lifecycle (wasm::); wasm wasm_stress
#   jail     shim-jail; lifecycle (jail::); jail
#   vm       shim-vm; vm vm_pods
#   cri      cri
#   installer  shim-installer; installer
#   sandbox  sandbox_api
set -uo pipefail

nextest=$1
area=${2:-}

# `integration::<file>` test binaries of the given files.
files() {
	local f sep= out=
	for f in "$@"; do
		out+="$sep binary_id(integration::$f)"
		sep=" |"
	done
	echo "$out"
}

doc=
case $area in
"") filter= doc=1 ;;
unit) filter="not kind(test)" doc=1 ;;
sdk) filter="package(shim-common) | package(protocol) |$(files conformance skeleton harness output stdio ordering)" ;;
runc) filter="package(shim-runc-v2) |$(files runc bad_input checkpoint restart stats_oom tty exec_soak) | (binary_id(integration::lifecycle) & test(/^runc::/))" ;;
wasm) filter="package(shim-wasm) | package(containerd-client) |$(files wasm wasm_stress) | (binary_id(integration::lifecycle) & test(/^wasm::/))" ;;
jail) filter="package(shim-jail) |$(files jail) | (binary_id(integration::lifecycle) & test(/^jail::/))" ;;
vm) filter="package(shim-vm) |$(files vm vm_pods)" ;;
cri) filter=$(files cri) ;;
installer) filter="package(shim-installer) |$(files installer)" ;;
sandbox) filter=$(files sandbox_api) ;;
*)
	echo "make test: unknown AREA '$area' (unit sdk runc wasm jail vm cri installer sandbox)" >&2
	exit 2
	;;
esac

mkdir -p target
log=target/test.log
: >"$log"
t0=$(date +%s)
sweep=${SHIM_BIN_DIR:-target/x86_64-unknown-linux-gnu/release}/shimtest-sweep

# Leftovers of killed runs (a containerd of a test ended at its bound, its shims, QEMU, the
# mounts under its directory) would make the next test trip over them.
sweep() {
	if [ -x "$sweep" ]; then
		timeout 120 "$sweep" 2>&1 | tee -a "$log"
	fi
}
[ "$area" = unit ] || sweep

# Bounded as a whole too: each test has its own bound, this one guards nextest itself.
args=(nextest run --release --workspace)
[ -z "$filter" ] || args+=(-E "$filter")
timeout --kill-after=30 5400 "$nextest" "${args[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}

if [ -n "$doc" ]; then
	# nextest does not run doc tests: the SDK's examples are tests too.
	timeout --kill-after=30 900 cargo test --release --workspace --doc 2>&1 | tee -a "$log"
	drc=${PIPESTATUS[0]}
	[ "$rc" -ne 0 ] || rc=$drc
fi

[ "$area" = unit ] || sweep

{
	junit=target/nextest/default/junit.xml
	if [ -f "$junit" ]; then
		echo
		echo "==== slowest tests"
		awk '/<testcase / {
			n = c = t = ""
			if (match($0, / name="[^"]*"/)) n = substr($0, RSTART + 7, RLENGTH - 8)
			if (match($0, / classname="[^"]*"/)) c = substr($0, RSTART + 12, RLENGTH - 13)
			if (match($0, / time="[^"]*"/)) t = substr($0, RSTART + 7, RLENGTH - 8)
			printf "%8.1f s  %s %s\n", t, c, n
		}' "$junit" | sort -rn | head -10
	fi
	# nextest's summary (`N tests run: A passed, B failed, C timed out, D skipped`) and the
	# doc tests' `test result:` lines, as one line.
	awk -v area="${area:-all}" -v secs=$(($(date +%s) - t0)) '
		/^ *Summary \[/ {
			for (i = 2; i <= NF; i++) {
				w = $(i); gsub(/[,;]/, "", w)
				if (w == "passed") p += $(i - 1)
				else if (w == "failed" && $(i - 1) != "exec") f += $(i - 1)
				else if (w == "timed") { f += $(i - 1); t += $(i - 1) }
				else if (w == "skipped") s += $(i - 1)
			}
		}
		/^test result:/ {
			for (i = 1; i <= NF; i++) {
				if ($(i) ~ /^passed;?$/) p += $(i - 1)
				if ($(i) ~ /^failed;?$/) f += $(i - 1)
				if ($(i) ~ /^ignored;?$/) s += $(i - 1)
			}
		}
		END {
			printf "\ntests: %d passed, %d failed (%d timed out), %d skipped; area %s, %d s\n", p, f, t, s, area, secs
		}' "$log"
} 2>&1 | tee -a "$log"
exit "$rc"
