"""dtype "auto" and explicit dtypes: how they resolve, where the choice is reported, what is refused.

No assertion here depends on how fast this machine is: the auto choice is checked against the
measurement it was made from, never against a speed."""

import json
import pathlib

import pytest
import torch

from helios_core.cli import main
from helios_core.dtypes import (BF16_UNITS, CPU_FLAGS, cpu_flags, cpu_info, cpu_matmul_seconds, default_device,
                                dtype_name, parse_cpuinfo, resolve_auto_dtype, resolve_dtype)
from helios_core.engine import EngineConfig, LLMEngine
from helios_core.engine_process import EngineState
from helios_core.policy import Registry, RegistryError

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_REGISTRY = ROOT / "models" / "registry.yaml"  # its entries record dtype: float32

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
ZEN3 = "model name\t: AMD EPYC 7763 64-Core Processor\nflags\t\t: fpu sse2 avx avx2 fma\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16\n"  # no "flags" line: no x86 bf16 units


# --- the pure parts -------------------------------------------------------------------------------------
def test_parse_cpuinfo_reads_the_first_processor():
    model, flags = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx512_bf16", "amx_bf16", "amx_tile"} <= flags and BF16_UNITS <= flags
    model, flags = parse_cpuinfo(ZEN3)
    assert model == "AMD EPYC 7763 64-Core Processor" and "avx2" in flags and not BF16_UNITS & flags
    assert parse_cpuinfo(ARM) == ("", frozenset())
    assert parse_cpuinfo("") == ("", frozenset())


def test_cpu_info_names_the_model_and_every_reported_flag():
    info = cpu_info()
    assert isinstance(info["model"], str) and info["model"]
    assert set(info["flags"]) == set(CPU_FLAGS) and all(isinstance(v, bool) for v in info["flags"].values())
    assert info["flags"] == {f: f in cpu_flags() for f in CPU_FLAGS}


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("fp32", torch.float32),
                                         ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                         ("float16", torch.float16), (torch.float16, torch.float16)])
def test_explicit_dtypes_are_unchanged(name, dtype):
    assert resolve_dtype(name) is dtype and resolve_dtype(name, "cuda") is dtype  # no device is consulted


@pytest.mark.parametrize("name", ["float64", "int8", "Auto", ""])
def test_an_unknown_dtype_is_refused_by_name(name):
    with pytest.raises(ValueError, match="unknown dtype") as err:
        resolve_dtype(name)
    assert repr(name) in str(err.value) and "auto" in str(err.value)


# --- auto on this machine -------------------------------------------------------------------------------
def test_auto_on_the_cpu_follows_its_flags_and_its_measurement():
    chosen = resolve_auto_dtype("cpu")
    assert chosen in (torch.bfloat16, torch.float32)
    assert resolve_dtype("auto", "cpu") is chosen and resolve_auto_dtype(torch.device("cpu")) is chosen
    if not BF16_UNITS & cpu_flags():
        assert chosen is torch.float32  # no bf16 units: never bf16, whatever a matmul measured
    else:
        times = cpu_matmul_seconds()
        assert set(times) == {"float32", "bfloat16"} and all(t > 0 for t in times.values())
        assert chosen is (torch.bfloat16 if times["bfloat16"] < times["float32"] else torch.float32)
    assert cpu_matmul_seconds() is cpu_matmul_seconds()  # measured once per process


def test_the_measurement_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    cpu_matmul_seconds.__wrapped__()  # a fresh measurement, past the cache
    assert torch.equal(torch.get_rng_state(), state)


# --- where the choice is reported -------------------------------------------------------------------------
def test_the_engine_reports_its_dtype(tiny_llama):
    auto = LLMEngine(EngineConfig(model=str(tiny_llama), device="cpu", max_model_len=64))
    assert auto.config.dtype == "auto" and auto.dtype == dtype_name(resolve_auto_dtype("cpu"))
    assert auto.cache.k[0].dtype == auto.model.dtype
    assert EngineState.of(auto).dtype == auto.dtype  # what a replica's stats report
    explicit = LLMEngine(EngineConfig(model=str(tiny_llama), device="cpu", max_model_len=64, dtype="bf16"))
    assert explicit.dtype == "bfloat16" and EngineState.of(explicit).dtype == "bfloat16"


def test_generate_json_reports_the_dtype(tiny_llama, capsys):
    args = ["generate", "--model", str(tiny_llama), "--prompt", "x = ", "--max-tokens", "2", "--device", "cpu",
            "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == dtype_name(resolve_auto_dtype("cpu"))
    assert main(args + ["--dtype", "float32"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "float32"
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--dtype", "int8"])
    assert exit_info.value.code == 2 and "'int8'" in capsys.readouterr().err


# --- the registry -----------------------------------------------------------------------------------------
def test_the_registry_sizes_models_at_the_dtype_served():
    auto = dtype_name(resolve_auto_dtype(default_device()))  # the host's, as the registry resolves it
    recorded = Registry.load(DEMO_REGISTRY)  # each entry's own dtype
    assert {e.dtype for e in recorded} == {"float32"}
    for dtype, name in (("auto", auto), ("bf16", "bfloat16"), ("float32", "float32")):
        # The file's sizes are float32's: served at another dtype they are rescaled, not stale.
        served = Registry.load(DEMO_REGISTRY, dtype)
        size = resolve_dtype(name).itemsize
        for e, f in zip(served, recorded):
            assert e.dtype == name and e.element_size == size
            assert (e.fixed_weight_bytes, e.layer_weight_bytes) == (f.fixed_weight_bytes // 4 * size,
                                                                   f.layer_weight_bytes // 4 * size)
            assert e.kv_bytes_per_token_per_layer == f.kv_bytes_per_token_per_layer // 4 * size


def test_a_registry_saved_at_another_dtype_loads_again(tmp_path):
    out = tmp_path / "registry.yaml"
    Registry.load(DEMO_REGISTRY, "bfloat16").save(out)
    assert "dtype: bfloat16" in out.read_text() and "auto" not in out.read_text()
    again = Registry.load(out)  # its sizes are now bf16's, and so is its dtype: not stale
    assert [e.dtype for e in again] == ["bfloat16"] * len(again)
    assert [e.layer_weight_bytes for e in again] == [e.layer_weight_bytes for e in Registry.load(DEMO_REGISTRY, "bf16")]


def test_the_registry_refuses_an_unknown_dtype(tmp_path):
    with pytest.raises(RegistryError, match="unknown dtype 'int8'"):
        Registry.load(DEMO_REGISTRY, "int8")
    bad = tmp_path / "registry.yaml"
    bad.write_text(DEMO_REGISTRY.read_text().replace("dtype: float32", "dtype: double", 1)
                   .replace("path: helios-demo", f"path: {DEMO_REGISTRY.parent}/helios-demo"))
    with pytest.raises(RegistryError, match="unknown dtype 'double'"):
        Registry.load(bad)
