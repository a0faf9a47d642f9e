"""Teacher-forced quality of what a system served, on held-out text.

Free-running outputs diverge after the first differing token, so quality is measured teacher-forced:
for every configuration a system served tokens with (model, loaded depth, threshold), the exits it
would take on held-out text, as `helios eval --text` does. A system's figure is the mean over its
configurations, weighted by the tokens each served:
  accuracy     the exit token equals the next text token
  perplexity   of the text under the exit layers' distributions
  agreement    the exit token equals the same model's full-depth token on the same context
Models of another tokenizer family than the reference read the same characters in their own tokens;
their perplexity is per reference token (the text's total NLL over the reference's token count), so
that it compares across families. Accuracy and agreement stay per token of the model's own.
"""

from __future__ import annotations

import math

import torch

from ..engine import load_tokenizers
from ..exits import ExitConfig, ExitHeads, load_exit_heads
from ..models import load_model
from ..policy import Registry
from ..quality import chunk_tokens, load_text_tokens, load_texts, token_table, tokenize_texts

NO_EXIT = float("inf")  # a threshold no confidence reaches: every token runs every loaded layer


class QualityOracle:
    def __init__(self, registry: Registry, sources: list[str], tokens_per_source: int, chunk_len: int = 256,
                 device: str = "cpu", reference: str | None = None):
        """reference: the model whose tokenizer cuts `tokens_per_source` tokens of each source (default:
        the registry's first); the others read the same text."""
        self.registry, self.device, self.chunk_len = registry, device, chunk_len
        tokenizers = load_tokenizers({e.name: e.path for e in registry})
        ref = tokenizers[reference or next(iter(registry)).name]
        by_tokenizer = {id(ref): [c for s in sources
                                  for c in chunk_tokens(load_text_tokens(s, ref, tokens_per_source)[0], chunk_len)]}
        texts = None
        for tok in tokenizers.values():
            if id(tok) not in by_tokenizer:
                texts = texts or [load_texts(s, ref, tokens_per_source) for s in sources]
                by_tokenizer[id(tok)] = [c for t in texts for c in chunk_tokens(tokenize_texts(t, tok), chunk_len)]
        self._chunks = {name: by_tokenizer[id(tok)] for name, tok in tokenizers.items()}  # model -> its tokens
        self.sources, self.tokens = sources, _predicted(by_tokenizer[id(ref)])
        # NLL per own token -> per reference token: the same text's total over the reference's count.
        self._per_ref_token = {name: _predicted(c) / self.tokens for name, c in self._chunks.items()}
        self._cache: dict[tuple, dict] = {}
        self._models: dict[str, tuple] = {}
        self._final_top1: dict[str, torch.Tensor] = {}  # model -> its full-depth token per position

    def _model(self, name: str):
        if name not in self._models:
            entry = self.registry[name]
            net = load_model(str(entry.path), device=self.device, max_len=self.chunk_len,
                             quantization=entry.quantization)
            heads = load_exit_heads(str(entry.exit_heads), net) if entry.exit_heads else ExitHeads(net)
            self._models[name] = (net, heads)
        return self._models[name]

    def config(self, model: str, depth: int, threshold: float, exit_layers: tuple[int, ...] | None = None) -> dict:
        """accuracy, mean NLL and agreement of one configuration (cached); exit_layers None = the registry's."""
        exit_config = self.registry[model].exit_config()
        exit_config = ExitConfig(**{**exit_config.__dict__, "threshold": threshold,
                                    "exit_layers": exit_config.exit_layers if exit_layers is None else exit_layers})
        key = (model, depth, threshold, exit_config.exit_layers)
        if key not in self._cache:
            net, heads = self._model(model)
            table = token_table(net, heads, self._chunks[model], exit_config, depth)
            self._cache[key] = {
                "accuracy": float((table.exit_top1 == table.targets).float().mean()),
                "nll": float(table.exit_nll.double().mean()) * self._per_ref_token[model],
                "agreement": float((table.exit_top1 == table.top1[:, -1]).float().mean()),
            }
            self._final_top1[model] = table.top1[:, -1]
        return self._cache[key]

    def mixture(self, served: dict[tuple[str, int, tuple[int, ...] | None], int], threshold: dict[str, float],
                exit_layers: dict[str, tuple[int, ...] | None] | None = None) -> dict:
        """Token-weighted quality of the configurations in `served` ((model, depth, exit points) -> tokens;
        exit points None: `exit_layers[model]`, else the registry's)."""
        exit_layers = exit_layers or {}
        total = sum(served.values())
        if not total:
            return {"accuracy": None, "perplexity": None, "agreement_with_full_depth": None}
        parts = [(n / total, self.config(m, d, threshold[m], exits if exits is not None else exit_layers.get(m)))
                 for (m, d, exits), n in served.items()]
        return {"accuracy": sum(w * q["accuracy"] for w, q in parts),
                "perplexity": math.exp(sum(w * q["nll"] for w, q in parts)),
                "agreement_with_full_depth": sum(w * q["agreement"] for w, q in parts)}

    @torch.inference_mode()
    def transformers(self, model: str) -> dict:
        """The same figures for the transformers model (every layer); agreement is with Helios' full depth."""
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(self.registry[model].path), dtype=torch.float32,
                                                  use_safetensors=True).to(self.device).eval()
        self.config(model, self.registry[model].num_layers, NO_EXIT)
        chunks = [c for c in self._chunks[model] if len(c) > 1]
        logits = [hf(torch.tensor([c], device=self.device)).logits[0, :-1].float() for c in chunks]
        targets = torch.cat([torch.tensor(c[1:]) for c in chunks])
        top1 = torch.cat([x.argmax(-1).cpu() for x in logits])
        nll = torch.cat([torch.nn.functional.cross_entropy(x.cpu(), t, reduction="none")
                         for x, t in zip(logits, targets.split([len(c) - 1 for c in chunks]))])
        return {"accuracy": float((top1 == targets).float().mean()),
                "perplexity": math.exp(float(nll.double().mean()) * self._per_ref_token[model]),
                "agreement_with_full_depth": float((top1 == self._final_top1[model]).float().mean())}


def _predicted(chunks: list[list[int]]) -> int:
    """Tokens predicted over the chunks (all but each chunk's first)."""
    return sum(len(c) - 1 for c in chunks)
