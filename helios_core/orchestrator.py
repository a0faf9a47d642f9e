"""The in-process Helios server: engines + the HELIOS policy + capacity, without Ray.

One `step()`:
  1. reconcile  make the loaded engines match the policy's targets: load/unload layers of a live
                engine (`set_num_layers`, which re-plans the KV pool: the new capacity applies at
                once), or switch models in global mode: the old engine stops taking requests,
                hands the queued ones it has not started back to the queue, finishes the rest
                (drain), is released, and the new one loads with the whole budget;
  2. assign     queued requests go to the model the policy picks (held while it says so);
  3. run        one step of every engine with work; outputs go back to the caller;
  4. observe    step times, token records, finished requests, the queue and layer loads go to the policy.
The Ray deployments wrap the same object: a replica's loop is this step.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .dtypes import default_device, dtype_name, resolve_dtype
from .engine import EngineConfig, LLMEngine, encode, load_tokenizers
from .policy import HeliosPolicy, Limits, PolicyConfig, Registry
from .request import Completion, RequestOutput
from .sampling import SamplingParams
from .telemetry import RequestSummary

logger = logging.getLogger("helios")


@dataclass(frozen=True)
class OrchestratorConfig:
    registry: str | Registry  # registry YAML (see helios_core/policy/registry.py) or a loaded one
    memory_budget: int  # bytes for weights + KV + workspace of everything loaded at once
    max_model_len: int = 1024
    max_num_seqs: int = 256
    max_prefill_tokens: int = 256
    block_size: int = 64
    enable_prefix_caching: bool = True
    dtype: str = "auto"  # with a registry path; a loaded registry's entries carry their own
    device: str = "auto"
    policy: PolicyConfig = field(default_factory=PolicyConfig)


@dataclass
class _Pending:
    request_id: str
    prompt_ids: dict[str, list[int]]  # model -> the prompt as its tokenizer reads it
    params: SamplingParams
    task: str | None


class Orchestrator:
    def __init__(self, config: OrchestratorConfig):
        self.config = config
        # The engines load each entry's dtype: the one the policy's memory plans are made with.
        device = default_device() if config.device == "auto" else config.device
        self.registry = (config.registry if isinstance(config.registry, Registry)
                         else Registry.load(config.registry, dtype_name(resolve_dtype(config.dtype, device))))
        self.limits = Limits(config.memory_budget, config.max_model_len, config.max_num_seqs,
                             config.max_prefill_tokens, config.block_size)
        self.policy = HeliosPolicy(self.registry, self.limits, config.policy)
        self.engines: dict[str, LLMEngine] = {}
        self.model_of: dict[str, str] = {}  # request id -> model serving it
        self._live: dict[str, _Pending] = {}  # assigned requests, until they finish (a switch may requeue them)
        self._pending: deque[_Pending] = deque()
        self._ids = itertools.count()
        self._tokenizers, self._one_vocab = self._load_tokenizers()
        self.timeline: list[dict] = []  # loads, unloads, switches with capacity, for plots and the dashboard
        self._released_prefix = [0, 0, 0]  # prefix reuse counts of engines since released
        self._reconcile()

    # --- requests -------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, task: str | None = None) -> str:
        """Queue a request; it is checked now against every model it may be routed to."""
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.model_of or any(p.request_id == request_id for p in self._pending):
            raise ValueError(f"request id {request_id!r} is already in use")
        self._pending.append(_Pending(request_id, self._tokenize(prompt), params, task))
        return request_id

    def _load_tokenizers(self) -> tuple[dict, bool]:
        """model -> tokenizer, one object per distinct tokenizer file (a family shares one); and whether
        the candidates' tokenizers share one vocabulary (token ids then mean the same to every model)."""
        tokenizers = load_tokenizers({m: self.registry[m].path for m in self.policy.candidates})
        vocabs = [t.get_vocab() for t in {id(t): t for t in tokenizers.values()}.values() if t is not None]
        return tokenizers, all(v == vocabs[0] for v in vocabs[1:])

    def _tokenize(self, prompt: str | list[int]) -> dict[str, list[int]]:
        """The prompt as each candidate reads it, checked against each: text is encoded by every model's
        own tokenizer (models of different families may serve it alike); token ids need one vocabulary."""
        if not isinstance(prompt, str) and not self._one_vocab:
            raise ValueError("the candidate models have different tokenizers, so token ids would mean "
                             "different text to each: send the prompt as text")
        ids_by_model, encoded = {}, {}  # encoded: each shared tokenizer runs once
        for model, tok in self._tokenizers.items():
            if isinstance(prompt, str):
                if tok is None:
                    raise ValueError(f"model {model} has no tokenizer: pass token ids instead of text")
                if id(tok) not in encoded:
                    encoded[id(tok)] = encode(tok, prompt)
                ids = encoded[id(tok)]
            else:
                ids = list(prompt)
            vocab = self.registry[model].config.vocab_size
            if not ids:
                raise ValueError("prompt is empty")
            if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
            if len(ids) >= self.config.max_model_len:
                raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.config.max_model_len}; "
                                 "it must leave room for at least one generated token")
            ids_by_model[model] = ids
        return ids_by_model

    def abort(self, request_id: str) -> None:
        for p in list(self._pending):
            if p.request_id == request_id:
                self._pending.remove(p)
                return
        model = self.model_of.get(request_id)
        if model in self.engines:
            self.engines[model].abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._pending) or any(e.has_unfinished() for e in self.engines.values())

    # --- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._reconcile()
        self._assign()
        outputs: list[RequestOutput] = []
        for name, engine in list(self.engines.items()):
            if not engine.has_unfinished():
                continue
            step_outputs = engine.step()
            self.policy.observe_steps(name, engine.drain_steps())
            self.policy.observe_tokens(name, [r for o in step_outputs for r in o.new_records])
            for out in step_outputs:
                if out.finished:
                    self._finished(name, engine.num_layers, out.summary)
            outputs += step_outputs
        running = sum(len(e.scheduler.running) for e in self.engines.values())
        waiting = len(self._pending) + sum(len(e.scheduler.waiting) for e in self.engines.values())
        context = sum(len(s.token_ids) for e in self.engines.values() for s in e.scheduler.running)
        self.policy.observe_load(running, waiting, context)
        return outputs

    def _finished(self, model: str, depth: int, summary: RequestSummary) -> None:
        request = self._live.pop(summary.request_id, None)
        self.policy.observe_request(model, depth, summary, request.task if request else None)
        self.model_of.pop(summary.request_id, None)

    def _assign(self) -> None:
        while self._pending:
            model = self.policy.choose(self._pending[0].task)
            engine = self.engines.get(model) if model else None
            if engine is None or model in self._draining():
                return  # held: a profiling round is full, or the chosen model is not loaded yet
            p = self._pending.popleft()
            engine.add_request(p.prompt_ids[model], p.params, p.request_id)
            self.policy.assigned(model, p.task)
            self.model_of[p.request_id] = model
            self._live[p.request_id] = p

    def _draining(self) -> set[str]:
        return {m for m in self.engines if m not in self.policy.targets}

    def _reconcile(self) -> None:
        """Make the engines match the policy's targets (between steps)."""
        for name in list(self.engines):
            if name in self.policy.targets:
                continue
            # Draining: what it has not started goes back to the queue, for the model chosen now.
            for seq in reversed(self.engines[name].release_waiting()):
                self.model_of.pop(seq.request_id)
                self._pending.appendleft(self._live.pop(seq.request_id))
            if not self.engines[name].has_unfinished():
                self._release(name)
        for name, target in self.policy.targets.items():
            engine = self.engines.get(name)
            if engine is None:
                if self._draining():
                    continue  # global switch: wait until the old model has finished its requests
                engine = self._start(name, target.depth)
            elif engine.num_layers != target.depth:
                event = engine.set_num_layers(target.depth)
                self.policy.observe_layer_event(event.bytes_read, event.seconds)
                self._log("load" if target.depth > event.from_layers else "unload", name, engine,
                          seconds=event.seconds, bytes_read=event.bytes_read, preempted=event.preempted)
            if engine.exit_layers != target.exits:
                engine.set_exit_layers(target.exits)

    def _budget(self) -> int:
        return self.policy.limits.memory_budget  # the whole budget, or one model's share per request mode

    def _start(self, name: str, depth: int) -> LLMEngine:
        entry = self.registry[name]
        started = time.perf_counter()
        engine = LLMEngine(EngineConfig(
            model=str(entry.path), name=name, num_layers=depth, device=self.config.device, **entry.engine_options(),
            memory_budget=self._budget(), max_model_len=self.config.max_model_len,
            max_num_seqs=self.config.max_num_seqs, max_prefill_tokens=self.config.max_prefill_tokens,
            block_size=self.config.block_size, enable_prefix_caching=self.config.enable_prefix_caching,
            exit=entry.exit_config(),
        ))
        self.engines[name] = engine
        bytes_read = engine.model.checkpoint.bytes_read
        seconds = time.perf_counter() - started
        self.policy.observe_layer_event(bytes_read, seconds)
        self._log("start", name, engine, seconds=seconds, bytes_read=bytes_read)
        return engine

    def _release(self, name: str) -> None:
        engine = self.engines.pop(name)
        self._released_prefix = [a + b for a, b in zip(self._released_prefix, engine.scheduler.blocks.stats.counts())]
        self._log("release", name, engine)
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _log(self, kind: str, name: str, engine: LLMEngine, **extra) -> None:
        entry = {"time": time.time(), "kind": kind, "model": name, "layers": engine.num_layers,
                 "capacity": engine.capacity, "capacity_tokens": engine.capacity_tokens,
                 "weight_bytes": engine.memory.weight_bytes,
                 "kv_bytes": engine.memory.kv_bytes, **extra}
        self.timeline.append(entry)
        logger.info("%s %s: %d layers, batch capacity %d", kind, name, engine.num_layers, engine.capacity)

    def prefix_totals(self) -> tuple[int, int, int]:
        """Prompt blocks looked up, found cached, and positions saved, over every engine since start."""
        live = [e.scheduler.blocks.stats.counts() for e in self.engines.values()]
        return tuple(map(sum, zip(self._released_prefix, *live)))

    # --- conveniences ---------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 tasks: list[str | None] | None = None) -> list[Completion]:
        """Run prompts to completion (all queued at once); results in prompt order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        tasks = tasks or [None] * len(prompts)
        ids = [self.add_request(p, sp, task=t) for p, sp, t in zip(prompts, params_list, tasks)]
        prompt_ids = {p.request_id: p.prompt_ids for p in self._pending}  # per model; the one that served it below
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        records: dict[str, list] = {i: [] for i in ids}
        text: dict[str, str] = {i: "" for i in ids}
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id in tokens:
                    tokens[out.request_id] += out.new_token_ids
                    records[out.request_id] += out.new_records
                    text[out.request_id] += out.new_text
                    if out.finished:
                        done[out.request_id] = out
        return [Completion(i, prompt_ids[i][done[i].summary.model], tokens[i], text[i], records[i],
                           done[i].finish_reason, done[i].summary) for i in ids]

    def stats(self) -> dict:
        """Per live model: depth, capacity and use, memory; plus the policy's state and the timeline."""
        models = {}
        for name, e in self.engines.items():
            models[name] = {
                "loaded_layers": e.num_layers, "num_layers": e.model_config.num_layers, "capacity": e.capacity,
                "capacity_tokens": e.capacity_tokens, "used_tokens": e.scheduler.used_tokens,
                "mean_seq_len": e.mean_seq_len, "preempted": e.scheduler.num_preempted,
                "prefix_hit_rate": e.scheduler.blocks.stats.hit_rate,
                "prefill_tokens_saved": e.scheduler.blocks.stats.tokens_saved,
                "running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting),
                "weight_bytes": e.memory.weight_bytes, "kv_bytes": e.memory.kv_bytes,
                "memory_budget": e.memory.budget_bytes, "draining": name not in self.policy.targets,
            }
        return {"models": models, "queued": len(self._pending), "policy": self.policy.snapshot(),
                "timeline": self.timeline}


__all__ = ["Orchestrator", "OrchestratorConfig"]
