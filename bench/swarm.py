#!/usr/bin/env python3
"""Benchmark: time for the swarm to become ready over an emulated network, against the
theoretical minimum and against plain HTTP from the seeder, in one run.

Every host is a network namespace on a bridge (198.18.0.0/24, the benchmarking range, with no
route anywhere else), each link capped with `tc tbf`: seeder uplink u_s, node uplink u, and
downlink d (method and the aria2c/libtorrent/HTTP figures for the same shapes:
shared/bench-notes.md). The seeder and coordinator share the seeder's host; N nodes start
empty. Printed per shape: our makespan (nodes started -> SWARM_READY), the lower bound
max(D/u_s, F_max/d, sum(F)/(u_s + N*u)) with D the bytes of the distinct shards and F_i the
bytes node i needs, the makespan of every node fetching its shards over plain HTTP from the
seeder's web seed, the ratios, and the seeder's upload in copies of D (from its veth's
tx_bytes). Shapes: 4 shards on N=4 and on N=8 (2 replicas each).

usage (root): bench/swarm.py [--us 80] [--u 40] [--d 200] [--runs 1]   (Mbit/s)
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import stop, wait_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "target", "release")
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


def run_swarm(work, shards_dir, n, seeder_dev):
    seeder_ns = ns_name(0)
    procs = []
    try:
        s = start(seeder_ns, [os.path.join(BIN, "server"), "--listen-addr", "198.18.0.1", "--port", "51820",
                              "--http-port", "51821", "--seed-dir", shards_dir, "--state-dir",
                              os.path.join(work, "seeder-state")], os.path.join(work, "seeder.log"))
        procs.append(s)
        wait_line(s, r"^\[READY\]", 300)
        c = start(seeder_ns, [os.path.join(BIN, "coordinator"), "--listen", "198.18.0.1:51830", "--seeder",
                              "http://198.18.0.1:51821", "--min-nodes", str(n)], os.path.join(work, "coordinator.log"))
        procs.append(c)
        wait_line(c, r"^\[READY\]", 60)
        tx0 = tx_bytes(seeder_ns, seeder_dev)
        t0 = time.monotonic()
        for i in range(1, n + 1):
            procs.append(start(ns_name(i), [os.path.join(BIN, "node"), "--coordinator", "http://198.18.0.1:51830",
                                            "--data-dir", os.path.join(work, f"node{i}"), "--name", f"n{i}",
                                            "--listen-addr", f"198.18.0.{i + 1}", "--threads", "1"],
                               os.path.join(work, f"node{i}.log")))
        wait_line(c, r"^\[SWARM_READY\]", 900)
        ready = time.monotonic() - t0
        # Replicas may still be copying: the makespan is when every node holds its shard.
        deadline = time.time() + 900
        while time.time() < deadline:
            out = sh("ip", "netns", "exec", seeder_ns, "curl", "-sf", "http://198.18.0.1:51830/status", check=False).stdout
            try:
                nodes = json.loads(out)["nodes"]
            except (ValueError, KeyError):
                nodes = []
            if len(nodes) == n and all(n_["shards"] and all(h["state"] == "loaded" for h in n_["shards"].values())
                                       for n_ in nodes):
                break
            time.sleep(0.2)
        else:
            sys.exit("the nodes never all loaded their shards")
        makespan = time.monotonic() - t0
        return makespan, ready, tx_bytes(seeder_ns, seeder_dev) - tx0
    finally:
        stop(procs)


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
    ap.add_argument("--shapes", default="4,8", help="node counts")
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
    try:
        shards_dir = os.path.join(work, "shards")
        subprocess.run([os.path.join(BIN, "shard_loader"), "split", "--model", model, "--shards", "4",
                        "--target-dir", shards_dir], check=True, capture_output=True)
        sizes = [os.path.getsize(os.path.join(shards_dir, f"shard-{k}.gguf")) for k in range(4)]
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", BRIDGE, "up")
        _, seeder_dev = add_host(0, args.us, args.d)
        for i in range(1, hosts):
            add_host(i, args.u, args.d)
        mbit = lambda b, rate: b * 8 / (rate * 1_000_000)
        for n in shapes:
            need = [sizes[(i - 1) % 4] for i in range(1, n + 1)]
            D = sum(sizes)
            bound = max(mbit(D, args.us), mbit(max(need), args.d), mbit(sum(need), args.us + n * args.u))
            ours, readies, uploads, http = [], [], [], []
            for r in range(args.runs):
                rundir = os.path.join(work, f"n{n}-r{r}")
                os.makedirs(rundir)
                t, ready, sent = run_swarm(rundir, shards_dir, n, seeder_dev)
                ours.append(t)
                readies.append(ready)
                uploads.append(sent / D)
                http.append(run_http(rundir, shards_dir, n, sizes))
                print(f"N={n} run {r + 1}: every node loaded {t:.1f} s (SWARM_READY {ready:.1f} s, seeder sent"
                      f" {sent / D:.2f} x D), HTTP {http[-1]:.1f} s", flush=True)
            results.append((n, bound, ours, http, uploads, readies))
    finally:
        teardown(hosts)
        if args.keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"4 shards ({sum(sizes)} bytes), u_s={args.us} u={args.u} d={args.d} Mbit/s, {args.runs} run(s) each")
    print("ours = nodes started until every node holds its shard(s); SWARM_READY comes earlier")
    print(f"{'shape':8s} {'bound s':>8s} {'ours s (min/med/max)':>22s} {'ours/bound':>10s} {'READY s':>8s} "
          f"{'HTTP s':>8s} {'HTTP/bound':>10s} {'seeder upload (x D)':>20s}")
    for n, bound, ours, http, uploads, readies in results:
        o, h, u = statistics.median(ours), statistics.median(http), statistics.median(uploads)
        print(f"N={n:<6d} {bound:8.1f} {min(ours):7.1f}/{o:5.1f}/{max(ours):5.1f} {o / bound:10.2f} "
              f"{statistics.median(readies):8.1f} {h:8.1f} {h / bound:10.2f} {u:20.2f}")


if __name__ == "__main__":
    main()
