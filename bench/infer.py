#!/usr/bin/env python3
"""Benchmark: generation speed of the 4-node pipeline on loopback against one llama.cpp process
with the whole model (`node reference`), same prompt, max_tokens and threads (1 per process),
in one run: min/median/max of RUNS for time-to-first-token and tokens/s, and the ratios. Both
are greedy, and the texts are checked equal (a fast wrong answer must not look good).

Pipeline tokens/s counts the tokens after the first over the time from the first streamed
chunk to the last; the reference reports the same split from inside the process.

With --tls the same runs go also through a second swarm whose coordinator serves HTTPS and
wss:// (a CA made with openssl), and the TLS/plain ratio is printed. The data channel between
stages is plain TCP either way (its TLS is not built yet).

usage: bench/infer.py [--runs 3] [--max-tokens 64] [--tls]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchlib import make_certificates, start_local_swarm, stats, stop, url_opener

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "target", "release")
PROMPT = "Once upon a time, in a land of many small machines that shared the work of one large model, there lived"


def stream(addr, max_tokens, tls=None):
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    scheme = "https" if tls else "http"
    req = urllib.request.Request(f"{scheme}://{addr}/v1/completions", body, {"content-type": "application/json"})
    t0 = time.monotonic()
    first = last = None
    text = []
    with url_opener(tls)(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.monotonic()
            chunk = json.loads(line[6:])["choices"][0].get("text", "")
            if chunk:
                first = first or now
                last = now
                text.append(chunk)
    return (first - t0) * 1000, last - first, "".join(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tls", action="store_true", help="also measure a swarm behind HTTPS / wss://")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "--workspace", "--bins"], cwd=REPO, check=True)
    model = subprocess.run([os.path.join(REPO, "deploy", "fetch-model.sh")], capture_output=True, text=True,
                           check=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="shardswarm-bench-infer.")
    procs = []
    try:
        coord, procs = start_local_swarm(REPO, work, model)
        stream(coord, 4)  # warm-up: first contexts, connections
        tls = tls_coord = None
        if args.tls:
            # A second swarm behind HTTPS, measured in turn with the plain one in every run.
            tls_work = os.path.join(work, "tls")
            os.makedirs(tls_work)
            tls = make_certificates(tls_work)
            tls_coord, tls_procs = start_local_swarm(REPO, tls_work, model, tls=tls)
            procs += tls_procs
            stream(tls_coord, 4, tls)
        ref_ttft, ref_tps, swarm_ttft, swarm_tps, tls_ttft, tls_tps = [], [], [], [], [], []
        for run in range(args.runs):
            out = subprocess.run([os.path.join(BIN, "node"), "reference", "--model", model, "--prompt", PROMPT,
                                  "--max-tokens", str(args.max_tokens), "--threads", "1", "--json"],
                                 capture_output=True, text=True, check=True)
            ref = json.loads(out.stdout)
            n = len(ref["token_ids"])
            ref_ttft.append(ref["first_token_ms"])
            ref_tps.append((n - 1) / (ref["rest_ms"] / 1000))
            ttft, rest_s, text = stream(coord, args.max_tokens)
            if text != ref["text"]:
                sys.exit(f"FAIL: the pipeline's text differs from the reference:\n{text!r}\n{ref['text']!r}")
            swarm_ttft.append(ttft)
            swarm_tps.append((n - 1) / rest_s)
            line = (f"run {run + 1}: reference {ref_tps[-1]:6.1f} tok/s, TTFT {ref_ttft[-1]:6.1f} ms | "
                    f"pipeline {swarm_tps[-1]:6.1f} tok/s, TTFT {swarm_ttft[-1]:6.1f} ms")
            if tls:
                ttft, rest_s, text = stream(tls_coord, args.max_tokens, tls)
                if text != ref["text"]:
                    sys.exit(f"FAIL: the TLS pipeline's text differs from the reference:\n{text!r}")
                tls_ttft.append(ttft)
                tls_tps.append((n - 1) / rest_s)
                line += f" | TLS {tls_tps[-1]:6.1f} tok/s, TTFT {tls_ttft[-1]:6.1f} ms"
            print(line, flush=True)
        print()
        print(f"SmolLM2-135M Q4_1, 4 stages on loopback, 1 thread per process, {args.max_tokens} tokens, "
              f"{args.runs} runs, texts equal")
        print(f"{'':24s} {'tok/s min/med/max':>22s} {'TTFT ms min/med/max':>24s}")
        for name, tps, ttft in (("node reference", ref_tps, ref_ttft), ("4-node pipeline", swarm_tps, swarm_ttft)):
            a, b = stats(tps), stats(ttft)
            print(f"{name:24s} {a[0]:6.1f} {a[1]:6.1f} {a[2]:6.1f}    {b[0]:6.1f} {b[1]:6.1f} {b[2]:6.1f}")
        print(f"ratio tok/s (median, pipeline / reference): {statistics.median(swarm_tps) / statistics.median(ref_tps):.2f}x"
              f" (goal >= 0.8)")
        print(f"ratio TTFT (median, pipeline / reference): {statistics.median(swarm_ttft) / statistics.median(ref_ttft):.2f}x")
        if args.tls:
            a, b = stats(tls_tps), stats(tls_ttft)
            print(f"{'4-node pipeline, TLS':24s} {a[0]:6.1f} {a[1]:6.1f} {a[2]:6.1f}    {b[0]:6.1f} {b[1]:6.1f} {b[2]:6.1f}")
            print(f"ratio tok/s (median, TLS / plain): {statistics.median(tls_tps) / statistics.median(swarm_tps):.3f}x"
                  f" (goal >= 0.95)")
    finally:
        stop(procs)
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
