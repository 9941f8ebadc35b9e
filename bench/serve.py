#!/usr/bin/env python3
"""Benchmark: serving many clients at once. K = 1, 2, 4, 8, 16 streaming clients, each with its own
prompt and the same max_tokens (greedy), against the 4-stage pipeline on loopback
(nodes with every core, shared while several stages work) and against llama.cpp's own llama-server
running the whole model with `-np K` on the same 2 cores.
For each K: aggregate tokens/s, time to first token, inter-token p50/p99 (medians over RUNS runs), the
ratios ours / llama-server, the servers' CPU time per token (all our processes; llama-server's one),
each stage's busy fraction (from the coordinator's /status), and how many greedy texts equal
llama-server's.

Tokens are counted as streamed chunks with text (both servers send one per token, holding back a
partial character). llama-server is built once from full llama.cpp sources by
../shared/tools/llama-server.sh (or give --llama-server PATH).

Each node's decode-thread policy (measured when its stage loads, or fixed by --node-threads) is
printed as the swarm comes up. With --policies, K=1 and K=8 run first under every policy (swarms
with nodes fixed to one thread, a free team, a pinned team) and with the nodes' measured choice,
each twice in mirrored order, so that a choice worse than the best fixed policy shows in the same
run.

Each line also gives the busiest vCPU's steal time (/proc/stat: the hypervisor running something
else while the VM wanted that vCPU), which makes teams that wait for their slowest thread slow.
--busy-core CPU keeps one core busy with a spinning process (a machine shared with other work).

SHARDSWARM_BIN_DIR=DIR runs another build's binaries instead of building this checkout's (to
compare two builds: run once with each, one after the other, on the same machine).

--transports tcp,mesh measures the pipeline with the data channel over TCP, then over the mesh
(iroh QUIC, the seeder running the relay), and prints mesh against tcp per K.

usage: bench/serve.py [--runs 3] [--max-tokens 48] [--clients 1,2,4,8,16] [--micro-batches 0]
                      [--node-threads 1] [--stages 4] [--skip-llama-server] [--policies]
                      [--busy-core CPU] [--transports tcp,mesh]
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from benchlib import start_local_swarm, stop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = ["the sea", "a small robot", "winter in the mountains", "a busy kitchen", "the first computer",
          "a lost key", "bees and flowers", "a train at night", "the moon landing", "an old library",
          "a desert city", "learning to swim", "a garden in spring", "the northern lights", "a chess game",
          "a quiet village"]


def prompt(i):
    return f"Write a short story about {TOPICS[i % len(TOPICS)]}. Once upon a time,"


def stream(addr, text, max_tokens, out, i):
    body = json.dumps({"prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/completions", body, {"content-type": "application/json"})
    t0 = time.monotonic()
    stamps, pieces = [], []
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            piece = chunk["choices"][0].get("text", "")
            if piece:
                stamps.append(time.monotonic())
                pieces.append(piece)
    out[i] = (t0, stamps, "".join(pieces))


def round_of(addr, k, max_tokens):
    """K clients at once: (aggregate tok/s, TTFTs in ms, inter-token gaps in ms, texts, tokens)."""
    out = [None] * k
    threads = [threading.Thread(target=stream, args=(addr, prompt(i), max_tokens, out, i)) for i in range(k)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = max(s[-1] for _, s, _ in out if s)
    tokens = sum(len(s) for _, s, _ in out)
    ttft = [(s[0] - t0) * 1000 for t0, s, _ in out if s]
    gaps = [(b - a) * 1000 for _, s, _ in out for a, b in zip(s, s[1:])]
    return tokens / (end - start), ttft, gaps, [t for _, _, t in out], tokens


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(binary, model, k, work):
    port = free_port()
    log = open(os.path.join(work, f"llama-server-{k}.log"), "w")
    p = subprocess.Popen([binary, "-m", model, "-t", "2", "-np", str(k), "-c", str(1024 * k), "--host",
                          "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return p, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    stop([p])
    sys.exit("llama-server did not come up")


def busy(addr):
    return status(addr).get("batching", {}).get("stage_busy_seconds", [])


def cpu_seconds(pids):
    """User + system CPU time of processes so far (from /proc), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def steal_ticks():
    """Per CPU, the time the hypervisor ran something else while this VM's vCPU wanted to run
    (/proc/stat `steal`, in clock ticks)."""
    with open("/proc/stat") as f:
        return [int(line.split()[8]) for line in f if line.startswith("cpu") and line[3].isdigit()]


