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


def make_certificates(work):
    """A CA and a certificate for 127.0.0.1 signed by it (openssl), in `work`:
    {"ca", "cert", "key"} paths."""
    subprocess.run(["sh", "-c", """set -e
        ec='-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes'
        openssl req -x509 $ec -keyout ca.key -out ca.pem -days 2 -subj '/CN=bench CA' 2>/dev/null
        openssl req $ec -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
        echo subjectAltName=IP:127.0.0.1 > san.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
            -days 2 -extfile san.ext 2>/dev/null"""], cwd=work, check=True)
    return {k: os.path.join(work, f) for k, f in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"))}


def url_opener(tls):
    """urlopen for the coordinator: trusting `tls["ca"]` when given."""
    if not tls:
        return urllib.request.urlopen
    import ssl
    context = ssl.create_default_context(cafile=tls["ca"])
    return lambda *a, **k: urllib.request.urlopen(*a, context=context, **k)


def bin_dir_of(repo):
    """Our binaries: $SHARDSWARM_BIN_DIR (another build's, to compare two builds in one run),
    else the repository's release build."""
    return os.environ.get("SHARDSWARM_BIN_DIR") or os.path.join(repo, "target", "release")


def start_local_swarm(repo, work, model, nodes=4, shards=4, coordinator_flags=(), threads=1, limit=300, tls=None,
                      node_flags=(), seeder_flags=()):
    """Split `model` into `shards`, start a seeder, a coordinator and `nodes` nodes on loopback
    (their logs in `work`; each node with `threads` llama.cpp threads, or its default, measured,
    for None, and `node_flags`; the seeder with `seeder_flags`), and wait until the coordinator serves. With `tls` (from `make_certificates`) the
    coordinator serves HTTPS and wss://. Returns (coordinator address, processes): stop them
    with `stop`."""
    bin_dir = bin_dir_of(repo)
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
                   "--seed-dir", target, "--state-dir", os.path.join(work, "st"), *seeder_flags], "seeder.log")
        seeder = wait_line(s, r"^\[READY\] http=(\S+)", limit).group(1)
        tls_flags = ["--tls-cert", tls["cert"], "--tls-key", tls["key"]] if tls else []
        scheme = "https" if tls else "http"
        c = start([os.path.join(bin_dir, "coordinator"), "--listen", "127.0.0.1:0", "--seeder", f"http://{seeder}",
                   "--min-nodes", str(nodes), "--cache-dir", os.path.join(work, "cache"), *tls_flags,
                   "--state-dir", os.path.join(work, "coordinator-state"),
                   *coordinator_flags],
                  "coord.log")
        coord = wait_line(c, r"^\[READY\] http=(\S+)", limit).group(1)
        for i in range(nodes):
            start([os.path.join(bin_dir, "node"), "--coordinator", f"{scheme}://{coord}",
                   *(["--ca", tls["ca"]] if tls else []), "--data-dir",
                   os.path.join(work, f"n{i}"), "--listen-addr", "127.0.0.1",
                   *(["--threads", str(threads)] if threads else []), *node_flags], f"n{i}.log")
        deadline = time.time() + limit
        while True:
            with url_opener(tls)(f"{scheme}://{coord}/status", timeout=10) as r:
                if json.load(r).get("serving") is True:
                    break
            if time.time() > deadline:
                sys.exit(f"the swarm never served (logs in {work})")
            time.sleep(0.2)
        return coord, procs
    except BaseException:
        stop(procs)
        raise
