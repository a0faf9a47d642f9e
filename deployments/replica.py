"""Model replica: one early-exit model (one registry entry), its engine in a child process.

The engine steps back to back in a process of its own (`helios_core.engine_process`): requests,
aborts and depth changes go to it as commands, applied between steps; each step's outputs come back
on a socket the replica's event loop watches, and go to per-request outboxes that `generate` streams
from. Telemetry (token breach flags, finished-request summaries, step records, load) goes to the
router in batches about once a second, and at each finished request while the model profiles
(its turn ends at N finished); the router's reply is this model's target (depth and exit points).
A new replica reads that target before its first request, so a restart or a scale-up serves what
the others serve.

Every stream item costs several Ray and HTTP hops (replica -> ingress -> proxy -> client), more CPU
than a decode step's share of a token. So a busy replica sends fewer, larger items: a request's
tokens wait in its outbox until its next send time, which grows with the replica's batch (a budget
of about STREAM_ITEMS_PER_S items per second beyond the first stream); a lone stream, a
first token and a last one go at once. Serve's queues never hold a generator back, so the consumer's
lag cannot be seen from here: the budget is what keeps a busy system's message count down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

import ray
from ray import serve

from helios_core.memory_size import parse_bytes
from helios_core.dtypes import default_device, dtype_name, resolve_dtype
from helios_core.engine import STEP_LOG, EngineConfig
from helios_core.engine_process import EngineProcess, EngineState
from helios_core.policy import Registry, Target
from helios_core.request import RequestOutput
from helios_core.sampling import SamplingParams
from helios_core.telemetry import StepRecord, TokenRecord

from .metrics import ReplicaMetrics

logger = logging.getLogger("ray.serve")
REPORT_INTERVAL_S = 1.0
STREAM_ITEMS_PER_S = 50  # each costs ~3.5 ms of CPU on the whole path: a sixth of a core at this rate
MAX_HOLD_S = 0.1  # default stream_max_hold_s: a token waits at most this long for the next ones
ENGINE_NICENESS = 0  # an ordinary process's, above Ray's workers (15): see engine_process._renice
LOST_NOTICE_S = 2.0  # the longest a replica whose engine died waits for its streams to take the news
PEAK_WINDOW_S = 1.0  # stats report the largest batch of the last second: a reader polling that often sees every peak


@dataclass
class _Telemetry:
    """What the replica owes the router since its last report."""

    records: list[TokenRecord] = field(default_factory=list)
    finished: list[tuple] = field(default_factory=list)  # (summary, depth, task)
    steps: deque[StepRecord] = field(default_factory=lambda: deque(maxlen=STEP_LOG))


class _RecentMax:
    """The largest value added in the last `window_s` seconds; older values are dropped as new ones come."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._values: deque[tuple[float, int]] = deque()  # (monotonic time, value)

    def add(self, value: int) -> None:
        self._values.append((time.monotonic(), value))
        self._drop_old()

    def max(self, default: int) -> int:
        self._drop_old()
        return max((v for _, v in self._values), default=default)

    def _drop_old(self) -> None:
        since = time.monotonic() - self.window_s
        while self._values and self._values[0][0] < since:
            self._values.popleft()


def _merge(item: dict, later: dict) -> dict:
    """Two consecutive stream items of one request as one: the deltas joined, the rest the later's."""
    return {**later, "text": item["text"] + later["text"], "token_ids": item["token_ids"] + later["token_ids"],
            "logprobs": item["logprobs"] + later["logprobs"]}


class _Outbox:
    """A request's output not sent yet, merged into one item as the engine adds to it; and what the
    replica keeps of the request: its task tag, and whether a switch may move it (routed by the
    policy, not pinned by name)."""

    def __init__(self, task: str | None = None, movable: bool = False):
        self.task, self.movable = task, movable
        self.item: dict | None = None
        self.arrived = asyncio.Event()  # there is something to send
        self.ended = asyncio.Event()  # the last item (finished, or an error) is in

    def put(self, item: dict) -> None:
        # An item without text (an error, a move, the engine lost) ends the request: it alone is sent.
        self.item = item if self.item is None or "text" not in item else _merge(self.item, item)
        self.arrived.set()
        if item.get("finished", True):  # an {"error": ...} item is the only and last one
            self.ended.set()

    async def take(self, not_before: float) -> dict:
        """Everything added so far, once there is something and it is `not_before` (monotonic
        time), or at once when the request ended: the last token is never held back."""
        await self.arrived.wait()
        hold_s = not_before - time.monotonic()
        if hold_s > 0 and not self.ended.is_set():
            try:
                await asyncio.wait_for(self.ended.wait(), hold_s)
            except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                pass
        item, self.item = self.item, None
        self.arrived.clear()
        return item


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256, max_queued_requests=512,
                  health_check_period_s=5)
