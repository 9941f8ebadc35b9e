#!/usr/bin/env python3
"""Benchmark: time for the swarm to become ready over an emulated network, against the
theoretical minimum and against plain HTTP from the seeder, in one run.

Every host is a network namespace on a bridge (198.18.0.0/24, the benchmarking range, with no
route anywhere else), each link capped with `tc tbf`: seeder uplink u_s, node uplink u, and
downlink d (method and the aria2c/libtorrent/HTTP figures for the same shapes:
shared/bench-notes.md). The seeder and coordinator share the seeder's host; N nodes start
empty, each declaring its uplink (`--uplink-mbit`). Shapes: 4 shards on N nodes (N/4 copies of
each); from N=32 on every cap is a quarter (so the machine's 2 cores, not the emulation, set the
pace). `--uneven`: half the nodes have a quarter of the uplink.

Printed per shape (medians over runs): the lower bound max(D/u_s, F_max/d, sum(F)/(u_s + sum(u)))
with D the bytes of the distinct shards and F_i the bytes node i needs; per-node completion (the
moment each node holds its shard) p50 and p99 over the nodes of a run, and both against the bound
(Kraken's way of reporting); the seeder's upload in copies of D (from its veth's tx_bytes); the
time to the first completion token from empty nodes (start -> every shard fetched and loaded in
llama.cpp -> first streamed token); and every node fetching its shard over plain HTTP from the
seeder's web seed (up to N=16: beyond, it takes many minutes).

usage (root): bench/swarm.py [--us 80] [--u 40] [--d 200] [--shapes 4,8,16,32] [--runs 1] [--uneven]
"""
import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import stop, wait_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "target", "release")
API_KEY = secrets.token_hex(16)
PREFIX = f"sswb{os.getpid() % 10000}"
BRIDGE = f"{PREFIX}br"


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def ns_name(i):
    return f"{PREFIX}h{i}"


