"""A local multi-node Ray cluster on one machine: a head that runs no replicas and N worker raylets.

    python cluster/local_cluster.py start [--workers 2] [--worker-cpus 2] [--dir DIR]
    export RAY_ADDRESS=<printed address> RAY_AUTH_MODE=token   # the script prints this line
    serve run serve_config.yaml                                # or: helios serve
    python cluster/local_cluster.py stop DIR

Every node is a `ray start --block` process (Ray stops that node's processes when it gets SIGTERM)
with its own `--temp-dir` root and free ports, so the cluster never touches another Ray cluster on
the machine. `DIR/cluster.json` records the address and the `--block` pids; `stop` terminates exactly
those, then any Ray process left whose arguments name DIR (e.g. a worker whose raylet was killed).
Never use `ray stop` here: it stops every Ray cluster of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATE = "cluster.json"
READY = "Ray runtime started"
OBJECT_STORE_BYTES = 100 << 20  # per node; Ray's default (30% of RAM per node) is far too much x3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Ports Ray would otherwise take at fixed defaults (52365, ...) that another cluster may hold."""
    flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [arg for flag in flags for arg in (flag, str(free_port()))]


def auth_mode() -> str:
    return os.environ.get("RAY_AUTH_MODE", "token")


def worker_names(n: int) -> list[str]:
    return [f"worker_{string.ascii_lowercase[i]}" for i in range(n)]


def _launch(root: Path, name: str, args: list[str]) -> int:
    # `ray start` of this Python's Ray (the `ray` on PATH may be another install, or a pyenv shim).
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
           "--temp-dir", str(root / "ray"), "--object-store-memory", str(OBJECT_STORE_BYTES), *args, *node_ports()]
    # Ray 2.60's head turns token auth on by default but a joining node does not: say it to every
    # node (the token is the user's ~/.ray/auth_token, which the head creates if missing).
    # `stop` takes the whole cluster down: no point in Ray's 30 s drain of each node on SIGTERM.
    # Serve's throughput-optimised mode, as `helios serve` runs it (deployments/launch.py).
    env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", **os.environ,
           "RAY_AUTH_MODE": auth_mode()}
    # Own session: a Ctrl-C in the user's shell does not reach the cluster; `stop` does.
    with open(root / f"{name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    return proc.pid


class NodeExited(RuntimeError):
    pass


def _wait_started(root: Path, name: str, pid: int, deadline: float) -> None:
    log = root / f"{name}.log"
    while time.monotonic() < deadline:
        if not alive(pid):
            raise NodeExited(f"{name} exited while starting; see {log}:\n{log.read_text(errors='replace')[-2000:]}")
        if READY in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not start in time; see {log}:\n{log.read_text(errors='replace')[-2000:]}")


def _start_node(root: Path, state: dict, name: str, make_args, deadline: float, attempts: int = 3) -> None:
    """Ray gives a new raylet a fixed 30 s to register with the GCS, which a busy machine can miss;
    `ray start` then exits (its processes die with it): try again, with fresh ports."""
    for attempt in range(1, attempts + 1):
        state["pids"][name] = _launch(root, name, make_args())
        _save(root, state)
        try:
            return _wait_started(root, name, state["pids"][name], deadline)
        except NodeExited:
            if attempt == attempts:
                raise
            print(f"{name} failed to start (attempt {attempt} of {attempts}); retrying", file=sys.stderr)


def start(root: Path, workers: int, worker_cpus: int, timeout: float = 300) -> dict:
    """Start the head and `workers` worker nodes, one after another, all within `timeout` seconds;
    returns the state also written to root/cluster.json."""
    deadline = time.monotonic() + timeout
    root.mkdir(parents=True, exist_ok=True)
    state: dict = {"dir": str(root), "pids": {}, "resources": {}}

    def head_args() -> list[str]:
        port = free_port()
        state["address"] = f"127.0.0.1:{port}"
        state["env"] = {"RAY_ADDRESS": state["address"], "RAY_AUTH_MODE": auth_mode()}  # what a driver needs
        return ["--head", "--port", str(port), "--num-cpus", "0", "--include-dashboard", "false",
                "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port())]

    try:
        _start_node(root, state, "head", head_args, deadline)
        for name in worker_names(workers):
            state["resources"][name] = {name: 1}
            _start_node(root, state, name, lambda name=name: [
                "--address", state["address"], "--num-cpus", str(worker_cpus),
                "--resources", json.dumps(state["resources"][name])], deadline)
    except BaseException:
        if (root / STATE).exists():
            stop(root)
        raise
    return state


def _save(root: Path, state: dict) -> None:
    (root / STATE).write_text(json.dumps(state, indent=2))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we have


def processes_of(root: Path) -> list[int]:
    """Pids of live Ray processes of the cluster in root: Ray passes every process it starts (GCS,
    raylet, agents, workers) a `--flag=<root>/ray...` argument, which a user's `tail -f` of a log has
    not. Linux only (/proc); empty elsewhere."""
    needle, pids = f"={root / 'ray'}".encode(), []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "cmdline").read_bytes() and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
        except OSError:
            continue  # exited meanwhile, or not ours to read
    return [pid for pid in pids if alive(pid)]


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def stop(root: Path, timeout: float = 30) -> list[int]:
    """Stop the cluster started in root: SIGTERM to its `--block` processes (workers first), then
    SIGTERM, and SIGKILL if need be, to any process of it still alive. Returns the pids that needed
    SIGKILL."""
    state_file = root / STATE
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} does not exist: no cluster was started in {root}")
    pids = list(json.loads(state_file.read_text())["pids"].values())[::-1]
    _signal_all(pids, signal.SIGTERM)
    left = _wait_gone(pids, timeout)
    stragglers = [p for p in processes_of(root) if p not in left] + left
    _signal_all(stragglers, signal.SIGTERM)
    killed = _wait_gone(stragglers, 5)
    _signal_all(killed, signal.SIGKILL)
    if _wait_gone(killed, 5):
        raise RuntimeError(f"processes of {root} survived SIGKILL: {killed}")
    return killed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("start", help="start a head (no CPUs) and worker raylets; print the address")
    up.add_argument("--workers", type=int, default=2, help="worker nodes (resources worker_a, worker_b, ...)")
    up.add_argument("--worker-cpus", type=int, default=2, help="logical CPUs of each worker node")
    up.add_argument("--dir", type=Path, default=None, help="state and Ray temp dir (default: a new /tmp dir)")
    up.add_argument("--timeout", type=float, default=300, help="seconds the whole cluster may take to start")
    down = sub.add_parser("stop", help="stop the cluster started in DIR (only that one)")
    down.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "start":
        if not 1 <= args.workers <= 26:
            parser.error("--workers must be in [1, 26]")
        # A short absolute path: Ray's Unix socket paths under it must stay below ~107 bytes.
        root = (args.dir or Path(tempfile.mkdtemp(prefix="helios-ray-", dir="/tmp"))).resolve()
        state = start(root, args.workers, args.worker_cpus, args.timeout)
        print(json.dumps(state), flush=True)
        print(f"export {' '.join(f'{k}={v}' for k, v in state['env'].items())}\n"
              f"stop it with: python {sys.argv[0]} stop {root}", file=sys.stderr)
    else:
        killed = stop(args.dir.resolve())
        print(f"stopped {args.dir}" + (f" (killed leftovers: {killed})" if killed else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
