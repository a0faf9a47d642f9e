"""`helios serve`: start a local Ray cluster and the Helios app from a Serve config file, print the URL.

Equivalent to `serve run serve_config.yaml`, with progress lines a first-time user can follow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import yaml


def _say(message: str) -> None:
    print(f"[helios] {message}", file=sys.stderr, flush=True)


def serve_from_config(config: str = "serve_config.yaml", host: str | None = None, port: int | None = None,
                      block: bool = True) -> str:
    """Deploy the config's first application; returns its base URL (blocks until Ctrl-C if `block`)."""
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"Serve config {path} does not exist")
    doc = yaml.safe_load(path.read_text())
    try:
        [application] = doc["applications"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: expected exactly one entry under 'applications'") from None
    http = doc.get("http_options", {})
    host, port = host or http.get("host", "127.0.0.1"), port or http.get("port", 8000)

    name = application.get("name", "helios")
    if block:
        def interrupt(*_):  # SIGTERM too: leave no Ray processes behind
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
    _say(f"starting a local Ray cluster and deploying {application['import_path']} "
         "(loading the models; about a minute on 2 CPU cores)")
    started = time.perf_counter()
    try:
        url = start_app(application.get("args", {}), host, port, name, application.get("route_prefix", "/"))
        _say(f"ready in {time.perf_counter() - started:.0f} s: OpenAI API at {url}/v1 (Ctrl-C stops)")
        _say(f"try: curl {url}/v1/completions -H 'Content-Type: application/json' "
             "-d '{\"model\": \"helios\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 32}'")
        while block:
            time.sleep(3600)
    except KeyboardInterrupt:  # while starting too: a Ctrl-C then must not leave the cluster behind
        _say("shutting down")
        stopped = time.perf_counter()
        stop(name)
        _say(f"stopped in {time.perf_counter() - stopped:.0f} s")
        url = ""
    return url


# What Serve's processes read when they start:
# - throughput-optimised mode: direct ingress and gRPC between Serve's processes, user code and
#   handle routers on the caller's event loop. It raised the Serve path's tokens/s 1.3-1.7x at
#   closed:64 here (docs/benchmarks.md).
# - the proxy's ready check: Serve kills a proxy not ready within 5 s, and `serve.start` then
#   fails; with both cores busy the proxy took longer to start here.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


@contextlib.contextmanager
def serve_environment():
    """SERVE_ENV in the environment while a Ray cluster starts, so Serve's processes inherit it
    (a value the user set wins). This process and its later children keep Serve's defaults: in
    throughput mode a DeploymentHandle needs a running event loop, which a plain Python driver does
    not have."""
    added = [name for name in SERVE_ENV if name not in os.environ]
    os.environ.update({name: SERVE_ENV[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            del os.environ[name]


def start_app(args: dict, host: str = "127.0.0.1", port: int | None = 8000, name: str = "helios",
              route_prefix: str = "/") -> str:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, Serve's HTTP proxy on host:port (None: a free
    port) and `build_app(args)`; returns the app's base URL once it is ready. `stop()` tears it all down."""
    import ray
    from ray import serve

    from .app import build_app

    global _own_cluster
    if port is None:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    if not ray.is_initialized():
        _own_cluster = "RAY_ADDRESS" not in os.environ  # else ray.init joins that cluster
    with serve_environment():  # a cluster joined with RAY_ADDRESS keeps what it was started with
        ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


_own_cluster = False  # whether start_app started the Ray cluster (rather than joining one)


def stop(name: str = "helios") -> None:
    """Tear down what `start_app` started: the whole local cluster it started, or only its
    application `name` on a cluster it joined.

    A cluster of our own is shut down directly, not through `serve.shutdown()` first: its Serve
    processes die with it, and Serve's graceful shutdown of every replica took over two minutes
    with both cores busy (Ray's workers run at niceness 15)."""
    global _own_cluster
    import ray
    from ray import serve

    if _own_cluster:
        _own_cluster = False
    elif ray.is_initialized():
        serve.delete(name)
    ray.shutdown()
