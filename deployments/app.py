"""The Helios application: one ModelReplica deployment per registry model, the router, the ingress.

`serve run serve_config.yaml` calls `build_app(args)` with the config's `args`:

    registry          registry YAML (default registry.yaml: the demo family). A path that exists
                      (relative to the working directory, or absolute) is used as is; otherwise
                      `NAME` or `models/NAME` is the file NAME of the package helios_models (the
                      checkout's models/ directory), so the shipped configs work from anywhere.
                      Its `pull:` models missing here are pulled first (helios pull, progress on stderr)
    memory_budget     bytes or "96MiB" for each model replica's weights + KV (default 64MiB)
    max_model_len     tokens per sequence (default 1024)
    max_tokens        the API's max_tokens limit (default 512)
    device, dtype     "auto" by default: the GPU if there is one; bfloat16 where the replica's device
                      computes it natively and faster, else float32 (helios_core/dtypes.py); it
                      replaces the registry entries' own dtype
    num_gpus          per model replica (default 0: CPU); num_cpus likewise (default 0.5)
    threads           torch threads per model replica (default 1)
    engine_niceness   the niceness each model replica's engine process asks for (default 0, above
                      Ray's workers at 15, where the process may lower it: CAP_SYS_NICE; null keeps
                      15); on a CPU node the engine then wins the cores from Serve's processes
    threshold         every model's default exit threshold (set through the replicas' Serve
                      user_config, so `serve` can change it live; default: the registry's)
    policy            PolicyConfig fields, e.g. {"slo": "throughput", "mode": "global"}
    api_key           require "Authorization: Bearer <key>" (default: none)
    max_body_bytes    the largest request body the API reads (default 1 MiB; larger: 413)
    max_ongoing_requests, max_queued_requests
                      per model replica (default 256 / 512): streams a replica serves at once, and
                      requests that may wait for it; beyond that the client gets 503 + Retry-After
    stream_max_hold_s the longest a busy replica holds a stream's tokens to send them together
                      (default 0.1; 0 sends every token at once): fewer stream items, less CPU per
                      token, burstier inter-token times (docs/serving.md)
    autoscaling       Serve autoscaling_config for each model deployment, e.g. {"min_replicas": 1,
                      "max_replicas": 4}; target_ongoing_requests defaults to the sequences of
                      expected_seq_len tokens a replica's paged KV cache holds at full depth (from the
                      registry's memory plan), so replicas are added when requests would otherwise
                      queue for KV blocks
    expected_seq_len  prompt + output tokens of a typical request, for that default (default:
                      max_model_len, the most a request can take)
    block_size        positions per KV block (default 64)
    max_num_seqs      sequences a replica's engine runs at once, at most (default 256)
    enable_prefix_caching
                      reuse the KV blocks of prompt prefixes seen before (default true)
"""

from __future__ import annotations

from ray.serve import Application

import helios_models
from helios_core.memory_size import parse_bytes
from helios_core.engine import EngineConfig
from helios_core.kv_cache import MemoryBudgetError
from helios_core.policy import Registry
from helios_core.pull import pull_registry

from .ingress import MAX_BODY_BYTES, Ingress
from .launch import say
from .replica import ENGINE_NICENESS, MAX_HOLD_S, ModelReplica
from .router import Router


