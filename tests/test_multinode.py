"""Helios across a local multi-node Ray cluster started by cluster/local_cluster.py.

The script starts a head with no CPUs and two worker raylets (2 CPUs each, resources worker_a and
worker_b). A driver in a subprocess (this process already holds the session's Ray cluster, and one
process can join only one) deploys the demo family with 1 CPU per model replica, so the three
replicas cannot fit one worker, and prints which node each replica runs on. The test then sends
completions through the head's HTTP proxy and finally stops the cluster and checks that none of
its processes is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from conftest import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cluster" / "local_cluster.py"
sys.path.insert(0, str(SCRIPT.parent))
import local_cluster  # noqa: E402

MODELS = ["helios-demo-code-6l", "helios-demo-prose-12l", "helios-demo-mixed-16l"]

# Runs in the subprocess: deploy, then print {"nodes": {id: resources}, "replicas": {model: stats}}.
DRIVER = """
import json, sys
import ray
from ray import serve
from deployments.app import build_app

port, registry, models = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
ray.init(log_to_driver=False)  # RAY_ADDRESS and RAY_AUTH_MODE come from the environment
serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
serve.run(build_app({"registry": registry, "memory_budget": "64MiB", "max_tokens": 16, "num_cpus": 1,
                     "dtype": "float32", "policy": {"profile_requests": 10**6}}), name="helios", route_prefix="/")
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
replicas = {m: serve.get_deployment_handle(f"model-{m}", "helios").stats.remote().result(timeout_s=30)
            for m in models}
print("RESULT " + json.dumps({"nodes": nodes, "replicas": replicas}), flush=True)
"""


def run_driver(env: dict, port: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(port), str(ROOT / "models" / "registry.yaml"), *MODELS],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_replicas_spread_over_the_worker_nodes_and_serve():
    # Not pytest's tmp_path: Ray's Unix socket paths under this dir must stay below ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="helios-ray-", dir="/tmp"))
    pids: list[int] = []
    try:
        start = subprocess.run([sys.executable, str(SCRIPT), "start", "--dir", str(root), "--workers", "2",
                                "--worker-cpus", "2", "--timeout", "240"], capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, start.stderr[-3000:]
        state = json.loads(start.stdout.splitlines()[-1])
        pids = list(state["pids"].values())
        assert set(state["pids"]) == {"head", "worker_a", "worker_b"}
        port = free_port()
        result = run_driver({**os.environ, **state["env"]}, port)

        nodes = result["nodes"]
        head = [n for n, res in nodes.items() if "node:__internal_head__" in res]
        by_name = {name: n for n, res in nodes.items() for name in ("worker_a", "worker_b") if name in res}
        assert len(nodes) == 3 and len(head) == 1 and set(by_name) == {"worker_a", "worker_b"}
        assert nodes[head[0]].get("CPU", 0) == 0 and all(nodes[n]["CPU"] == 2 for n in by_name.values())

        placement = {m: s["node_id"] for m, s in result["replicas"].items()}
        assert set(placement) == set(MODELS)
        assert set(placement.values()) == set(by_name.values())  # both workers host replicas, the head none
        assert all(s["rss_bytes"] > 0 for s in result["replicas"].values())

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        for model in MODELS:  # every replica answers through the head's proxy
            out = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=8,
                                            temperature=0, extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 8 and out.model_extra["helios"]["model"] == model
        replica_pids = [s[k] for s in result["replicas"].values() for k in ("pid", "engine_pid")]
        assert all(local_cluster.alive(pid) for pid in replica_pids)
        pids += replica_pids  # stopping the cluster leaves no engine process behind either
    finally:
        killed = local_cluster.stop(root) if (root / local_cluster.STATE).exists() else []
        leftovers = local_cluster.processes_of(root)
        shutil.rmtree(root, ignore_errors=True)
    assert leftovers == [] and not any(local_cluster.alive(pid) for pid in pids)
    assert killed == []  # SIGTERM to the --block processes was enough: Ray stopped every process of its node
