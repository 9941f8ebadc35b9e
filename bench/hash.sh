#!/usr/bin/env bash
# Benchmark: .torrent creation (SHA-1 piece hashing) by our `shard_loader torrent create` against
# `mktorrent -t 2`, on the same 1 GiB file in the page cache at the same piece length, in one run.
# Prints min/median/max throughput of 3 runs each and the ratio of medians, and checks that both
# give the same info hash (a fast wrong answer must not look good).
#
#   bench/hash.sh [SIZE_MIB=1024] [PIECE_LOG2=20] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
log2=${2:-20}
runs=${3:-3}
command -v mktorrent >/dev/null || { echo "mktorrent missing: apt-get install mktorrent" >&2; exit 1; }
cargo build --release -q -p shard_loader
bin=target/release/shard_loader

work=$(mktemp -d /tmp/shardswarm-bench-hash.XXXXXX)
trap 'rm -rf "$work"' EXIT
file="$work/data.bin"
echo "making a ${size_mib} MiB file (pseudo-random) in $work"
head -c $((size_mib << 20)) /dev/urandom >"$file"
cat "$file" >/dev/null   # into the page cache: we measure hashing, not the disk

now() { date +%s.%N; }
rate() { awk -v b=$((size_mib << 20)) -v t="$1" 'BEGIN { printf "%.0f", b / 1048576 / t }'; }
stats() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { printf "%d %d %d", a[1], a[int((NR + 1) / 2)], a[NR] }'; }

ours=() ; theirs=()
for i in $(seq "$runs"); do
    t0=$(now); "$bin" torrent create "$file" -l $((1 << log2)) --no-date -o "$work/ours.torrent" >/dev/null 2>&1; t1=$(now)
    ours+=("$(rate "$(echo "$t1 - $t0" | bc -l)")")
    rm -f "$work/mk.torrent"
    t0=$(now); mktorrent -t 2 -l "$log2" -o "$work/mk.torrent" "$file" >/dev/null 2>&1; t1=$(now)
    theirs+=("$(rate "$(echo "$t1 - $t0" | bc -l)")")
done
h_ours=$("$bin" torrent show "$work/ours.torrent" --json | sed -n 's/.*"info_hash": "\([0-9a-f]*\)".*/\1/p')
h_mk=$("$bin" torrent show "$work/mk.torrent" --json | sed -n 's/.*"info_hash": "\([0-9a-f]*\)".*/\1/p')
if [ "$h_ours" != "$h_mk" ]; then
    echo "FAIL: info hashes differ: ours $h_ours, mktorrent $h_mk" >&2
    exit 1
fi
read -r omin omed omax <<<"$(stats "${ours[@]}")"
read -r mmin mmed mmax <<<"$(stats "${theirs[@]}")"
echo "file: ${size_mib} MiB, piece length 2^${log2}, ${runs} runs each, $(nproc) cores; info hash $h_ours (equal)"
printf '%-28s %8s %8s %8s  MiB/s\n' "" min median max
printf '%-28s %8d %8d %8d\n' "shard_loader torrent create" "$omin" "$omed" "$omax"
printf '%-28s %8d %8d %8d\n' "mktorrent -t 2" "$mmin" "$mmed" "$mmax"
awk -v a="$omed" -v b="$mmed" 'BEGIN { printf "ratio (median, ours / mktorrent): %.2fx\n", a / b }'
