"""The bundled demo model: loads offline, matches transformers, and exits early on code."""

from pathlib import Path

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.exits import ExitConfig
from helios_core.sampling import SamplingParams
from tiny_models import hf_greedy

DEMO = Path(__file__).resolve().parent.parent / "models" / "helios-demo-code-6l"


def test_demo_model_matches_transformers_and_exits_early():
    full = LLMEngine(EngineConfig(model=str(DEMO), dtype="float32", early_exit=False, max_model_len=256))
    prompt = full.tokenize("def fibonacci(n):\n")
    [ref] = full.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert ref.token_ids == hf_greedy(DEMO, prompt, 24)
    assert ref.text.strip()  # real text from trained weights

    partial = LLMEngine(EngineConfig(model=str(DEMO), dtype="float32", num_layers=3, max_model_len=256,
                                     exit=ExitConfig(threshold=0.5)))
    assert partial.capacity_tokens > full.capacity_tokens  # the same default budget, fewer layers: more KV
    [out] = partial.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert min(out.exit_layers) < 3 and max(out.exit_layers) == 3
    assert any(out.forced)
