"""The committed benchmark prompt sets (bench/data/): shape, token budget, held-out provenance, rebuild."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import make_prompts  # noqa: E402
from prompts import DATA, SETS, load_prompts  # noqa: E402

from helios_core.train import is_held_out  # noqa: E402

SIZES = {"code": 64, "prose": 64, "summarize": 48, "mixed": 96, "shift": 96}
TASKS = {"code": {"code"}, "prose": {"prose", "chat"}, "summarize": {"summarize"},
         "mixed": {"code", "prose", "chat", "summarize"}, "shift": {"code", "prose", "chat", "summarize"}}
FIELDS = {"id", "task", "prompt", "max_tokens", "source"}
# The sets were cut from the Python 3.11 stdlib and the held-out python3.11-doc files Helios ships;
# on another Python the stdlib differs, so skip the text checks there.
HAVE_SOURCES = sys.version_info[:2] == (3, 11)
needs_sources = pytest.mark.skipif(not HAVE_SOURCES, reason="the code prompts were cut from Python 3.11's stdlib")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(make_prompts.TOKENIZER))


@pytest.fixture(scope="module")
def sets() -> dict[str, list[dict]]:
    return {name: load_prompts(name) for name in SETS}


@pytest.mark.parametrize("name", SETS)
def test_set_fields_and_size(sets, tokenizer, name):
    records = sets[name]
    assert len(records) == SIZES[name]
    assert len({r["id"] for r in records}) == len(records)
    raw = (DATA / f"{name}.jsonl").read_bytes()
    assert b"\x00" not in raw and raw.decode("utf-8")  # strict UTF-8
    for r in records:
        assert set(r) == FIELDS | ({"phase"} if name == "shift" else set()), r["id"]
        assert r["task"] in TASKS[name], r["id"]
        assert all(line == line.rstrip() for line in r["prompt"].split("\n")), r["id"]
        n = len(tokenizer.encode(r["prompt"]).ids)
        assert n + r["max_tokens"] <= make_prompts.MAX_CONTEXT, r["id"]
        if r["task"] in ("code", "prose"):
            assert 100 <= n <= 400 and 64 <= r["max_tokens"] <= 128, r["id"]
        elif r["task"] == "summarize":
            assert 200 <= n <= 610 and r["max_tokens"] == 64, r["id"]
        else:
            assert re.fullmatch(r"Question: [^\n]+\?\nAnswer:", r["prompt"]), r["id"]


def test_every_source_is_held_out(sets):
    for records in sets.values():
        for r in records:
            assert is_held_out(Path(r["source"])), r["source"]
            assert is_held_out(make_prompts.source_path(r["source"])), r["source"]


def verbatim(record: dict) -> list[str]:
    """The parts of a prompt that must occur word for word in its (cleaned) source file."""
    prompt, task = record["prompt"], record["task"]
    if task == "summarize":
        instruction = next(i for i in make_prompts.SUMMARY_INSTRUCTIONS if prompt.endswith(i))
        return [prompt.removesuffix(instruction)]
    if task == "chat":  # the subject (and module) named in backticks
        return [name.removesuffix("()") for name in re.findall(r"`([^`]+)`", prompt)]
    return [prompt]


@needs_sources
def test_prompts_come_from_their_sources(sets):
    texts: dict[str, str] = {}
    for r in sets["code"] + sets["prose"] + sets["summarize"]:
        if r["source"] not in texts:
            raw = make_prompts.source_path(r["source"]).read_bytes().decode("utf-8", errors="replace")
            texts[r["source"]] = make_prompts.clean(raw)
        parts = verbatim(r)
        assert parts and all(part in texts[r["source"]] for part in parts), r["id"]


def test_mixed_and_shift_reuse_the_base_sets(sets):
    base = {r["id"]: r for name in ("code", "prose", "summarize") for r in sets[name]}
    for r in sets["mixed"]:
        assert r == base[r["id"]]
    assert len({r["task"] for r in sets["mixed"][:12]}) > 1  # interleaved, not grouped by task
    phases = [r["phase"] for r in sets["shift"]]
    assert phases == sorted(phases) and phases.count(0) == phases.count(1) == SIZES["shift"] // 2
    for r in sets["shift"]:
        assert (r["task"] == "code") == (r["phase"] == 0)
        assert {k: v for k, v in r.items() if k != "phase"} == base[r["id"]]


@needs_sources
def test_builder_reproduces_the_committed_files(tmp_path):
    make_prompts.build(tmp_path)
    for name in SETS:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DATA / f"{name}.jsonl").read_bytes(), name


GOOD = {"id": "x", "task": "code", "prompt": "def f():", "max_tokens": 8, "source": "python3.11/os.py"}


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "prompt"}), 'missing or empty "prompt"'),
    (json.dumps({**GOOD, "prompt": ""}), 'missing or empty "prompt"'),
    (json.dumps({**GOOD, "max_tokens": 0}), '"max_tokens" must be a positive integer'),
    (json.dumps({**GOOD, "max_tokens": "8"}), '"max_tokens" must be a positive integer'),
    (json.dumps({k: v for k, v in GOOD.items() if k != "max_tokens"}), '"max_tokens" must be a positive integer'),
])
def test_load_prompts_rejects_bad_lines(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: {message}")):
        load_prompts(path)


def test_load_prompts_by_path_and_unknown_name(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n")
    assert load_prompts(str(path)) == [GOOD]
    with pytest.raises(FileNotFoundError, match="no prompt set 'nope'"):
        load_prompts("nope")
