"""`helios profile`: measure each registry model offline, at full depth, on a prompt set.

The shortlist ranks models by these numbers before any live traffic has been seen. One batch of the
whole prompt set per model (greedy, `max_tokens` each), so tokens/s is the throughput at that
concurrency on this device; TPOT is the mean per request. The decode step-time fit (pht.StepFit) is
taken over the steps of that batch, of one prompt alone (so the batch size varies across its samples),
and of the batch again with no exit checks (so the check cost separates from the blocks').
"""

from __future__ import annotations

import math
import time
from collections import Counter

from ..engine import EngineConfig, LLMEngine
from ..evaluate import Prompt
from ..sampling import SamplingParams
from .pht import fit_steps, sample
from .registry import ModelEntry, OfflineProfile


def profile_model(entry: ModelEntry, prompts: list[Prompt], prompts_name: str, max_tokens: int = 32,
                  max_model_len: int | None = None, device: str = "auto") -> OfflineProfile:
    engine = LLMEngine(EngineConfig(model=str(entry.path), name=entry.name, device=device, max_model_len=max_model_len,
                                    exit=entry.exit_config(), max_num_seqs=max(len(prompts), 1),
                                    **entry.engine_options()))
    params = [SamplingParams(max_tokens=p.max_tokens or max_tokens, temperature=0, ignore_eos=True) for p in prompts]
    engine.generate([prompts[0].text], params[0])  # warm-up: first-call allocations are not the model's speed
    engine.drain_steps()
    engine.generate([prompts[0].text], params[0])  # batch 1: the step fit needs more than one batch size
    start = time.perf_counter()
    done = engine.generate([p.text for p in prompts], params)
    seconds = time.perf_counter() - start
    records = [r for c in done for r in c.records]
    engine.set_exit_layers(())  # the same batch without a check: what the checks cost
    engine.generate([p.text for p in prompts], params)
    fit = fit_steps([sample(s) for s in engine.drain_steps()], exited_share=entry.config.attention_share)
    tpots = [c.summary.time_per_output_token_s for c in done if c.summary.time_per_output_token_s is not None]
    exits = Counter(r.exit_layer for r in records)
    return OfflineProfile(
        prompts=prompts_name, device=str(engine.device), tokens_per_s=len(records) / seconds,
        time_per_output_token_s=sum(tpots) / len(tpots) if tpots else seconds / max(len(records), 1),
        perplexity=math.exp(-sum(r.logprob for r in records) / len(records)),
        exit_shares={d: n / len(records) for d, n in sorted(exits.items())}, tokens=len(records),
        step_per_layer_s=fit.per_layer_s if fit else None, step_per_row_layer_s=fit.per_row_layer_s if fit else None,
        step_per_check_row_s=fit.per_check_row_s if fit else None,
    )
