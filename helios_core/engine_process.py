"""The engine in a process of its own, driven over a socket (vLLM V1's engine-core split).

A Serve replica streams tokens from an asyncio event loop. With the engine in the same process,
the loop's Python (Ray's streaming, the stream items) takes the GIL from the decode step between
torch ops, and each step waits for the loop to hand out its outputs before the next one starts.
Here the engine steps back to back in a child process; the replica only sends commands and reads
outputs. Measured in docs/benchmarks.md (where the time goes, Serve).

The child runs `python -m helios_core.engine_process FD` on its end of a socket pair. Both ends
speak `multiprocessing.connection` (pickled tuples between our own two processes, never a file):

  to the engine    ("add", request_id, prompt, params) | ("abort", request_id)
                   | ("layers", num_layers) | ("budget", bytes) | ("exits", exit_layers or None)
                   | ("release", request_ids)  hand back those of them not started yet
  from the engine  ("ready", state) once loaded, or ("failed", error, traceback) instead
                   ("step", outputs, state, step_records) after every step
                   ("refused", request_id, message)  a bad prompt; the other requests go on
                   ("layers", LayerEvent, state) | ("budget", capacity, state)
                   ("command_failed", command, message)  a depth or budget that cannot apply
                   ("released", request_ids)  they left the queue without an output
                   ("adding", request_id) before a request is taken in; ("stepping",) before
                   the first step after requests were: what the parent last read tells it,
                   should the child die, whether a request's add or a step killed it

Commands are applied between steps, in the order sent; one the engine cannot apply is refused
alone ("refused" or "command_failed"), never fatal. The child exits when the parent's end closes
(the replica stopped or died), so it never outlives its replica. For tests, a prompt holding the
text in $HELIOS_TEST_CRASH_PROMPT makes the child exit at once, as a crash in its add would.

Each side reads its socket in a thread of its own and keeps the socket blocking. An event loop
watches `EngineProcess.fileno()`, a pipe the reader thread rings, never the socket: uvloop (Ray's
loop) makes a watched descriptor non-blocking, and a large send (a megabyte prompt) or a message
read in part then fails with BlockingIOError, which looked like the engine's death.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch

from .engine import EngineConfig, LLMEngine
from .request import RequestOutput
from .sampling import SamplingParams
from .telemetry import StepRecord

START_TIMEOUT_S = 300.0  # loading a large checkpoint onto a GPU can take minutes
CRASH_PROMPT_ENV = "HELIOS_TEST_CRASH_PROMPT"
CRASH_EXIT_CODE = 70


@dataclass(frozen=True)
class EngineState:
    """What the replica reads of the engine: its shape, load and running totals, as of the last message."""

    name: str
    num_layers: int  # loaded
    model_num_layers: int  # in the checkpoint
    capacity: int  # sequences the KV pool holds at the observed mean length
    capacity_tokens: int  # positions the KV pool holds
    used_tokens: int  # positions of the blocks the running sequences hold
    mean_seq_len: float  # prompt + output tokens of recent requests (max_model_len before any)
    preempted: int  # sequences preempted for lack of blocks, since start
    prefix_lookups: int  # prompt blocks looked up in the prefix cache, since start
    prefix_hits: int  # of those, found cached
    prefill_tokens_saved: int  # prompt positions not prefilled thanks to cached prefixes, since start
    running: int
    waiting: int
    context_tokens: int  # prompt + output tokens of the running sequences
    weight_bytes: int
    kv_bytes: int
    kv_used_bytes: int  # of kv_bytes: the blocks the running sequences hold
    memory_budget: int
    histogram: dict[int, int] = field(default_factory=dict)  # exit depth -> tokens, since start
    tokens: int = 0
    forced: int = 0
    breaches: int = 0
    exit_layers: tuple[int, ...] | None = None  # the exit points in use (None: the configured ones)
    dtype: str = ""  # the weights', e.g. "bfloat16" (what "auto" resolved to)

    @property
    def prefix_hit_rate(self) -> float:
        """Of the prompt blocks looked up, the share found cached, since start."""
        return self.prefix_hits / self.prefix_lookups if self.prefix_lookups else 0.0

    @staticmethod
    def of(engine: LLMEngine) -> "EngineState":
        sched, m, s = engine.scheduler, engine.memory, engine.stats
        running, used = sched.running, sched.blocks.num_used
        return EngineState(engine.name, engine.num_layers, engine.model_config.num_layers, engine.capacity,
                           m.capacity_tokens, sched.used_tokens, engine.mean_seq_len, sched.num_preempted,
                           *sched.blocks.stats.counts(),
                           len(running), len(sched.waiting), sum(len(q.token_ids) for q in running),
                           m.weight_bytes, m.kv_bytes, used * m.kv_bytes_per_block, m.budget_bytes,
                           dict(s.histogram), s.tokens, s.forced, s.breaches, engine.exit_layers, engine.dtype)


class EngineProcess:
    """The parent's side: start the child, send it commands, read what it sends back.

    `fileno()` becomes readable when messages arrive (for an event loop's `add_reader`); `receive()`
    returns those already there without blocking. `threads`: torch's in the child; `niceness`: the
    child's, where it may set it (None: the parent's)."""

    def __init__(self, config: EngineConfig, threads: int = 1, niceness: int | None = None):
        parent, child = socket.socketpair()
        # The parent's import path, so the child runs the same helios_core (a Ray runtime_env's
        # working_dir or py_modules are on sys.path, not in the environment).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen([sys.executable, "-m", __name__, str(child.fileno())],
                                        pass_fds=(child.fileno(),), env=env)
        child.close()
        self._socket = parent  # kept to shut down: that wakes our reader and the child sees EOF
        self._conn = Connection(os.dup(parent.fileno()))
        self._conn.send((config, threads, niceness))
        if not self._conn.poll(START_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"the engine process did not load {config.model} within {START_TIMEOUT_S:.0f} s")
        try:
            message = self._conn.recv()
        except EOFError:
            self.close()
            raise RuntimeError(f"the engine process exited while loading {config.model} "
                               f"(exit code {self.process.wait()})") from None
        if message[0] == "failed":
            self.close()
            _, error, trace = message
            raise error from RuntimeError(f"in the engine process:\n{trace}")
        self.state: EngineState = message[1]
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # messages, then None at EOF
        self._bell_r, self._bell_w = os.pipe()
        os.set_blocking(self._bell_r, False)
        os.set_blocking(self._bell_w, False)  # a full pipe is readable already: a ring may be dropped
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                self._inbox.put(self._conn.recv())
                self._ring()
        except (EOFError, OSError):
            self._inbox.put(None)
            self._ring()

    def _ring(self) -> None:
        try:
            os.write(self._bell_w, b"\0")
        except BlockingIOError:  # the pipe is full, so readable already
            pass

    @property
    def pid(self) -> int:
        return self.process.pid

    def add(self, request_id: str, prompt: list[int] | str, params: SamplingParams) -> None:
        self._conn.send(("add", request_id, prompt, params))

    def abort(self, request_id: str) -> None:
        self._conn.send(("abort", request_id))

    def set_num_layers(self, num_layers: int) -> None:
        self._conn.send(("layers", num_layers))

    def set_exit_layers(self, exit_layers: tuple[int, ...] | None) -> None:
        self._conn.send(("exits", exit_layers))

    def release(self, request_ids: list[str]) -> None:
        self._conn.send(("release", request_ids))

    def set_memory_budget(self, budget: int) -> None:
        self._conn.send(("budget", budget))

    def fileno(self) -> int:
        """Readable while messages wait (a pipe, not the socket: see the module docstring)."""
        return self._bell_r

    def receive(self) -> list[tuple]:
        """The messages waiting (none blocks); raises EOFError once the engine process has gone."""
        try:
            while os.read(self._bell_r, 4096):
                pass
        except BlockingIOError:
            pass
        messages = []
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return messages
            if message is None:
                self._inbox.put(None)  # every later call raises
                if messages:  # its last messages first: they tell what the engine was doing
                    self._ring()
                    return messages
                raise EOFError("the engine process has gone")
            if message[0] in ("step", "layers", "budget"):
                self.state = message[2]
            messages.append(message)

    def close(self) -> None:
        """Stop the child (it sees EOF and exits) and free the descriptors; a second call does nothing."""
        if self._socket.fileno() == -1:
            return
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:  # the child has gone already
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        reader = getattr(self, "_reader", None)  # None when loading failed
        if reader is not None:
            reader.join()  # it saw EOF: nothing rings the bell after this
            os.close(self._bell_r)
            os.close(self._bell_w)
        self._conn.close()
        self._socket.close()


def _apply(engine: LLMEngine, conn: Connection, command: tuple, crash_prompt: str | None = None) -> None:
    """Apply one command. One that cannot apply is answered and dropped: the engine and the other
    requests go on as before (a bad prompt is "refused" to its request, any other "command_failed")."""
    try:
        kind, *args = command
        if kind == "add":
            request_id, prompt, params = args
            conn.send(("adding", request_id))
            if crash_prompt and isinstance(prompt, str) and crash_prompt in prompt:
                os._exit(CRASH_EXIT_CODE)
            try:
                engine.add_request(prompt, params, request_id)
            except Exception as err:  # a bad prompt (a tokenizer error too) fails alone
                conn.send(("refused", request_id, str(err)))
        elif kind == "abort":
            engine.abort(*args)
        elif kind == "exits":
            engine.set_exit_layers(*args)
        elif kind == "release":
            released = engine.release_waiting(set(*args))
            conn.send(("released", [s.request_id for s in released]))
        elif kind in ("layers", "budget"):  # e.g. a depth whose weights no longer fit: keep serving as before
            result = engine.set_num_layers(*args) if kind == "layers" else engine.set_memory_budget(*args)
            conn.send((kind, result, EngineState.of(engine)))
        else:
            raise ValueError(f"unknown engine command {kind!r}")
    except (EOFError, OSError):  # the replica has gone: serve() ends
        raise
    except Exception as err:
        conn.send(("command_failed", _shorten(command), f"{type(err).__name__}: {err}"))


def _shorten(command, limit: int = 200):
    """The command as the error report names it: itself, or the head of its repr, never a megabyte
    echoed back."""
    text = repr(command)
    return command if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _renice(niceness: int) -> None:
    """Run at `niceness` where allowed. Ray starts its workers, this engine's replica among them,
    at nice 15, and the kernel shares a busy core evenly between equally nice threads: the Serve
    processes around the engine (ingress, proxy, replica), which have slack, then take turns
    with the decode step. Lowering the niceness needs CAP_SYS_NICE (root, or a container granted
    it); without it the engine keeps the niceness it inherited."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except PermissionError:
        pass


