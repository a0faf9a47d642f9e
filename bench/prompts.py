"""Load the benchmark prompt sets of bench/data/ (JSON Lines, one prompt per line).

    from prompts import load_prompts          # with bench/ on sys.path
    for p in load_prompts("code"):            # a set name, or the path of any .jsonl file
        print(p["id"], p["task"], p["max_tokens"], p["prompt"][:40])
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
SETS = ("code", "prose", "summarize", "mixed", "shift")


def load_prompts(name_or_path: str | Path) -> list[dict]:
    """Every record of a set; ValueError naming the file and line for a malformed one."""
    path = DATA / f"{name_or_path}.jsonl" if name_or_path in SETS else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt set {str(name_or_path)!r} (a set name of {', '.join(SETS)} "
                                f"or the path of a .jsonl file)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ValueError(f"{where}: missing or empty \"prompt\" (a non-empty string)")
        tokens = record.get("max_tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise ValueError(f"{where}: \"max_tokens\" must be a positive integer, got {tokens!r}")
        records.append(record)
    return records
