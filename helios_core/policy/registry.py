"""The model repository: which early-exit models Helios may serve, and what each costs.

A registry is a YAML file (`models/registry.yaml` for the demo family):

    models:
      - name: helios-demo-code-6l          # served name; requests may only name registry models
        path: helios-demo-code-6l          # model directory, relative to the registry file (absolute ok)
        threshold: 0.8                     # exit confidence threshold (default 0.8)
        exit_layers: null                  # exit depths, null = every layer, [] = none (full depth)
        exit_heads: null                   # trained exit-head adapter (.safetensors), optional
        measure: max_prob                  # exit confidence measure (default max_prob; probe needs exit_heads)
        probe_gate: null                   # max_prob/margin: LM head only where exit_heads' probe reaches this
        quantization: null                 # int8: weight-only int8 matrices (models/quantize.py)
        compile: false                     # torch.compile the small-batch decode step at start (runner.py)
        profile: {...}                     # offline telemetry, written by `helios profile`

Instead of `path`, an entry may name a model of `helios pull`'s catalog: `pull: smollm2-135m-instruct`
serves the directory that `helios pull smollm2-135m-instruct` writes (`$HELIOS_HOME/models/NAME`);
loading refuses it until it is pulled (`helios_core.pull.pull_registry` pulls a registry's missing ones).

The sizes the policy reasons with (layers, weight bytes of the fixed part and of one layer, KV bytes
per token per layer) are derived from the checkpoint itself when the registry loads; `helios profile`
writes them into the file too, and a file whose recorded sizes disagree with its checkpoint is stale
and refused. An entry's `dtype` is the one its recorded sizes and profile were measured at, and the
one it is served at unless `Registry.load` is given another (a deployment's `dtype`); "auto" or no
`dtype` at all is resolved when the registry loads (helios_core.dtypes).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

import helios_models

from ..dtypes import default_device, dtype_name, resolve_dtype
from ..exits import ExitConfig
from ..kv_cache import MemoryPlan, plan_memory
from ..models.checkpoint import Checkpoint
from ..models.config import ModelConfig
from ..models.low_rank import PREFIX as BACKBONE
from ..models.quantize import check_quantization
from ..models.transformer import Transformer, quantize_lm_head, quantize_linears, weight_bytes
from ..pull import CATALOG, is_pulled, model_dir
from .pht import StepFit


class RegistryError(ValueError):
    """A registry file or one of its entries is invalid (the message names the file and entry)."""


@dataclass(frozen=True)
class OfflineProfile:
    """What `helios profile` measured for one model, at full depth, on a prompt set."""

    prompts: str  # the prompt set it was measured on
    device: str
    tokens_per_s: float  # output tokens/s with every prompt of the set in one batch
    time_per_output_token_s: float  # mean TPOT of those requests
    perplexity: float  # of the greedy outputs under the model itself (full depth)
    exit_shares: dict[int, float]  # depth -> share of tokens that exited there at the threshold
    tokens: int
    # The decode step-time fit on this device (pht.StepFit; absent in profiles written before it existed)
    step_per_layer_s: float | None = None
    step_per_row_layer_s: float | None = None
    step_per_check_row_s: float | None = None  # one row's exit check (absent: inside step_per_row_layer_s)

    @property
    def check_ratio(self) -> float | None:
        """An exit check's cost in blocks (one row each), when both were measured."""
        if not self.step_per_check_row_s or not self.step_per_row_layer_s:
            return None
        return self.step_per_check_row_s / self.step_per_row_layer_s

    def step_fit(self, exited_share: float) -> StepFit | None:
        """The recorded fit; `exited_share` is the model's `ModelConfig.attention_share` (not recorded)."""
        if self.step_per_layer_s is None or self.step_per_row_layer_s is None:
            return None
        return StepFit(self.step_per_layer_s, self.step_per_row_layer_s, None, samples=0,  # count not recorded
                       per_check_row_s=self.step_per_check_row_s, exited_share=exited_share)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    config: ModelConfig
    threshold: float = 0.8
    exit_layers: tuple[int, ...] | None = None
    exit_heads: Path | None = None
    dtype: str = "float32"  # a concrete dtype, never "auto" (resolved when the registry loads)
    fixed_weight_bytes: int = 0  # embeddings, final norm, LM head (and exit heads)
    layer_weight_bytes: int = 0  # one transformer block
    profile: OfflineProfile | None = None
    measure: str = "max_prob"
    probe_gate: float | None = None
    pull: str | None = None  # the catalog name when `path` is its pull directory
    quantization: str | None = None  # "int8": weight-only int8 matrices; sizes and profile are measured so
    compile: bool = False  # EngineConfig.compile

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def element_size(self) -> int:
        return resolve_dtype(self.dtype).itemsize

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return self.config.kv_bytes_per_token_per_layer(self.element_size)

    def weight_bytes(self, depth: int) -> int:
        return self.fixed_weight_bytes + depth * self.layer_weight_bytes

    def engine_options(self) -> dict:
        """The `EngineConfig` fields an engine serving this entry takes from it, beside its path and exits."""
        return {"dtype": self.dtype, "quantization": self.quantization, "compile": self.compile}

    def exit_config(self) -> ExitConfig:
        return ExitConfig(threshold=self.threshold, measure=self.measure, exit_layers=self.exit_layers,
                          heads_path=str(self.exit_heads) if self.exit_heads else None, probe_gate=self.probe_gate)

    def plan(self, depth: int, budget_bytes: int, max_model_len: int, max_num_seqs: int = 256,
             max_prefill_tokens: int = 256, block_size: int = 64) -> MemoryPlan:
        """The engine's memory plan at this depth, without loading anything (same arithmetic, exact)."""
        return plan_memory(self.config, depth, self.weight_bytes(depth), budget_bytes, max_model_len,
                           self.element_size, max_num_seqs, max_prefill_tokens, block_size)


