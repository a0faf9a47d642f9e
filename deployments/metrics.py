"""Prometheus metrics (through `ray.serve.metrics`, exported on Ray's metrics endpoint).

All carry the tag `model`. Token counters are added per engine step (one call per step and exit
layer, not per token); gauges are set once a step.
"""

from __future__ import annotations

from collections import Counter as Tally

from ray.serve import metrics

from helios_core.engine_process import EngineState
from helios_core.request import RequestOutput

_LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class ReplicaMetrics:
    def __init__(self, model: str):
        self.tags = {"model": model}
        self.tokens = metrics.Counter("helios_tokens", "generated tokens by exit layer", ("model", "exit_layer"))
        self.forced = metrics.Counter("helios_forced_exits", "tokens forced out at the last loaded layer", ("model",))
        self.breaches = metrics.Counter("helios_breaches", "forced exits below the threshold", ("model",))
        self.requests = metrics.Counter("helios_requests", "finished requests", ("model", "finish_reason"))
        self.layer_loads = metrics.Counter("helios_layer_changes", "loads and unloads of layers", ("model", "kind"))
        self.loaded_layers = metrics.Gauge("helios_loaded_layers", "layers loaded", ("model",))
        self.capacity = metrics.Gauge("helios_batch_capacity", "sequences the KV pool holds at the mean length",
                                      ("model",))
        self.capacity_tokens = metrics.Gauge("helios_kv_capacity_tokens", "positions the KV pool holds", ("model",))
        self.batch = metrics.Gauge("helios_batch_size", "sequences running", ("model",))
        self.prefix_hit_rate = metrics.Gauge("helios_prefix_cache_hit_rate",
                                             "share of prompt KV blocks found cached, since start", ("model",))
        self.kv_used = metrics.Gauge("helios_kv_bytes_used", "KV bytes of the running sequences' blocks", ("model",))
        self.ttft = metrics.Histogram("helios_ttft_seconds", "time to first token", _LATENCY_BOUNDS, ("model",))
        self.tpot = metrics.Histogram("helios_tpot_seconds", "time per output token", _LATENCY_BOUNDS, ("model",))

    def step(self, outputs: list[RequestOutput], state: EngineState) -> None:
        records = [r for out in outputs for r in out.new_records]
        for depth, n in Tally(r.exit_layer for r in records).items():
            self.tokens.inc(n, {**self.tags, "exit_layer": str(depth)})
        forced, breaches = sum(r.forced for r in records), sum(r.breach for r in records)
        if forced:
            self.forced.inc(forced, self.tags)
        if breaches:
            self.breaches.inc(breaches, self.tags)
        for out in outputs:
            if out.finished and out.summary is not None:
                s = out.summary
                self.requests.inc(1, {**self.tags, "finish_reason": s.finish_reason})
                if s.time_to_first_token_s is not None:
                    self.ttft.observe(s.time_to_first_token_s, self.tags)
                if s.time_per_output_token_s is not None:
                    self.tpot.observe(s.time_per_output_token_s, self.tags)
        self.shape(state)

    def shape(self, state: EngineState) -> None:
        self.loaded_layers.set(state.num_layers, self.tags)
        self.capacity.set(state.capacity, self.tags)
        self.capacity_tokens.set(state.capacity_tokens, self.tags)
        self.batch.set(state.running, self.tags)
        self.kv_used.set(state.kv_used_bytes, self.tags)
        self.prefix_hit_rate.set(state.prefix_hit_rate, self.tags)

    def layer_change(self, kind: str, state: EngineState) -> None:
        self.layer_loads.inc(1, {**self.tags, "kind": kind})
        self.shape(state)