class ModelReplica:
    def __init__(self, model: str, registry: str, memory_budget: int, max_model_len: int, router=None,
                 device: str = "auto", dtype: str = "auto", threads: int = 1,
                 stream_max_hold_s: float = MAX_HOLD_S, engine_niceness: int | None = ENGINE_NICENESS,
                 batching: dict | None = None):
        # "auto" is resolved for this replica's device, so the registry's plans are its engine's.
        dtype = dtype_name(resolve_dtype(dtype, default_device() if device == "auto" else device))
        self.entry = Registry.load(registry, dtype)[model]
        self.name, self.max_model_len = model, max_model_len
        # threads: torch's in the engine process. Several replicas share a CPU node, and OpenMP
        # spin-waiting across them costs far more than it gains.
        self.engine = EngineProcess(EngineConfig(
            model=str(self.entry.path), name=model, device=device, memory_budget=memory_budget,
            max_model_len=max_model_len, exit=self.entry.exit_config(), **self.entry.engine_options(),
            **(batching or {})), threads, engine_niceness)
        niceness = os.getpriority(os.PRIO_PROCESS, self.engine.pid)
        if engine_niceness is not None and niceness != engine_niceness:
            logger.warning("%s: the engine process runs at nice %d, not %d (lowering it needs CAP_SYS_NICE)",
                           model, niceness, engine_niceness)
        self.router = router
        self.max_hold_s = stream_max_hold_s
        self.metrics = ReplicaMetrics(model)
        self.metrics.shape(self.engine.state)
        self._asked_depth: int | None = None  # sent to the engine, not confirmed yet
        self._exits: tuple[int, ...] | None = None  # exit points last sent (None: the registry's)
        self.threshold: float | None = None  # default exit threshold from reconfigure (requests may override)
        self._outboxes: dict[str, _Outbox] = {}
        self._move_to: str | None = None  # where handed-back requests go
        self._telemetry = _Telemetry()
        self._reading = False
        self._report_task: asyncio.Task | None = None
        self._synced: asyncio.Task | None = None  # the router's target, read before the first request
        self._profiling = False  # the model's target is a profiling turn: report each finish at once
        self._report_now = asyncio.Event()
        self._ids = 0
        self._peak = _RecentMax(PEAK_WINDOW_S)  # step batches: running plus just finished
        self._max_batch = 0  # the largest since the replica started
        self._last: tuple = ("ready",)  # the engine's last message: what it was doing should it die
        self._started: set[str] = set()  # requests that had output (ids of those still here)
        self._lost: str | None = None  # why the engine is gone, once it is

    def __del__(self):  # Serve calls it when the replica shuts down
        if hasattr(self, "engine"):  # not when the engine failed to start
            self.engine.close()

    # --- the engine's messages ------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if not self._reading:
            loop = asyncio.get_running_loop()
            loop.add_reader(self.engine.fileno(), self._on_engine_messages)
            self._reading = True
            if self.router is not None:
                self._synced = loop.create_task(self._take_target())
                self._report_task = loop.create_task(self._report_forever())

    def _on_engine_messages(self) -> None:
        try:
            messages = self.engine.receive()
        except EOFError:
            self._engine_lost()
            return
        for kind, *body in messages:
            self._last = (kind, *body)
            if kind == "step":
                outputs, state, steps = body
                self._started.update(o.request_id for o in outputs if o.request_id in self._outboxes)
                batch = state.running + sum(o.finished for o in outputs)
                self._peak.add(batch)
                self._max_batch = max(self._max_batch, batch)
                self._telemetry.steps.extend(steps)
                self._dispatch(outputs, state)
                self.metrics.step(outputs, state)
            elif kind == "refused":  # a bad prompt: it fails alone, the batch goes on
                request_id, message = body
                if request_id in self._outboxes:
                    self._outboxes[request_id].put({"error": message})
            elif kind == "layers":
                event, state = body
                self._asked_depth = None
                if event.to_layers != event.from_layers:
                    self.metrics.layer_change("load" if event.to_layers > event.from_layers else "unload", state)
                    logger.info("%s: %d -> %d layers, capacity %d", self.name, event.from_layers, event.to_layers,
                                event.capacity_after)
            elif kind == "budget":
                capacity, state = body
                logger.info("%s: memory budget %d bytes, capacity %d", self.name, state.memory_budget, capacity)
                self.metrics.shape(state)
            elif kind == "released":  # a switch: these had not started, another model takes them
                for request_id in body[0]:
                    if request_id in self._outboxes:
                        self._outboxes[request_id].put({"moved": self._move_to})
            elif kind == "command_failed":
                command, message = body
                self._asked_depth = None
                logger.error("%s: the engine refused %r: %s", self.name, command, message)

    def _engine_lost(self) -> None:
        """The engine process died (killed, out of memory, a crash): so does the replica, so that
        Serve starts a new one, once each request here has been told whether it is a suspect.

        The ingress retries a request lost with its replica, but a suspect only once: the request
        whose add the engine last began (the engine says "adding" first), or, when a step was
        running, those with no output yet (a step takes in new requests first; the others had
        run through steps before). So a request that kills its engine kills at most two."""
        if self._lost is not None:
            return
        code = self.engine.process.poll()
        self._lost = f"the engine process of model {self.name} exited (code {code})"
        logger.error("%s; stopping the replica", self._lost)
        asyncio.get_running_loop().remove_reader(self.engine.fileno())
        adding = self._last[1] if self._last[0] == "adding" else None
        for request_id, outbox in self._outboxes.items():
            suspect = request_id == adding if adding is not None else request_id not in self._started
            outbox.put({"lost": self._lost, "suspect": suspect})
        asyncio.get_running_loop().create_task(self._exit_once_told())

    async def _exit_once_told(self) -> None:
        deadline = time.monotonic() + LOST_NOTICE_S
        while self._outboxes and time.monotonic() < deadline:  # each stream takes its last item
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # and Ray hands it on
        os._exit(1)

    def _dispatch(self, outputs: list[RequestOutput], state: EngineState) -> None:
        for out in outputs:
            self._telemetry.records += out.new_records
            outbox = self._outboxes.get(out.request_id)
            if out.finished and out.summary is not None and out.finish_reason != "abort":
                task = outbox.task if outbox is not None else None
                self._telemetry.finished.append((out.summary, state.num_layers, task))
                if self._profiling:  # its turn ends at N finished: the sooner the router knows, the better
                    self._report_now.set()
            if outbox is not None:
                outbox.put({
                    "text": out.new_text, "token_ids": out.new_token_ids,
                    "logprobs": [r.logprob for r in out.new_records], "finished": out.finished,
                    "finish_reason": out.finish_reason, "summary": out.summary,
                    "loaded_layers": state.num_layers,
                })

    async def _report_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._report_now.wait(), REPORT_INTERVAL_S)
            except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                pass
            self._report_now.clear()
            batch, self._telemetry = self._telemetry, _Telemetry()
            state = self.engine.state
            try:
                target, move_to = await self.router.report.remote(
                    self.name, state.num_layers, batch.records, batch.finished,
                    (state.running, state.waiting, state.context_tokens), list(batch.steps))
            except Exception:  # the router restarts: keep serving at the current depth
                logger.exception("%s: telemetry report failed", self.name)
                continue
            self._apply(target)
            movable = [request_id for request_id, outbox in self._outboxes.items() if outbox.movable]
            if move_to not in (None, self.name) and movable:
                self._move_to = move_to
                self.engine.release(movable)

    async def _take_target(self) -> None:
        """A new replica (a restart, a scale-up) takes its model's depth and exit points before its
        first request, so that it serves what the replica it joins or replaces serves."""
        try:
            self._apply(await self.router.target.remote(self.name))
        except Exception:  # the router restarts: the first report will bring the target
            logger.exception("%s: could not read the router's target", self.name)

    def _apply(self, target: Target | None) -> None:
        """Send the engine the router's target for this model (None: not a target, keep as is)."""
        self._profiling = target is not None and target.profiling
        if target is None:
            return
        if target.depth not in (self.engine.state.num_layers, self._asked_depth):
            self._set_depth(target.depth)
        if target.exits != self._exits:
            self._exits = target.exits  # commands apply in order: no need to wait for the engine
            self.engine.set_exit_layers(target.exits)

    # --- calls ----------------------------------------------------------------------------------
    async def generate(self, prompt: list[int] | str, params: SamplingParams, task: str | None = None,
                       movable: bool = False):
        """Stream one request: dicts with the new text, token ids, logprobs; the last has the summary.
        A prompt the engine refuses yields one {"error": message}; when the engine dies, each request
        gets one {"lost": why, "suspect": bool} (see `_engine_lost`). A `movable` request that the
        router's switch to another model finds not started yields one {"moved": model}: the
        caller sends it there."""
        self._ensure_running()
        if self._synced is not None and not self._synced.done():
            await asyncio.shield(self._synced)  # shared by the requests that arrive meanwhile
        if params.threshold is None and self.threshold is not None:
            params = dataclasses.replace(params, threshold=self.threshold)
        if self._lost is not None:  # never reached the engine: not a suspect
            yield {"lost": self._lost, "suspect": False}
            return
        self._ids += 1
        request_id = f"{self.name}-{self._ids}-{time.monotonic_ns()}"
        outbox = _Outbox(task, movable)
        self._outboxes[request_id] = outbox
        try:
            self.engine.add(request_id, prompt, params)
        except OSError:  # the socket is closed: the engine died before the reader saw it
            self._engine_lost()
        finished, sent = False, -math.inf
        try:
            while not finished:
                item = await outbox.take(sent + self._send_interval())
                sent, finished = time.monotonic(), item.get("finished", True)
                yield item
        finally:
            if not finished and self._lost is None:  # the client went away: free the slot
                self.engine.abort(request_id)
            self._outboxes.pop(request_id, None)
            self._started.discard(request_id)

    def _send_interval(self) -> float:
        """Seconds between a stream's items: 0 for a lone stream, then the item budget shared out
        over the batch (waiting requests send nothing)."""
        return min(self.max_hold_s, (self.engine.state.running - 1) / STREAM_ITEMS_PER_S)

    def reconfigure(self, user_config: dict) -> None:
        """Serve's user_config: {"threshold": 0.6, "memory_budget": "96MiB"} (either may be left out)."""
        unknown = set(user_config) - {"threshold", "memory_budget"}
        if unknown:
            raise ValueError(f"unknown user_config keys {sorted(unknown)}; known: threshold, memory_budget")
        if user_config.get("threshold") is not None:
            threshold = float(user_config["threshold"])
            if threshold < 0:
                raise ValueError(f"threshold must be >= 0, got {threshold}")
            self.threshold = threshold
        if user_config.get("memory_budget") is not None:
            budget = user_config["memory_budget"]
            budget = parse_bytes(budget) if isinstance(budget, str) else int(budget)
            # Refuse a budget that cannot work now (the registry's plan is the engine's, exactly).
            self.entry.plan(self.engine.state.num_layers, budget, self.max_model_len)
            self.engine.set_memory_budget(budget)

    async def set_num_layers(self, num_layers: int) -> int:
        """Ask for a depth; it is applied between steps. Returns the depth asked for."""
        if not 1 <= num_layers <= self.entry.num_layers:
            raise ValueError(f"num_layers must be in [1, {self.entry.num_layers}]")
        self._ensure_running()
        self._set_depth(num_layers)
        return num_layers

    def _set_depth(self, num_layers: int) -> None:
        self._asked_depth = num_layers
        self.engine.set_num_layers(num_layers)

    async def stats(self) -> dict:
        # Here, not at the top: Ray vendors psutil (ray/thirdparty_files), importable once ray is.
        import psutil

        self._ensure_running()  # read what the engine sent, even before the first request
        s = self.engine.state
        return {"model": self.name, "dtype": s.dtype, "loaded_layers": s.num_layers, "num_layers": s.model_num_layers,
                "exit_layers": None if s.exit_layers is None else list(s.exit_layers),
                "capacity": s.capacity, "capacity_tokens": s.capacity_tokens, "used_tokens": s.used_tokens,
                "mean_seq_len": s.mean_seq_len, "preempted": s.preempted,
                "prefix_hit_rate": s.prefix_hit_rate, "prefix_lookups": s.prefix_lookups,
                "prefix_hits": s.prefix_hits, "prefill_tokens_saved": s.prefill_tokens_saved,
                "running": s.running, "waiting": s.waiting,
                "peak_batch": self._peak.max(default=s.running), "max_batch": self._max_batch,
                "requests": len(self._outboxes),  # here, the engine's queue and batch included
                "weight_bytes": s.weight_bytes, "kv_bytes": s.kv_bytes, "kv_used_bytes": s.kv_used_bytes,
                "memory_budget": s.memory_budget, "exit_histogram": dict(s.histogram),
                "tokens": s.tokens, "forced": s.forced, "breaches": s.breaches,
                # where the replica runs and its resident memory (with its engine process's):
                # placement checks, leak watching
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "engine_pid": self.engine.pid, "engine_niceness": os.getpriority(os.PRIO_PROCESS, self.engine.pid),
                "rss_bytes": sum(psutil.Process(p).memory_info().rss for p in (os.getpid(), self.engine.pid))}

    def check_health(self) -> None:
        if self.engine.process.poll() is not None:
            raise RuntimeError(f"{self.name}: the engine process exited (code {self.engine.process.returncode})")
