#!/usr/bin/env bash
# One command from a fresh clone to the furthest the project runs today: install what is
# missing, build, fetch the real model, split it into 4 stage shards and validate them, then run
# the swarm on this machine: the seeder (tracker + web seed), the coordinator and 4 empty nodes,
# which fetch their shards by BitTorrent until the swarm is ready, then print one completion
# made by the 4-stage pipeline (and the whole model's, to compare). Output in target/quickstart/.
#
#   deploy/quickstart.sh [--keep-running]
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/quickstart
shards=4
nodes=4
keep=false
[ "${1:-}" = "--keep-running" ] && keep=true

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v clang >/dev/null || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so >/dev/null 2>&1 || need+=(libclang-dev)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v curl >/dev/null || need+=(curl)
command -v patch >/dev/null || need+=(patch)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "== building (the first build compiles llama.cpp: 5-25 minutes)"
deploy/patch-crates.sh
cargo build --release --workspace

echo "== fetching the model"
model=$(deploy/fetch-model.sh)

echo "== splitting into $shards shards"
target/release/shard_loader split --model "$model" --shards "$shards" --target-dir "$out/shards"
target/release/shard_loader validate --target-dir "$out/shards" --expected-shards "$shards"

echo "== starting the swarm: seeder, coordinator, $nodes nodes (logs in $out/logs)"
rm -rf "$out/state" "$out/nodes" "$out/logs"
mkdir -p "$out/logs"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Wait (bounded) for a "[READY] http=…" line in a log, and print the address.
ready_addr() {
    for _ in $(seq 1200); do
        addr=$(sed -n 's/^\[READY\] http=\([^ ]*\).*/\1/p' "$1" 2>/dev/null | head -1)
        [ -n "$addr" ] && { echo "$addr"; return 0; }
        sleep 0.1
    done
    echo "no [READY] in $1" >&2
    return 1
}

target/release/server --listen-addr 127.0.0.1 --port 0 --http-port 0 --seed-dir "$out/shards" \
    --state-dir "$out/state" >"$out/logs/seeder.out" 2>"$out/logs/seeder.log" &
pids+=($!)
seeder=$(ready_addr "$out/logs/seeder.out")
# The key the seeder signs its manifest with: the coordinator uses the manifest only if it checks out.
seeder_key=$(sed -n 's/^\[READY\].* key=\([0-9a-f]*\).*/\1/p' "$out/logs/seeder.out" | head -1)
grep '^\[TORRENT\]' "$out/logs/seeder.out"
echo "seeder:      http://$seeder"

target/release/coordinator --listen 127.0.0.1:0 --seeder "http://$seeder" --seeder-key "$seeder_key" \
    --min-nodes "$nodes" --cache-dir "$out/cache" \
    >"$out/logs/coordinator.out" 2>"$out/logs/coordinator.log" &
pids+=($!)
coordinator=$(ready_addr "$out/logs/coordinator.out")
echo "coordinator: http://$coordinator"

for i in $(seq 1 "$nodes"); do
    target/release/node --coordinator "http://$coordinator" --data-dir "$out/nodes/node-$i" --name "node-$i" \
        --listen-addr 127.0.0.1 >"$out/logs/node-$i.out" 2>"$out/logs/node-$i.log" &
    pids+=($!)
done

echo "== waiting for SWARM_READY (bytes of each node's shards)"
target/release/shard_loader watch --coordinator "http://$coordinator" --until ready --timeout 180 ||
    { tail -20 "$out/logs/coordinator.log"; exit 1; }
grep '^\[SWARM_READY\]' "$out/logs/coordinator.out" || { tail -20 "$out/logs/coordinator.log"; exit 1; }
curl -sf "http://$coordinator/status" | python3 -c "
import json, sys
s = json.load(sys.stdin)
print('ready:', s['ready'], ' split:', s['split_id'][:16], ' nodes:', len(s['nodes']))
for n in s['nodes']:
    for shard, h in n['shards'].items():
        print('  %-8s shard-%s.gguf  %-8s %10d B from the seeder %10d B from nodes'
              % (n['name'], shard, h['state'], h.get('from_seeder', 0), h.get('from_peers', 0)))
"
echo "== waiting for the pipeline (every stage loaded in llama.cpp)"
target/release/shard_loader watch --coordinator "http://$coordinator" --until serving --timeout 60 ||
    { tail -20 "$out/logs/coordinator.log"; exit 1; }
prompt="The capital of France is"
echo "== one completion through the swarm (POST /v1/completions, greedy): $prompt"
curl -sf "http://$coordinator/v1/completions" -H 'content-type: application/json' \
    -d "{\"prompt\": \"$prompt\", \"max_tokens\": 24, \"temperature\": 0}" |
    python3 -c "import json, sys; r = json.load(sys.stdin); print(repr(r['choices'][0]['text'])); print(r['usage'])"
echo "== the same with the whole model in one process (node reference)"
target/release/node reference --model "$model" --prompt "$prompt" --max-tokens 24 --json |
    python3 -c "import json, sys; print(repr(json.load(sys.stdin)['text']))"
if $keep; then
    echo "== running; stop with Ctrl-C (status: curl http://$coordinator/status; OpenAI API: http://$coordinator/v1)"
    wait
fi
echo "== done (the swarm stops now; run with --keep-running to keep it)"
