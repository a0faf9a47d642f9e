"""Generation-based evaluation: early-exit decoding against the same model at full depth.

Both runs are greedy on the same prompts in one engine: first every layer for every token (the
reference), then early exits at the threshold, optionally with only the first `layers` layers loaded.
Reported: greedy token agreement, exact-match share, ROUGE-L F1 of the early-exit outputs against the
reference outputs (on token ids), the perplexity of each output under the full model (teacher-forced,
the prompt as context), the exit histogram, forced share, breach rate, and tokens/s of both runs
(informative only: one process, batch as large as the prompt set).

Prompt files: `.jsonl`, one object per line with "prompt" (optional "max_tokens", "task"), or any
other file with one prompt per line (blank lines skipped).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .models.transformer import Transformer


@dataclass(frozen=True)
class Prompt:
    text: str
    max_tokens: int | None = None  # None: the evaluation's default
    task: str | None = None


def load_prompts(path: str | Path) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(Prompt(line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: invalid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise ValueError(f'{path}:{n}: expected an object with a non-empty string "prompt"')
        max_tokens = obj.get("max_tokens")
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):  # bool is no count
            raise ValueError(f'{path}:{n}: "max_tokens" must be a positive integer, got {max_tokens!r}')
        task = obj.get("task")
        prompts.append(Prompt(obj["prompt"], max_tokens, None if task is None else str(task)))
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


# --- metrics ----------------------------------------------------------------------------------------
def lcs_length(a: Sequence, b: Sequence) -> int:
    """Longest common subsequence, O(len(a) * len(b)) time, one row of memory."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: Sequence, reference: Sequence) -> float:
    """ROUGE-L F1 (beta = 1). Two empty sequences agree fully; one empty one not at all."""
    if not candidate and not reference:
        return 1.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def token_matches(a: Sequence, b: Sequence) -> tuple[int, int]:
    """(positions equal, positions compared); the longer output's extra positions count as mismatches."""
    return sum(x == y for x, y in zip(a, b)), max(len(a), len(b))


