"""The engine in a child process (what a Serve replica runs): same tokens as in-process, commands
applied between steps, bad input failing alone, and a child that never outlives its parent."""

import asyncio
import dataclasses
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from helios_core.engine import EngineConfig, LLMEngine
from helios_core.engine_process import EngineProcess
from helios_core.exits import ExitConfig
from helios_core.kv_cache import MemoryBudgetError
from helios_core.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = {"a": [5, 17, 33, 2, 9], "b": [40], "c": [100, 101, 102, 7]}


def collect(proc: EngineProcess, want: set[str], timeout_s: float = 60) -> tuple[dict, list[tuple]]:
    """Token ids per request until every request in `want` finished, and the other messages."""
    tokens, others, done = {}, [], set()
    deadline = time.monotonic() + timeout_s
    while done < want:
        assert time.monotonic() < deadline, f"timed out; finished {done} of {want}"
        for message in proc.receive():
            if message[0] != "step":
                others.append(message)
                if message[0] == "refused":
                    done.add(message[1])
                continue
            for out in message[1]:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    done.add(out.request_id)
        time.sleep(0.005)
    return tokens, others


@pytest.fixture(scope="module")
def config(tiny_llama) -> EngineConfig:
    return EngineConfig(model=str(tiny_llama), dtype="float32", exit=ExitConfig(threshold=0.5), max_prefill_tokens=4)


@pytest.fixture(scope="module")
def proc(config):
    p = EngineProcess(config)
    yield p
    p.close()


def test_same_tokens_as_the_engine_in_process(config, proc):
    expected = {rid: c.token_ids for rid, c in zip(PROMPTS, LLMEngine(config).generate(list(PROMPTS.values()), GREEDY))}
    assert proc.state.num_layers == proc.state.model_num_layers == 6 and proc.state.running == 0
    for rid, prompt in PROMPTS.items():
        proc.add(rid, prompt, GREEDY)
    tokens, _ = collect(proc, set(PROMPTS))
    assert tokens == expected
    assert proc.state.running == 0 and proc.state.tokens == 3 * GREEDY.max_tokens


def test_bad_prompt_fails_alone_and_depth_changes_apply(proc):
    proc.add("good", [5, 17, 33], GREEDY)
    proc.add("bad", [10**6], GREEDY)
    proc.set_num_layers(3)
    proc.add("shallow", [5, 17, 33], GREEDY)
    tokens, others = collect(proc, {"good", "bad", "shallow"})
    assert len(tokens["good"]) == len(tokens["shallow"]) == GREEDY.max_tokens and "bad" not in tokens
    [refused] = [m for m in others if m[0] == "refused"]
    assert refused[1] == "bad" and "token ids must be ints" in refused[2]
    [(_, event, state)] = [m for m in others if m[0] == "layers"]
    assert (event.from_layers, event.to_layers) == (6, 3) and state.num_layers == proc.state.num_layers == 3
    assert state.capacity > event.capacity_before  # the unloaded layers' memory became KV slots

    proc.set_num_layers(6)
    proc.set_memory_budget(1)  # cannot hold the weights: refused, the engine keeps serving
    proc.add("after", [40], GREEDY)
    tokens, others = collect(proc, {"after"})
    assert len(tokens["after"]) == GREEDY.max_tokens and proc.state.num_layers == 6
    [failed] = [m for m in others if m[0] == "command_failed"]
    assert failed[1] == ("budget", 1) and MemoryBudgetError.__name__ in failed[2]


def test_exit_points_apply_in_order_and_a_bad_one_is_refused(config, tiny_llama):
    thinned = LLMEngine(config)
    thinned.set_exit_layers((4,))
    expected = thinned.generate([PROMPTS["a"]], GREEDY)[0].token_ids
    proc = EngineProcess(config)
    try:
        proc.set_exit_layers((4,))  # before the request: it is checked at 4 only
        proc.add("a", PROMPTS["a"], GREEDY)
        proc.set_exit_layers((0,))  # not a depth: refused, the engine keeps checking at 4
        tokens, others = collect(proc, {"a"})
        assert tokens["a"] == expected and proc.state.exit_layers == (4,)
        [failed] = [m for m in others if m[0] == "command_failed"]
        assert failed[1] == ("exits", (0,)) and "1-based" in failed[2]
    finally:
        proc.close()


def test_release_hands_back_only_what_has_not_started(config):
    proc = EngineProcess(dataclasses.replace(config, max_num_seqs=1))  # one slot: b and c queue behind a
    try:
        for rid, prompt in PROMPTS.items():
            proc.add(rid, prompt, GREEDY)
        while not any(m[0] == "step" and m[1] for m in proc.receive()):  # a has started
            time.sleep(0.005)
        proc.release(["a", "b"])  # a is running: it stays; c was not asked for
        tokens, others = collect(proc, {"a", "c"})
        assert ("released", ["b"]) in others
        assert "b" not in tokens and len(tokens["c"]) == GREEDY.max_tokens
        assert proc.state.running == proc.state.waiting == 0
    finally:
        proc.close()


