"""Executes prefill chunks and early-exit decode steps on the model and the KV pool.

The decode step keeps every row of the batch in one (B, 1, D) hidden state and, per loaded layer:
  1. every row runs the attention half of the block, so K/V is written for every row from one
     projection: rows that already exited write it from their frozen exit hidden state (the
     CALM/DREX choice: later tokens attend to every position at every layer they run);
  2. only the rows still running take the residual and the MLP (`Block.forward(rows=...)`);
  3. at an exit point, the running rows whose confidence reaches their threshold leave with their
     logits (`exits.exit_check`: with a probe gate or a logit-free measure, the LM head runs on
     fewer rows than are running);
  4. once every row has left, the remaining layers only project K/V from the frozen states;
  5. with a logit-free measure, the leaving rows keep the features their head's LM head reads, and
     one LM-head product at the end of the step serves every row that shares the model's LM head:
     the LM head is memory-bound (SmolLM2's: 113 MB in fp32; Gemma 3 270M's: 671 MB), so reading it
     once per step instead of once per exit point with leavers is what keeps exits cheap.
Attention runs for exited rows too rather than on a compacted batch: gathering the running rows'
K/V at every deeper layer, plus a separate K/V projection for the exited rows, cost more than the
discarded rows (bench/decode_ab.py measures the two side by side).
At the last loaded layer every remaining row leaves (greedy exit); on a partially loaded model
that exit is *forced*. A row whose context is being refilled for newly loaded layers (`caps`)
leaves, forced, at the deepest layer its context has K/V in.

With `compile`, a step in which no row may exit and none is capped runs as one torch.compile graph
when the batch is small (`COMPILED_ROWS`) and its rows share no KV block: there a step is some 600
small ops whose dispatch costs as much as the products (weight-only int8 at batch 1), and the graph
fuses the norms, RoPE, the attention's softmax and the residuals. Larger batches are bound by their
matmuls, which compiling does not speed up; steps with exits branch on the data and stay eager, as
do batches with shared prompt prefixes (each would be one more graph to compile for a few percent).
`warm_up` compiles before serving, so no request waits on the compiler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .exits import LOGIT_FREE, ExitConfig, ExitHeads, check_probes, exit_check, exit_confidence
from .kv_cache import DecodeKV, KVCache, PrefillKV
from .models.transformer import Transformer

logger = logging.getLogger("helios")
COMPILED_ROWS = 8  # the largest batch the compiled step serves: beyond it, compiling measured no faster


@dataclass
class DecodeOutput:
    logits: Tensor  # (B, V) fp32: the logits each row exited with
    logprobs: Tensor  # (B, V) fp32: their log-softmax (the sampled token's logprob, and the greedy exit's confidence)
    depth: Tensor  # (B,) int64: exit depth, 1-based
    confidence: Tensor  # (B,) fp32: confidence at the exit depth
    forced: Tensor  # (B,) bool: greedy exit at the last loaded layer of a partially loaded model


class ModelRunner:
    def __init__(self, model: Transformer, heads: ExitHeads, exit_config: ExitConfig, cache: KVCache,
                 compile: bool = False):
        check_probes(heads, exit_config)
        self.model, self.heads, self.exit_config, self.cache = model, heads, exit_config, cache
        # Shapes are symbolic: one graph serves every batch of 2..COMPILED_ROWS rows and every context.
        self._compiled = torch.compile(self._decode, dynamic=True) if compile else None

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[list[int], Tensor, int]]) -> None:
        """Fill the cache for prompt chunks of several sequences in one packed forward.

        chunks: (block table, tokens, start) per sequence: its tokens at positions [start, start + len).
        No logits: the last prompt token is fed by the decode step, so prompts need no LM head.
        """
        model = self.model
        device = chunks[0][1].device
        tokens = torch.cat([t for _, t, _ in chunks])[None]
        positions = torch.cat([torch.arange(start, start + t.shape[0], device=device) for _, t, start in chunks])[None]
        x = model.embed_tokens(tokens, positions)
        rope = model.rope(positions)
        kv = PrefillKV(self.cache, [(table, start, start + t.shape[0]) for table, t, start in chunks])
        *body, last = model.layers
        for layer in body:
            x = layer(x, rope, kv)
        last.fill_kv(x, rope, kv)  # the last layer's output is never read: K/V is all we need

    def decode(
        self, tokens: Tensor, kv: DecodeKV, thresholds: Tensor, early_exit: Tensor, any_early_exit: bool,
        caps: list[int] | None = None,
    ) -> DecodeOutput:
        """One token per row. thresholds (B,) fp32; early_exit (B,) bool; any_early_exit = early_exit.any();
        caps: per row, the deepest layer it may run (None: every loaded layer)."""
        if (self._compiled is not None and not any_early_exit and caps is None and tokens.shape[0] <= COMPILED_ROWS
                and not kv.extra_blocks.numel()):
            try:
                with torch.no_grad():  # inference mode cannot be traced
                    return self._compiled(tokens, kv, thresholds, early_exit, False)
            except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler: raised before it runs
                logger.warning("torch.compile failed, decoding eagerly from now on: %s", e)
                self._compiled = None
        with torch.inference_mode():
            return self._decode(tokens, kv, thresholds, early_exit, any_early_exit, caps)

    def warm_up(self, max_len: int) -> None:
        """Compile the decode step before serving, so that no request waits on the compiler, on a
        scratch cache (the live pool is not touched). The compiler specializes sizes of 1, so a graph
        is compiled for each of: one row reading one block, one row reading several, several rows."""
        if self._compiled is None:
            return
        c, device = self.cache, self.cache.device
        n = min(3, (max_len - 1) // c.block_size + 1)  # blocks a row reads: 3 where max_len allows
        last = (n - 1) * c.block_size  # the position that reads them
        first, second = list(range(n)), list(range(n, 2 * n))
        layouts = (([0], [[0]]), ([last], [first]), ([last, last], [first, second]))  # (positions, block tables)
        # Sizes that coincide are specialized too: the pool's is unlike any of the layouts'.
        scratch = KVCache(c.config, self.model.num_loaded_layers, 2 * n + 5, c.block_size, c.dtype, device)
        for positions, tables in layouts:
            rows = len(tables)
            off = torch.zeros(rows, dtype=torch.bool, device=device)
            self.decode(torch.zeros(rows, dtype=torch.long, device=device), DecodeKV(scratch, positions, tables),
                        torch.ones(rows, device=device), off, any_early_exit=False)

    def _decode(
        self, tokens: Tensor, kv: DecodeKV, thresholds: Tensor, early_exit: Tensor, any_early_exit: bool,
        caps: list[int] | None = None,
    ) -> DecodeOutput:
        model, heads = self.model, self.heads
        n_rows, n_loaded = tokens.shape[0], model.num_loaded_layers
        device = tokens.device
        measure = self.exit_config.measure
        exit_points = set(self.exit_config.exit_points(n_loaded)) if any_early_exit else set()
        capped = {d: torch.tensor([i for i, c in enumerate(caps) if c == d], device=device)
                  for d in set(caps or ()) if d < n_loaded}
        limits = torch.where(early_exit, thresholds, torch.inf)  # a row that may not exit never reaches inf

        x = model.embed_tokens(tokens[:, None], kv.positions[:, None])  # (B, 1, D)
        rope = model.rope(kv.positions[:, None])
        previous = x  # hidden state at the previous exit point (cosine measure)
        out = DecodeOutput(
            logits=torch.empty(n_rows, model.config.vocab_size, device=device),
            logprobs=torch.empty(0),  # filled at the end, once every row has its logits
            depth=torch.full((n_rows,), n_loaded, dtype=torch.long, device=device),
            confidence=torch.empty(n_rows, device=device),
            forced=torch.zeros(n_rows, dtype=torch.bool, device=device),
        )
        run: Tensor | None = None  # indices of the running rows once some row has left; None while all run
        all_gone = False
        defer = measure in LOGIT_FREE  # leaving rows keep their LM-head input; one product at the end
        if defer:
            features = torch.empty(n_rows, model.config.hidden_size, dtype=x.dtype, device=device)
            deferred = torch.zeros(n_rows, dtype=torch.bool, device=device)

        for layer in model.layers:
            depth = layer.index + 1
            if all_gone:
                layer.fill_kv(x, rope, kv)
                continue
            x = layer(x, rope, kv, run)
            if depth in exit_points:
                rows = slice(None) if run is None else run  # only the running rows are checked
                found = exit_check(heads, self.exit_config, depth, x[rows, 0], previous[rows, 0], limits[rows],
                                   with_logits=not defer)
                previous = x
                if found is not None:
                    sel, conf, logits = found
                    left = sel if run is None else run[sel]
                    if logits is None:
                        f, lm_head = heads.features(depth, x[left, 0])
                        if lm_head is model.lm_head:
                            features[left], deferred[left] = f, True
                        else:  # a head with its own LM head
                            out.logits[left] = lm_head(f).float()
                    else:
                        out.logits[left] = logits
                    out.depth[left] = depth
                    out.confidence[left] = conf
                    stay = torch.ones(n_rows if run is None else run.numel(), dtype=torch.bool, device=device)
                    stay[sel] = False
                    run = (torch.arange(n_rows, device=device) if run is None else run)[stay]
            if depth in capped:  # capped rows still running leave here, forced
                running = torch.zeros(n_rows, dtype=torch.bool, device=device)
                running[slice(None) if run is None else run] = True
                left = capped[depth][running[capped[depth]]]
                if left.numel():
                    f, lm_head = heads.features(depth, x[left, 0])
                    out.logits[left] = lm_head(f).float()
                    out.confidence[left] = exit_confidence(heads, measure, depth, x[left, 0], previous[left, 0],
                                                           out.logits[left])
                    out.depth[left], out.forced[left] = depth, True
                    running[left] = False
                    run = running.nonzero()[:, 0]
            all_gone = run is not None and run.numel() == 0

        if not all_gone:  # greedy exit: whatever still runs leaves at the last loaded layer
            rows = slice(None) if run is None else run
            f, lm_head = heads.features(n_loaded, x[rows, 0])
            if defer and lm_head is model.lm_head:
                features[rows], deferred[rows] = f, True
            elif run is None:  # every row leaves here: take the product itself, not a copy of it
                out.logits = lm_head(f).float()
            else:
                out.logits[rows] = lm_head(f).float()
        if defer and bool(deferred.any()):
            if bool(deferred.all()):
                out.logits = model.lm_head(features).float()
            else:
                index = deferred.nonzero()[:, 0]
                out.logits[index] = model.lm_head(features[index]).float()
        # One pass over the vocabulary serves the sampled tokens' logprobs and the greedy exit's confidence.
        out.logprobs = torch.log_softmax(out.logits, dim=-1)
        if not all_gone:
            out.confidence[rows] = exit_confidence(heads, measure, n_loaded, x[rows, 0], previous[rows, 0],
                                                   logprobs=out.logprobs[rows])
            out.forced[rows] = n_loaded < model.config.num_layers
        return out