def measure(addr, k, runs, max_tokens, pids, busy_of=None):
    """Medians over runs: (tok/s, TTFT p50, inter-token p50, p99, stage busy fractions, texts,
    server CPU ms per token, the busiest vCPU's steal fraction)."""
    rows = []
    for _ in range(runs):
        before = busy_of(addr) if busy_of else []
        cpu0, steal0 = cpu_seconds(pids), steal_ticks()
        t0 = time.monotonic()
        tps, ttft, gaps, texts, tokens = round_of(addr, k, max_tokens)
        wall = time.monotonic() - t0
        cpu_ms = (cpu_seconds(pids) - cpu0) * 1000 / max(tokens, 1)
        steal = max((b - a for a, b in zip(steal0, steal_ticks())), default=0) / os.sysconf("SC_CLK_TCK") / wall
        after = busy_of(addr) if busy_of else []
        fractions = [(a - b) / wall for a, b in zip(after, before)]
        rows.append((tps, statistics.median(ttft), pct(gaps, 50), pct(gaps, 99), fractions, texts, cpu_ms, steal))
    med = lambda j: statistics.median(r[j] for r in rows)
    fractions = [statistics.median(r[4][i] for r in rows) for i in range(len(rows[0][4]))]
    return med(0), med(1), med(2), med(3), fractions, rows[0][5], med(6), med(7)


POLICIES = {
    # name: the nodes' flags (every core for the teams)
    "measured": [],
    "one": ["--threads", "1"],
    "team": ["--threads", str(os.cpu_count()), "--pin-threads", "false"],
    "team-pinned": ["--threads", str(os.cpu_count()), "--pin-threads", "true"],
}


def status(addr):
    with urllib.request.urlopen(f"http://{addr}/status", timeout=10) as r:
        return json.load(r)


def decode_policies(addr):
    """Each node's decode-thread policy from /status, in stage order: "stage S: POLICY (by)"."""
    nodes = sorted(status(addr)["nodes"], key=lambda n: (n.get("stage") is None, n.get("stage") or 0))
    out = []
    for n in nodes:
        d = n.get("decode") or {}
        times = ", ".join(f"{p} {ms:.2f}" for p, ms in sorted(d.get("measured_ms", {}).items()))
        out.append(f"stage {n.get('stage')}: {d.get('policy', '?')} x{d.get('threads', '?')} "
                   f"({d.get('chosen_by', '?')}{'; ms/decode ' + times if times else ''})")
    return out


def run_pipeline(args, model, ks, node_flags, label, transport="tcp"):
    """Start a swarm whose data channel runs over `transport` (tcp, or mesh: the seeder runs
    the relay), measure every K, stop it: {K: measure(...)} and the nodes' policies."""
    work = tempfile.mkdtemp(prefix="shardswarm-bench-serve.")
    procs = []
    results = {}
    try:
        coord, procs = start_local_swarm(REPO, work, model, nodes=args.stages, shards=args.stages,
                                         threads=args.node_threads, node_flags=node_flags, coordinator_flags=[
            "--parallel", str(max(ks)), "--micro-batches", str(args.micro_batches),
            "--data-transport", transport],
                                         seeder_flags=["--relay-port", "0"] if transport == "mesh" else [])
        policies = decode_policies(coord)
        for line in policies:
            print(f"{label:12s} {line}", flush=True)
        round_of(coord, 2, 4)  # warm-up: contexts, connections
        for k in ks:
            results[k] = measure(coord, k, args.runs, args.max_tokens, [p.pid for p in procs], busy)
            r = results[k]
            print(f"{label:12s} K={k:2d}: {r[0]:6.1f} tok/s, TTFT {r[1]:6.0f} ms, inter-token p50 "
                  f"{r[2]:5.1f} p99 {r[3]:6.1f} ms, CPU {r[6]:5.1f} ms/token, steal {r[7]:4.0%}, stage busy "
                  + " ".join(f"{f:.2f}" for f in r[4]), flush=True)
        return results, policies
    finally:
        stop(procs)
        subprocess.run(["rm", "-rf", work])


