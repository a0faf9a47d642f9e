"""Fuzzing the HTTP API of a real Serve app (issue 7): hypothesis bodies, raw bytes and auth headers,
then schemathesis against the app's OpenAPI schema. For every request: no 5xx, an answer within
TIMEOUT_S, a 4xx with OpenAI's error body, a 200 that the official SDK types parse. Afterwards the
server is healthy, no request is left in an engine, and a greedy completion is what it was before.

Reproducible and bounded: derandomized hypothesis, a fixed number of examples, no shrinking (each
example is an HTTP round trip; a failure is reported as found).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("ray")
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
from ray import serve  # noqa: E402

from deployments import openai_protocol as oa  # noqa: E402
from deployments.app import build_app  # noqa: E402
from helios_core.policy import Registry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "models" / "registry.yaml"
APP, KEY = "fuzz", "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
MAX_TOKENS, MAX_MODEL_LEN, VOCAB = 8, 256, 4096
TIMEOUT_S = 60  # per request, generous for 2 busy cores: a hang fails the example
MODELS = [entry.name for entry in Registry.load(REGISTRY)]
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
REFERENCE = {"model": MODELS[0], "prompt": "def fibonacci(n):", "max_tokens": MAX_TOKENS, "temperature": 0,
             "ignore_eos": True}


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


# --- the app and HTTP ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(serve_cluster) -> str:
    serve.run(build_app({"registry": str(REGISTRY), "memory_budget": "64MiB", "max_tokens": MAX_TOKENS,
                         "dtype": "float32", "max_model_len": MAX_MODEL_LEN, "api_key": KEY, "policy": {"profile_requests": 10**6}}),
              name=APP, route_prefix=f"/{APP}")
    yield f"{serve_cluster.url}/{APP}"
    serve.delete(APP)


def request(base: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of one request on a fresh connection; raises on a hang."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT_S)
    start = time.monotonic()
    try:
        conn.request(method, url.path + path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    assert time.monotonic() - start < TIMEOUT_S, f"{method} {path} took over {TIMEOUT_S} s"
    return resp.status, resp.getheader("content-type", ""), data


def post_json(base: str, path: str, body, headers=AUTH) -> tuple[int, str, bytes]:
    return request(base, "POST", path, json.dumps(body).encode(), headers)  # NaN/Infinity stay as such


def replica_stats() -> list[dict]:
    return [serve.get_deployment_handle(f"model-{m}", APP).stats.remote().result(timeout_s=TIMEOUT_S)
            for m in MODELS]


def reference_text(base: str) -> str:
    status, _, data = post_json(base, COMPLETIONS, REFERENCE)
    assert status == 200, data[:300]
    return json.loads(data)["choices"][0]["text"]


@pytest.fixture(scope="module")
def reference(base) -> tuple[str, int]:
    """Before any fuzzing: the greedy text of REFERENCE, and the tokens the replicas generated."""
    text = reference_text(base)
    return text, sum(s["tokens"] for s in replica_stats())


@contextmanager
def good_requests_alongside(base: str, text: str):
    """REFERENCE in a loop while the fuzz runs (sharing engine batches with it): each one must still
    give the reference text."""
    stop, outs = threading.Event(), []

    def loop():
        while not stop.is_set():
            try:
                outs.append(reference_text(base))
            except Exception as err:  # reported below, in the test's thread
                outs.append(repr(err))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
    assert outs and outs == [text] * len(outs), outs


# --- what every answer must look like -----------------------------------------------------------
def check_error(status: int, data: bytes) -> None:
    assert 400 <= status < 500, (status, data[:300])
    body = json.loads(data)
    error = body["error"]
    assert set(body) == {"error"} and set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)


def check_sse(data: bytes, chat: bool) -> None:
    events = data.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], events[-3:]
    finishes = []
    for event in events[:-2]:
        assert event.startswith("data: "), event
        chunk = json.loads(event.removeprefix("data: "))
        assert "error" not in chunk, chunk  # a cut stream
        finishes += [c["finish_reason"] for c in chunk["choices"] if c["finish_reason"] is not None]
        if chat:
            ChatCompletionChunk.model_validate(chunk)
        else:  # the SDK's Completion (responses and chunks) has no null finish_reason, which chunks send
            Completion.model_validate({**chunk, "choices": [{**c, "finish_reason": "stop"} for c in chunk["choices"]]})
    assert finishes in (["stop"], ["length"]), finishes


def check_answer(status: int, content_type: str, data: bytes, chat: bool, sent=None) -> int:
    """A request's answer: a well-formed 200 (streaming when asked), or a 4xx with OpenAI's error
    body. Returns the status."""
    assert status < 500, (status, data[:300])
    if status != 200:
        check_error(status, data)
        return status
    streaming = content_type.startswith("text/event-stream")
    if isinstance(sent, dict):
        assert streaming == (sent.get("stream") is True)
        assert sent.get("model") in ["helios", *MODELS]  # the registry's names only
    if streaming:
        check_sse(data, chat)
    else:
        out = (ChatCompletion if chat else Completion).model_validate_json(data)
        assert len(out.choices) == 1 and out.choices[0].finish_reason in ("stop", "length")
        assert 0 < out.usage.completion_tokens <= MAX_TOKENS
    return status


# --- strategies -----------------------------------------------------------------------------------
# A body is a valid request (so generation runs) with up to three fields then broken: a wrong type,
# an out-of-range or non-finite number, a lone surrogate, a model name that is a path, or dropped.
TEXT = st.text(max_size=24)
BAD_TEXT = st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=24)  # lone surrogates too
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), BAD_TEXT,
                 st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
BAD_MODELS = ["../../etc/passwd", "/tmp/x", str(ROOT / "models" / MODELS[0]), f"models/{MODELS[0]}", "gpt2",
              "file:///etc/passwd", "http://127.0.0.1:1/x", f"{MODELS[0]}/../{MODELS[1]}", "", " helios", "HELIOS"]
DROP = object()  # a mutation that removes the field
ANY_INT, ANY_FLOAT = st.integers(-2**70, 2**70), st.floats()

# field -> (valid values, invalid values); JUNK and DROP are added to every invalid set.
COMMON = {
    "model": (st.sampled_from(["helios", *MODELS]), st.sampled_from(BAD_MODELS) | BAD_TEXT),
    "max_tokens": (st.none() | st.integers(1, MAX_TOKENS), ANY_INT),
    "temperature": (st.floats(0, 2), ANY_FLOAT),
    "top_p": (st.floats(0, 1, exclude_min=True), ANY_FLOAT),
    "top_k": (st.integers(-1, 50), ANY_INT),
    "seed": (st.integers(0, 2**64 - 1), ANY_INT),
    "stop": (st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=3),
             st.lists(BAD_TEXT, max_size=3)),
    "stream": (st.booleans(), st.sampled_from([0, 1, "true"])),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), JUNK),
    "threshold": (st.floats(0, 2), ANY_FLOAT),
    "ignore_eos": (st.booleans(), JUNK),
    "task": (st.sampled_from(["code", "prose"]) | TEXT, BAD_TEXT),
    "user": (TEXT, BAD_TEXT),
    "n": (st.sampled_from([1, None]), st.integers(-1, 3)),
    "logit_bias": (st.sampled_from([{}, None]), st.dictionaries(BAD_TEXT, ANY_FLOAT, max_size=2)),
    "presence_penalty": (st.sampled_from([0, 0.0, None]), ANY_FLOAT),
    "frequency_penalty": (st.sampled_from([0, 0.0, None]), ANY_FLOAT),
}
COMPLETION_FIELDS = {
    **COMMON,
    "prompt": (st.text(min_size=1, max_size=40) | st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=16)
               | st.text(min_size=1, max_size=8).map(lambda s: [s])
               | st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4).map(lambda ids: [ids]),
               st.one_of(BAD_TEXT, st.lists(ANY_INT, max_size=3), st.lists(st.integers(VOCAB, VOCAB + 2), min_size=1),
                         st.lists(TEXT, min_size=2, max_size=3), st.just("x " * MAX_MODEL_LEN),
                         st.just([1] * MAX_MODEL_LEN), st.just([]), st.just([[]]))),
    "echo": (st.sampled_from([False, None]), JUNK),
    "suffix": (st.sampled_from(["", None]), TEXT),
    "best_of": (st.sampled_from([1, None]), st.integers(-1, 3)),
    "logprobs": (st.sampled_from([0, None]), st.integers(-1, 3)),
}
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                 "content": TEXT | st.lists(TEXT_PART, min_size=1, max_size=2)})
BAD_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["tool", "", "User"]) | JUNK, "content": TEXT}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(BAD_TEXT, JUNK, st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["image_url", "text"]), "text": JUNK}), min_size=1))}),
    st.fixed_dictionaries({"role": st.just("user")}), JUNK)
CHAT_FIELDS = {
    **COMMON,
    "messages": (st.lists(MESSAGE, min_size=1, max_size=3),
                 st.just([]) | st.lists(BAD_MESSAGE, min_size=1, max_size=2)),
    "max_completion_tokens": COMMON["max_tokens"],
    "logprobs": (st.booleans() | st.none(), JUNK),
    "top_logprobs": (st.sampled_from([0, None]), st.integers(-1, 3)),
}


def _coherent(body: dict) -> dict:
    if body.get("stream") is not True:  # stream_options without streaming is a (well-tested) 400
        body.pop("stream_options", None)
    return body


def _break(body: dict, mutations: list[tuple[str, object]]) -> dict:
    body = dict(body)
    for name, value in mutations:
        if value is DROP:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def bodies(fields: dict, required: tuple[str, ...]) -> st.SearchStrategy[dict]:
    valid = st.fixed_dictionaries({k: fields[k][0] for k in required},
                                  optional={k: v for k, (v, _) in fields.items() if k not in required}).map(_coherent)
    mutation = st.sampled_from(sorted(fields)).flatmap(
        lambda name: st.tuples(st.just(name), fields[name][1] | JUNK | st.just(DROP)))
    unknown = st.tuples(st.text(min_size=1, max_size=8).filter(lambda k: k not in fields), JUNK)  # ignored
    broken = st.builds(_break, valid, st.lists(mutation | unknown, min_size=1, max_size=3))
    return st.integers(0, 2).flatmap(lambda i: valid if i == 0 else broken)  # one valid in three


COMPLETION_BODY = bodies(COMPLETION_FIELDS, ("model", "prompt", "max_tokens"))
CHAT_BODY = bodies(CHAT_FIELDS, ("model", "messages", "max_tokens"))


# --- the fuzz tests -------------------------------------------------------------------------------
def test_reference_before_fuzzing(reference):
    text, _ = reference
    assert text


def assert_both_paths(seen: Counter, least: int) -> None:
    """The fuzzing reached generation (200s) as well as validation (4xx), not one of them only."""
    assert seen[200] >= least and sum(n for status, n in seen.items() if status != 200) >= least, seen


def test_fuzz_completions(base, reference):
    seen = Counter()

    @given(body=COMPLETION_BODY)
    @example(body={"model": "../../etc/passwd", "prompt": "x", "max_tokens": 1})
    @example(body={"model": "\ud800", "prompt": "x", "max_tokens": 1})  # was a 500: the 404 echoed it
    @example(body={"model": "helios", "prompt": "a\udfffb", "max_tokens": 1})  # killed the engine loop
    @example(body={"model": MODELS[0], "prompt": "x", "max_tokens": 2**70})
    @example(body={"model": MODELS[0], "prompt": "x", "max_tokens": 2, "temperature": float("nan")})
    @example(body={"prompt": "x"})
    @fuzz_settings(100)
    def run(body):
        seen[check_answer(*post_json(base, COMPLETIONS, body), chat=False, sent=body)] += 1

    with good_requests_alongside(base, reference[0]):
        run()
    assert_both_paths(seen, 10)


def test_fuzz_chat(base, reference):
    seen = Counter()

    @given(body=CHAT_BODY)
    @example(body={"model": "helios", "messages": [{"role": "user", "content": "\ud83d"}], "max_tokens": 1})
    @example(body={"model": "helios", "messages": [], "max_tokens": 1})
    @fuzz_settings(60)
    def run(body):
        seen[check_answer(*post_json(base, CHAT, body), chat=True, sent=body)] += 1

    with good_requests_alongside(base, reference[0]):
        run()
    assert_both_paths(seen, 5)


SCALARS = st.none() | st.booleans() | st.floats() | st.integers() | BAD_TEXT
RAW_BODY = st.one_of(
    st.binary(max_size=64),
    st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.lists(st.lists(SCALARS, max_size=2), max_size=2),
              st.dictionaries(TEXT, SCALARS, max_size=3)).map(lambda v: json.dumps(v).encode()),  # JSON
    st.tuples(st.sampled_from([json.dumps(REFERENCE)]), st.integers(0, 60), st.binary(max_size=4))
    .map(lambda t: t[0].encode()[:t[1]] + t[2]),  # truncated, then garbage
    st.sampled_from(["utf-8", "utf-16", "utf-32", "latin-1"]).map(lambda enc: json.dumps(
        {**REFERENCE, "prompt": "déf ü():"}, ensure_ascii=False).encode(enc)),
)
CONTENT_TYPES = st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json; charset=utf-16", "ü/ü"])


@given(path=st.sampled_from([COMPLETIONS, CHAT]), body=RAW_BODY, content_type=CONTENT_TYPES)
@example(path=COMPLETIONS, body=b"[" * 100_000, content_type="application/json")  # was a 500 (RecursionError)
@example(path=CHAT, body=b'{"model": "helios", "max_tokens": ' + b"7" * 5000 + b"}", content_type=None)  # 500
@example(path=COMPLETIONS, body=b" " * ((1 << 20) + 1), content_type="application/json")  # 413
@example(path=COMPLETIONS, body=b"", content_type=None)
@fuzz_settings(60)
def test_fuzz_raw_bodies(base, reference, path, body, content_type):
    headers = {"Authorization": f"Bearer {KEY}"} | ({"Content-Type": content_type} if content_type else {})
    status, ctype, data = request(base, "POST", path, body, headers)
    check_answer(status, ctype, data, chat=path == CHAT)
    if len(body) > 1 << 20:
        assert status == 413


HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=24)
AUTH_VALUES = st.one_of(
    st.none(), st.just(f"Bearer {KEY}"), HEADER_TEXT,
    st.sampled_from(["Bearer", "Bearer ", f"bearer {KEY}", f"Basic {KEY}", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x",
                     f"Bearer {KEY.upper()}", f"Bearer  {KEY}", f"Bearer {KEY}\t", "Bearer " + "k" * 8192]),
    st.tuples(HEADER_TEXT, HEADER_TEXT).map(lambda t: f"{t[0]}{KEY}{t[1]}"))


@given(auth=AUTH_VALUES, route=st.sampled_from([("GET", "/v1/models"), ("GET", "/v1/helios/stats"),
                                                ("POST", COMPLETIONS), ("POST", CHAT)]))
@fuzz_settings(40)
def test_fuzz_auth_header(base, reference, auth, route):
    """Without the exact key in the header: 401 (invalid_api_key) before the body is read; with
    "Bearer <key>": never a 401."""
    method, path = route
    body = {**REFERENCE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    headers = {"Content-Type": "application/json"} | ({"Authorization": auth} if auth is not None else {})
    status, ctype, data = request(base, method, path, json.dumps(body).encode() if method == "POST" else None,
                                  headers)
    if auth is None or KEY not in auth:
        check_error(status, data)
        assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
    elif auth.strip(" \t") == f"Bearer {KEY}":  # the HTTP server strips spaces and tabs
        assert status == 200, data[:300]
        if method == "POST":
            check_answer(status, ctype, data, chat=path == CHAT)
    else:
        assert status in (200, 401), (status, data[:300])


# --- schemathesis against the OpenAPI schema --------------------------------------------------------
def openapi_document(base: str) -> dict:
    """The app's schema (its request bodies declared by the ingress), narrowed to this server: the
    served model names and its max_tokens."""
    status, _, data = request(base, "GET", "/openapi.json")
    assert status == 200, data[:300]
    doc = json.loads(data)
    for path, cls in ((COMPLETIONS, oa.CompletionRequest), (CHAT, oa.ChatCompletionRequest)):
        post = doc["paths"][path]["post"]
        declared = oa.openapi_request_body(cls)["content"]["application/json"]["schema"]["properties"]
        assert set(post["requestBody"]["content"]["application/json"]["schema"]["properties"]) == set(declared)
        fields = post["requestBody"]["content"]["application/json"]["schema"]["properties"]
        fields["model"]["enum"] = ["helios", *MODELS]
        for name in ("max_tokens", "max_completion_tokens"):
            if name in fields:
                fields[name]["anyOf"][0]["maximum"] = MAX_TOKENS
    return doc


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis(base, reference, mode):
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_dict(openapi_document(base))
    strategy = schema.as_strategy(generation_mode=schemathesis.GenerationMode(mode))
    seen = Counter()

    @given(case=strategy)
    @fuzz_settings(50)
    def run(case):
        response = case.call(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT_S)
        case.validate_response(response, checks=[not_a_server_error])
        if case.path in (COMPLETIONS, CHAT):
            content_type = response.headers.get("content-type", [""])[0]
            seen[check_answer(response.status_code, content_type, response.content, chat=case.path == CHAT)] += 1

    run()
    if mode == "positive":
        assert_both_paths(seen, 3)
    else:  # what the schema forbids is refused (not all: e.g. a one-prompt batch ["x"] is accepted)
        assert sum(n for status, n in seen.items() if 400 <= status < 500) >= 10, seen


# --- afterwards -------------------------------------------------------------------------------------
def test_server_unharmed_after_fuzzing(base, reference):
    """Healthy, every engine idle (no request leaked), the same greedy text."""
    text, tokens_before = reference
    status, _, data = request(base, "GET", "/health")
    assert (status, json.loads(data)) == (200, {"status": "ok"})
    app = serve.status().applications[APP]
    assert app.status == "RUNNING" and all(d.status == "HEALTHY" for d in app.deployments.values())
    deadline = time.monotonic() + TIMEOUT_S
    while True:  # a stream whose client left is aborted between engine steps: give it a moment
        stats = replica_stats()
        if all(s["running"] == s["waiting"] == 0 for s in stats) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [(s["running"], s["waiting"]) for s in stats] == [(0, 0)] * len(MODELS)
    assert sum(s["tokens"] for s in stats) > tokens_before  # the fuzzing did generate
    assert reference_text(base) == text
