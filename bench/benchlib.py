"""What the benchmark scripts share: waiting (bounded) for a process's output line, stopping
processes gracefully, and min/median/max."""
import re
import signal
import statistics
import subprocess
import sys
import time


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