def measure_weights(path: Path, config: ModelConfig, dtype: str, exit_heads: Path | None,
                    quantization: str | None = None) -> tuple[int, int]:
    """(fixed bytes, bytes per block) at `dtype` and `quantization`, from the architecture built on the
    meta device as the loader builds it (models/loader.py)."""
    with torch.device("meta"):
        model = Transformer(config, num_layers=1).to(resolve_dtype(dtype))
    tied = _tied(path, config)
    if tied:
        model.lm_head.weight = model.embed.weight
    if quantization:
        quantize_lm_head(model, tied)
        quantize_linears(model.layers[0])
    block = weight_bytes(model.layers[0])
    heads = 0
    if exit_heads is not None:
        with safe_open(str(exit_heads), "pt") as f:
            # A backbone adapter is merged into the blocks' weights at load: it holds no memory of its own.
            heads = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith(BACKBONE))
    return weight_bytes(model) - block + heads * resolve_dtype(dtype).itemsize, block


def _tied(path: Path, config: ModelConfig) -> bool:
    return config.tie_embeddings or Checkpoint(path).resolve("lm_head.weight") is None


class Registry:
    def __init__(self, entries: list[ModelEntry], path: Path | None = None):
        self.path = path
        self.entries: dict[str, ModelEntry] = {}
        for e in entries:
            if e.name in self.entries:
                raise RegistryError(f"registry {path}: model name {e.name!r} appears twice")
            self.entries[e.name] = e

    def __getitem__(self, name: str) -> ModelEntry:
        if name not in self.entries:
            raise KeyError(f"unknown model {name!r}; the registry has: {', '.join(self.entries)}")
        return self.entries[name]

    def __iter__(self):
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return list(self.entries)

    def with_profile(self, name: str, profile: OfflineProfile) -> None:
        self.entries[name] = replace(self[name], profile=profile)

    @staticmethod
    def load(path: str | Path, dtype: str | None = None, check_sizes: bool = True) -> "Registry":
        """A registry file; `registry.yaml` or `models/registry-real.yaml` not found relative to the
        working directory is the package's (`helios_models.resolve`). `dtype`: every model's, in place
        of the entries' own (None: each entry's, "auto" where it names none). `check_sizes=False`
        accepts recorded sizes that disagree with the checkpoint (for `helios profile`, which rewrites
        them)."""
        path = helios_models.resolve(path)
        if not path.is_file():
            raise FileNotFoundError(f"registry file {path} is not a file")
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise RegistryError(f"registry {path} is not valid YAML: {err}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("models"), list) or not doc["models"]:
            raise RegistryError(f"registry {path} must have a non-empty list under 'models'")
        return Registry([_entry(path, i, raw, dtype, check_sizes) for i, raw in enumerate(doc["models"])], path)

    def save(self, path: str | Path | None = None) -> None:
        path = Path(path or self.path)
        models = []
        for e in self:
            item = {
                "name": e.name,
                **({"pull": e.pull} if e.pull else {"path": _relative(e.path, path.parent)}),
                "threshold": e.threshold,
                "exit_layers": None if e.exit_layers is None else list(e.exit_layers),
                "exit_heads": _relative(e.exit_heads, path.parent) if e.exit_heads else None,
                **({"measure": e.measure} if e.measure != "max_prob" else {}),
                **({"probe_gate": e.probe_gate} if e.probe_gate is not None else {}),
                **({"quantization": e.quantization} if e.quantization else {}),
                **({"compile": True} if e.compile else {}),
                "layers": e.num_layers,
                "weight_bytes_fixed": e.fixed_weight_bytes,
                "weight_bytes_per_layer": e.layer_weight_bytes,
                "kv_bytes_per_token_per_layer": e.kv_bytes_per_token_per_layer,
                "dtype": e.dtype,
            }
            if e.profile is not None:
                item["profile"] = asdict(e.profile)
            models.append(item)
        path.write_text(_header(path) + yaml.safe_dump({"models": models}, sort_keys=False))


def _header(path: Path) -> str:
    """The file's leading comment block, kept when it is rewritten (it says what the file is for)."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        kept = "".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
        if kept:
            return kept
    return ("# Helios model registry (format: helios_core/policy/registry.py). Sizes and profiles are\n"
            "# written by `helios profile`; the sizes are checked against each checkpoint when it loads.\n")


def _relative(p: Path, base: Path) -> str:
    try:
        return str(p.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(p)


KNOWN_KEYS = {"name", "path", "pull", "threshold", "exit_layers", "exit_heads", "measure", "probe_gate", "profile",
              "layers", "weight_bytes_fixed", "weight_bytes_per_layer", "kv_bytes_per_token_per_layer", "dtype",
              "quantization", "compile"}


def _entry(file: Path, index: int, raw, dtype: str | None, check_sizes: bool = True) -> ModelEntry:
    where = f"registry {file}, model #{index + 1}"
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise RegistryError(f"{where}: each model needs a string 'name'")
    where = f"registry {file}, model {raw['name']!r}"
    unknown = set(raw) - KNOWN_KEYS
    if unknown:
        raise RegistryError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(KNOWN_KEYS)})")
    path = _model_path(where, file, raw)
    try:
        config = ModelConfig.from_pretrained(path)
        Checkpoint(path)  # safetensors present, no pickles
    except (OSError, ValueError) as err:
        raise RegistryError(f"{where}: cannot load {path}: {err}") from None
    heads = (file.parent / raw["exit_heads"]).resolve() if raw.get("exit_heads") else None
    if heads is not None and not heads.is_file():
        raise RegistryError(f"{where}: exit_heads file {heads} does not exist")
    try:
        dtype = _concrete(dtype or raw.get("dtype", "auto"))
        recorded_dtype = _concrete(raw.get("dtype", dtype))
        exit_cfg = ExitConfig(threshold=raw.get("threshold", 0.8), measure=raw.get("measure", "max_prob"),
                              exit_layers=None if raw.get("exit_layers") is None else tuple(raw["exit_layers"]),
                              probe_gate=raw.get("probe_gate"))
        if (exit_cfg.measure == "probe" or exit_cfg.probe_gate is not None) and heads is None:
            raise ValueError("measure 'probe' and probe_gate need exit_heads: a file with exit probes")
        if exit_cfg.exit_layers and max(exit_cfg.exit_layers) > config.num_layers:
            raise ValueError(f"exit_layers {list(exit_cfg.exit_layers)} go deeper than the model's "
                             f"{config.num_layers} layers")
        quantization = raw.get("quantization")
        check_quantization(quantization)
        compile = raw.get("compile", False)
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be true or false, got {compile!r}")
        fixed, block = measure_weights(path, config, dtype, heads, quantization)
        recorded_weights = ((fixed, block) if recorded_dtype == dtype
                            else measure_weights(path, config, recorded_dtype, heads, quantization))
    except (TypeError, ValueError) as err:
        raise RegistryError(f"{where}: {err}") from None
    entry = ModelEntry(raw["name"], path, config, exit_cfg.threshold, exit_cfg.exit_layers, heads, dtype, fixed, block,
                       _profile(where, raw.get("profile")), exit_cfg.measure, exit_cfg.probe_gate, raw.get("pull"),
                       quantization, compile)
    # The sizes as the file's dtype makes them.
    served, at = entry.element_size, resolve_dtype(recorded_dtype).itemsize
    recorded = {"layers": entry.num_layers, "weight_bytes_fixed": recorded_weights[0],
                "weight_bytes_per_layer": recorded_weights[1],
                "kv_bytes_per_token_per_layer": entry.kv_bytes_per_token_per_layer // served * at}
    stale = {k: (raw[k], v) for k, v in recorded.items() if k in raw and raw[k] != v}
    if stale and check_sizes:
        raise RegistryError(f"{where}: recorded sizes disagree with the checkpoint (recorded, actual): {stale}; "
                            "run `helios profile` again")
    return entry


def _concrete(dtype: str) -> str:
    """A dtype's canonical name; "auto" is what it resolves to on this host's default device. The
    registry may be read where no model runs (Serve's driver, the router): a replica resolves "auto"
    for its own device and loads the registry with that, so its plans are its engine's."""
    return dtype_name(resolve_dtype(dtype, default_device()))


def _model_path(where: str, file: Path, raw: dict) -> Path:
    """The entry's model directory: `path` (relative to the registry file) or `pull`'s directory."""
    given = [k for k in ("path", "pull") if raw.get(k) is not None]
    if len(given) != 1 or not isinstance(raw[given[0]], str):
        raise RegistryError(f"{where}: give exactly one of 'path' (a model directory) and 'pull' (a name of "
                            f"`helios pull`'s catalog: {', '.join(sorted(CATALOG))}), as a string")
    if given == ["path"]:
        return (file.parent / raw["path"]).resolve()
    name = raw["pull"]
    if name not in CATALOG:
        raise RegistryError(f"{where}: unknown pull name {name!r}; the catalog has: {', '.join(sorted(CATALOG))}")
    if not is_pulled(name):
        raise RegistryError(f"{where}: {name} is not pulled yet (expected in {model_dir(name)}); "
                            f"run `helios pull {name}`")
    return model_dir(name)


def _profile(where: str, raw) -> OfflineProfile | None:
    if raw is None:
        return None
    try:
        shares = {int(k): float(v) for k, v in raw.pop("exit_shares").items()}
        return OfflineProfile(exit_shares=shares, **raw)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise RegistryError(f"{where}: invalid profile: {err}") from None


__all__ = ["ModelEntry", "OfflineProfile", "Registry", "RegistryError", "measure_weights"]
