"""Bounded overload soak: offer twice the saturation rate for a fixed time and check that Helios degrades
cleanly (every request gets a complete answer or a 429/503), stays inside its memory budget and does not
leak.

    python bench/soak.py --seconds 90 --json soak.json     # deploys app "soak" on RAY_ADDRESS or a new local Ray

1. Deploys the Helios app with a fixed per-replica queue limit (`--max-ongoing`, `--max-queued`).
2. Saturation: closed loop, `--max-ongoing` clients back to back on one model for `--saturation-seconds`:
   completed requests/s.
3. Overload: open loop, Poisson arrivals at `--rate-factor` x saturation for `--seconds`, a
   `--stream-share` of them streaming; every request asks for exactly `--max-tokens` tokens (ignore_eos).
4. All along, every ~`--sample-interval` s, the model replica's `stats()`: running vs capacity,
   weights + KV vs budget, the replica process's RSS.

A response is *complete* when it has all `--max-tokens` tokens, finish_reason "length" (and for a
stream, the usage chunk and [DONE], no error event). The JSON has every figure of the printed table
plus all samples. `run_soak` is what tests/test_soak.py runs, shorter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from prompts import load_prompts  # noqa: E402

MiB = 1 << 20


@dataclass(frozen=True)
class SoakConfig:
    model: str = "helios-demo-code-6l"
    max_tokens: int = 16
    seconds: float = 60.0  # overload duration
    saturation_seconds: float = 10.0
    warmup_seconds: float = 5.0  # of the overload, before the "after warm-up" RSS sample
    rate_factor: float = 2.0
    stream_share: float = 0.5
    concurrency: int = 16  # closed-loop clients for the saturation phase (the replica's max_ongoing)
    timeout_s: float = 120.0  # a request still open after this is a hang
    sample_interval_s: float = 0.5
    seed: int = 0


@dataclass
class Outcome:
    kind: str  # complete | rejected | incomplete | error | timeout
    status: int | None
    stream: bool
    start: float  # seconds since the phase began
    latency_s: float
    ttft_s: float | None = None  # streams: first content chunk
    detail: str = ""


# --- one request ------------------------------------------------------------------------------------
def _body(cfg: SoakConfig, prompt: str, stream: bool) -> dict:
    body = {"model": cfg.model, "prompt": prompt, "max_tokens": cfg.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    return body | ({"stream_options": {"include_usage": True}} if stream else {})


def _complete(cfg: SoakConfig, finish_reason: str | None, usage: dict | None) -> bool:
    return finish_reason == "length" and bool(usage) and usage["completion_tokens"] == cfg.max_tokens


async def _read_stream(resp: aiohttp.ClientResponse, cfg: SoakConfig, t0: float) -> tuple[bool, float | None, str]:
    """(complete, time to first content, why not complete) of an SSE response."""
    finish, usage, ttft, done = None, None, None, False
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return False, ttft, f"error event: {chunk['error'].get('message')}"
        for choice in chunk.get("choices") or []:
            if choice.get("text") and ttft is None:
                ttft = time.perf_counter() - t0
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
    ok = done and _complete(cfg, finish, usage)
    return ok, ttft, "" if ok else f"truncated stream: done={done} finish={finish} usage={usage}"


async def one_request(session: aiohttp.ClientSession, url: str, cfg: SoakConfig, prompt: str, stream: bool,
                      phase_start: float) -> Outcome:
    t0 = time.perf_counter()
    start, status, ttft = t0 - phase_start, None, None
    try:  # the session's total timeout (cfg.timeout_s) covers reading the whole stream
        async with session.post(f"{url}/v1/completions", json=_body(cfg, prompt, stream)) as resp:
            status = resp.status
            if status in (429, 503):
                await resp.read()
                kind = "rejected" if "Retry-After" in resp.headers else "error"
                return Outcome(kind, status, stream, start, time.perf_counter() - t0, None,
                               "" if kind == "rejected" else "no Retry-After")
            if status != 200:
                return Outcome("error", status, stream, start, time.perf_counter() - t0, None,
                               (await resp.text())[:300])
            if stream:
                ok, ttft, detail = await _read_stream(resp, cfg, t0)
            else:
                out = await resp.json()
                ok = _complete(cfg, out["choices"][0]["finish_reason"], out.get("usage"))
                detail = "" if ok else f"truncated: {out['choices'][0]['finish_reason']} {out.get('usage')}"
        kind = "complete" if ok else "incomplete"
        return Outcome(kind, status, stream, start, time.perf_counter() - t0, ttft, detail)
    except asyncio.TimeoutError:
        return Outcome("timeout", status, stream, start, time.perf_counter() - t0, ttft, "no answer in time")
    except (aiohttp.ClientError, ValueError, KeyError) as err:
        return Outcome("error", status, stream, start, time.perf_counter() - t0, ttft, repr(err)[:300])


# --- the two load phases ----------------------------------------------------------------------------
def _session(cfg: SoakConfig) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),  # no client-side queueing
                                 timeout=aiohttp.ClientTimeout(total=cfg.timeout_s))


async def closed_loop(url: str, cfg: SoakConfig, prompts: list[str]) -> tuple[list[Outcome], float]:
    """`cfg.concurrency` clients back to back (non-streaming) for saturation_seconds: outcomes, elapsed."""
    rng = random.Random(cfg.seed)
    start = time.perf_counter()
    deadline = start + cfg.saturation_seconds
    outcomes: list[Outcome] = []

    async def client(session):
        while time.perf_counter() < deadline:
            outcomes.append(await one_request(session, url, cfg, rng.choice(prompts), False, start))

    async with _session(cfg) as session:
        await asyncio.gather(*(client(session) for _ in range(cfg.concurrency)))
    return outcomes, time.perf_counter() - start


async def open_loop(url: str, cfg: SoakConfig, prompts: list[str], rate: float) -> list[Outcome]:
    """Poisson arrivals at `rate` per second for cfg.seconds, each request independent of the others."""
    rng = random.Random(cfg.seed + 1)
    tasks = []
    async with _session(cfg) as session:
        start = time.perf_counter()
        next_at = start + rng.expovariate(rate)
        while next_at < start + cfg.seconds:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            stream = rng.random() < cfg.stream_share
            tasks.append(asyncio.create_task(one_request(session, url, cfg, rng.choice(prompts), stream, start)))
            next_at += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))


# --- replica samples --------------------------------------------------------------------------------
class Sampler(threading.Thread):
    """Polls a model replica's stats() every interval (Ray handle call, from its own thread).
    Under overload a call may wait for a free slot of the replica; a sample records when it returned."""

    def __init__(self, handle, interval_s: float):
        super().__init__(daemon=True)
        self.handle, self.interval_s = handle, interval_s
        self.samples: list[dict] = []
        self.failures = 0
        self.phase = "start"
        self._halt = threading.Event()

    def sample(self) -> dict | None:
        try:
            s = self.handle.stats.remote().result(timeout_s=30)
        except Exception:  # counted: a replica that stops answering shows up as missing samples
            self.failures += 1
            return None
        keep = ("running", "waiting", "capacity", "loaded_layers", "weight_bytes", "kv_bytes", "memory_budget",
                "rss_bytes", "pid")
        sample = {"t": time.time(), "phase": self.phase, **{k: s[k] for k in keep}}
        self.samples.append(sample)
        return sample

    def run(self) -> None:
        while not self._halt.is_set():
            began = time.perf_counter()
            self.sample()
            self._halt.wait(max(0.0, self.interval_s - (time.perf_counter() - began)))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)


# --- the report -------------------------------------------------------------------------------------
def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": max(values)}


def _slope_mib_per_min(samples: list[dict]) -> float | None:
    if len(samples) < 2:
        return None
    ts = [s["t"] for s in samples]
    ys = [s["rss_bytes"] / MiB for s in samples]
    tm, ym = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - tm) ** 2 for t in ts)
    return 60 * sum((t - tm) * (y - ym) for t, y in zip(ts, ys)) / var if var else None


def summarize(cfg: SoakConfig, saturation: dict, outcomes: list[Outcome], samples: list[dict],
              sample_failures: int, overload_start: float, after: Outcome, idle_after: dict | None) -> dict:
    kinds, statuses = _count(o.kind for o in outcomes), _count(str(o.status) for o in outcomes)
    done = [o for o in outcomes if o.kind == "complete"]
    overload = [s for s in samples if s["phase"] == "overload"]
    warm = [s for s in overload if s["t"] >= overload_start + cfg.warmup_seconds]
    rss = {"start": samples[0]["rss_bytes"] / MiB if samples else None,
           "after_warmup": warm[0]["rss_bytes"] / MiB if warm else None,
           "end": overload[-1]["rss_bytes"] / MiB if overload else None,
           "max": max(s["rss_bytes"] for s in samples) / MiB if samples else None,
           "slope_mib_per_min": _slope_mib_per_min(warm)}
    rss["growth_after_warmup"] = rss["end"] - rss["after_warmup"] if warm else None
    return {
        "config": asdict(cfg),
        "saturation_rps": saturation["rps"], "saturation": saturation,
        "offered_rps": cfg.rate_factor * saturation["rps"],
        "arrival_rps": len(outcomes) / cfg.seconds,
        "sent": len(outcomes), "streams": sum(o.stream for o in outcomes),
        "complete": kinds.get("complete", 0),
        "rejected_503": sum(o.kind == "rejected" and o.status == 503 for o in outcomes),
        "rejected_429": sum(o.kind == "rejected" and o.status == 429 for o in outcomes),
        "incomplete": kinds.get("incomplete", 0), "errors": kinds.get("error", 0),
        "timeouts": kinds.get("timeout", 0), "statuses": statuses,
        "problems": [asdict(o) for o in outcomes if o.kind not in ("complete", "rejected")][:20],
        "goodput_rps": len(done) / cfg.seconds,
        "latency_s": _percentiles([o.latency_s for o in done]),
        "ttft_s": _percentiles([o.ttft_s for o in done if o.ttft_s is not None]),
        "rejection_latency_s": _percentiles([o.latency_s for o in outcomes if o.kind == "rejected"]),
        "samples": len(samples), "sample_failures": sample_failures,
        "max_running": max((s["running"] for s in samples), default=None),
        "min_capacity": min((s["capacity"] for s in samples), default=None),
        "running_over_capacity": sum(s["running"] > s["capacity"] for s in samples),
        "max_memory_bytes": max((s["weight_bytes"] + s["kv_bytes"] for s in samples), default=None),
        "memory_budget": samples[0]["memory_budget"] if samples else None,
        "memory_over_budget": sum(s["weight_bytes"] + s["kv_bytes"] > s["memory_budget"] for s in samples),
        "replica_restarted": len({s["pid"] for s in samples}) > 1,
        "rss_mib": rss,
        "after": asdict(after), "idle_after": idle_after,
        "sample_log": samples,
    }


def print_table(r: dict) -> None:
    lat, rss = r["latency_s"], r["rss_mib"]
    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    rows = [
        ("saturation (closed loop)", f"{r['saturation_rps']:.2f} req/s ({r['config']['concurrency']} clients)"),
        ("offered (open loop, Poisson)", f"{r['offered_rps']:.2f} req/s for {r['config']['seconds']:.0f} s "
                                         f"(arrivals {r['arrival_rps']:.2f} req/s)"),
        ("requests sent / streaming", f"{r['sent']} / {r['streams']}"),
        ("complete", f"{r['complete']} ({r['goodput_rps']:.2f} req/s)"),
        ("rejected 503 / 429", f"{r['rejected_503']} / {r['rejected_429']}"),
        ("incomplete / other errors / hangs", f"{r['incomplete']} / {r['errors']} / {r['timeouts']}"),
        ("latency of complete p50/p90/p99/max", "/".join(fmt(lat.get(k), ".2f") for k in ("p50", "p90", "p99", "max"))
         + " s" if lat else "-"),
        ("max running / capacity", f"{r['max_running']} / {r['min_capacity']} "
                                   f"(over: {r['running_over_capacity']} of {r['samples']} samples)"),
        ("max weights + KV / budget", f"{fmt(r['max_memory_bytes'] / MiB)} / {fmt(r['memory_budget'] / MiB)} MiB "
                                      f"(over: {r['memory_over_budget']})"),
        ("replica RSS start / warm / end", f"{fmt(rss['start'])} / {fmt(rss['after_warmup'])} / {fmt(rss['end'])} MiB"),
        ("RSS growth after warm-up, slope", f"{fmt(rss['growth_after_warmup'])} MiB, "
                                            f"{fmt(rss['slope_mib_per_min'], '.2f')} MiB/min"),
        ("after the soak", f"{r['after']['kind']}; replica idle: {r['idle_after'] is not None}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# --- the whole run ----------------------------------------------------------------------------------
def _wait_idle(sampler: Sampler, timeout_s: float) -> dict | None:
    """The first sample with nothing running or waiting (None if the replica stays busy: a leak)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = sampler.sample()
        if s is not None and s["running"] == 0 and s["waiting"] == 0:
            return s
        time.sleep(0.5)
    return None


