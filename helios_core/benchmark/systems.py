"""The in-process systems under test, and the loop that offers them a load.

Every system serves the same requests on the same memory budget:
  full_depth    one model, every layer for every token (plain decoding, continuous batching)
  ee_baseline   the same model with every layer loaded and early exits at the threshold (EE-LLM style)
  helios        the orchestrator: the HELIOS policy over the registry, partial loading, switches
  helios_single the orchestrator over the baseline model alone: exits, partial loading, freed memory -> batch
  hf_generate   transformers `generate` on static batches of B0 requests (what fits the budget)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..engine import EngineConfig, LLMEngine, load_tokenizer
from ..orchestrator import Orchestrator
from ..request import RequestOutput
from ..sampling import SamplingParams
from .traces import Trace
from .workload import BenchRequest


def greedy(req: BenchRequest) -> SamplingParams:
    # ignore_eos: every system generates exactly max_tokens, so tokens/s compare like for like.
    return SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)


class EngineSystem:
    """One LLMEngine (full_depth or ee_baseline)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def add(self, req: BenchRequest) -> None:
        self.engine.add_request(req.prompt, greedy(req), req.id)

    def step(self) -> list[RequestOutput]:
        return self.engine.step()

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def running(self) -> int:
        return len(self.engine.scheduler.running)

    def memory(self) -> tuple[int, int]:
        return self.engine.memory.weight_bytes, self.engine.memory.kv_bytes

    def prefix(self) -> tuple[int, int, int]:
        return self.engine.scheduler.blocks.stats.counts()

    def config_of(self, out: RequestOutput) -> tuple[str, int, tuple[int, ...] | None]:
        return self.engine.name, self.engine.num_layers, self.engine.exit_layers


class HeliosSystem:
    """The orchestrator; memory and batch are summed over its live engines."""

    def __init__(self, orchestrator: Orchestrator):
        self.orch = orchestrator

    def add(self, req: BenchRequest) -> None:
        self.orch.add_request(req.prompt, greedy(req), req.id, req.task)

    def step(self) -> list[RequestOutput]:
        return self.orch.step()

    def has_unfinished(self) -> bool:
        return self.orch.has_unfinished()

    def running(self) -> int:
        return sum(len(e.scheduler.running) for e in self.orch.engines.values())

    def memory(self) -> tuple[int, int]:
        engines = self.orch.engines.values()
        return sum(e.memory.weight_bytes for e in engines), sum(e.memory.kv_bytes for e in engines)

    def prefix(self) -> tuple[int, int, int]:
        return self.orch.prefix_totals()

    def config_of(self, out: RequestOutput) -> tuple[str, int, tuple[int, ...] | None]:
        """(model, loaded depth, exit points) that produced this output (a finished request has left `model_of`)."""
        model = out.summary.model if out.summary else self.orch.model_of[out.request_id]
        engine = self.orch.engines[model]
        return model, engine.num_layers, engine.exit_layers


@dataclass
class RunResult:
    traces: list[Trace]
    seconds: float
    max_batch: int  # most sequences decoding in one step
    peak_weight_bytes: int
    peak_kv_bytes: int
    prefix: tuple[int, int, int] = (0, 0, 0)  # prompt blocks looked up, found cached, positions saved


def drive(system, requests: list[BenchRequest], arrivals: list[float] | None = None,
          concurrency: int | None = None, progress: Callable[[int], None] | None = None) -> RunResult:
    """Offer `requests` open loop (request i arrives at arrivals[i] s) or closed loop (`concurrency`
    in flight, a new one as soon as one finishes); step the system until every request is done."""
    if (arrivals is None) == (concurrency is None):
        raise ValueError("give either arrivals (open loop) or concurrency (closed loop)")
    queue = deque(zip(requests, arrivals or [0.0] * len(requests)))
    traces: dict[str, Trace] = {}
    in_flight = max_batch = peak_w = peak_kv = 0
    prefix_before = system.prefix()
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    while queue or system.has_unfinished():
        now = clock()
        while queue and (queue[0][1] <= now if arrivals is not None else in_flight < concurrency):
            req, at = queue.popleft()
            traces[req.id] = Trace(req.id, req.task, at if arrivals is not None else now)
            system.add(req)
            in_flight += 1
        if not system.has_unfinished():
            time.sleep(max(0.0, queue[0][1] - clock()))
            continue
        outputs = system.step()
        now = clock()
        weights, kv = system.memory()
        peak_w, peak_kv = max(peak_w, weights), max(peak_kv, kv)
        # The step's batch: sequences still running plus those it just finished.
        max_batch = max(max_batch, system.running() + sum(o.finished for o in outputs))
        for out in outputs:
            trace = traces[out.request_id]
            if out.new_token_ids:
                records = out.new_records
                trace.add_tokens(now, out.new_token_ids, [r.exit_layer for r in records],
                                 system.config_of(out), sum(r.forced for r in records),
                                 sum(r.breach for r in records))
            if out.finished:
                trace.finished, in_flight = now, in_flight - 1
                if out.finish_reason == "abort":
                    trace.error = "aborted"
                if progress:
                    progress(1)
    prefix = tuple(after - before for after, before in zip(system.prefix(), prefix_before))
    return RunResult(list(traces.values()), clock(), max_batch, peak_w, peak_kv, prefix)


