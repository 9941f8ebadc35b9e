"""What the benchmark scripts share: waiting (bounded) for a process's output line, stopping
processes gracefully, min/median/max, and a local swarm on loopback."""
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request


def wait_line(proc, pattern, limit):
    """The first match of `pattern` in `proc`'s stdout within `limit` seconds, or exit."""
    deadline = time.time() + limit
    for line in proc.stdout:
        m = re.search(pattern, line)
        if m:
            return m
        if time.time() > deadline:
            break
    sys.exit(f"no line matching {pattern!r} within {limit} s")


def stop(procs):
    """SIGTERM every process still running, then wait up to 10 s each and kill the rest."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def stats(values):
    return min(values), statistics.median(values), max(values)


def start_local_swarm(repo, work, model, nodes=4, shards=4, coordinator_flags=(), threads=1, limit=300):
    """Split `model` into `shards`, start a seeder, a coordinator and `nodes` nodes on loopback
    (their logs in `work`; each node with `threads` llama.cpp threads, or its default, every core,
    for None), and wait until the coordinator serves. Returns (coordinator address, processes):
    stop them with `stop`."""
    bin_dir = os.path.join(repo, "target", "release")
    procs = []

    def start(args, log):
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(os.path.join(work, log), "w"), text=True)
        procs.append(p)
        return p

    try:
        target = os.path.join(work, "shards")
        subprocess.run([os.path.join(bin_dir, "shard_loader"), "split", "--model", model, "--shards", str(shards),
                        "--target-dir", target], check=True, capture_output=True)
        s = start([os.path.join(bin_dir, "server"), "--listen-addr", "127.0.0.1", "--port", "0", "--http-port", "0",
                   "--seed-dir", target, "--state-dir", os.path.join(work, "st")], "seeder.log")
        seeder = wait_line(s, r"^\[READY\] http=(\S+)", limit).group(1)
        c = start([os.path.join(bin_dir, "coordinator"), "--listen", "127.0.0.1:0", "--seeder", f"http://{seeder}",
                   "--min-nodes", str(nodes), "--cache-dir", os.path.join(work, "cache"), *coordinator_flags],
                  "coord.log")
        coord = wait_line(c, r"^\[READY\] http=(\S+)", limit).group(1)
        for i in range(nodes):
            start([os.path.join(bin_dir, "node"), "--coordinator", f"http://{coord}", "--data-dir",
                   os.path.join(work, f"n{i}"), "--listen-addr", "127.0.0.1",
                   *(["--threads", str(threads)] if threads else [])], f"n{i}.log")
        deadline = time.time() + limit
        while True:
            with urllib.request.urlopen(f"http://{coord}/status", timeout=10) as r:
                if json.load(r).get("serving") is True:
                    break
            if time.time() > deadline:
                sys.exit(f"the swarm never served (logs in {work})")
            time.sleep(0.2)
        return coord, procs
    except BaseException:
        stop(procs)
        raise