def compare_policies(args, model):
    """K=1 and K=8 with the nodes' measured choice and under each fixed policy, swarms started
    in turn, twice in mirrored order (A B C D D C B A) so that the machine's drift falls on all
    alike; the measured choice against the best fixed one."""
    ks = [1, 8]
    runs = {name: {k: [] for k in ks} for name in POLICIES}
    order = list(POLICIES) + list(reversed(POLICIES))
    for name in order:
        results, _ = run_pipeline(args, model, ks, POLICIES[name], name)
        for k in ks:
            runs[name][k].append(results[k][0])
    rate = {name: {k: statistics.median(v) for k, v in by_k.items()} for name, by_k in runs.items()}
    print()
    print(f"decode-thread policies: SmolLM2-135M Q4_1, {args.stages} stages on loopback, {args.max_tokens} greedy "
          f"tokens per client; tok/s: mean of 2 swarms (mirrored order), each the median of {args.runs} runs; "
          f"teams of {os.cpu_count()} threads")
    print(f"{'policy':12s} " + " ".join(f"{'K=' + str(k) + ' tok/s':>12s} {'(swarms)':>14s}" for k in ks))
    for name in POLICIES:
        print(f"{name:12s} " + " ".join(
            f"{rate[name][k]:12.1f} {'(' + ', '.join(f'{v:.1f}' for v in runs[name][k]) + ')':>14s}" for k in ks))
    for k in ks:
        best = max((n for n in POLICIES if n != "measured"), key=lambda n: rate[n][k])
        print(f"K={k}: measured {rate['measured'][k]:.1f} tok/s = "
              f"{rate['measured'][k] / rate[best][k]:.2f}x the best fixed policy ({best}, "
              f"{rate[best][k]:.1f}); goal: about 1 (within noise)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--micro-batches", type=int, default=0, help="the coordinator's --micro-batches")
    ap.add_argument("--node-threads", type=int, default=0,
                    help="each node's --threads (default: the node's own choice, measured)")
    ap.add_argument("--stages", type=int, default=4,
                    help="pipeline stages (one node each); 1 measures our serving path without the pipeline")
    ap.add_argument("--skip-llama-server", action="store_true", help="measure the pipeline only")
    ap.add_argument("--policies", action="store_true",
                    help="K=1 and K=8 under each decode-thread policy (one, team, team-pinned) and the "
                         "nodes' measured choice, then the usual comparison with llama-server (unless skipped)")
    ap.add_argument("--busy-core", type=int, metavar="CPU",
                    help="keep CPU busy with a spinning process throughout (other work on the machine: "
                         "shows which policy the nodes choose then, and what each costs)")
    ap.add_argument("--llama-server", help="llama-server binary (default: build or reuse the cached one)")
    ap.add_argument("--transports", default="tcp",
                    help="the data channel's transports to measure, in order (tcp, mesh: iroh QUIC on loopback, "
                         "the seeder running the relay); with both, a table of mesh against tcp")
    args = ap.parse_args()
    if args.busy_core is not None:
        hog = subprocess.Popen(["taskset", "-c", str(args.busy_core), "sh", "-c", "while :; do :; done"])
        try:
            run(args)
        finally:
            stop([hog])
    else:
        run(args)