def add_host(i, up_mbit, down_mbit):
    """Namespace i with address 198.18.0.(i+1), uplink and downlink caps."""
    ns, inside, outside = ns_name(i), f"{PREFIX}i{i}", f"{PREFIX}o{i}"
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
    sh("ip", "link", "set", inside, "netns", ns)
    sh("ip", "link", "set", outside, "master", BRIDGE)
    sh("ip", "link", "set", outside, "up")
    sh("ip", "-n", ns, "addr", "add", f"198.18.0.{i + 1}/24", "dev", inside)
    sh("ip", "-n", ns, "link", "set", inside, "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    for dev, rate, netns in ((inside, up_mbit, ns), (outside, down_mbit, None)):
        burst = max(rate * 1_000_000 // 8 // 100, 4096)
        cmd = ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate}mbit", "burst", str(burst), "latency", "50ms"]
        sh(*(["ip", "netns", "exec", netns] + cmd if netns else cmd))
    return ns, inside


def tx_bytes(ns, dev):
    return int(sh("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/statistics/tx_bytes").stdout)


def teardown(hosts):
    for i in range(hosts):
        sh("ip", "netns", "del", ns_name(i), check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


def start(ns, args, log):
    return subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=subprocess.PIPE,
                            stderr=open(log, "w"), text=True)


def node_uplink(i, n, u, uneven):
    """Node i's uplink (1-based): with --uneven, every second node has a quarter."""
    return max(u // 4, 1) if uneven and i % 2 == 0 else u


def ca_file(work):
    """The swarm's CA, which the coordinator (on a public address, so with TLS) made."""
    return os.path.join(work, "coordinator-state", "ca.pem")


def first_token(work, seeder_ns, limit):
    """Stream one completion through the coordinator (again while it answers that it is not
    serving yet); the monotonic time of its first token."""
    body = json.dumps({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "stream": True})
    deadline = time.monotonic() + limit
    answer = ""
    while time.monotonic() < deadline:
        p = subprocess.Popen(["ip", "netns", "exec", seeder_ns, "curl", "-sN", "--max-time", str(limit), "-H",
                              "content-type: application/json", "-H", f"Authorization: Bearer {API_KEY}", "-d", body,
                              "--cacert", ca_file(work), "https://198.18.0.1:51830/v1/completions"],
                             stdout=subprocess.PIPE, text=True)
        try:
            answer = ""
            for line in p.stdout:
                answer += line
                if line.startswith("data: {") and '"text":' in line and '"text":""' not in line:
                    return time.monotonic()
        finally:
            p.kill()
            p.wait()
        time.sleep(0.2)
    sys.exit(f"no token within {limit} s; the last answer: {answer[:500]}")


def run_swarm(work, shards_dir, n, seeder_dev, caps, uneven):
    us, u, d = caps
    seeder_ns = ns_name(0)
    procs = []
    try:
        s = start(seeder_ns, [os.path.join(BIN, "server"), "--listen-addr", "198.18.0.1", "--port", "51820",
                              "--http-port", "51821", "--seed-dir", shards_dir, "--state-dir",
                              os.path.join(work, "seeder-state")], os.path.join(work, "seeder.log"))
        procs.append(s)
        wait_line(s, r"^\[READY\]", 300)
        # As on a real network: nodes join with the swarm token, the API asks for a key.
        token_file = os.path.join(work, "token")
        with open(token_file, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        c = start(seeder_ns, [os.path.join(BIN, "coordinator"), "--listen", "198.18.0.1:51830", "--seeder",
                              "http://198.18.0.1:51821", "--min-nodes", str(n), "--token-file", token_file,
                              "--api-key", API_KEY, "--state-dir", os.path.join(work, "coordinator-state")],
                  os.path.join(work, "coordinator.log"))
        procs.append(c)
        wait_line(c, r"^\[READY\]", 60)
        tx0 = tx_bytes(seeder_ns, seeder_dev)
        t0 = time.monotonic()
        for i in range(1, n + 1):
            procs.append(start(ns_name(i), [os.path.join(BIN, "node"), "--coordinator", "https://198.18.0.1:51830",
                                            "--data-dir", os.path.join(work, f"node{i}"), "--name", f"n{i}",
                                            "--token-file", token_file,
                                            "--listen-addr", f"198.18.0.{i + 1}", "--threads", "1",
                                            "--uplink-mbit", str(node_uplink(i, n, u, uneven)),
                                            "--downlink-mbit", str(d)],
                               os.path.join(work, f"node{i}.log")))
        wait_line(c, r"^\[SWARM_READY\]", 900)
        ready = time.monotonic() - t0
        token = {}
        asker = threading.Thread(target=lambda: token.setdefault("t", first_token(work, seeder_ns, 600)))
        asker.start()
        # Replicas may still be copying: each node's completion is when it holds its shard.
        done = {}
        deadline = time.time() + 900
        while time.time() < deadline and len(done) < n:
            out = sh("ip", "netns", "exec", seeder_ns, "curl", "-sf", "--cacert", ca_file(work), "-H",
                     f"Authorization: Bearer {API_KEY}", "https://198.18.0.1:51830/status", check=False).stdout
            try:
                nodes = json.loads(out)["nodes"]
            except (ValueError, KeyError):
                nodes = []
            now = time.monotonic() - t0
            for node in nodes:
                if node["shards"] and all(h["state"] == "loaded" for h in node["shards"].values()):
                    done.setdefault(node["name"], now)
            time.sleep(0.2)
        if len(done) < n:
            sys.exit("the nodes never all loaded their shards")
        asker.join()
        ttft = token["t"] - t0
        return sorted(done.values()), ready, ttft, tx_bytes(seeder_ns, seeder_dev) - tx0
    finally:
        stop(procs)


def pct(values, p):
    """The nearest-rank percentile p of values."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, -(-len(values) * p // 100) - 1))]


def run_http(work, shards_dir, n, sizes):
    """Every node fetches its shard(s) over plain HTTP from the seeder's web seed at once."""
    procs = []
    try:
        s = start(ns_name(0), [os.path.join(BIN, "server"), "--listen-addr", "198.18.0.1", "--port", "51820",
                               "--http-port", "51821", "--seed-dir", shards_dir, "--state-dir",
                               os.path.join(work, "seeder-state")], os.path.join(work, "seeder-http.log"))
        procs.append(s)
        wait_line(s, r"^\[READY\]", 300)
        t0 = time.monotonic()
        curls = []
        for i in range(1, n + 1):
            k = (i - 1) % len(sizes)
            out = os.path.join(work, f"http{i}.bin")
            curls.append(subprocess.Popen(["ip", "netns", "exec", ns_name(i), "curl", "-sf", "-o", out,
                                           f"http://198.18.0.1:51821/seed/shard-{k}.gguf"]))
        for p in curls:
            if p.wait(900) != 0:
                sys.exit("an HTTP download failed")
        return time.monotonic() - t0
    finally:
        stop(procs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--us", type=int, default=80, help="seeder uplink, Mbit/s")
    ap.add_argument("--u", type=int, default=40, help="node uplink, Mbit/s")
    ap.add_argument("--d", type=int, default=200, help="downlink, Mbit/s")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--shapes", default="4,8,16,32", help="node counts")
    ap.add_argument("--quarter-from", type=int, default=32, help="shapes this large run with every cap quartered")
    ap.add_argument("--http-up-to", type=int, default=16, help="measure plain HTTP for shapes up to this size")
    ap.add_argument("--uneven", action="store_true", help="half the nodes with a quarter of the uplink")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs) and print its path")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "seeder", "-p", "coordinator", "-p", "node",
                    "-p", "torrents"], cwd=REPO, check=True)
    model = subprocess.run([os.path.join(REPO, "deploy", "fetch-model.sh")], capture_output=True, text=True,
                           check=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="shardswarm-bench-swarm.")
    shapes = [int(x) for x in args.shapes.split(",")]
    hosts = max(shapes) + 1
    results = []
    mbit = lambda b, rate: b * 8 / (rate * 1_000_000)
    try:
        shards_dir = os.path.join(work, "shards")
        subprocess.run([os.path.join(BIN, "shard_loader"), "split", "--model", model, "--shards", "4",
                        "--target-dir", shards_dir], check=True, capture_output=True)
        sizes = [os.path.getsize(os.path.join(shards_dir, f"shard-{k}.gguf")) for k in range(4)]
        D = sum(sizes)
        for n in shapes:
            q = 4 if n >= args.quarter_from else 1
            caps = (args.us // q, args.u // q, args.d // q)
            # Fresh links per shape: the caps differ.
            teardown(hosts)
            sh("ip", "link", "add", BRIDGE, "type", "bridge")
            sh("ip", "link", "set", BRIDGE, "up")
            _, seeder_dev = add_host(0, caps[0], caps[2])
            for i in range(1, n + 1):
                add_host(i, node_uplink(i, n, caps[1], args.uneven), caps[2])
            need = [sizes[(i - 1) % 4] for i in range(1, n + 1)]
            uplinks = sum(node_uplink(i, n, caps[1], args.uneven) for i in range(1, n + 1))
            bound = max(mbit(D, caps[0]), mbit(max(need), caps[2]), mbit(sum(need), caps[0] + uplinks))
            runs = []
            for r in range(args.runs):
                rundir = os.path.join(work, f"n{n}-r{r}")
                os.makedirs(rundir)
                done, ready, ttft, sent = run_swarm(rundir, shards_dir, n, seeder_dev, caps, args.uneven)
                http = run_http(rundir, shards_dir, n, sizes) if n <= args.http_up_to else None
                runs.append({"p50": pct(done, 50), "p99": pct(done, 99), "all": done[-1], "ready": ready,
                             "ttft": ttft, "sent": sent / D, "http": http})
                print(f"N={n} run {r + 1}: nodes done p50 {pct(done, 50):.1f} s p99 {pct(done, 99):.1f} s "
                      f"(bound {bound:.1f} s), SWARM_READY {ready:.1f} s, first token {ttft:.1f} s, seeder sent "
                      f"{sent / D:.2f} x D" + (f", HTTP {http:.1f} s" if http else ""), flush=True)
            results.append((n, caps, bound, runs))
    finally:
        teardown(hosts)
        if args.keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    med = lambda runs, key: statistics.median(r[key] for r in runs)
    print()
    print(f"4 shards ({D} bytes), {args.runs} run(s) each, medians; links in Mbit/s (u_s/u/d)"
          + (", half the nodes with a quarter of u" if args.uneven else ""))
    print("per-node completion: when each node holds its shard (p50/p99 over the nodes of a run); "
          "first token: start -> every shard loaded -> first streamed token")
    print(f"{'shape':6s} {'links':>11s} {'bound s':>8s} {'p50 s':>7s} {'p99 s':>7s} {'p50/bound':>9s} "
          f"{'p99/bound':>9s} {'seeder xD':>9s} {'READY s':>8s} {'1st tok s':>9s} {'HTTP s':>7s} {'HTTP/p99':>8s}")
    for n, caps, bound, runs in results:
        p50, p99 = med(runs, "p50"), med(runs, "p99")
        https = [r["http"] for r in runs if r["http"]]
        http = statistics.median(https) if https else None
        links = "/".join(str(c) for c in caps)
        print(f"N={n:<4d} {links:>11s} {bound:8.1f} {p50:7.1f} {p99:7.1f} {p50 / bound:9.2f} {p99 / bound:9.2f} "
              f"{med(runs, 'sent'):9.2f} {med(runs, 'ready'):8.1f} {med(runs, 'ttft'):9.1f} "
              + (f"{http:7.1f} {http / p99:8.2f}" if http else f"{'-':>7s} {'-':>8s}"))
    print("goals: p99/bound <= 1.3 at N=8, 16 (80/40/200) and 32 (20/10/50); seeder <= 1.2 D; HTTP/p99 >= 3 at N=16")


if __name__ == "__main__":
    main()
