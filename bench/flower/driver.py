"""Runs the Flower arm in deployment mode on 127.0.0.1: one SuperLink, one SuperNode per
node (partition-id = the node's CSV), then `flwr run` of this app. Prints the results
JSON (accuracy after each round, seconds per round) on stdout.

usage: python driver.py --data-dir DIR --nodes N --rounds R --init MODEL.safetensors
                        [--local-epochs E] [--lr LR] [--batch-size B] [--seed S] --work DIR
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {seconds}s")


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--data-dir", required=True)
    a.add_argument("--nodes", type=int, required=True)
    a.add_argument("--rounds", type=int, required=True)
    a.add_argument("--init", required=True)
    a.add_argument("--local-epochs", type=int, default=1)
    a.add_argument("--lr", type=float, default=0.05)
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--work", required=True)
    args = a.parse_args()
    bindir = os.path.dirname(sys.executable)
    os.makedirs(args.work, exist_ok=True)
    home = os.path.join(args.work, "flwr-home")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, FLWR_HOME=home, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    port = free_port()
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f'[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    logs = open(os.path.join(args.work, "flower.log"), "w")
    procs = []
    try:
        procs.append(subprocess.Popen(
            [os.path.join(bindir, "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            stdout=logs, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        wait_port(port, 60)
        for i in range(args.nodes):
            procs.append(subprocess.Popen(
                [os.path.join(bindir, "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--port", str(free_port()), "--node-config", f"partition-id={i}"],
                stdout=logs, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        results = os.path.join(args.work, "results.json")
        if os.path.exists(results):
            os.remove(results)
        config = " ".join([
            f"num-server-rounds={args.rounds}", f"local-epochs={args.local_epochs}", f"lr={args.lr}",
            f"batch-size={args.batch_size}", f"nodes={args.nodes}", f"seed={args.seed}",
            f'data-dir="{os.path.abspath(args.data_dir)}"', f'init-model="{os.path.abspath(args.init)}"',
            f'results="{results}"',
        ])
        started = time.time()
        subprocess.run([os.path.join(bindir, "flwr"), "run", HERE, "bench", "--run-config", config],
                       stdout=logs, stderr=subprocess.STDOUT, env=env, check=True, timeout=120)
        deadline = started + 60 + 120 * args.rounds
        while not os.path.exists(results):
            if time.time() > deadline:
                raise SystemExit(f"no results after {time.time() - started:.0f}s; see {logs.name}")
            time.sleep(0.5)
        time.sleep(0.2)
        with open(results) as f:
            out = json.load(f)
        out["wallSeconds"] = time.time() - started
        print(json.dumps(out))
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
