#!/usr/bin/env python3
"""Benchmark: seeding a 1 GiB file over loopback to aria2c, our `server` against an aria2c
seeder, in one run, plus our web seed over plain HTTP (curl).

For each run it prints the *transfer rate* (the downloader's bytes written, sampled from
/proc/PID/io every ~10 ms, from its first MiB to its last byte: aria2c's wall time includes
~1-1.7 s before the first byte and ~2.3 s after the last, see shared/bench-notes.md) and the
seeder's CPU-seconds per GiB sent (utime+stime from /proc/PID/stat before and after). Each
side runs RUNS times; min/median/max and the ratios of medians are printed. Every download is
checked byte for byte (cmp) so a fast wrong answer cannot look good.

usage: bench/seed.py [--size-mib 1024] [--runs 3] [--piece-log2 20]
Loopback only; needs aria2c, curl, and the release build (it builds it).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import stats, stop, wait_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "target", "release")
TICK = os.sysconf("SC_CLK_TCK")
ARIA_COMMON = [
    "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false",
    "--enable-peer-exchange=false", "--disable-ipv6=true", "--interface=127.0.0.1",
    "--file-allocation=none", "--console-log-level=warn", "--summary-interval=0",
    "--allow-overwrite=true", "--auto-file-renaming=false",
]


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start_server(seed_dir, state_dir, *extra):
    p = subprocess.Popen(
        [os.path.join(BIN, "server"), "--listen-addr", "127.0.0.1", "--port", "0", "--http-port", "0",
         "--seed-dir", seed_dir, "--state-dir", state_dir, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        m = wait_line(p, r"^\[READY\] http=(\S+) peer=(\S+)", 300)
    except SystemExit:
        p.kill()
        raise
    return p, m.group(1)


def measure_download(cmd, size, seeder_pid):
    """Run a downloader; return (MiB/s between its first MiB and last byte, seeder CPU-s/GiB,
    downloader CPU-s/GiB)."""
    cpu0 = cpu_seconds(seeder_pid)
    d = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_first = t_last = None
    deadline = time.time() + 600
    status = usage = None
    while time.time() < deadline:
        pid, status, usage = os.wait4(d.pid, os.WNOHANG)
        if pid:
            break
        try:
            wchar = int(re.search(r"wchar: (\d+)", open(f"/proc/{d.pid}/io").read()).group(1))
        except (OSError, AttributeError):
            wchar = 0
        now = time.monotonic()
        if t_first is None and wchar >= 1 << 20:
            t_first = now
        if t_last is None and wchar >= size:
            t_last = now
        time.sleep(0.01)
    else:
        d.kill()
        sys.exit(f"download timed out: {' '.join(cmd)}")
    d.returncode = os.waitstatus_to_exitcode(status)
    if t_first is not None and t_last is None:
        t_last = time.monotonic()  # it finished between two samples: an upper bound
    cpu = cpu_seconds(seeder_pid) - cpu0
    if d.returncode != 0 or t_first is None or t_last <= t_first:
        sys.exit(f"download failed: {' '.join(cmd)} (exit {d.returncode})")
    gib = size / (1 << 30)
    return (size - (1 << 20)) / (1 << 20) / (t_last - t_first), cpu / gib, (usage.ru_utime + usage.ru_stime) / gib


def check_same(a, b):
    if subprocess.run(["cmp", "-s", a, b]).returncode != 0:
        sys.exit(f"FAIL: {b} differs from {a}")
    os.remove(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--piece-log2", type=int, default=20)
    args = ap.parse_args()
    for tool in ("aria2c", "curl", "cmp"):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing (apt-get install aria2 curl)")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "seeder", "-p", "torrents"], cwd=REPO, check=True)
    size = args.size_mib << 20
    work = tempfile.mkdtemp(prefix="shardswarm-bench-seed.")
    try:
        seed, other, dl, state = (os.path.join(work, d) for d in ("seed", "other", "dl", "state"))
        for d in (seed, other, dl, state):
            os.makedirs(d)
        src = os.path.join(seed, "big.gguf")
        print(f"making a {args.size_mib} MiB file in {work}", flush=True)
        with open("/dev/urandom", "rb") as r, open(src, "wb") as w:
            for _ in range(args.size_mib):
                w.write(r.read(1 << 20))
        # aria2c's copy: same bytes and name (same info hash), in a dir our server does not serve.
        shutil.copy(src, os.path.join(other, "big.gguf"))
        piece = 1 << args.piece_log2
        sl = os.path.join(BIN, "shard_loader")

        # Ours: our server seeds and tracks; aria2c downloads over the peer wire only.
        server, http = start_server(seed, os.path.join(state, "ours"))
        ours_t = os.path.join(work, "ours.torrent")
        subprocess.run(["curl", "-sf", "-o", ours_t, f"http://{http}/torrents/big.gguf.torrent"], check=True)
        subprocess.run([sl, "torrent", "edit", ours_t, "-a", f"http://{http}/announce"],
                       check=True, capture_output=True)
        # The baseline: an aria2c seeder, tracked by a second server of ours (--open-tracker,
        # empty seed dir) so both sides find peers the same way.
        empty = os.path.join(work, "empty")
        os.makedirs(empty)
        tracker, thttp = start_server(empty, os.path.join(state, "tracker"), "--open-tracker")
        base_t = os.path.join(work, "base.torrent")
        subprocess.run([sl, "torrent", "create", os.path.join(other, "big.gguf"), "-l", str(piece), "--no-date",
                        "-a", f"http://{thttp}/announce", "-o", base_t], check=True, capture_output=True)
        if piece != int(re.search(r"piece length: (\d+)", subprocess.run(
                [sl, "torrent", "show", ours_t], capture_output=True, text=True).stdout).group(1)):
            print(f"note: our server chose its own piece length; the baseline uses 2^{args.piece_log2}")
        aria_seed = subprocess.Popen(
            ["aria2c", *ARIA_COMMON, "-d", other, "--bt-seed-unverified=true", "--seed-ratio=0.0",
             "--seed-time=60", "--listen-port=6990-6999", base_t],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)  # aria2c's first announce; the baseline seeder has no readiness signal

        results = {"ours": [], "aria2c": [], "webseed": []}
        for run in range(args.runs):
            for name, torrent, seeder_pid in (("ours", ours_t, server.pid), ("aria2c", base_t, aria_seed.pid)):
                cmd = ["aria2c", *ARIA_COMMON, "-d", dl, "--seed-time=0", "--bt-stop-timeout=120", torrent]
                rate, cpu, dcpu = measure_download(cmd, size, seeder_pid)
                check_same(src, os.path.join(dl, "big.gguf"))
                results[name].append((rate, cpu))
                print(f"run {run + 1} {name:7s} {rate:7.0f} MiB/s  seeder {cpu:5.2f} CPU-s/GiB"
                      f"  downloader {dcpu:5.2f} CPU-s/GiB", flush=True)
            out = os.path.join(dl, "web.bin")
            rate, cpu, dcpu = measure_download(["curl", "-sf", "-o", out, f"http://{http}/seed/big.gguf"],
                                               size, server.pid)
            check_same(src, out)
            results["webseed"].append((rate, cpu))
            print(f"run {run + 1} webseed {rate:7.0f} MiB/s  seeder {cpu:5.2f} CPU-s/GiB"
                  f"  downloader {dcpu:5.2f} CPU-s/GiB", flush=True)
        aria_seed.kill()
        stop([tracker, server])

        print()
        print(f"{args.size_mib} MiB over loopback, {args.runs} runs, {os.cpu_count()} cores")
        print(f"{'seeder -> downloader':34s} {'transfer MiB/s (min/med/max)':>30s} {'seeder CPU-s/GiB (min/med/max)':>32s}")
        label = {"ours": "shardswarm server -> aria2c", "aria2c": "aria2c seeder -> aria2c",
                 "webseed": "shardswarm /seed -> curl (HTTP)"}
        med = {}
        for k in ("ours", "aria2c", "webseed"):
            r = stats([x[0] for x in results[k]])
            c = stats([x[1] for x in results[k]])
            med[k] = (r[1], c[1])
            print(f"{label[k]:34s} {r[0]:9.0f} {r[1]:9.0f} {r[2]:9.0f}   {c[0]:9.2f} {c[1]:9.2f} {c[2]:9.2f}")
        print(f"ratio transfer rate, ours / aria2c seeder: {med['ours'][0] / med['aria2c'][0]:.2f}x (goal >= 0.9)")
        print(f"ratio CPU-s/GiB, ours / aria2c seeder:     {med['ours'][1] / med['aria2c'][1]:.2f}x (goal <= 1.0)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