def run_soak(url: str, app: str, cfg: SoakConfig, prompts: list[str], log=print) -> dict:
    """Saturation, then overload, against the app at `url` (its route prefix included); the caller
    must be connected to the app's Ray cluster (the replica stats come through a Serve handle)."""
    from ray import serve

    sampler = Sampler(serve.get_deployment_handle(f"model-{cfg.model}", app), cfg.sample_interval_s)
    sampler.sample()  # RSS at the start, before any load
    sampler.start()
    try:
        sampler.phase = "saturation"
        sat, elapsed = asyncio.run(closed_loop(url, cfg, prompts))
        completed = sum(o.kind == "complete" for o in sat)
        saturation = {"rps": completed / elapsed, "sent": len(sat), "seconds": elapsed,
                      "kinds": _count(o.kind for o in sat),
                      "problems": [asdict(o) for o in sat if o.kind not in ("complete", "rejected")][:5]}
        log(f"saturation: {saturation['rps']:.2f} req/s ({completed} of {len(sat)} complete in {elapsed:.1f} s)")
        if not completed:
            raise RuntimeError(f"no request completed in the saturation phase: {[asdict(o) for o in sat[:3]]}")
        rate = cfg.rate_factor * saturation["rps"]
        log(f"overload: {rate:.2f} req/s for {cfg.seconds:.0f} s")
        sampler.phase = "overload"
        overload_start = time.time()
        outcomes = asyncio.run(open_loop(url, cfg, prompts, rate))
        sampler.phase = "after"
    finally:
        sampler.stop()
    after = asyncio.run(_after(url, cfg, prompts[0]))
    idle = _wait_idle(sampler, 30)
    return summarize(cfg, saturation, outcomes, sampler.samples, sampler.failures, overload_start, after, idle)


