"""helios_serve: the Helios Ray Serve app, measured as a client sees it over HTTP.

`run_serve` starts a local Ray cluster with the app (or uses a running app at `url`) and offers it
each load on /v1/completions, streaming: the same requests as the in-process systems, greedy, each
exactly max_tokens long (ignore_eos), model "helios" (the policy's choice). A token's time is when
its SSE chunk reached the client; its id comes with the chunk (`return_token_ids`, as the text cannot
be re-tokenized exactly); the exit histogram and the serving (model, loaded depth) come with the
last chunk. The batch and memory figures are sampled from /v1/helios/stats every STATS_INTERVAL_S;
each replica reports its largest step batch over that window, so no peak is missed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable

import aiohttp
import torch
from tqdm import tqdm

from .runner import BenchConfig, _requests
from .systems import RunResult
from .traces import Trace
from .workload import BenchRequest, poisson_arrivals

STATS_INTERVAL_S = 1.0  # the replicas' PEAK_WINDOW_S; each poll costs a call to the router and every replica
QUEUE_LIMIT = 1024  # per replica: far above any load here, so Serve's admission control never refuses
READ_TIMEOUT_S = 600  # longest silence on a stream (a queued request's wait for its first token included)
WARMUP_ROUNDS = 4  # the warm-up set is served again (up to this many times) while the policy still profiles
SETTLE_S = 2.0  # then the routing table (cached 1 s) and the replicas' depths (set on their 1 s reports) follow


def app_args(cfg: BenchConfig, budget: int) -> dict:
    """`build_app` arguments for the benchmark's settings (each model replica gets `budget`)."""
    return {"registry": cfg.registry, "memory_budget": budget, "max_model_len": cfg.max_model_len,
            "max_tokens": cfg.max_tokens, "policy": cfg.policy, "device": cfg.device, "dtype": cfg.dtype,
            "threshold": cfg.threshold, "threads": torch.get_num_threads(), "max_ongoing_requests": QUEUE_LIMIT,
            "max_queued_requests": QUEUE_LIMIT, "stream_max_hold_s": cfg.stream_max_hold_s}


