"""helios_serve: the Helios Ray Serve app, measured as a client sees it over HTTP.

`run_serve` starts a local Ray cluster with the app (or uses a running app at `url`) and offers it
each load on /v1/completions, streaming: the same requests as the in-process systems, greedy, each
exactly max_tokens long (ignore_eos), model "helios" (the policy's choice). A token's time is when
its SSE chunk reached the client; its id comes with the chunk (`return_token_ids`, as the text cannot
be re-tokenized exactly); the exit histogram and the serving (model, loaded depth) come with the
last chunk. The batch and memory figures are sampled from /v1/helios/stats every STATS_INTERVAL_S
(so a batch that lasts less than that may be missed).
"""

from __future__ import annotations

import asyncio
import json
import socket
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

STATS_INTERVAL_S = 0.25
QUEUE_LIMIT = 1024  # per replica: far above any load here, so Serve's admission control never refuses
READ_TIMEOUT_S = 600  # longest silence on a stream (a queued request's wait for its first token included)


def app_args(cfg: BenchConfig, budget: int) -> dict:
    """`build_app` arguments for the benchmark's settings (each model replica gets `budget`)."""
    return {"registry": cfg.registry, "memory_budget": budget, "max_model_len": cfg.max_model_len,
            "max_tokens": cfg.max_tokens, "policy": cfg.policy, "device": cfg.device, "threshold": cfg.threshold,
            "threads": torch.get_num_threads(), "max_ongoing_requests": QUEUE_LIMIT,
            "max_queued_requests": QUEUE_LIMIT}


async def _stream(session: aiohttp.ClientSession, url: str, req: BenchRequest, trace: Trace,
                  clock: Callable[[], float]) -> None:
    body = {"model": "helios", "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "task": req.task, "return_token_ids": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
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
                trace.served_by[(info["model"], info["loaded_layers"])] = len(trace.output_ids)
            if chunk.get("usage") and chunk["usage"]["completion_tokens"] != len(trace.output_ids):
                trace.error = f"usage says {chunk['usage']['completion_tokens']} tokens, got {len(trace.output_ids)}"
    trace.error = trace.error or "the stream ended without [DONE]"


async def _one(session, url: str, req: BenchRequest, trace: Trace, clock, bar) -> None:
    try:
        await _stream(session, url, req, trace, clock)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:  # ValueError: a chunk not JSON
        trace.error = f"{type(err).__name__}: {err}"
    bar.update(1)


def _in_use(sample: dict) -> tuple[int, int, int]:
    """(running sequences, weight bytes, KV bytes) summed over the replicas that run something or
    hold the policy's current model (the others are idle copies Serve keeps loaded)."""
    current = sample["policy"].get("targets", {})
    live = [s for name, s in sample["models"].items() if "error" not in s and (s["running"] or name in current)]
    return sum(s["running"] for s in live), sum(s["weight_bytes"] for s in live), sum(s["kv_bytes"] for s in live)


async def _poll_stats(session: aiohttp.ClientSession, url: str, samples: list[tuple[int, int, int]]) -> None:
    while True:
        try:
            async with session.get(f"{url}/v1/helios/stats") as resp:
                if resp.status == 200:
                    samples.append(_in_use(await resp.json()))
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(STATS_INTERVAL_S)


async def _drive(url: str, requests: list[BenchRequest], load: tuple[str, float], seed: int, bar) -> RunResult:
    """Open loop (Poisson arrivals) or closed loop (`concurrency` in flight), as `systems.drive`."""
    kind, value = load
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=READ_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        samples: list[tuple[int, int, int]] = []
        poller = asyncio.create_task(_poll_stats(session, url, samples))
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        traces = [Trace(r.id, r.task, 0.0) for r in requests]
        if kind == "poisson":
            async def at(t: float, req: BenchRequest, trace: Trace) -> None:
                trace.arrival = t
                await asyncio.sleep(t - clock())
                await _one(session, url, req, trace, clock, bar)

            await asyncio.gather(*map(at, poisson_arrivals(value, len(requests), seed), requests, traces))
        else:
            pending = iter(zip(requests, traces))

            async def worker() -> None:
                for req, trace in pending:  # a new request as soon as one finishes
                    trace.arrival = clock()
                    await _one(session, url, req, trace, clock, bar)

            await asyncio.gather(*(worker() for _ in range(int(value))))
        seconds = clock()
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
    batch, weights, kv = (max(column) for column in zip(*samples or [(0, 0, 0)]))
    return RunResult(traces, seconds, batch, weights, kv)


async def _measure(url: str, cfg: BenchConfig, base: list[BenchRequest], warm: list[BenchRequest],
                   loads: list[tuple[str, float]]) -> list[tuple[str, RunResult]]:
    runs = []
    with tqdm(total=len(warm) + len(base) * len(loads), desc="helios_serve", unit="req", file=sys.stderr) as bar:
        if warm:  # untimed, as for the in-process systems: the policy profiles its candidates here
            await _drive(url, warm, ("closed", len(warm)), cfg.seed, bar)
        for spec, load in zip(cfg.loads, loads):
            runs.append((spec, await _drive(url, _requests(base, spec), load, cfg.seed, bar)))
    return runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(cfg: BenchConfig, budget: int, base: list[BenchRequest], warm: list[BenchRequest],
              loads: list[tuple[str, float]], log: Callable[[str], None] = print,
              url: str | None = None) -> list[tuple[str, RunResult]]:
    """One (load spec, RunResult) per load of `cfg.loads`, after the untimed `warm` requests. With no
    `url`, starts a local Ray cluster and the app with `app_args(cfg, budget)`, and stops both after;
    else drives the app already served at `url` (its base URL, without /v1)."""
    own = url is None
    if own:
        from deployments import launch  # Ray only here: helios_core itself never imports it
    try:
        if own:
            log("helios_serve: starting a local Ray cluster and the Serve app (loading the models)")
            url = launch.start_app(app_args(cfg, budget), port=_free_port(), name="helios-bench")
        log(f"helios_serve: driving {url}/v1/completions over HTTP")
        return asyncio.run(_measure(url, cfg, base, warm, loads))
    finally:
        if own:
            launch.stop()
