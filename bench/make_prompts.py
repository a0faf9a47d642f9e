"""Build the benchmark prompt sets of bench/data/ from held-out files only (see bench/data/README.md).

    python bench/make_prompts.py [--out bench/data]

The text comes from the files `helios_core.train.is_held_out` keeps out of the demo models' training
data: Python's standard library ("stdlib") and the Python 3.11 reST docs ("pydoc": the held-out
files of the Debian package python3.11-doc, shipped in helios_core/data/pydoc). Deterministic: one seeded RNG, files in sorted order, the family's tokenizer.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
import sysconfig
from bisect import bisect_right
from collections.abc import Callable, Iterator
from pathlib import Path

from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from prompts import DATA

from helios_core.train import PYDOC_HELD_OUT, held_out_files, is_held_out, stdlib_files

SEED = 0
TOKENIZER = REPO / "models" / "helios-demo-code-6l" / "tokenizer.json"  # shared by the demo family
MAX_CONTEXT = 1024  # the demo models' context: prompt + max_tokens must fit
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SUMMARY_INSTRUCTIONS = ("\n\nIn summary,", "\n\nTL;DR:", "\n\nSummary:", "\n\nTo sum up,")
SIZES = {"code": 64, "prose": 40, "chat": 24, "summarize": 48, "mixed": 96, "shift": 96}

# reST: a section title's underline, and the directives that describe one API object.
UNDERLINE = re.compile(r"^([=\-~^*#+\"'`])\1{2,}$")
DIRECTIVE = re.compile(r"^( *)\.\. (?:c:|py:)?(function|method|classmethod|staticmethod|decorator|macro|class|"
                       r"exception|attribute|data|type|member|var)::[ \t]+(\S.*)$", re.MULTILINE)
BLOCK = re.compile(r"(?:^[^\n]+(?:\n|$))+", re.MULTILINE)  # a run of non-blank lines
SENTENCE_END = re.compile(r"[.?!](?=\s+[A-Z`*(])")


def clean(text: str) -> str:
    """Unix newlines, no NUL, no trailing whitespace on any line (the form every prompt is cut from)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return "\n".join(line.rstrip() for line in text.split("\n"))


def source_name(path: Path) -> str:
    """The path relative to its source root's parent ("python3.11/argparse.py", "_sources/library/...").

    Keeping the root's own folder name makes `is_held_out(Path(name))` agree with the absolute path."""
    root = PYDOC_HELD_OUT if path.is_relative_to(PYDOC_HELD_OUT) else STDLIB
    return path.relative_to(root.parent).as_posix()


def source_path(name: str) -> Path:
    root = PYDOC_HELD_OUT if name.split("/", 1)[0] == PYDOC_HELD_OUT.name else STDLIB
    return root.parent / name


def held_out(files: list[Path]) -> list[tuple[str, str]]:
    """(source name, cleaned text) of the held-out files, in sorted order."""
    return [(source_name(f), clean(f.read_bytes().decode("utf-8", errors="replace")))
            for f in sorted(files) if is_held_out(f)]


