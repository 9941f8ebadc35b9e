#!/usr/bin/env bash
# Benchmark: `shard_loader split` against `cp` of the same model, both from a cold page cache
# (root: drop_caches before each run) and both ending with their files on disk (cp then sync;
# split syncs each file itself). The model is a synthetic llama written by
# tests/scripts/make_synthetic_model.py (random F16 weights, `--width 16`: n_embd 2560,
# n_ff 6144, about 126 MB a layer), so the size is set by LAYERS.
#
# Prints each run's times and split / cp (the two run back to back, in alternating order: the
# VM's disk drifts by 2x within minutes), and the medians. Goal (issue 26): split <= 1.2x cp.
#
# usage: sudo bench/split.sh [LAYERS=16] [SHARDS=4] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
layers=${1:-16}
shards=${2:-4}
runs=${3:-3}
[ "$(id -u)" = 0 ] || { echo "bench/split.sh drops the page cache before each run: run it as root" >&2; exit 1; }
bin=${SHARDSWARM_BIN_DIR:-target/release}  # another build's binaries, to compare two builds
[ -n "${SHARDSWARM_BIN_DIR:-}" ] || cargo build --release -q -p shard_loader
python=${SHARDSWARM_PYTHON:-.venv/bin/python}
work=$(mktemp -d /var/tmp/shardswarm-bench-split.XXXXXX)
trap 'rm -rf "$work"' EXIT
model="$work/model.gguf"
echo "writing a synthetic model with $layers layers ..."
"$python" tests/scripts/make_synthetic_model.py llama "$model" --layers "$layers" --width 16
size=$(stat -c %s "$model")
echo "model: $((size / 1048576)) MiB; $shards shards; $runs runs each, cold page cache"

# Both outputs removed and the disk settled before each run: a run right after 2 GB were
# deleted paid for the deletion (cp took 4 s after removing a split, 1.7 s after a copy).
cold() { rm -rf "$work/copy.gguf" "$work/split"; sync; sleep 3; echo 3 > /proc/sys/vm/drop_caches; }
seconds() { local t0 t1; t0=$(date +%s.%N); "$@" > /dev/null 2>&1; t1=$(date +%s.%N); awk "BEGIN {print $t1 - $t0}"; }
run_cp() { cold; seconds bash -c "cp '$model' '$work/copy.gguf' && sync"; }
run_split() { cold; seconds "$bin/shard_loader" split --model "$model" --shards "$shards" --target-dir "$work/split"; }

cps=(); splits=(); ratios=()
for i in $(seq "$runs"); do
    if [ $((i % 2)) = 1 ]; then cps+=("$(run_cp)"); splits+=("$(run_split)"); else splits+=("$(run_split)"); cps+=("$(run_cp)"); fi
    ratios+=("$(awk "BEGIN {print ${splits[-1]} / ${cps[-1]}}")")
    echo "run $i: cp ${cps[-1]} s, split ${splits[-1]} s, split / cp ${ratios[-1]}"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
c=$(median "${cps[@]}"); s=$(median "${splits[@]}"); r=$(median "${ratios[@]}")
awk -v c="$c" -v s="$s" -v r="$r" -v size="$size" 'BEGIN {
    printf "medians: cp + sync %.2f s (%.0f MiB/s), split %.2f s; split / cp per run (median) %.2fx (goal <= 1.2)\n",
        c, size / c / 1048576, s, r }'
