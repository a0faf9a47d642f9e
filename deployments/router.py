"""Router: one replica that runs the HELIOS policy over the replicas' batched telemetry.

Replicas report about once a second (token breach flags, finished-request summaries, engine step
times, their load) and get their model's target back (depth and exit points). The ingress reads
the routing table (task -> model) from a cache it refreshes about once a second, never per
request. The policy's state (PHT, events) is saved in Ray's internal key-value store after every
change and restored when the router restarts.

Global mode over live replicas: while a candidate profiles, the ingress sends it the round's N
requests and the rest to the model serving before the round (not held, as in process, where only
one model is loaded). A replica whose model neither serves nor profiles hands its requests not
started yet to the model that serves, so a switch moves the queue.
"""

from __future__ import annotations

import logging
import pickle

from ray import serve
from ray.serve import metrics

from helios_core.policy import HeliosPolicy, Limits, PolicyConfig, Registry, Target
from helios_core.telemetry import RequestSummary, StepRecord, TokenRecord

logger = logging.getLogger("ray.serve")
STATE_VERSION = 3  # bump when the policy's classes change shape: older saved state is then ignored


def _restore(saved: bytes | None) -> HeliosPolicy | None:
    """The saved policy, or None when there is none or another Helios version wrote it."""
    if not saved:
        return None
    try:
        version, state = pickle.loads(saved)
    except (TypeError, ValueError, AttributeError, ImportError, pickle.UnpicklingError):
        version = None
    if version != STATE_VERSION:
        logger.warning("router: ignoring saved policy state from another Helios version; profiling afresh")
        return None
    return state


def _kv():
    from ray.experimental import internal_kv  # Ray's GCS-backed store: survives actor restarts

    return internal_kv


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class Router:
    def __init__(self, registry: str, memory_budget: int, max_model_len: int, policy: dict | None = None,
                 dtype: str | None = None, state_key: str | None = None, block_size: int = 64,
                 max_num_seqs: int = 256):
        config = PolicyConfig(**(policy or {}))
        # One key per application, so two Helios apps on a cluster keep their own state.
        self.state_key = (state_key or f"helios/router/{serve.get_replica_context().app_name}").encode()
        # The policy is plain Python over telemetry; its whole state is restored as one object.
        # (Trusted: written by this deployment into the cluster's own store, never from a request.)
        state = _restore(_kv()._internal_kv_get(self.state_key))
        if state is not None:
            self.policy: HeliosPolicy = state
            logger.info("router: restored policy state (%d events)", len(self.policy.events))
        else:
            limits = Limits(memory_budget, max_model_len, max_num_seqs, block_size=block_size)
            self.policy = HeliosPolicy(Registry.load(registry, dtype), limits, config)
        self._events_counted = len(self.policy.events)
        self._in_flight: dict[str, int] = {}  # model -> running + waiting at its last report
        self._event_metric = metrics.Counter("helios_policy_events", "profiles, loads, switches of the policy",
                                             ("kind", "model"))

    def report(self, model: str, depth: int, records: list[TokenRecord],
               finished: list[tuple[RequestSummary, int, str | None]], load: tuple[int, int, int],
               steps: list[StepRecord] = ()) -> tuple[Target | None, str | None]:
        """A replica's telemetry since its last report. Returns that model's target (depth and exit
        points; None: keep them), and None while the model serves or profiles, else the model its
        requests not started yet should go to."""
        p = self.policy
        p.observe_load(*load)
        self._in_flight[model] = load[0] + load[1]
        p.observe_steps(model, steps)
        p.observe_tokens(model, records)
        for summary, served_depth, task in finished:
            p.assigned(model, task)
            p.observe_request(model, served_depth, summary, task)
        for event in p.events[self._events_counted:]:
            self._event_metric.inc(1, {"kind": event.kind, "model": event.model})
        self._events_counted = len(p.events)
        if records or finished:  # the state moved (a few KB, <1 ms): a restarted router resumes from here
            self._save()
        target = p.targets.get(model)
        keeps_its_queue = p.config.mode != "global" or target is not None or model == p.serving
        return target, None if keeps_its_queue else self._default()

    def target(self, model: str) -> Target | None:
        """The model's target now (None: the policy has none for it), for a replica that starts."""
        return self.policy.targets.get(model)

    def routing_table(self) -> dict:
        """Which model serves a task: the policy's current choice for each task seen, and a default."""
        p = self.policy
        tasks = {task for (_, task) in p.task_rows} | {None}
        return {"mode": p.config.mode, "default": self._default(),
                "tasks": {t: p.choose(t) for t in tasks if t is not None},
                "targets": {m: t.depth for m, t in p.targets.items()}, "profile": self._profile()}

    def _default(self) -> str:
        """The model for a request without a task: the serving one while a global round profiles
        another (before the first choice, or when the policy says hold: the target)."""
        p = self.policy
        return p.serving or p.choose(None) or next(iter(p.targets))

    def _profile(self) -> dict | None:
        """Global mode, while a round profiles a candidate other than the serving model: the
        candidate, and how many more requests it needs (not finished, not in flight there as of
        its last report); the ingress sends it up to that many per table it reads."""
        p = self.policy
        if p.config.mode != "global" or p.serving is None:
            return None
        [(model, target)] = p.targets.items()
        if not target.profiling or model == p.serving:
            return None
        needed = p.config.profile_requests - p.pht.get(model).requests - self._in_flight.get(model, 0)
        return {"model": model, "needed": max(needed, 0)}

    def snapshot(self) -> dict:
        return self.policy.snapshot()

    def _save(self) -> None:
        _kv()._internal_kv_put(self.state_key, pickle.dumps((STATE_VERSION, self.policy)), overwrite=True)
