#!/usr/bin/env python3
"""Cold and warm invoke latency per runtime, via the CLI and via curl, next to the bare
interpreter start-up measured in the same run.

    python3 bench/invoke_latency.py [--runs 20] [--no-build]

Builds the release binary, starts `nimbus serve` on a free port with a temp data dir,
deploys the hello examples, then for each runtime: cold (evict, then call) and warm
calls, N runs each, timed end to end on the client side. Prints a table and writes
bench/results/invoke_latency.json. Needs root (the sandbox) and curl.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "nimbus")
FUNCTIONS = [("python3", "hello", "/hello/ada"), ("node", "hello-node", "/hello-node/ada")]


def timed(cmd, env=None):
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ms = (time.perf_counter() - t) * 1000
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed: {out.stderr.decode()}")
    return ms, out.stdout


def median(xs):
    return round(statistics.median(xs), 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    curl = shutil.which("curl") or sys.exit("curl is needed")
    python = subprocess.run(
        ["python3", "-c", "import sys; print(sys.executable)"], capture_output=True, text=True
    ).stdout.strip()
    node = shutil.which("node")

    tmp = tempfile.mkdtemp(prefix="nimbus-bench-")
    env = dict(os.environ, NIMBUS_DATA_DIR=os.path.join(tmp, "data"))
    server = subprocess.Popen(
        [BIN, "serve", "--listen", "127.0.0.1:0", "--cgroup-parent", f"nimbus-bench-{os.getpid()}"],
        env=env, stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "server.log"), "w"),
    )
    try:
        line = server.stdout.readline().decode().strip()
        addr = line.rsplit("http://", 1)[-1]
        env["NIMBUS_SERVER"] = f"http://{addr}"
        for ex in ("python-hello", "node-hello"):
            timed([BIN, "deploy", os.path.join(ROOT, "examples", ex)], env)

        rows = {}
        # Baselines, in the same run.
        rows["baseline python3 -I -S -c pass"] = median(
            [timed([python, "-I", "-S", "-c", "pass"])[0] for _ in range(args.runs)])
        rows["baseline node -e 0"] = median([timed([node, "-e", "0"])[0] for _ in range(args.runs)])
        rows["baseline curl /health"] = median(
            [timed([curl, "-sf", f"http://{addr}/health"])[0] for _ in range(args.runs)])
        rows["baseline nimbus ls (CLI round trip)"] = median(
            [timed([BIN, "ls", "-o", "json"], env)[0] for _ in range(args.runs)])

        for runtime, name, path in FUNCTIONS:
            url = f"http://{addr}{path}"
            for via in ("cli", "curl"):
                cold, warm, server_init = [], [], []
                for _ in range(args.runs):
                    timed([BIN, "evict", name], env)
                    if via == "cli":
                        ms, out = timed([BIN, "invoke", name, "-d", '{"name":"ada"}', "-o", "json"], env)
                        server_init.append(json.loads(out)["initDurationMs"])
                    else:
                        ms, _ = timed([curl, "-sf", url])
                    cold.append(ms)
                    for _ in range(1):
                        if via == "cli":
                            ms, _ = timed([BIN, "invoke", name, "-d", '{"name":"ada"}'], env)
                        else:
                            ms, _ = timed([curl, "-sf", url])
                        warm.append(ms)
                rows[f"{runtime} cold via {via}"] = median(cold)
                rows[f"{runtime} warm via {via}"] = median(warm)
                if server_init:
                    rows[f"{runtime} cold init (server-side initDurationMs)"] = median(server_init)
        width = max(map(len, rows))
        print(f"median of {args.runs} runs, milliseconds, {os.cpu_count()} cores, {os.uname().release}")
        for k, v in rows.items():
            print(f"  {k:<{width}}  {v:8.2f}")
        os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
        with open(os.path.join(ROOT, "bench", "results", "invoke_latency.json"), "w") as f:
            json.dump({"runs": args.runs, "ms": rows}, f, indent=2)
    finally:
        server.terminate()
        server.wait(timeout=20)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
