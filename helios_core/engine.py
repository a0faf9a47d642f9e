"""The early-exit engine: requests in, tokens and exit telemetry out.

One step is schedule -> execute -> update:
  schedule  the scheduler gives running requests the KV blocks they grow into, admits waiting ones
            while blocks are free (preempting the newest when they run out), and plans prefill
            chunks and the decode batch;
  execute   the runner fills the cache for the prefill chunks (packed into one forward), then runs
            one early-exit decode step over the batch, and the sampler picks each row's next token;
  update    tokens, exit records and stop conditions are applied; finished requests free their blocks.
Loading or unloading layers happens between steps (`set_num_layers`) and re-sizes the KV pool so
that weights + KV + workspace stay within `memory_budget`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Collection, Iterator

import torch

from .detokenizer import TextStream
from .dtypes import default_device, dtype_name, resolve_dtype
from .exits import ExitConfig, ExitHeads, load_exit_heads
from .kv_cache import DecodeKV, KVCache, MemoryPlan, blocks_for, plan_memory
from .models import ModelConfig, load_layers, load_model, pack_weights, unload_layers
from .models.quantize import check_quantization
from .models.transformer import weight_bytes
from .prompt_limits import check_prompt_size, max_prompt_chars
from .request import Completion, RequestOutput, RequestStatus, Sequence
from .runner import ModelRunner
from .sampling import Sampler, SamplingParams, make_generator
from .scheduler import Scheduler
from .telemetry import ExitStats, RequestSummary, StepRecord, TokenRecord

logger = logging.getLogger("helios")
DEFAULT_BUDGET_SEQS = 32  # the default memory budget holds this many sequences with every layer loaded
STEP_LOG = 4096  # step records kept until a consumer drains them (the policy, a replica's report)


@dataclass(frozen=True)
class EngineConfig:
    model: str  # Hugging Face model directory (config.json + *.safetensors [+ tokenizer])
    name: str | None = None  # served name; defaults to the directory name
    num_layers: int | None = None  # loaded depth; None = every layer
    dtype: str = "auto"  # auto (the device's fastest native dtype, helios_core.dtypes) | float32 | bfloat16 | float16
    quantization: str | None = None  # "int8": weight-only int8 matrices (models/quantize.py)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    memory_budget: int | None = None  # bytes for weights + KV + workspace; None = DEFAULT_BUDGET_SEQS at full depth
    max_model_len: int | None = None  # prompt + output tokens per sequence; None = min(model's, 2048)
    max_num_seqs: int = 256  # upper bound on the running batch
    max_prefill_tokens: int = 256  # prompt tokens prefilled per step (chunked prefill)
    block_size: int = 64  # positions per KV block (bench/paged_attention.py measures the choice)
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before
    exit: ExitConfig = field(default_factory=ExitConfig)
    early_exit: bool = True  # False: every request runs all loaded layers
    compile: bool = False  # torch.compile the small-batch full-depth decode step (runner.py), at start
    pack_weights: bool = True  # CPU: fp32/bf16 matrices in oneDNN's layout (loader.pack_weights); not with compile

    def __post_init__(self):
        # num_layers is checked against the model's depth when it loads.
        check_quantization(self.quantization)
        positive = {"max_num_seqs": self.max_num_seqs, "max_prefill_tokens": self.max_prefill_tokens,
                    "memory_budget": self.memory_budget, "block_size": self.block_size}
        for name, value in positive.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an int >= 2, got {self.max_model_len!r}")


@dataclass(frozen=True)
class LayerEvent:
    """A change of loaded depth, for telemetry and the policy's history."""

    time: float
    from_layers: int
    to_layers: int
    bytes_read: int
    seconds: float
    capacity_before: int
    capacity_after: int
    preempted: int


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        device = default_device() if config.device == "auto" else torch.device(config.device)
        dtype = resolve_dtype(config.dtype, device)  # before anything loads: an unknown name fails first
        model_config = ModelConfig.from_pretrained(config.model)
        self.max_model_len = config.max_model_len or min(model_config.max_position_embeddings, 2048)
        if not 2 <= self.max_model_len <= model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len must be in [2, {model_config.max_position_embeddings}] (the model's "
                f"max_position_embeddings), got {self.max_model_len}"
            )
        self.name = config.name or Path(config.model).name
        self.model = load_model(config.model, config.num_layers, dtype, device, max_len=self.max_model_len,
                                quantization=config.quantization)
        self.device = self.model.device
        self.heads = load_exit_heads(config.exit.heads_path, self.model) if config.exit.heads_path else ExitHeads(self.model)
        # After the heads: a backbone adapter merges into plain weights. Not with compile: inductor
        # cannot take oneDNN's opaque tensors as inputs.
        if config.pack_weights and not config.compile:
            pack_weights(self.model)
        self.tokenizer = load_tokenizer(config.model)
        self.max_prompt_chars = None if self.tokenizer is None else max_prompt_chars(self.tokenizer, self.max_model_len)
        self.eos_token_ids = set(model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)

        self.memory_budget = config.memory_budget or self._default_budget()
        self.memory = m = self._plan(self.model.num_loaded_layers)
        self.cache = KVCache(model_config, self.model.num_loaded_layers, m.num_blocks, config.block_size,
                             self.model.dtype, self.device)
        self.runner = ModelRunner(self.model, self.heads, config.exit, self.cache, compile=config.compile)
        self.runner.warm_up(self.max_model_len)
        self.scheduler = Scheduler(m.num_blocks, config.block_size, m.max_seqs, config.max_prefill_tokens,
                                   config.enable_prefix_caching)
        self._lengths = deque(maxlen=256)  # prompt + output tokens of the latest finished requests
        self.sampler = Sampler()
        self.stats = ExitStats(self.name, model_config.num_layers)
        self.layer_events: list[LayerEvent] = []
        self.steps: deque[StepRecord] = deque(maxlen=STEP_LOG)
        # Steps are timed for the policy's cost model. On a CPU the cost is the CPU time the step
        # took: other processes on the same cores (Serve's ingress and proxy, another model's engine
        # during a profiling round) stretch the wall time of whichever model shares them then.
        self._clock = time.perf_counter if self.device.type == "cuda" else time.process_time
        self._requests: dict[str, Sequence] = {}
        self._aborted: list[Sequence] = []
        self._ids = itertools.count()
        logger.info(
            "%s: %d/%d layers on %s in %s%s, weights %.1f MiB, KV pool %.1f MiB = %d tokens in %d blocks "
            "(%d sequences of max_model_len), budget %.1f MiB",
            self.name, self.num_layers, model_config.num_layers, self.device, self.dtype,
            " (auto)" if config.dtype == "auto" else "", m.weight_bytes / 2**20,
            m.kv_bytes / 2**20, m.capacity_tokens, m.num_blocks, m.sequences(self.max_model_len),
            m.budget_bytes / 2**20,
        )

    # --- memory ---------------------------------------------------------------------------------
    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    @property
    def dtype(self) -> str:
        """The weights' and KV cache's dtype, e.g. "bfloat16" (what "auto" resolved to)."""
        return dtype_name(self.model.dtype)

    @property
    def num_layers(self) -> int:
        return self.model.num_loaded_layers

    @property
    def mean_seq_len(self) -> float:
        """Prompt + output tokens of the latest finished requests, on average (max_model_len before any)."""
        return sum(self._lengths) / len(self._lengths) if self._lengths else float(self.max_model_len)

    @property
    def capacity(self) -> int:
        """Sequences the KV pool holds at once at the observed mean length."""
        return self.memory.sequences(self.mean_seq_len)

    @property
    def capacity_tokens(self) -> int:
        return self.memory.capacity_tokens

    def _weight_bytes(self, num_layers: int) -> int:
        """Weights held at a given depth (blocks are identical in size, so this is exact)."""
        model = self.model
        block = weight_bytes(model.layers[0])
        return model.weight_bytes() - model.num_loaded_layers * block + num_layers * block + self.heads.weight_bytes()

    def _plan(self, num_layers: int, budget: int | None = None) -> MemoryPlan:
        return plan_memory(
            self.model.config, num_layers, self._weight_bytes(num_layers), budget or self.memory_budget,
            self.max_model_len, self.model.dtype.itemsize, self.config.max_num_seqs,
            self.config.max_prefill_tokens, self.config.block_size,
        )

    def _default_budget(self) -> int:
        """Room for DEFAULT_BUDGET_SEQS sequences of max_model_len with every layer loaded; partial
        loading turns the unloaded layers' share into more blocks."""
        probe = self._plan(self.model.config.num_layers, budget=2**62)
        seqs = min(DEFAULT_BUDGET_SEQS, self.config.max_num_seqs)
        return probe.budget_for_blocks(seqs * blocks_for(self.max_model_len, self.config.block_size))

    def set_num_layers(self, num_layers: int) -> LayerEvent:
        """Load or unload layers between steps; re-size the KV pool to the new depth.

        Running sequences are kept. Growing the depth shrinks the pool: the newest sequences are
        preempted back to the queue until the rest fit (recomputed later, nothing is lost). The new
        layers have no K/V for the running sequences' context: each keeps decoding, no deeper than the
        layers it has, while its context is refilled chunk by chunk beside the decodes (no stall), and
        then runs at the new depth. Shrinking frees the dropped layers' weights and KV, and the pool
        gains blocks.
        """
        start, before = time.perf_counter(), self.num_layers
        capacity_before = self.capacity
        if not 1 <= num_layers <= self.model_config.num_layers:
            raise ValueError(f"num_layers must be in [1, {self.model_config.num_layers}], got {num_layers}")
        if num_layers == before:
            return LayerEvent(time.time(), before, before, 0, 0.0, capacity_before, capacity_before, 0)
        plan = self._plan(num_layers)  # raises MemoryBudgetError before anything changes
        old_plan = self.memory
        moves, preempted = self.scheduler.resize(plan.num_blocks, plan.max_seqs)
        bytes_read = 0
        if num_layers > before:
            # The pool shrinks before the weights grow, so the budget holds throughout.
            self.cache.resize(num_layers, plan.num_blocks, moves)
            try:
                bytes_read = load_layers(self.model, num_layers)
            except Exception:
                moves, _ = self.scheduler.resize(old_plan.num_blocks, old_plan.max_seqs)
                self.cache.resize(before, old_plan.num_blocks, moves)
                raise
            # Cached prefixes have no K/V in the new layers; running contexts are refilled.
            self.scheduler.blocks.forget_cached()
            self.scheduler.refill(before)
        else:
            unload_layers(self.model, num_layers)
            self.cache.resize(num_layers, plan.num_blocks, moves)
            self.scheduler.unload(num_layers)
        self.memory = plan
        self.runner.warm_up(self.max_model_len)  # a compiled step is specific to the depth: compile the new one now
        event = LayerEvent(time.time(), before, num_layers, bytes_read, time.perf_counter() - start,
                           capacity_before, self.capacity, len(preempted))
        self.layer_events.append(event)
        return event

    @property
    def exit_layers(self) -> tuple[int, ...] | None:
        """The exit points in use (None: the configured ones, `config.exit`)."""
        active = self.runner.exit_config
        return None if active is self.config.exit else active.exit_layers

    def set_exit_layers(self, exit_layers: tuple[int, ...] | None) -> None:
        """Check for exits at these depths only (between steps; None: back to `config.exit`'s).
        The policy thins the exit points where a check costs more than the exits it finds save."""
        exit_config = self.config.exit
        if exit_layers is not None:
            exit_config = replace(exit_config, exit_layers=tuple(exit_layers))
        self.runner.exit_config = exit_config

    def set_memory_budget(self, budget: int) -> int:
        """Re-plan the KV pool for a new budget at the current depth (between steps); returns the new
        capacity. Running sequences keep their cache; when a smaller pool cannot hold them all, the
        newest are preempted and recomputed later, never dropped."""
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"memory_budget must be a positive int, got {budget!r}")
        plan = self._plan(self.num_layers, budget)  # raises MemoryBudgetError before anything changes
        moves, _ = self.scheduler.resize(plan.num_blocks, plan.max_seqs)
        self.cache.resize(self.num_layers, plan.num_blocks, moves)
        self.memory_budget, self.memory = budget, plan
        return self.capacity

    # --- requests -------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.name} has no tokenizer: pass token ids instead of text")
            return encode(self.tokenizer, prompt)
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        check_prompt_size(prompt, self.max_model_len, self.max_prompt_chars)  # before it costs an encode
        ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        check_prompt_size(ids, self.max_model_len, None)
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        threshold = self.config.exit.threshold if params.threshold is None else params.threshold
        text = None
        if self.tokenizer is not None:
            text = TextStream(self.tokenizer, ids, params.stop, params.include_stop_str_in_output)
        seq = Sequence(request_id, list(ids), len(ids), params, threshold, time.perf_counter(),
                       make_generator(params.seed, self.device), text)
        self._requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        seq = self._requests.get(request_id)
        if seq is not None and seq.status != RequestStatus.FINISHED:
            self.scheduler.finish(seq)
            seq.finish_reason = "abort"
            self._aborted.append(seq)

    def release_waiting(self, request_ids: Collection[str] | None = None) -> list[Sequence]:
        """Hand back the queued requests that have not started (no slot, no output yet), in queue
        order, so that another model can serve them after a switch; with `request_ids`, only those.
        They leave without an output: to their caller they were never here."""
        released = [s for s in self.scheduler.waiting
                    if not s.output_ids and (request_ids is None or s.request_id in request_ids)]
        for seq in released:
            self.scheduler.waiting.remove(seq)
            del self._requests[seq.request_id]
        return released

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def drain_steps(self) -> list[StepRecord]:
        """The step records since the last drain (safe while another thread is stepping)."""
        return [self.steps.popleft() for _ in range(len(self.steps))]

    # --- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = [self._finish(seq, "abort", [], "", []) for seq in self._aborted]
        self._aborted = []
        plan = self.scheduler.schedule()
        start = self._clock()
        if plan.prefills:
            self.runner.prefill([(c.seq.block_table, torch.tensor(c.seq.token_ids[c.start : c.end], device=self.device),
                                  c.start) for c in plan.prefills])
            for chunk in plan.prefills:
                self.scheduler.prefilled(chunk)
        if plan.prefills and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so the decode's time below excludes the prefill's kernels
        prefill_s = self._clock() - start
        prefill_tokens = sum(c.end - c.start for c in plan.prefills)
        if not plan.decodes:
            if plan.prefills:
                self.steps.append(StepRecord(0.0, 0, self.num_layers, 0, prefill_tokens, prefill_s))
            return outputs
        start = self._clock()
        seqs = plan.decodes
        positions = [len(s.token_ids) - 1 for s in seqs]
        early = [self.config.early_exit and s.params.early_exit for s in seqs]
        kv = DecodeKV(self.cache, positions, [s.block_table for s in seqs])
        out = self.runner.decode(
            torch.tensor([s.token_ids[-1] for s in seqs], device=self.device),
            kv,
            torch.tensor([s.threshold for s in seqs], device=self.device),
            torch.tensor(early, device=self.device),
            any_early_exit=any(early),
            caps=[s.depth_cap or self.num_layers for s in seqs] if any(s.depth_cap for s in seqs) else None,
        )
        new_tokens = self.sampler(out.logits, [s.params for s in seqs], [s.generator for s in seqs])
        logprobs = out.logprobs.gather(1, new_tokens[:, None])[:, 0]
        depths = out.depth.tolist()  # .tolist() waits for the device: the step's time is complete here
        rows = zip(seqs, new_tokens.tolist(), depths, out.confidence.tolist(), out.forced.tolist(), logprobs.tolist())
        seconds, now = self._clock() - start, time.perf_counter()
        points = self.runner.exit_config.exit_points(self.num_layers) if any(early) else ()
        checks = sum(p <= d for d in depths for p in points)
        self.steps.append(StepRecord(seconds, len(seqs), self.num_layers, sum(depths), prefill_tokens, prefill_s,
                                     checks))
        for seq, token, depth, conf, forced, logprob in rows:
            record = TokenRecord(depth, conf, forced, forced and conf < seq.threshold, logprob)
            outputs.append(self._append(seq, token, record, now))
        return outputs

    def _append(self, seq: Sequence, token: int, record: TokenRecord, now: float) -> RequestOutput:
        seq.num_cached = len(seq.token_ids)
        seq.token_ids.append(token)
        seq.records.append(record)
        self.stats.add_token(record)
        if seq.first_token_time is None:
            seq.first_token_time = now
        p = seq.params
        stop_by_token = (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids
        delta, stop_by_text = "", False
        if seq.text is not None and not stop_by_token:
            delta, stop_by_text = seq.text.push(token)
        if stop_by_token or stop_by_text:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = "length"
        else:
            return RequestOutput(seq.request_id, [token], delta, [record], finished=False)
        if seq.text is not None and not stop_by_text:
            delta += seq.text.finish()
        return self._finish(seq, reason, [token], delta, [record])

    def _finish(self, seq: Sequence, reason: str, tokens: list[int], delta: str, records: list[TokenRecord]) -> RequestOutput:
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        self._requests.pop(seq.request_id, None)
        self._lengths.append(len(seq.token_ids))
        self.stats.add_request()
        summary = RequestSummary.from_records(
            seq.request_id, self.name, seq.num_prompt_tokens, seq.records, reason,
            seq.arrival_time, seq.first_token_time, time.perf_counter(), self.exit_layers,
        )
        return RequestOutput(seq.request_id, tokens, delta, records, True, reason, summary)

    # --- conveniences over step() -----------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]] | str | list[int],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Run prompts to completion with continuous batching; results in prompt order.

        Needs an otherwise idle engine (step() is the interface for mixed callers).
        """
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; use add_request()/step() alongside other requests")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        seqs = {rid: self._requests[rid] for rid in ids}
        summaries: dict[str, RequestSummary] = {}
        while len(summaries) < len(ids):
            for out in self.step():
                if out.finished:
                    summaries[out.request_id] = out.summary
        return [self._completion(seqs[rid], summaries[rid]) for rid in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one request's deltas as they are produced (needs an otherwise idle engine)."""
        if self.has_unfinished():
            raise RuntimeError("stream() needs an idle engine; use add_request()/step() alongside other requests")
        self.add_request(prompt, params)
        while self.has_unfinished():
            yield from self.step()

    def _completion(self, seq: Sequence, summary: RequestSummary) -> Completion:
        text = seq.text.text if seq.text is not None else ""
        return Completion(seq.request_id, seq.token_ids[: seq.num_prompt_tokens], seq.output_ids, text,
                          seq.records, summary.finish_reason, summary)


def load_tokenizer(path: str | Path):
    """The model directory's tokenizer, or None when it ships none. Never runs remote code."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def load_tokenizers(paths: dict[str, Path]) -> dict[str, Any]:
    """name -> `load_tokenizer` of each model directory, one object per distinct tokenizer file: the
    models of a family share one."""
    by_file, tokenizers = {}, {}
    for name, path in paths.items():
        path = Path(path)
        key = (path / "tokenizer.json").read_bytes() if (path / "tokenizer.json").is_file() else name
        if key not in by_file:
            by_file[key] = load_tokenizer(path)
        tokenizers[name] = by_file[key]
    return tokenizers


def encode(tokenizer, text: str) -> list[int]:
    """`text`'s token ids, with the tokenizer's special tokens (its BOS) unless the text already starts
    with the BOS token's text, as a chat template that emits it renders: one BOS, never two."""
    bos = tokenizer.bos_token
    return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids)


__all__ = ["EngineConfig", "LLMEngine", "LayerEvent", "encode", "load_tokenizer", "load_tokenizers"]