@torch.inference_mode()
def output_nll(model: Transformer, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> list[float]:
    """Per output token, -log p(token | prompt, previous outputs) under `model` (teacher-forced)."""
    if not output_ids:
        return []
    tokens = torch.tensor([list(prompt_ids) + list(output_ids)], device=model.device)
    logits = model(tokens)[0, len(prompt_ids) - 1 : -1].float()
    return F.cross_entropy(logits, tokens[0, len(prompt_ids) :], reduction="none").tolist()


def _ppl(nll: list[float]) -> float | None:
    return math.exp(sum(nll) / len(nll)) if nll else None


# --- the evaluation ---------------------------------------------------------------------------------
@dataclass
class PromptResult:
    task: str | None
    prompt_tokens: int
    full_ids: list[int]
    early_ids: list[int]
    exit_layers: list[int]
    agreement: float
    rouge_l: float
    perplexity_full: float | None
    perplexity_early: float | None


@dataclass
class EvalReport:
    model: str
    num_layers: int
    loaded_layers: int
    threshold: float
    measure: str
    prompts: int
    tokens_full: int
    tokens_early: int
    token_agreement: float  # equal positions / compared positions, over all prompts
    exact_match: float  # share of prompts whose early-exit output equals the reference
    rouge_l: float  # mean over prompts
    perplexity_full: float | None  # exp(mean NLL) over all output tokens, under the full model
    perplexity_early: float | None
    exit_histogram: dict[int, int]
    mean_exit_layer: float
    forced_share: float
    breach_rate: float
    tokens_per_s_full: float
    tokens_per_s_early: float
    results: list[PromptResult]

    def to_dict(self, per_prompt: bool = True) -> dict:
        out = asdict(self)
        out.pop("results")
        if per_prompt:
            out["per_prompt"] = [asdict(r) for r in self.results]
        return out

    def format(self) -> str:
        def ppl(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        return "\n".join([
            f"{self.model}: {self.prompts} prompts, greedy; early exit at threshold {self.threshold} ({self.measure}), "
            f"{self.loaded_layers}/{self.num_layers} layers loaded, vs full depth",
            "                    full depth  early exit",
            f"tokens              {self.tokens_full:10d}  {self.tokens_early:10d}",
            f"perplexity (full)   {ppl(self.perplexity_full):>10}  {ppl(self.perplexity_early):>10}",
            f"tokens/s            {self.tokens_per_s_full:10.1f}  {self.tokens_per_s_early:10.1f}",
            f"token agreement {self.token_agreement:.1%}, exact match {self.exact_match:.1%}, "
            f"ROUGE-L {self.rouge_l:.3f}",
            f"exits by layer {self.exit_histogram}, mean exit layer {self.mean_exit_layer:.2f}, "
            f"forced {self.forced_share:.1%}, breaches {self.breach_rate:.1%}",
        ])


def evaluate(
    model: str,
    prompts: Sequence[Prompt | str],
    threshold: float = 0.8,
    layers: int | None = None,
    max_tokens: int = 64,
    measure: str = "max_prob",
    exit_layers: tuple[int, ...] | None = None,
    exit_heads: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    ignore_eos: bool = True,
    quantization: str | None = None,
) -> EvalReport:
    """Greedy early-exit decoding (threshold, first `layers` layers loaded) vs the full-depth model."""
    from .engine import EngineConfig, LLMEngine
    from .exits import ExitConfig
    from .sampling import SamplingParams

    prompts = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts to evaluate")
    exit_config = ExitConfig(threshold=threshold, measure=measure, exit_layers=exit_layers, heads_path=exit_heads)
    engine = LLMEngine(EngineConfig(model=model, dtype=dtype, quantization=quantization, device=device,
                                    exit=exit_config))
    depth = engine.model_config.num_layers
    if layers is not None and not 1 <= layers <= depth:
        raise ValueError(f"layers must be in [1, {depth}], got {layers}")
    texts = [p.text for p in prompts]
    full_params = [SamplingParams(max_tokens=p.max_tokens or max_tokens, temperature=0, ignore_eos=ignore_eos,
                                  early_exit=False) for p in prompts]

    start = time.perf_counter()
    full = engine.generate(texts, full_params)
    full_s = time.perf_counter() - start
    if layers is not None:
        engine.set_num_layers(layers)
    start = time.perf_counter()
    early = engine.generate(texts, [replace(sp, early_exit=True, threshold=threshold) for sp in full_params])
    early_s = time.perf_counter() - start
    engine.set_num_layers(depth)  # perplexity is always under the full model

    results, nll_full, nll_early, matched, compared = [], [], [], 0, 0
    for p, f, e in zip(prompts, full, early):
        nf = output_nll(engine.model, f.prompt_token_ids, f.token_ids)
        ne = output_nll(engine.model, e.prompt_token_ids, e.token_ids)
        nll_full += nf
        nll_early += ne
        m, c = token_matches(e.token_ids, f.token_ids)
        matched, compared = matched + m, compared + c
        results.append(PromptResult(p.task, len(f.prompt_token_ids), f.token_ids, e.token_ids, e.exit_layers,
                                    m / c if c else 1.0, rouge_l(e.token_ids, f.token_ids), _ppl(nf), _ppl(ne)))

    records = [r for e in early for r in e.records]
    n_full, n_early = sum(len(f.token_ids) for f in full), len(records)
    return EvalReport(
        model=engine.name, num_layers=depth, loaded_layers=layers or depth, threshold=threshold, measure=measure,
        prompts=len(prompts), tokens_full=n_full, tokens_early=n_early,
        token_agreement=matched / compared if compared else 1.0,
        exact_match=sum(r.full_ids == r.early_ids for r in results) / len(results),
        rouge_l=sum(r.rouge_l for r in results) / len(results),
        perplexity_full=_ppl(nll_full), perplexity_early=_ppl(nll_early),
        exit_histogram=dict(sorted(Counter(r.exit_layer for r in records).items())),
        mean_exit_layer=sum(r.exit_layer for r in records) / n_early if n_early else 0.0,
        forced_share=sum(r.forced for r in records) / n_early if n_early else 0.0,
        breach_rate=sum(r.breach for r in records) / n_early if n_early else 0.0,
        tokens_per_s_full=n_full / full_s, tokens_per_s_early=n_early / early_s,
        results=results,
    )