class Cutter:
    """Cuts prompts out of one text: a line-aligned start, an exact end, a token budget."""

    WINDOW = 8  # only text within WINDOW characters per token of budget is searched (tokens average ~3)

    def __init__(self, tokenizer: Tokenizer, text: str):
        self.count = lambda s: len(tokenizer.encode(s).ids)
        self.text = text
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def before(self, end: int, budget: int, minimum: int) -> str | None:
        """The longest text ending at `end`, starting at a line start, of at most `budget` tokens."""
        lo = bisect_right(self.line_starts, end - budget * self.WINDOW)
        hi = bisect_right(self.line_starts, end) - 1
        while lo < hi:  # the token count shrinks as the start moves down
            mid = (lo + hi) // 2
            if self.count(self.text[self.line_starts[mid]:end]) <= budget:
                hi = mid
            else:
                lo = mid + 1
        prompt = self.text[self.line_starts[lo]:end].lstrip("\n")
        return prompt if minimum <= self.count(prompt) <= budget else None

    def after(self, start: int, ends: list[int], budget: int, minimum: int) -> str | None:
        """The longest text from `start` to one of `ends` (sorted) of at most `budget` tokens."""
        lo, hi = bisect_right(ends, start), bisect_right(ends, start + budget * self.WINDOW) - 1
        if lo > hi:
            return None
        while lo < hi:  # the token count grows with the end
            mid = (lo + hi + 1) // 2
            if self.count(self.text[start:ends[mid]]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        prompt = self.text[start:ends[lo]]
        return prompt if minimum <= self.count(prompt) <= budget else None


def round_robin(per_file: list[list]) -> Iterator:
    """One candidate of each file in turn, so that every file contributes."""
    queues = [list(q) for q in per_file]
    while any(queues):
        for q in queues:
            if q:
                yield q.pop(0)


def take(candidates: Iterator, make: Callable, count: int) -> list[dict]:
    """The first `count` distinct prompts that `make` builds from the candidates."""
    records, seen = [], set()
    for candidate in candidates:
        record = make(*candidate)
        if record is None:
            continue
        key = "\n".join(record["prompt"].splitlines()[-3:])  # near-copies (e.g. codec modules) end alike
        if key not in seen:
            seen.add(key)
            records.append(record)
            if len(records) == count:
                return records
    raise RuntimeError(f"only {len(records)} of {count} prompts could be built")


def code_cuts(text: str, rng: random.Random) -> list[int]:
    """Cut points in every function: mid-docstring (or after the signature) and before a body statement."""
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    cuts = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.body[0].lineno == node.lineno:
            continue
        first = node.body[0]
        line_start = starts[first.lineno - 1]
        if ast.get_docstring(node, clean=False) is not None:
            line = text[line_start:].split("\n", 1)[0]
            quote = re.match(r"\s*[rRbBuU]*(\"\"\"|'''|\"|')", line)
            words = [m.end() for m in re.finditer(r"\S+", line[quote.end():])]
            # the signature and the first half of the docstring's first line
            cuts.append(line_start + quote.end() + (words[len(words) // 2 - 1] if len(words) > 1 else 0))
        else:
            cuts.append(line_start - 1)  # the signature (and any comment before the body)
        later = [s for s in node.body[1:] if s.lineno > first.lineno]
        if later:
            s = rng.choice(later)
            cuts.append(starts[min([s.lineno] + [d.lineno for d in getattr(s, "decorator_list", [])]) - 1] - 1)
    return cuts


def continuation(task: str, rng: random.Random):
    """A prompt maker for `take`: the text before a cut (120-400 tokens), 64-128 tokens to generate."""

    def make(source: str, cutter: Cutter, cut: int) -> dict | None:
        prompt = cutter.before(cut, budget=rng.randint(120, 400), minimum=100)
        if prompt is None:
            return None
        return {"task": task, "prompt": prompt, "max_tokens": rng.randint(64, 128), "source": source}

    return make


def code_set(tokenizer: Tokenizer, files: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    per_file = []
    for source, text in files:
        cuts, cutter = code_cuts(text, rng), Cutter(tokenizer, text)
        rng.shuffle(cuts)
        per_file.append([(source, cutter, cut) for cut in cuts])

    return take(round_robin(per_file), continuation("code", rng), SIZES["code"])


def is_prose(block: str) -> bool:
    """A paragraph of running text: not markup, a title, a table, code or a directive's options."""
    lines = block.strip("\n").split("\n")
    first = lines[0].lstrip()
    return (len(block) >= 120 and (first[0].isalnum() or first[0] in "`*\"")
            and re.search(r"[.?!](\s|$)", block) is not None
            and not first.startswith((">>>", "..")) and not any(UNDERLINE.match(line) for line in lines)
            and not any(line.lstrip().startswith(("+-", "|", "==")) for line in lines))


def topic(source: str) -> str:
    stem = source.rsplit("/", 1)[-1].removesuffix(".rst.txt")
    return f"the `{stem}` module" if "/library/" in source else f"the C API's `{stem}` page"


def titles(text: str) -> list[tuple[int, str]]:
    """(offset, title) of each section title, the offset at its overline if it has one."""
    lines = text.split("\n")
    offsets = [0] + [m.end() for m in re.finditer("\n", text)]
    found = []
    for i in range(len(lines) - 1):
        title = lines[i].strip()
        if title and UNDERLINE.match(lines[i + 1]) and len(lines[i + 1]) >= len(title) and not UNDERLINE.match(title):
            start = i - 1 if i and UNDERLINE.match(lines[i - 1]) else i
            found.append((offsets[start], title))
    return found


def chat_questions(source: str, text: str) -> list[str]:
    """A question about each described API object and each plain section title of one doc file."""
    questions = []
    for m in DIRECTIVE.finditer(text):
        kind, signature = m.group(2), m.group(3)
        called = re.findall(r"[A-Za-z_][\w.]*(?=\s*\()", signature)
        name = called[0] if called else re.findall(r"[A-Za-z_][\w.]*", signature)[-1]
        if kind in ("class", "exception"):
            question = f"When is `{name}` raised?" if kind == "exception" else f"What is the `{name}` class used for?"
        elif kind in ("attribute", "data", "type", "member", "var"):
            question = f"What is `{name}` in {topic(source)}?"
        else:
            question = f"What does `{name}()` do in {topic(source)}?"
        questions.append(question)
    for _, title in titles(text):
        if not re.search(r"[`:*|\\]", title):  # only titles without markup, so they occur verbatim
            questions.append(f"What does the section `{title}` of the documentation of {topic(source)} explain?")
    return questions


def prose_set(tokenizer: Tokenizer, files: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """Continuations cut after a paragraph's first sentence, then the chat-like questions."""
    per_file = []
    for source, text in files:
        cuts = []
        for b in BLOCK.finditer(text):
            if is_prose(b.group()):
                end = SENTENCE_END.search(b.group().rstrip("\n")[:-1])
                words = [m.end() for m in re.finditer(r"\S+", b.group())]
                cuts.append(b.start() + (end.end() if end else words[len(words) // 2 - 1]))
        rng.shuffle(cuts)
        cutter = Cutter(tokenizer, text)
        per_file.append([(source, cutter, cut) for cut in cuts])

    prose = take(round_robin(per_file), continuation("prose", rng), SIZES["prose"])

    per_file = []
    for source, text in files:
        questions = chat_questions(source, text)
        rng.shuffle(questions)
        per_file.append([(source, q) for q in questions])

    def ask(source: str, question: str) -> dict:
        return {"task": "chat", "prompt": f"Question: {question}\nAnswer:", "max_tokens": rng.randint(64, 128),
                "source": source}

    return prose + take(round_robin(per_file), ask, SIZES["chat"])


def summarize_set(tokenizer: Tokenizer, files: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """Non-overlapping excerpts from a section title or an API object's directive, then an instruction."""
    per_file = []
    for source, text in files:
        starts = sorted({offset for offset, _ in titles(text)}
                        | {m.start() for m in DIRECTIVE.finditer(text) if not m.group(1)})
        rng.shuffle(starts)
        ends = [b.start() + len(b.group().rstrip("\n")) for b in BLOCK.finditer(text)  # not at a title or directive
                if not b.group().lstrip().startswith("..") and not UNDERLINE.match(b.group().rstrip("\n")[-3:])]
        cutter, used = Cutter(tokenizer, text), []
        per_file.append([(source, cutter, start, ends, used) for start in starts])

    def make(source: str, cutter: Cutter, start: int, ends: list[int], used: list[range]) -> dict | None:
        excerpt = cutter.after(start, ends, budget=rng.randint(200, 600), minimum=200)
        if excerpt is None:
            return None
        span = range(start, start + len(excerpt))
        if any(span.start < u.stop and u.start < span.stop for u in used):
            return None
        used.append(span)
        return {"task": "summarize", "prompt": excerpt + rng.choice(SUMMARY_INSTRUCTIONS), "max_tokens": 64,
                "source": source}

    return take(round_robin(per_file), make, SIZES["summarize"])


def numbered(name: str, records: list[dict]) -> list[dict]:
    return [{"id": f"{name}-{i:03d}", **r} for i, r in enumerate(records)]


def build(out: Path = DATA) -> dict[str, list[dict]]:
    """Write every set as out/NAME.jsonl; returns the sets."""
    rng = random.Random(SEED)
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    code_files = held_out(stdlib_files())
    doc_files = held_out(held_out_files("pydoc"))
    sets = {"code": numbered("code", code_set(tokenizer, code_files, rng)),
            "prose": numbered("prose", prose_set(tokenizer, doc_files, rng)),
            "summarize": numbered("summarize", summarize_set(tokenizer, doc_files, rng))}
    base = sum(len(s) for s in sets.values())
    mixed = [r for s in sets.values() for r in rng.sample(s, round(SIZES["mixed"] * len(s) / base))]
    rng.shuffle(mixed)
    sets["mixed"] = mixed
    half = SIZES["shift"] // 2
    docs = rng.sample(sets["prose"] + sets["summarize"], half)
    sets["shift"] = ([{**r, "phase": 0} for r in rng.sample(sets["code"], half)]
                     + [{**r, "phase": 1} for r in docs])
    out.mkdir(parents=True, exist_ok=True)
    for name, records in sets.items():
        for r in records:
            assert len(tokenizer.encode(r["prompt"]).ids) + r["max_tokens"] <= MAX_CONTEXT, r["id"]
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        (out / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8", newline="\n")
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DATA, help="output folder (default: bench/data)")
    out = parser.parse_args().out
    for name, records in build(out).items():
        print(f"{name}: {len(records)} prompts, {(out / f'{name}.jsonl').stat().st_size} bytes")


if __name__ == "__main__":
    main()