def run(args):
    ks = [int(k) for k in args.clients.split(",")]
    if not os.environ.get("SHARDSWARM_BIN_DIR"):
        subprocess.run(["cargo", "build", "--release", "-q", "--workspace", "--bins"], cwd=REPO, check=True)
    model = subprocess.run([os.path.join(REPO, "deploy", "fetch-model.sh")], capture_output=True, text=True,
                           check=True).stdout.strip()
    if args.policies:
        compare_policies(args, model)
        print()
    transports = args.transports.split(",")
    by_transport = {t: run_pipeline(args, model, ks, [], f"pipeline/{t}", t)[0] for t in transports}
    ours = by_transport[transports[0]]
    if "tcp" in by_transport and "mesh" in by_transport:
        print()
        print(f"{'K':>3s} {'tcp tok/s':>10s} {'mesh tok/s':>11s} {'mesh/tcp':>9s} {'ITL p50 tcp/mesh ms':>20s}")
        for k in ks:
            t, m = by_transport["tcp"][k], by_transport["mesh"][k]
            print(f"{k:3d} {t[0]:10.1f} {m[0]:11.1f} {m[0] / t[0]:8.2f}x {t[2]:9.1f}/{m[2]:<9.1f}")
    if args.skip_llama_server:
        return
    binary = args.llama_server or subprocess.run(
        [os.path.join(REPO, "..", "shared", "tools", "llama-server.sh")], capture_output=True, text=True,
        check=True).stdout.strip()
    theirs = {}
    work = tempfile.mkdtemp(prefix="shardswarm-bench-serve.")
    try:
        for k in ks:
            server, addr = start_llama_server(binary, model, k, work)
            try:
                round_of(addr, 2, 4)
                theirs[k] = measure(addr, k, args.runs, args.max_tokens, [server.pid])
            finally:
                stop([server])
            print(f"llama-server K={k:2d}: {theirs[k][0]:6.1f} tok/s, TTFT {theirs[k][1]:6.0f} ms, inter-token p50 "
                  f"{theirs[k][2]:5.1f} p99 {theirs[k][3]:6.1f} ms, CPU {theirs[k][6]:5.1f} ms/token, "
                  f"steal {theirs[k][7]:4.0%}", flush=True)
    finally:
        subprocess.run(["rm", "-rf", work])
    print()
    print(f"SmolLM2-135M Q4_1, {args.max_tokens} greedy tokens per client, medians of {args.runs} runs; "
          f"pipeline: {args.stages} stage(s) on loopback, "
          f"{args.node_threads or 'measured'} thread(s) per node "
          f"(shared while stages work at once); llama-server: whole model, -t 2 -np K")
    print(f"{'K':>3s} {'ours tok/s':>11s} {'llama-srv':>10s} {'ratio':>6s} {'TTFT ratio':>11s} "
          f"{'ITL p50/p99 ours':>17s} {'CPU ms/tok ours/srv':>20s} {'same text':>10s}  stage busy")
    for k in ks:
        o, t = ours[k], theirs[k]
        same = sum(a == b for a, b in zip(o[5], t[5]))
        print(f"{k:3d} {o[0]:11.1f} {t[0]:10.1f} {o[0] / t[0]:5.2f}x {o[1] / t[1]:10.2f}x "
              f"{o[2]:8.1f}/{o[3]:<8.1f} {o[6]:10.1f}/{t[6]:<9.1f} {same:4d} of {k:<3d}  "
              + " ".join(f"{f:.2f}" for f in o[4]))
    if 1 in ours and 8 in ours:
        print(f"goals: K=8 ours/llama-server {ours[8][0] / theirs[8][0]:.2f}x (goal >= 0.8); "
              f"K=1 {ours[1][0] / theirs[1][0]:.2f}x (goal >= 0.9)"
              + (f"; K=8 -> K=16 ours {ours[16][0] / ours[8][0]:.2f}x (goal > 1)" if 16 in ours else ""))


if __name__ == "__main__":
    main()