class _StepClock:
    """A logits processor that only notes when each decoding step of `generate` happens."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


class HFGenerate:
    """transformers `generate` on static batches of at most `batch_size` requests: a batch starts
    when the previous one has finished, with whatever has arrived by then (left-padded)."""

    def __init__(self, model_dir: str, batch_size: int, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        self.name, self.batch_size, self.device = model_dir.rstrip("/").split("/")[-1], batch_size, device
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
        self.model.to(device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.num_layers = self.model.config.num_hidden_layers

    @torch.inference_mode()
    def _generate(self, batch: list[BenchRequest], start: float, traces: dict[str, Trace]) -> float:
        enc = self.tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True).to(self.device)
        n = max(r.max_tokens for r in batch)
        step_clock = _StepClock()
        out = self.model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                  logits_processor=[step_clock], pad_token_id=self.tokenizer.pad_token_id)
        # Token i is chosen right after the i-th logits call; all are returned when generate ends.
        done = time.perf_counter() - start
        for row, req in zip(out[:, enc.input_ids.shape[1]:].tolist(), batch):
            trace = traces[req.id]
            ids = row[: req.max_tokens]
            times = [t - start for t in step_clock.times[: len(ids)]]
            trace.token_times, trace.output_ids = times, ids
            trace.exit_layers = [self.num_layers] * len(ids)
            trace.served_by[(self.name, self.num_layers, None)] += len(ids)
            trace.finished = done
        return done

    def drive(self, requests: list[BenchRequest], arrivals: list[float] | None = None,
              concurrency: int | None = None, progress: Callable[[int], None] | None = None) -> RunResult:
        """As `drive` for the engines: open loop at `arrivals`, or closed loop with `concurrency`
        requests in flight (queued or in the batch)."""
        pending = deque(zip(requests, arrivals or [0.0] * len(requests)))
        ready: deque[tuple[BenchRequest, float]] = deque()
        if arrivals is None:
            ready += [(pending.popleft()[0], 0.0) for _ in range(min(concurrency, len(pending)))]
        traces: dict[str, Trace] = {}
        start, max_batch = time.perf_counter(), 0
        while pending or ready:
            now = time.perf_counter() - start
            while arrivals is not None and pending and pending[0][1] <= now:
                ready.append(pending.popleft())
            if not ready:
                time.sleep(pending[0][1] - now)
                continue
            batch = [ready.popleft() for _ in range(min(self.batch_size, len(ready)))]
            for req, at in batch:
                traces[req.id] = Trace(req.id, req.task, at)
            max_batch = max(max_batch, len(batch))
            done = self._generate([r for r, _ in batch], start, traces)
            if arrivals is None:  # closed loop: each finished request lets the next one in
                ready += [(pending.popleft()[0], done) for _ in range(min(len(batch), len(pending)))]
            if progress:
                progress(len(batch))
        return RunResult(list(traces.values()), time.perf_counter() - start, max_batch, self.weight_bytes, 0)


def engine_system(model_dir: str, name: str, budget: int, max_model_len: int, exit_config, early_exit: bool,
                  device: str = "auto", prefix_caching: bool = True, **options) -> EngineSystem:
    """options: further `EngineConfig` fields (a registry entry's `engine_options`)."""
    return EngineSystem(LLMEngine(EngineConfig(model=model_dir, name=name, memory_budget=budget,
                                               max_model_len=max_model_len, exit=exit_config,
                                               early_exit=early_exit, device=device,
                                               enable_prefix_caching=prefix_caching, **options)))