class _Client:
    """Requests to the app at `url` (its base URL, without /v1)."""

    def __init__(self, session: aiohttp.ClientSession, url: str):
        self.session, self.url = session, url

    async def stats(self) -> dict | None:
        try:
            async with self.session.get(f"{self.url}/v1/helios/stats") as resp:
                return await resp.json() if resp.status == 200 else None
        except aiohttp.ClientError:
            return None

    async def complete(self, req: BenchRequest, trace: Trace, clock: Callable[[], float]) -> None:
        """Stream one request into `trace`; any failure becomes `trace.error`."""
        try:
            await self._stream(req, trace, clock)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:  # ValueError: a chunk not JSON
            trace.error = f"{type(err).__name__}: {err}"

    async def _stream(self, req: BenchRequest, trace: Trace, clock: Callable[[], float]) -> None:
        body = {"model": "helios", "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
                "ignore_eos": True, "task": req.task, "return_token_ids": True, "stream": True,
                "stream_options": {"include_usage": True}}
        async with self.session.post(f"{self.url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                trace.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    trace.finished = clock()
                    return
                chunk, now = json.loads(line[6:]), clock()
                if "error" in chunk:  # a stream cut by the server
                    trace.error = chunk["error"]["message"]
                for choice in chunk.get("choices", []):
                    trace.token_times += [now] * len(choice["token_ids"])
                    trace.output_ids += choice["token_ids"]
                if "helios" in chunk:  # the last chunk with a choice
                    info = chunk["helios"]
                    trace.exit_layers = [int(d) for d, n in info["exit_histogram"].items() for _ in range(n)]
                    trace.forced, trace.breaches = info["forced"], info["breaches"]
                    exits = info["exit_layers"]
                    config = (info["model"], info["loaded_layers"], None if exits is None else tuple(exits))
                    trace.served_by[config] = len(trace.output_ids)
                usage = chunk.get("usage")
                if usage and usage["completion_tokens"] != len(trace.output_ids):
                    trace.error = f"usage says {usage['completion_tokens']} tokens, got {len(trace.output_ids)}"
        trace.error = trace.error or "the stream ended without [DONE]"


def _in_use(stats: dict) -> tuple[int, int, int]:
    """(peak batch, weight bytes, KV bytes) summed over the replicas that run something or hold one
    of the policy's current models (the others are idle copies Serve keeps loaded). Each replica's
    peak is its largest step batch of the last second."""
    current = stats["policy"].get("targets", {})
    live = [s for name, s in stats["models"].items() if "error" not in s and (s["peak_batch"] or name in current)]
    return sum(s["peak_batch"] for s in live), sum(s["weight_bytes"] for s in live), sum(s["kv_bytes"] for s in live)


def _prefix_counts(stats: dict | None) -> tuple[int, int, int]:
    """(prompt blocks looked up, found cached, positions saved) since start, summed over the replicas."""
    models = [m for m in (stats or {}).get("models", {}).values() if "error" not in m]
    return tuple(sum(m[key] for m in models) for key in ("prefix_lookups", "prefix_hits", "prefill_tokens_saved"))


def _profiling(stats: dict | None) -> bool:
    return stats is None or any(t["profiling"] for t in stats["policy"].get("targets", {}).values())


async def _poll_stats(client: _Client, samples: list[tuple[int, int, int]]) -> None:
    while True:
        if (stats := await client.stats()) is not None:
            samples.append(_in_use(stats))
        await asyncio.sleep(STATS_INTERVAL_S)


async def _drive(client: _Client, requests: list[BenchRequest], load: tuple[str, float], seed: int,
                 bar: tqdm) -> RunResult:
    """Open loop (Poisson arrivals) or closed loop (`concurrency` in flight), as `systems.drive`."""
    kind, value = load
    prefix_before = _prefix_counts(await client.stats())
    samples: list[tuple[int, int, int]] = []
    poller = asyncio.create_task(_poll_stats(client, samples))
    traces = [Trace(r.id, r.task, 0.0) for r in requests]
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    async def send(req: BenchRequest, trace: Trace) -> None:
        await client.complete(req, trace, clock)
        bar.update(1)

    if kind == "poisson":
        async def at(t: float, req: BenchRequest, trace: Trace) -> None:
            trace.arrival = t
            await asyncio.sleep(t - clock())
            await send(req, trace)

        await asyncio.gather(*map(at, poisson_arrivals(value, len(requests), seed), requests, traces))
    else:
        pending = iter(zip(requests, traces))

        async def worker() -> None:
            for req, trace in pending:  # a new request as soon as one finishes
                trace.arrival = clock()
                await send(req, trace)

        await asyncio.gather(*(worker() for _ in range(int(value))))
    seconds = clock()
    poller.cancel()
    await asyncio.gather(poller, return_exceptions=True)
    batch, weights, kv = (max(column) for column in zip(*samples or [(0, 0, 0)]))
    prefix = tuple(after - before for after, before in zip(_prefix_counts(await client.stats()), prefix_before))
    return RunResult(traces, seconds, batch, weights, kv, prefix)


async def _warm_up(client: _Client, warm: list[BenchRequest], seed: int, bar: tqdm,
                   log: Callable[[str], None]) -> None:
    """Serve the untimed warm-up set, as in process: the policy profiles its candidates then. Its
    telemetry reaches the router about once a second, so Serve may need the set more than once."""
    for n in range(1, WARMUP_ROUNDS + 1):
        await _drive(client, warm, ("closed", len(warm)), seed, bar)
        if not _profiling(stats := await client.stats()):
            events = ", ".join(f"{e['kind']} {e['model']}@{e['depth']}" for e in stats["policy"]["events"])
            log(f"helios_serve: the policy settled after {n} warm-up round(s): {events}")
            await asyncio.sleep(SETTLE_S)
            return
        bar.total += len(warm)
    log(f"helios_serve: the policy still profiles after {WARMUP_ROUNDS} warm-up rounds; measuring anyway")


async def _measure(url: str, cfg: BenchConfig, base: list[BenchRequest], warm: list[BenchRequest],
                   loads: list[tuple[str, float]], log: Callable[[str], None]
                   ) -> tuple[list[tuple[str, RunResult]], dict]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=READ_TIMEOUT_S)
    runs = []
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        client = _Client(session, url)
        with tqdm(total=len(warm) + len(base) * len(loads), desc="helios_serve", unit="req",
                  file=sys.stderr) as bar:
            if warm:
                await _warm_up(client, warm, cfg.seed, bar, log)
            for spec, load in zip(cfg.loads, loads):
                runs.append((spec, await _drive(client, _requests(base, spec), load, cfg.seed, bar)))
        stats = await client.stats()
    return runs, (stats["policy"] if stats else {})


def run_serve(cfg: BenchConfig, budget: int, base: list[BenchRequest], warm: list[BenchRequest],
              loads: list[tuple[str, float]], log: Callable[[str], None] = print,
              url: str | None = None) -> tuple[list[tuple[str, RunResult]], dict]:
    """One (load spec, RunResult) per load of `cfg.loads`, after the untimed `warm` requests (again,
    up to WARMUP_ROUNDS times, while the policy still profiles its candidates); and the router's
    policy snapshot at the end (its events from the start of the app, its PHT and step fits). With no
    `url`, starts a local Ray cluster and the app with `app_args(cfg, budget)`, and stops both after;
    else drives the app already served at `url` (its base URL, without /v1)."""
    own = url is None
    if own:
        from deployments import launch  # Ray only here: helios_core itself never imports it
    try:
        if own:
            log("helios_serve: starting a local Ray cluster and the Serve app (loading the models)")
            url = launch.start_app(app_args(cfg, budget), port=None, name="helios-bench")
        log(f"helios_serve: driving {url}/v1/completions over HTTP")
        return asyncio.run(_measure(url, cfg, base, warm, loads, log))
    finally:
        if own:
            launch.stop("helios-bench")
