#!/usr/bin/env bash
# Fuzz every parser that reads bytes from others (fuzz/fuzz_targets) for a bounded time each,
# starting from the checked-in corpus (fuzz/corpus/TARGET, never written to: new inputs go to
# a scratch dir). A crash leaves its input in fuzz/artifacts/TARGET/ and fails the run: copy it
# to fuzz/regressions/TARGET/ (tests/tests/fuzz_corpus.rs replays those) and fix the parser.
#
# usage: bench/fuzz.sh [SECONDS_PER_TARGET (default 60)] [TARGET ...]
#        bench/fuzz.sh --replay     run each target once over its corpus and regressions only
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz --locked).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
replay=false
seconds=60
if [[ ${1:-} == --replay ]]; then
    replay=true
    shift
elif [[ ${1:-} =~ ^[0-9]+$ ]]; then
    seconds=$1
    shift
fi
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build -O
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
    dirs=("corpus/$t")
    [[ -d regressions/$t ]] && dirs+=("regressions/$t")
    if $replay; then
        args=(-runs=0)
    else
        mkdir -p "$scratch/$t"
        dirs=("$scratch/$t" "${dirs[@]}")
        args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
    fi
    log="$scratch/$t.log"
    if cargo +nightly fuzz run -O "$t" "${dirs[@]}" -- "${args[@]}" >"$log" 2>&1; then
        runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
        cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 || true)
        printf '%-20s ok   %s executions, %s\n' "$t" "${runs:-corpus}" "${cov:-}"
    else
        printf '%-20s FAILED (log below)\n' "$t"
        tail -40 "$log"
        failed+=("$t")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
