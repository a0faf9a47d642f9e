"""Executes prefill chunks and early-exit decode steps on the model and the KV pool.

The decode step, per loaded layer:
  1. rows that already exited get this layer's K/V from their frozen exit hidden state
     (the layer's norm + K/V projections only — the CALM/DREX choice: cheap, and later tokens
     attend to every position at every layer they run);
  2. rows still running go through the full block;
  3. at an exit point, rows whose confidence reaches their threshold leave: their logits are kept,
     and the running set is compacted so deeper layers compute only the rows still running. With a
     logit-free measure (probe, cosine) only the leaving rows run the LM head.
At the last loaded layer every remaining row leaves (greedy exit); on a partially loaded model
that exit is *forced*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .exits import LOGIT_FREE, ExitConfig, ExitHeads, check_probes, exit_confidence
from .kv_cache import DecodeKV, KVCache, PrefillKV
from .models.transformer import Transformer


@dataclass
class DecodeOutput:
    logits: Tensor  # (B, V) fp32: the logits each row exited with
    depth: Tensor  # (B,) int64: exit depth, 1-based
    confidence: Tensor  # (B,) fp32: confidence at the exit depth
    forced: Tensor  # (B,) bool: greedy exit at the last loaded layer of a partially loaded model


class ModelRunner:
    def __init__(self, model: Transformer, heads: ExitHeads, exit_config: ExitConfig, cache: KVCache):
        check_probes(heads, exit_config)
        self.model, self.heads, self.exit_config, self.cache = model, heads, exit_config, cache

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: Tensor, start: int) -> None:
        """Fill the cache for `tokens` at positions [start, start + len) of the sequence in `slot`.

        No logits: the last prompt token is fed by the decode step, so prompts need no LM head.
        """
        model = self.model
        positions = torch.arange(start, start + tokens.shape[0], device=tokens.device)[None]
        x = model.embed_tokens(tokens[None], positions)
        cos, sin = model.rope(positions)
        kv = PrefillKV(self.cache, slot, start, tokens.shape[0])
        *body, last = model.layers
        for layer in body:
            x = layer(x, cos, sin, kv)
        last.fill_kv(x, cos, sin, kv)  # the last layer's output is never read: K/V is all we need

    @torch.inference_mode()
    def decode(
        self, tokens: Tensor, kv: DecodeKV, thresholds: Tensor, early_exit: Tensor, any_early_exit: bool
    ) -> DecodeOutput:
        """One token per row. thresholds (B,) fp32; early_exit (B,) bool; any_early_exit = early_exit.any()."""
        model, heads = self.model, self.heads
        n_rows, n_loaded = tokens.shape[0], model.num_loaded_layers
        device = tokens.device
        measure = self.exit_config.measure
        exit_points = set(self.exit_config.exit_points(n_loaded)) if any_early_exit else set()

        x = model.embed_tokens(tokens[:, None], kv.positions[:, None])  # (B, 1, D)
        cos, sin = model.rope(kv.positions[:, None])
        rows = torch.arange(n_rows, device=device)  # rows still running
        run_kv, run_cos, run_sin, run_thr, run_ee = kv, cos, sin, thresholds, early_exit
        previous = x  # hidden state at the previous exit point (cosine measure)

        out = DecodeOutput(
            logits=torch.empty(n_rows, model.config.vocab_size, device=device),
            depth=torch.full((n_rows,), n_loaded, dtype=torch.long, device=device),
            confidence=torch.empty(n_rows, device=device),
            forced=torch.zeros(n_rows, dtype=torch.bool, device=device),
        )
        gone_rows: list[Tensor] = []  # rows that left early, and their exit hidden states
        gone_h: list[Tensor] = []
        gone = None  # (hidden, cos, sin, kv) of all rows gone so far, rebuilt when rows leave

        for layer in model.layers:
            depth = layer.index + 1
            if gone is not None:
                layer.fill_kv(*gone)
            if rows.numel() == 0:
                continue
            x = layer(x, run_cos, run_sin, run_kv)
            if depth not in exit_points:
                continue
            # cosine and probe decide without the LM head: only the rows that leave compute logits
            logits = None if measure in LOGIT_FREE else heads.logits(depth, x[:, 0])
            conf = exit_confidence(heads, measure, depth, x[:, 0], previous[:, 0], logits)
            previous = x
            leave = (conf >= run_thr) & run_ee
            if not bool(leave.any()):
                continue
            left = rows[leave]
            h_left = x[leave]
            out.logits[left] = (logits[leave] if logits is not None else heads.logits(depth, h_left[:, 0])).float()
            out.depth[left] = depth
            out.confidence[left] = conf[leave]
            gone_rows.append(left)
            gone_h.append(h_left)
            all_gone = torch.cat(gone_rows)
            gone = (torch.cat(gone_h), cos[all_gone] if cos is not None else None,
                    sin[all_gone] if sin is not None else None, kv.select(all_gone))
            stay = ~leave
            rows, x, previous = rows[stay], x[stay], previous[stay]
            run_thr, run_ee, run_kv = run_thr[stay], run_ee[stay], kv.select(rows)
            if cos is not None:
                run_cos, run_sin = cos[rows], sin[rows]

        if rows.numel():  # greedy exit: whatever still runs leaves at the last loaded layer
            logits = heads.logits(n_loaded, x[:, 0])
            conf = exit_confidence(heads, measure, n_loaded, x[:, 0], previous[:, 0], logits)
            out.logits[rows] = logits.float()
            out.confidence[rows] = conf
            out.forced[rows] = n_loaded < model.config.num_layers
        return out