def _read_commands(conn: Connection, commands: queue.SimpleQueue) -> None:
    """Take commands off the socket as they come, so that the replica's sends never wait for a step
    (both ends blocked in a send, each buffer full, would be a deadlock). None: the replica is gone."""
    try:
        while True:
            commands.put(conn.recv())
    except (EOFError, OSError):
        commands.put(None)


def serve(conn: Connection) -> None:
    """The child's loop: load, then step while there is work, applying commands between steps."""
    config, threads, niceness = conn.recv()
    torch.set_num_threads(threads)
    if niceness is not None:
        _renice(niceness)
    try:
        engine = LLMEngine(config)
    except Exception as err:
        conn.send(("failed", err, traceback.format_exc()))
        return
    commands: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_commands, args=(conn, commands), daemon=True).start()
    conn.send(("ready", EngineState.of(engine)))
    crash_prompt = os.environ.get(CRASH_PROMPT_ENV)
    while True:
        block = not engine.has_unfinished()  # idle: wait for a command
        added = False
        while block or not commands.empty():
            command = commands.get()
            if command is None:
                return
            _apply(engine, conn, command, crash_prompt)
            added = added or (isinstance(command, tuple) and command[:1] == ("add",))
            block = False
        if added:
            conn.send(("stepping",))
        if engine.has_unfinished():
            outputs: list[RequestOutput] = engine.step()
            steps: list[StepRecord] = engine.drain_steps()
            conn.send(("step", outputs, EngineState.of(engine), steps))


def main(fd: int) -> None:
    # Ctrl-C in `serve run`'s terminal reaches the whole process group; the replica decides when
    # its engine stops (by closing the socket).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        serve(Connection(fd))
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the replica stopped or died
        pass
    except BaseException:
        traceback.print_exc()  # to the replica's log: the child inherits its stderr
        os._exit(1)
    os._exit(0)  # skip interpreter teardown (torch's thread pools): nothing here needs flushing


if __name__ == "__main__":
    # The module imported under its own name, not this __main__ copy: what the child pickles must
    # name helios_core.engine_process's classes.
    from helios_core.engine_process import main as imported_main

    imported_main(int(sys.argv[1]))
