#!/usr/bin/env bash
# One command from a fresh clone to the furthest the project runs today: install what is
# missing, build, fetch the real model, split it into 4 stage shards, validate them, and make and
# show a .torrent for each. Output in target/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/quickstart
shards=4

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v clang >/dev/null || need+=(clang)
[ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/llvm-*/lib/libclang*.so >/dev/null 2>&1 || need+=(libclang-dev)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "== building (the first build compiles llama.cpp: 5-25 minutes)"
cargo build --release --workspace

echo "== fetching the model"
model=$(deploy/fetch-model.sh)

echo "== splitting into $shards shards"
target/release/shard_loader split --model "$model" --shards "$shards" --target-dir "$out/shards"

echo "== validating"
target/release/shard_loader validate --target-dir "$out/shards" --expected-shards "$shards"

echo "== loading each shard with llama.cpp"
for k in $(seq 0 $((shards - 1))); do
    printf 'shard-%d.gguf: ' "$k"
    target/release/node model-info --model "$out/shards/shard-$k.gguf" --json | tr -d '\n ' ; echo
done

echo "== making torrents"
mkdir -p "$out/torrents"
for k in $(seq 0 $((shards - 1))); do
    target/release/shard_loader torrent create "$out/shards/shard-$k.gguf" --no-date \
        --announce http://127.0.0.1:51821/announce --web-seed "http://127.0.0.1:51821/seed/shard-$k.gguf" \
        -o "$out/torrents/shard-$k.gguf.torrent" >/dev/null
    echo "-- shard-$k.gguf.torrent"
    target/release/shard_loader torrent show "$out/torrents/shard-$k.gguf.torrent"
done
echo "== done: shards in $out/shards, torrents in $out/torrents"