def build_app(args: dict | None = None) -> Application:
    args = dict(args or {})
    registry = str(helios_models.resolve(args.pop("registry", "registry.yaml")))
    budget = args.pop("memory_budget", "64MiB")
    budget = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    max_model_len = int(args.pop("max_model_len", 1024))
    max_tokens = int(args.pop("max_tokens", 512))
    device, dtype = args.pop("device", "auto"), args.pop("dtype", "auto")
    threads = int(args.pop("threads", 1))
    niceness = args.pop("engine_niceness", ENGINE_NICENESS)
    niceness = None if niceness is None else int(niceness)
    if niceness is not None and not -20 <= niceness <= 19:
        raise ValueError(f"engine_niceness must be in [-20, 19] or null, got {niceness}")
    hold = float(args.pop("stream_max_hold_s", MAX_HOLD_S))
    if hold < 0:
        raise ValueError(f"stream_max_hold_s must be >= 0, got {hold}")
    actor = {"num_gpus": float(args.pop("num_gpus", 0)), "num_cpus": float(args.pop("num_cpus", 0.5))}
    policy, api_key = args.pop("policy", None), args.pop("api_key", None)
    autoscaling, threshold = args.pop("autoscaling", None), args.pop("threshold", None)
    expected_len = int(args.pop("expected_seq_len", max_model_len))
    batching = {"block_size": int(args.pop("block_size", EngineConfig.block_size)),
                "max_num_seqs": int(args.pop("max_num_seqs", EngineConfig.max_num_seqs)),
                "enable_prefix_caching": args.pop("enable_prefix_caching", True)}
    for name in ("block_size", "max_num_seqs"):
        if batching[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {batching[name]}")
    if not isinstance(batching["enable_prefix_caching"], bool):
        raise ValueError(f"enable_prefix_caching must be true or false, got {batching['enable_prefix_caching']!r}")
    if not 1 <= expected_len <= max_model_len:
        raise ValueError(f"expected_seq_len must be in [1, max_model_len={max_model_len}], got {expected_len}")
    max_body_bytes = int(args.pop("max_body_bytes", MAX_BODY_BYTES))
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    queueing = {k: int(args.pop(k)) for k in ("max_ongoing_requests", "max_queued_requests") if k in args}
    if args:
        raise ValueError(f"unknown build_app arguments: {sorted(args)} (see deployments/app.py)")

    pull_registry(registry, progress=say)  # `serve run` too: replicas load the models from disk
    # Sized here (and by the router) at what "auto" is on this host; each replica resolves it for its own
    # device, so on a cluster whose replicas' devices differ from this host's these sizes are estimates.
    entries, refused = servable(list(Registry.load(registry, dtype)), budget, max_model_len, batching)
    for name, reason in refused.items():
        say(f"not serving {name}: {reason}")
    if not entries:
        raise ValueError(f"no registry model fits memory_budget={budget} bytes at full depth: "
                         + "; ".join(f"{name}: {reason}" for name, reason in refused.items()))
    router = Router.bind(registry, budget, max_model_len, policy, dtype, block_size=batching["block_size"],
                         max_num_seqs=batching["max_num_seqs"])
    replicas = {}
    for entry in entries:
        options = {"name": f"model-{entry.name}", "ray_actor_options": actor, **queueing}
        if threshold is not None:
            options["user_config"] = {"threshold": float(threshold)}
        if autoscaling is not None:
            target = autoscaling_target(entry, budget, max_model_len, expected_len, batching)
            options["autoscaling_config"] = {"target_ongoing_requests": target, **autoscaling}
        replicas[entry.name] = ModelReplica.options(**options).bind(
            entry.name, registry, budget, max_model_len, router, device, dtype, threads, hold, niceness, batching)
    return Ingress.bind(router, replicas, registry, max_tokens, api_key, max_model_len, max_body_bytes)


def servable(entries: list, budget: int, max_model_len: int, batching: dict) -> tuple[list, dict[str, str]]:
    """The registry models a replica can hold at full depth in `budget`, and why each other one cannot.
    The policy profiles a model at full depth before it serves it, so a model that does not fit there
    never serves: it gets no replica (and its engine would refuse the budget at start)."""
    fitting, refused = [], {}
    for entry in entries:
        try:
            entry.plan(entry.num_layers, budget, max_model_len, batching["max_num_seqs"],
                       block_size=batching["block_size"])
        except MemoryBudgetError as e:
            refused[entry.name] = str(e)
        else:
            fitting.append(entry)
    return fitting, refused


def autoscaling_target(entry, budget: int, max_model_len: int, expected_len: int, batching: dict | None = None) -> int:
    """Requests one replica serves at once at full depth: sequences of `expected_len` tokens in its KV pool."""
    batching = batching or {}
    plan = entry.plan(entry.num_layers, budget, max_model_len, batching.get("max_num_seqs", EngineConfig.max_num_seqs),
                      block_size=batching.get("block_size", EngineConfig.block_size))
    return plan.sequences(expected_len)