def test_the_engine_runs_at_the_niceness_asked_for(config):
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    for asked, expected in ((None, mine), (mine + 3, mine + 3)):  # raising it is always allowed
        proc = EngineProcess(config, niceness=asked)
        try:
            assert os.getpriority(os.PRIO_PROCESS, proc.pid) == expected
        finally:
            proc.close()


def test_a_model_that_cannot_load_raises_in_the_parent(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):  # the child's own error
        EngineProcess(EngineConfig(model=str(tmp_path / "missing"), dtype="float32"))


def test_the_child_exits_when_the_parent_end_closes(config):
    p = EngineProcess(config)
    p.add("x", [5, 17], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    p._socket.shutdown(socket.SHUT_RDWR)  # what the replica's death does to the socket, without waiting
    assert p.process.wait(timeout=30) == 0
    p.close()


def test_commands_flow_while_the_parent_is_not_reading(config):
    """The parent sends megabytes of commands while its own receive buffer is full of step outputs
    (the child then blocks in its send): the child still takes them in, so neither side deadlocks."""
    p = EngineProcess(config)
    try:
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        for i in range(8):
            p.add(f"long-{i}", [5, 17, i], long)
        time.sleep(2)  # steps pile up unread: the socket fills and the child waits to send
        sender = threading.Thread(target=lambda: [p.abort("x" * 10_000 + str(i)) for i in range(300)])
        sender.start()
        sender.join(timeout=60)
        assert not sender.is_alive(), "the parent's sends blocked"
        tokens, _ = collect(p, {f"long-{i}" for i in range(8)}, timeout_s=120)
        assert all(len(t) == 200 for t in tokens.values())
    finally:
        p.close()


def test_commands_it_cannot_apply_are_refused_and_the_engine_goes_on(proc):
    pid = proc.pid
    for command in [("bogus", 1), "not a tuple", ("add",), ("layers", "six"), ("release", None), ("abort",)]:
        proc._conn.send(command)
    proc.add("after", [40], GREEDY)
    tokens, others = collect(proc, {"after"})
    assert len(tokens["after"]) == GREEDY.max_tokens and proc.process.poll() is None and proc.pid == pid
    failed = [m[1] for m in others if m[0] == "command_failed"]
    assert failed == [("bogus", 1), "not a tuple", ("add",), ("layers", "six"), ("release", None), ("abort",)]


def test_a_huge_prompt_under_uvloop_is_refused_by_its_length_and_the_engine_lives(proc):
    """Ray runs replicas on uvloop, whose add_reader makes the watched descriptor non-blocking: a
    multi-megabyte send on the engine's socket then failed half-way, and the replica took it for
    the engine's death. The loop watches a pipe now; the socket stays blocking."""
    uvloop = pytest.importorskip("uvloop")
    huge = list(range(10**6))  # ~5 MB pickled, more than a socket buffer holds

    async def main():
        loop, got = asyncio.get_running_loop(), asyncio.Queue()
        loop.add_reader(proc.fileno(), lambda: [got.put_nowait(m) for m in proc.receive()])
        try:
            proc.add("huge", huge, GREEDY)
            proc.add("small", [40], GREEDY)
            seen = {}
            while "small" not in seen or "huge" not in seen:
                message = await asyncio.wait_for(got.get(), 60)
                if message[0] == "refused":
                    seen[message[1]] = message[2]
                elif message[0] == "step":
                    seen.update((o.request_id, o.finished) for o in message[1] if o.finished)
            return seen
        finally:
            loop.remove_reader(proc.fileno())

    seen = uvloop.run(main())
    assert "1000000 tokens but max_model_len" in seen["huge"] and seen["small"] is True
    assert proc.process.poll() is None


def test_a_text_prompt_longer_than_any_fitting_prompt_is_refused_without_tokenizing():
    from helios_core.prompt_limits import PromptTooLong, longest_token_chars

    demo = Path(__file__).resolve().parent.parent / "models" / "helios-demo-code-6l"
    engine = LLMEngine(EngineConfig(model=str(demo), dtype="float32", max_model_len=64))
    longest = longest_token_chars(engine.tokenizer)
    assert engine.max_prompt_chars >= 64 * longest  # no prompt that fits is refused by characters
    with pytest.raises(PromptTooLong, match="characters"):
        engine.add_request("x" * (engine.max_prompt_chars + 1), GREEDY)
    with pytest.raises(ValueError, match="tokens but max_model_len is 64"):  # under the bound: counted exactly
        engine.add_request("word " * 100, GREEDY)
    assert not engine.has_unfinished()