async def _after(url: str, cfg: SoakConfig, prompt: str) -> Outcome:
    async with _session(cfg) as session:
        return await one_request(session, url, cfg, prompt, False, time.perf_counter())


def app_args(registry: str, memory_budget: str, max_ongoing: int, max_queued: int) -> dict:
    """build_app arguments of the soak: a fixed queue per replica; the policy never leaves profiling,
    so the model keeps its full depth (the saturation measured is the one overloaded)."""
    return {"registry": registry, "memory_budget": memory_budget, "max_tokens": 64,
            "max_ongoing_requests": max_ongoing, "max_queued_requests": max_queued,
            "policy": {"profile_requests": 10**6}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SoakConfig()
    p.add_argument("--seconds", type=float, default=d.seconds, help="overload duration")
    p.add_argument("--saturation-seconds", type=float, default=d.saturation_seconds)
    p.add_argument("--warmup-seconds", type=float, default=d.warmup_seconds)
    p.add_argument("--rate-factor", type=float, default=d.rate_factor, help="offered rate / saturation rate")
    p.add_argument("--stream-share", type=float, default=d.stream_share)
    p.add_argument("--model", default=d.model)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--prompts", default="code", help="a bench/data set name or a .jsonl path")
    p.add_argument("--registry", default=str(ROOT / "models" / "registry.yaml"))
    p.add_argument("--memory-budget", default="64MiB")
    p.add_argument("--max-ongoing", type=int, default=16, help="max_ongoing_requests per model replica")
    p.add_argument("--max-queued", type=int, default=16, help="max_queued_requests per model replica")
    p.add_argument("--port", type=int, default=None,
                   help="Serve's HTTP port: a free one by default; on a cluster already running Serve, its port")
    p.add_argument("--app", default="soak", help="app name and route prefix (deployed, deleted at the end)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", type=Path, default=None, help="write the report (with all samples) here")
    args = p.parse_args(argv)
    cfg = SoakConfig(model=args.model, max_tokens=args.max_tokens, seconds=args.seconds,
                     saturation_seconds=args.saturation_seconds, warmup_seconds=args.warmup_seconds,
                     rate_factor=args.rate_factor, stream_share=args.stream_share, concurrency=args.max_ongoing,
                     seed=args.seed)
    prompts = [r["prompt"] for r in load_prompts(args.prompts)]

    from ray import serve

    from deployments.launch import start_app

    log = lambda m: print(f"[soak] {m}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"deploying app {args.app!r} (every registry model; the load goes to {cfg.model})")
    # RAY_ADDRESS if set, else a new local cluster; a free port unless --port names Serve's
    url = start_app(app_args(args.registry, args.memory_budget, args.max_ongoing, args.max_queued),
                    port=args.port, name=args.app, route_prefix=f"/{args.app}")
    try:
        report = run_soak(url, args.app, cfg, prompts, log)
    finally:
        serve.delete(args.app)
    report["machine"] = {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print_table(report)


if __name__ == "__main__":
    main()
