"""Hostile input on a real Serve app (issue 21): oversized and malformed requests are refused with a
4xx before they cost work and harm nobody; a request that kills its engine is tried twice, then
refused, while ordinary requests beside it all succeed.

Before the fix one 1 MB prompt killed four replicas: Ray's uvloop made the engine's socket
non-blocking, the megabyte send failed half-way, the replica took that for its engine's death, and
the ingress's retries carried the request to the next replica.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ray = pytest.importorskip("ray")
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from ray import serve  # noqa: E402

from deployments.app import build_app  # noqa: E402
from tiny_models import TEST_CRASH_PROMPT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CODE = "helios-demo-code-6l"
APP = "hostile"
MAX_MODEL_LEN, MAX_BODY = 256, 4 << 20  # a body cap above the prompts below: their refusal is the prompt check's
TIMEOUT_S = 30  # a hang fails the example; refusals take milliseconds
ORDINARY = {"model": CODE, "prompt": "def fibonacci(n):", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def base(serve_cluster, tmp_path_factory) -> str:
    doc = yaml.safe_load((ROOT / "models" / "registry.yaml").read_text())  # one model: one replica to restart
    doc["models"] = [dict(m, path=str(ROOT / "models" / m["path"])) for m in doc["models"] if m["name"] == CODE]
    registry = tmp_path_factory.mktemp(APP) / "registry.yaml"
    registry.write_text(yaml.safe_dump(doc))
    serve.run(build_app({"registry": str(registry), "memory_budget": "64MiB", "dtype": "float32", "max_tokens": 16,
                         "max_model_len": MAX_MODEL_LEN, "max_body_bytes": MAX_BODY,
                         "policy": {"profile_requests": 10**6}}), name=APP, route_prefix=f"/{APP}")
    yield f"{serve_cluster.url}/{APP}"
    serve.delete(APP)


def post(base: str, path: str, body: bytes, timeout: float = TIMEOUT_S) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one POST on a fresh connection."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    start = time.monotonic()
    try:
        conn.request("POST", url.path + path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), time.monotonic() - start
    finally:
        conn.close()


def ordinary_text(base: str) -> str:
    status, data, _ = post(base, "/v1/completions", json.dumps(ORDINARY).encode(), timeout=120)
    assert status == 200, data[:300]
    return json.loads(data)["choices"][0]["text"]


def pids() -> tuple[int, int]:
    stats = serve.get_deployment_handle(f"model-{CODE}", APP).stats.remote().result(timeout_s=60)
    return stats["pid"], stats["engine_pid"]


@contextmanager
def ordinary_traffic(base: str, workers: int = 2):
    """Ordinary completions in a loop meanwhile; each must succeed with the same greedy text."""
    expected, stop, outs = ordinary_text(base), threading.Event(), []

    def loop():
        while not stop.is_set():
            try:
                outs.append(ordinary_text(base))
            except Exception as err:  # reported below, in the test's thread
                outs.append(repr(err))

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert outs and outs == [expected] * len(outs), [o for o in outs if o != expected][:3]


def check_refusal(status: int, data: bytes, seconds: float, field: str | None = None) -> dict:
    """A 4xx with OpenAI's error body, in time; with `field`: naming it, unless the whole body was
    refused first (over the size limit, or not valid Unicode)."""
    assert 400 <= status < 500, (status, data[:300])
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert seconds < TIMEOUT_S
    if field is not None:
        assert status == 413 or error["param"] == field or "surrogate" in error["message"], str(error)[:300]
    return error


# --- oversized and malformed --------------------------------------------------------------------------
def repeated(piece: st.SearchStrategy[str], least: int, most: int) -> st.SearchStrategy[str]:
    """A long text built by repeating a short one (hypothesis would take minutes to draw megabytes)."""
    return st.builds(lambda p, n: (p * (n // len(p) + 1))[:n], piece.filter(bool), st.integers(least, most))


ODD = st.lists(st.sampled_from(["\x00", "\ud800", "\udfff", "é", "\u0301", " ", "word ", "\n"]), min_size=1, max_size=6).map("".join)
HUGE_TEXT = repeated(st.sampled_from(["word ", "x", "\u4e2d", "e\u0301"]) | ODD, 200_000, 1_000_000)
HUGE_IDS = st.integers(10_000, 100_000).map(lambda n: [1] * n)
HUGE_STOP = st.integers(5, 100_000).map(lambda n: [f"s{i}" for i in range(n)])
HUGE_BIAS = st.integers(301, 100_000).map(lambda n: {str(i): 1.0 for i in range(n)})
FIELD = {"prompt": "prompt", "messages": "messages", "stop": "stop", "logit_bias": "logit_bias"}


HOSTILE_COMPLETION = st.one_of(
    st.tuples(st.just("prompt"), HUGE_TEXT | HUGE_IDS), st.tuples(st.just("stop"), HUGE_STOP),
    st.tuples(st.just("logit_bias"), HUGE_BIAS))
HOSTILE_CHAT = st.one_of(
    st.tuples(st.just("messages"), HUGE_TEXT.map(lambda t: [{"role": "user", "content": t}])),
    st.tuples(st.just("messages"), st.integers(2_000, 20_000).map(  # many messages, huge together
        lambda n: [{"role": "user", "content": "word " * 100}] * n)),
    st.tuples(st.just("stop"), HUGE_STOP), st.tuples(st.just("logit_bias"), HUGE_BIAS))

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], print_blob=False,
                    suppress_health_check=list(HealthCheck))


def encode(body: dict) -> bytes:
    return json.dumps(body).encode("utf-8", "surrogatepass")  # lone surrogates stay escaped as \ud800


def test_oversized_requests_get_a_4xx_in_seconds_and_harm_nobody(base):
    before = pids()

    @given(case=HOSTILE_COMPLETION)
    @example(case=("prompt", "word " * 200_000))  # the request of issue 21
    @example(case=("prompt", [1] * 100_000))
    @SETTINGS
    def completions(case):
        kind, value = case
        check_refusal(*post(base, "/v1/completions", encode({**ORDINARY, kind: value})), FIELD[kind])

    @given(case=HOSTILE_CHAT)
    @example(case=("messages", [{"role": "user", "content": "\x00\ud800" * 300_000}]))
    @SETTINGS
    def chat(case):
        kind, value = case
        body = {"model": CODE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, kind: value}
        check_refusal(*post(base, "/v1/chat/completions", encode(body)), FIELD[kind])

    with ordinary_traffic(base):
        completions()
        chat()
    assert pids() == before  # no replica and no engine process restarted


@pytest.mark.parametrize("size", [MAX_BODY + 1, 64 << 20])
def test_a_body_over_the_limit_gets_a_413_before_it_is_read(base, size):
    body = b'{"model": "' + CODE.encode() + b'", "prompt": "' + b"x" * size + b'"}'
    status, data, seconds = post(base, "/v1/completions", body)
    assert status == 413 and check_refusal(status, data, seconds)["type"] == "invalid_request_error"


# --- a request that kills its engine -------------------------------------------------------------------
def replica_names() -> set[str]:
    prefix = f"SERVE_REPLICA::{APP}#model-{CODE}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_kills_its_engine_is_tried_twice_then_refused(base, stream):
    seen, stop = replica_names(), threading.Event()

    def watch():  # every replica that lives for a moment: a restart takes seconds
        while not stop.is_set():
            seen.update(replica_names())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    killer = {**ORDINARY, "prompt": f"def f():\n    return '{TEST_CRASH_PROMPT}'", "stream": stream}
    try:
        with ordinary_traffic(base):
            status, data, _ = post(base, "/v1/completions", json.dumps(killer).encode(), timeout=300)
            error = json.loads(data)["error"]
            assert status == 500 and error["code"] == "request_crashed_replica" and "twice" in error["message"]
            deadline = time.monotonic() + 120  # the deployment heals: a new replica serves
            while serve.status().applications[APP].deployments[f"model-{CODE}"].status != "HEALTHY":
                assert time.monotonic() < deadline, "the deployment did not become healthy again"
                time.sleep(0.5)
            ordinary_text(base)
    finally:
        stop.set()
        watcher.join()
    assert len(seen) == 3  # the first replica and two more: the request killed two, not more
