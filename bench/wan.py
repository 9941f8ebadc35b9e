#!/usr/bin/env python3
"""Benchmark: the swarm across a WAN. Four nodes in two homes behind NAT routers, the rendezvous
host (seeder with its relay, coordinator) public: the topology of tests/tests/nat.rs, built in
network namespaces by the `netlab` binary (needs root). Each home router's link to the public
network runs through `delay_link`, a user-space forwarder (AF_PACKET) that delays every frame
by the same one-way delay in each direction: this kernel has no netem.

For each path between the homes (direct: a punched hole; relayed: UDP between the homes dropped,
so the relay on the public host carries it) and each one-way delay D (0, 10, 25 ms):
  - K=1: tokens/s of one streaming client, against the bound 1 / (sum of the route's one-way
    hop delays + t0), where the route's hops are the coordinator to stage 0, stage to stage,
    and the last stage's answer back to the coordinator (each crossing 0, 1 or 2 delayed
    links), and t0 is the time per token measured at D = 0 on the same swarm (compute and
    everything else that is not the delay);
  - K=8: aggregate tokens/s of eight clients at once (micro-batches in flight hide the delay:
    the coordinator keeps more of them in flight on a route whose hops are slow against its
    compute; the number it chose is printed).
Then relayed against direct at each D.

Goals (issue 25): K=1 >= 0.85x the bound; relayed >= 0.7x direct at 10 ms.

usage: sudo bench/wan.py [--delays 0,10,25] [--runs 3] [--max-tokens 32] [--clients 1,8]
                         [--paths direct,relayed]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

from benchlib import stop
from serve import round_of, status

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Lab:
    """A running `netlab`: the swarm in its namespaces, driven over the binary's stdin."""

    def __init__(self, block_udp, log):
        args = [os.path.join(REPO, "target", "release", "netlab")] + (["--block-udp"] if block_udp else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        deadline = time.time() + 600
        for line in self.proc.stdout:
            m = re.match(r"^\[READY\] http=(\S+)", line)
            if m:
                self.http = m.group(1)
                return
            if time.time() > deadline:
                break
        stop([self.proc])
        sys.exit(f"netlab never became ready (its log: {log.name})")

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer or answer.startswith("error"):
            sys.exit(f"netlab: {command!r} -> {answer!r}")
        return answer

    def close(self):
        # Closing stdin stops the swarm and deletes the namespaces; SIGTERM would leave them.
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            stop([self.proc])


def edges(addr):
    """Each route edge as "kind rtt": into each stage, then the answer lane."""
    route = status(addr).get("route") or []
    out = []
    for e in [s.get("edge") for s in route] + ([route[-1].get("answers_edge")] if route else []):
        e = e or {}
        rtt = e.get("rtt_us")
        out.append(f"{e.get('kind', '?')} {rtt / 1000:.1f}ms" if rtt is not None else e.get("kind", "?"))
    return out


def measure(addr, k, runs, max_tokens):
    """Median aggregate tokens/s of `runs` rounds of `k` clients."""
    return statistics.median(round_of(addr, k, max_tokens)[0] for _ in range(runs))


def run_path(name, block_udp, args, delays, ks, work):
    """{delay: {"links": [...], "edges": [...], K: tok/s}} for one path between the homes."""
    print(f"== {name}: starting the swarm in namespaces (netlab{' --block-udp' if block_udp else ''})", flush=True)
    with open(os.path.join(work, f"netlab-{name}.log"), "w") as log:
        lab = Lab(block_udp, log)
    results = {}
    try:
        for delay in delays:
            lab.ask(f"delay {delay}")
            round_of(lab.http, 1, 8)  # warm the lanes (and the path estimates) at this delay
            row = {"links": [int(x) for x in lab.ask("links").strip("[]").split(",")]}
            for k in ks:
                row[k] = measure(lab.http, k, args.runs, args.max_tokens)
                row[f"mb{k}"] = status(lab.http).get("batching", {}).get("micro_batches", "?")
            row["edges"] = edges(lab.http)
            results[delay] = row
            print(f"  {delay:>4} ms one way: " + ", ".join(f"K={k} {row[k]:.1f} tok/s ({row[f'mb{k}']} in flight)"
                                                          for k in ks)
                  + f"; edges: {', '.join(row['edges'])}", flush=True)
    finally:
        lab.close()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delays", default="0,10,25", help="one-way delays in ms (the first should be 0: t0)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--paths", default="direct,relayed")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/wan.py builds network namespaces: run it as root")
    delays = [float(d) for d in args.delays.split(",")]
    ks = [int(k) for k in args.clients.split(",")]
    if delays[0] != 0 or 1 not in ks:
        sys.exit("--delays must start at 0 and --clients include 1: the bound needs t0, K=1 at 0 ms")
    paths = args.paths.split(",")
    subprocess.run(["cargo", "build", "--release", "-q", "--workspace", "--bins"], cwd=REPO, check=True)
    work = os.path.join("/tmp", f"shardswarm-bench-wan.{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    print(f"(logs in {work})")
    found = {p: run_path(p, p == "relayed", args, delays, ks, work) for p in paths}

    print(f"\nmax_tokens {args.max_tokens}, medians of {args.runs} runs; one-way delay D on each home's link;"
          " hops crossing 0/1/2 delayed links")
    print("K>1 bound: min(K x the K=1 bound (each sequence waits for its own token), K's tok/s at 0 ms)")
    print(f"{'path':<8} {'D ms':>5} {'sum hop delays ms':>17} {'t0 ms':>6} {'bound tok/s':>11} {'K=1 tok/s':>9}"
          f" {'K=1/bound':>9}" + "".join(f" {'K=' + str(k) + ' tok/s':>10} {'/bound':>7}" for k in ks if k != 1))
    for p, rows in found.items():
        t0 = 1 / rows[delays[0]][1]
        for d, row in rows.items():
            hops = sum(row["links"]) * d / 1000
            bound = 1 / (hops + t0)
            print(f"{p:<8} {d:>5g} {hops * 1000:>17.0f} {t0 * 1000:>6.1f} {bound:>11.1f} {row[1]:>9.1f}"
                  f" {row[1] / bound:>8.2f}x" + "".join(
                      f" {row[k]:>10.1f} {row[k] / min(k * bound, rows[delays[0]][k]):>6.2f}x" for k in ks if k != 1))
    if "direct" in found and "relayed" in found:
        for d in delays:
            print(f"relayed/direct at {d:g} ms: " + ", ".join(
                f"K={k} {found['relayed'][d][k] / found['direct'][d][k]:.2f}x" for k in ks))
    worst = min(r[1] * (sum(r["links"]) * d / 1000 + 1 / rows[delays[0]][1])
                for rows in found.values() for d, r in rows.items())
    print(f"\nworst K=1 against its bound: {worst:.2f}x (goal >= 0.85)")
    if "direct" in found and "relayed" in found and 10 in delays:
        print(f"relayed/direct K=1 at 10 ms: {found['relayed'][10][1] / found['direct'][10][1]:.2f}x (goal >= 0.7)")


if __name__ == "__main__":
    main()
