"""Helios vs transformers on the real models: `helios generate --no-early-exit` against transformers
loading the very GGUF that `helios pull` converted, token for token.

    python bench/parity.py                      # both catalog models, pulled first if missing
    python bench/parity.py --models smollm2-135m-instruct --max-tokens 48

For each model and prompt: `helios generate --model DIR --no-early-exit --json` (the command a user
runs, in a subprocess) and transformers' greedy `generate` on the same prompt ids, fp32 on the CPU.
A row prints the tokens both agree on before the first difference (all of them when equal) and, at a
difference, transformers' top-1 minus top-2 logit margin there: a difference at a near-tie is
rounding, one at a clear margin is a bug. Exits 1 when any prompt differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from helios_core.pull import CATALOG, extract_gguf, pull

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "import numpy as np\n\ndef moving_average(x, window):\n",
)
CHAT = "What is the capital of France?"  # through the model's own chat template, where it has one


def helios_generate(model_dir: Path, prompt: str, max_tokens: int) -> dict:
    command = [sys.executable, "-m", "helios_core.cli", "generate", "--model", str(model_dir), "--prompt", prompt,
               "--max-tokens", str(max_tokens), "--no-early-exit", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"helios generate failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@torch.no_grad()
def hf_generate(model, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                         max_new_tokens=max_tokens, eos_token_id=None, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True, min_new_tokens=None)
    top2 = torch.stack(out.logits)[:, 0].float().topk(2, dim=-1).values
    return out.sequences[0, ids.shape[1]:].tolist(), (top2[:, 0] - top2[:, 1]).tolist()


def check_model(name: str, max_tokens: int, log) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = pull(name, progress=log)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    prompts = list(PROMPTS)
    if tokenizer.chat_template:
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": CHAT}], tokenize=False,
                                                     add_generation_prompt=True))
    with tempfile.TemporaryDirectory() as tmp:
        gguf = extract_gguf(name, tmp, progress=log)
        log(f"transformers loads {gguf.name} itself (from_pretrained(gguf_file=...), fp32)")
        reference = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32).eval()
    rows = []
    for prompt in prompts:
        ours = helios_generate(model_dir, prompt, max_tokens)
        # Both run the ids Helios encoded (the tokenizer is the GGUF's, converted); stop at Helios' end.
        theirs, margins = hf_generate(reference, ours["prompt_token_ids"], max_tokens)
        theirs = theirs[: len(ours["token_ids"])]
        same = next((i for i, (a, b) in enumerate(zip(ours["token_ids"], theirs)) if a != b), len(theirs))
        rows.append({"model": name, "prompt": prompt, "tokens": len(theirs), "agreeing": same,
                     "equal": ours["token_ids"] == theirs, "margin_at_difference": None if same == len(theirs)
                     else round(margins[same], 4), "helios_text": ours["text"]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(CATALOG), choices=list(CATALOG))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt instead of the table")
    args = parser.parse_args()
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    rows = [row for name in args.models for row in check_model(name, args.max_tokens, log)]
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        verdict = "equal" if row["equal"] else f"differ at token {row['agreeing']} (margin {row['margin_at_difference']})"
        print(f"{row['model']:<22} {row['prompt'][:40]!r:<44} {row['agreeing']:>3}/{row['tokens']} {verdict}  "
              f"-> {row['helios_text'][:60]!r}")
    equal = sum(r["equal"] for r in rows)
    print(f"{equal}/{len(rows)} prompts token for token equal to transformers", file=sys.stderr)
    return 0 if equal == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
