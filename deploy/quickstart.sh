#!/usr/bin/env bash
# One command from a fresh clone to the furthest the project runs today: install what is
# missing, build, fetch the real model, split it into 4 stage shards, validate them, seed them
# with the seeder (tracker + web seed on loopback), download every shard back with aria2c from
# its magnet link, and validate the downloaded set. Output in target/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/quickstart
shards=4

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v clang >/dev/null || need+=(clang)
[ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/llvm-*/lib/libclang*.so >/dev/null 2>&1 || need+=(libclang-dev)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v aria2c >/dev/null || need+=(aria2)
command -v curl >/dev/null || need+=(curl)
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

echo "== seeding with the seeder (loopback)"
rm -rf "$out/state" "$out/downloaded"
mkdir -p "$out/downloaded"
target/release/server --listen-addr 127.0.0.1 --port 0 --http-port 0 --seed-dir "$out/shards" \
    --state-dir "$out/state" >"$out/server.out" 2>"$out/server.log" &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 600); do grep -q '^\[READY\]' "$out/server.out" 2>/dev/null && break; sleep 0.1; done
grep '^\[' "$out/server.out" || { cat "$out/server.log"; exit 1; }
http=$(sed -n 's/^\[READY\] http=\([^ ]*\).*/\1/p' "$out/server.out")
curl -sf "http://$http/files" | python3 -m json.tool

echo "== downloading every shard back with aria2c, from its magnet link"
for magnet in $(curl -sf "http://$http/files" | python3 -c 'import json,sys; [print(f["magnet"]) for f in json.load(sys.stdin)["files"]]'); do
    aria2c -d "$out/downloaded" --enable-dht=false --enable-dht6=false --bt-enable-lpd=false \
        --enable-peer-exchange=false --seed-time=0 --bt-stop-timeout=120 --file-allocation=none \
        --console-log-level=warn --summary-interval=0 --allow-overwrite=true \
        --show-console-readout=false --download-result=hide "$magnet"
done
curl -sf "http://$http/manifest" >"$out/downloaded/shards.json"
target/release/shard_loader validate --target-dir "$out/downloaded" --expected-shards "$shards"
echo "== done: shards in $out/shards, downloaded copies in $out/downloaded, seeder log in $out/server.log"
