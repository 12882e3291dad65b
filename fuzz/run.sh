#!/usr/bin/env bash
# fuzz/run.sh [SECONDS]: builds both fuzzers (fuzz/build.sh), then runs json-fuzz and elf-fuzz
# side by side (one per core) for SECONDS each (default 30). Prints one summary line per fuzzer
# and exits non-zero if either found a crash, an ASan report, a leak, a timeout, an allocation
# over the limit or a failed harness check (JSON differential/round trip, ELF invariants).
# The corpus grows in .build-fuzz/corpus/ across runs; findings go to .build-fuzz/artifacts/,
# full output to .build-fuzz/logs/. Set FUZZ_SKIP_BUILD=1 to reuse the binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${1:-30}
OUT=.build-fuzz
[ "${FUZZ_SKIP_BUILD:-0}" = 1 ] || fuzz/build.sh

mkdir -p "$OUT/corpus/json" "$OUT/corpus/elf" "$OUT/artifacts" "$OUT/logs"

# Swift's own crash backtracer races libFuzzer's and ASan's handlers for the same signals and
# can hang or garble the report: leave crashes to them.
export SWIFT_BACKTRACE=enable=no

# -timeout: seconds per input (an input that takes longer is a hang finding).
# -rss_limit_mb / -malloc_limit_mb: a whole-process and a single-allocation bound; the inputs are
# at most 64 KiB, so anything near these is runaway allocation, not a big input.
COMMON=(-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=256 -print_final_stats=1 -detect_leaks=1)
# FUZZ_RUNS=J,E (CI): a fixed number of inputs for each fuzzer (json, elf) from a fixed seed, so
# a run is the same run on every machine and CI does not go red on a finding it happened to reach
# this time; new findings come from the timed runs developers start.
if [ -n "${FUZZ_RUNS:-}" ]; then
    JSON_LIMIT=(-seed=1 -runs="${FUZZ_RUNS%,*}")
    ELF_LIMIT=(-seed=1 -runs="${FUZZ_RUNS#*,}")
else
    JSON_LIMIT=(-max_total_time="$SECONDS_EACH")
    ELF_LIMIT=(-max_total_time="$SECONDS_EACH")
fi

run() {  # name, extra flags..., corpus dirs...
    local name=$1; shift
    "$OUT/bin/$name" "${COMMON[@]}" -artifact_prefix="$OUT/artifacts/$name-" "$@" >"$OUT/logs/$name.log" 2>&1
}

# The first corpus folder is the one libFuzzer adds to; the others are only read. fuzz/repro/*
# holds the minimized inputs of past findings, so those are replayed first, every run.
run json-fuzz "${JSON_LIMIT[@]}" -max_len=4096 -dict=fuzz/json.dict "$OUT/corpus/json" fuzz/seeds/json $(ls -d fuzz/repro/json 2>/dev/null) & json_pid=$!
run elf-fuzz "${ELF_LIMIT[@]}" -max_len=65536 "$OUT/corpus/elf" "$OUT/seeds/elf" $(ls -d fuzz/repro/elf 2>/dev/null) & elf_pid=$!
status=0
wait "$json_pid" || json_rc=$?
wait "$elf_pid" || elf_rc=$?

summary() {  # name, exit code
    local name=$1 rc=$2 log=$OUT/logs/$1.log
    local runs eps last
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    # The last status line: "#N  DONE  cov: C ft: F corp: U/SIZE ...".
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' || true)
    if [ "$rc" = 0 ]; then
        local label="${SECONDS_EACH}s,"
        [ -n "${FUZZ_RUNS:-}" ] && label="fixed inputs (seed 1),"
        echo "$name: PASS $label ${runs:-?} runs, ${eps:-?} exec/s, ${last:-no status line}"
    else
        local artifact
        artifact=$(sed -n "s/.*Test unit written to //p" "$log" | tail -1)
        echo "$name: FAIL (exit $rc) after ${runs:-?} runs, ${last:-no status line}; input: ${artifact:-none saved}; log: $log"
        # What went wrong, and the first frame in the project's code.
        { grep -E 'check failed|ERROR: |Fatal error' "$log" | head -3
          grep -m1 -E ' in .* /.*/(Sources|fuzz)/' "$log" || true; } | sed 's/^/    /'
        status=1
    fi
}
summary json-fuzz "${json_rc:-0}"
summary elf-fuzz "${elf_rc:-0}"
exit "$status"
