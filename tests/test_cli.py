"""`helios generate` as a user runs it: JSON output, streamed text, clear errors."""

import json
import subprocess
import sys

import pytest

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.exits import ExitConfig
from helios_core.sampling import SamplingParams


def helios(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "helios_core.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_generate_json_matches_the_engine(tiny_llama):
    run = helios("generate", "--model", str(tiny_llama), "--prompt", "def main():", "--max-tokens", "12",
                 "--threshold", "0.5", "--layers", "4", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out["token_ids"]) == len(out["exit_layers"]) == len(out["forced"]) == 12
    assert out["loaded_layers"] == 4 and all(1 <= d <= 4 for d in out["exit_layers"])
    assert out["forced"] == [d == 4 for d in out["exit_layers"]]  # partially loaded: the last layer is forced
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), num_layers=4, exit=ExitConfig(threshold=0.5)))
    [ref] = engine.generate(["def main():"], SamplingParams(max_tokens=12, temperature=0))
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text and out["exit_layers"] == ref.exit_layers


def test_generate_streams_text_and_reports_exits(tiny_llama):
    run = helios("generate", "--model", str(tiny_llama), "--prompt", "x = ", "--max-tokens", "8", "--no-early-exit")
    assert run.returncode == 0, run.stderr
    assert "8 tokens" in run.stderr and "exits by layer {6: 8}" in run.stderr
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), early_exit=False))
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
    from helios_core.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--config", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: []\n")
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(bad)])
    assert "exactly one entry under 'applications'" in capsys.readouterr().err
