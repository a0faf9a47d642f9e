"""The OpenAI protocol layer: validation errors, sampling parameters, chat prompts, and response
shapes parsed by the official `openai` SDK types. Pure Python: no Ray, no network, no model."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

import tiny_models
from deployments.openai_protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    chat_chunk,
    chat_logprobs,
    chat_prompt,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    error_body,
    error_event,
    models_response,
    new_chat_id,
    new_completion_id,
    openapi_request_body,
    parse_body,
    sse,
    to_sampling_params,
    usage_chunk,
    validate_chat,
    validate_completion,
)
from helios_core.sampling import SamplingParams
from helios_core.telemetry import RequestSummary, TokenRecord

LIMIT = 64
MODELS = ["helios-demo-code-6l"]
MODEL = MODELS[0]
CREATED = 1_700_000_000
USER = [{"role": "user", "content": "Hi"}]


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "def f():", **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": USER, **fields}


def summary(finish_reason: str = "length") -> RequestSummary:
    records = [TokenRecord(exit_layer=d, confidence=0.9, forced=d == 4, breach=False, logprob=-0.5)
               for d in (2, 2, 4)]
    return RequestSummary.from_records("r1", "helios-demo-code-6l@4", 5, records, finish_reason,
                                       arrival=0.0, first_token=0.1, finished=0.3, exit_layers=(2,))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def test_error_body_shape():
    assert error_body("bad", param="x") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": None}}
    err = ProtocolError("busy", status=503, type="server_error")
    assert isinstance(err, ValueError) and err.status == 503
    assert err.body() == {"error": {"message": "busy", "type": "server_error", "param": None, "code": None}}


@pytest.mark.parametrize("payload, param", [
    (completion(prompt=["a", "b"]), "prompt"),
    (completion(prompt=[[1, 2], [3]]), "prompt"),
    (completion(prompt=5), "prompt"),
    (completion(prompt=""), "prompt"),
    (completion(prompt=[]), "prompt"),
    (completion(prompt=[1, -2]), "prompt"),
    (completion(prompt=[True]), "prompt"),
    (completion(max_tokens=0), "max_tokens"),
    (completion(max_tokens=-1), "max_tokens"),
    (completion(max_tokens=LIMIT + 1), "max_tokens"),
    (completion(max_tokens=1.5), "max_tokens"),
    (completion(temperature=-0.1), "temperature"),
    (completion(temperature=2.5), "temperature"),
    (completion(temperature="0.5"), "temperature"),
    (completion(top_p=0), "top_p"),
    (completion(top_p=1.5), "top_p"),
    (completion(n=2), "n"),
    (completion(best_of=3), "best_of"),
    (completion(echo=True), "echo"),
    (completion(logprobs=1), "logprobs"),
    (completion(presence_penalty=0.5), "presence_penalty"),
    (completion(frequency_penalty=-1), "frequency_penalty"),
    (completion(logit_bias={"5": 10}), "logit_bias"),
    (completion(seed=-1), "seed"),
    (completion(stop=""), "stop"),
    (completion(stop=["ok", 1]), "stop[1]"),
    (completion(top_k=-2), "top_k"),
    (completion(threshold=-0.5), "threshold"),
    (completion(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (completion(stream_options={"include_usage": True}), "stream_options"),  # without stream
    ({"prompt": "x"}, "model"),
    (chat(messages="Hi"), "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (chat(messages=[*USER, {"role": "assistant"}]), "messages[1].content"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content"),
    (chat(max_completion_tokens=LIMIT + 1), "max_completion_tokens"),
    (chat(max_tokens=10**9), "max_tokens"),
    (chat(logprobs=True, top_logprobs=2), "top_logprobs"),
    (chat(temperature=3), "temperature"),
])
def test_invalid_requests_name_the_param(payload, param):
    validate = validate_chat if "messages" in payload else validate_completion
    with pytest.raises(ProtocolError) as info:
        validate(payload, LIMIT, MODELS)
    err = info.value
    assert err.status == 400 and err.param == param
    body = err.body()
    assert list(body) == ["error"] and list(body["error"]) == ["message", "type", "param", "code"]
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param
    assert param.split("[")[0].split(".")[0] in body["error"]["message"]


def test_special_errors():
    with pytest.raises(ProtocolError, match="only one prompt per request"):
        validate_completion(completion(prompt=["a", "b"]), LIMIT)
    with pytest.raises(ProtocolError) as info:
        validate_completion(completion(model="gpt-4"), LIMIT, MODELS)
    assert info.value.status == 404 and info.value.body()["error"]["code"] == "model_not_found"
    with pytest.raises(ProtocolError) as info:
        validate_chat(["not", "an", "object"], LIMIT)
    assert info.value.status == 400 and info.value.param is None
    with pytest.raises(ProtocolError, match="Missing required parameter: 'messages'"):
        validate_chat({"model": MODEL}, LIMIT)


def test_parse_body():
    assert parse_body(b'{"a": 1}', 100) == {"a": 1}
    with pytest.raises(ProtocolError) as info:
        parse_body(b"x" * 101, 100)
    assert info.value.status == 413
    with pytest.raises(ProtocolError) as info:
        parse_body(b'{"a": ', 100)
    assert info.value.status == 400


@pytest.mark.parametrize("raw, detail", [
    (b"[" * 100_000, "nested too deeply"),  # RecursionError in json.loads
    (b'{"model": "m", "prompt": "x", "extra": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    (b'{"max_tokens": ' + b"9" * 5000 + b"}", "4300"),  # ValueError: Python's int digit cap
    (b'{"model": "\\ud800", "prompt": "x"}', "surrogate"),  # would be echoed in the 404 message
    (b'{"model": "m", "prompt": "a\\udfffb"}', "surrogate"),  # the tokenizer raises TypeError on it
    (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d"}]}', "surrogate"),
])
def test_parse_body_refuses_what_json_loads_chokes_on(raw, detail):
    """Regressions found by tests/test_fuzz_http.py: each was a 500 (or killed a replica's engine loop)."""
    with pytest.raises(ProtocolError) as info:
        parse_body(raw, 1 << 20)
    assert info.value.status == 400 and detail in info.value.message
    json.dumps(info.value.body(), ensure_ascii=False).encode()  # the error itself can be sent


@pytest.mark.parametrize("cls, good, bad", [
    (CompletionRequest, completion(stream=True, stream_options={"include_usage": True}), completion(prompt=1.5)),
    (ChatCompletionRequest, chat(max_completion_tokens=8), chat(messages=[{"role": "user"}])),
])
def test_openapi_request_body(cls, good, bad):
    """The requestBody for FastAPI's openapi_extra: self-contained ($defs inlined), and it accepts
    what the validator accepts and refuses a wrong type, as a schema-driven client checks it."""
    jsonschema = pytest.importorskip("jsonschema")
    body = openapi_request_body(cls)
    schema = body["content"]["application/json"]["schema"]
    assert body["required"] and "$ref" not in json.dumps(schema) and "$defs" not in schema
    assert {"model", "prompt" if cls is CompletionRequest else "messages"} <= set(schema["required"])
    jsonschema.validate(good, schema)
    cls.model_validate(good)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_parse_body_keeps_paired_surrogates_and_deep_but_sane_json():
    assert parse_body(b'{"prompt": "\\ud83d\\ude00"}', 100) == {"prompt": "\U0001F600"}
    nested, depth = parse_body(b"[" * 200 + b"]" * 200, 1000), 1
    while nested:
        nested, depth = nested[0], depth + 1
    assert depth == 200


# ---------------------------------------------------------------------------------------------
# Sampling parameters
# ---------------------------------------------------------------------------------------------


def test_completion_defaults_and_unknown_fields():
    req = validate_completion(completion(tools=[], some_client_extra={"x": 1}), LIMIT, MODELS)
    assert isinstance(req, CompletionRequest) and not req.stream and not req.include_usage
    assert to_sampling_params(req, LIMIT) == SamplingParams(max_tokens=16)  # OpenAI's default 16
    req = validate_completion(completion(max_tokens=None, n=1, echo=False, logprobs=None), LIMIT)
    assert to_sampling_params(req, LIMIT).max_tokens == LIMIT


def test_completion_sampling_params():
    req = validate_completion(completion(
        max_tokens=32, temperature=0, top_p=0.9, top_k=5, seed=7, stop="\n\n", threshold=0.6,
        ignore_eos=True, task="code", user="u1", stream=True, stream_options={"include_usage": True},
        presence_penalty=0, frequency_penalty=0.0, logit_bias={}, logprobs=0), LIMIT, MODELS)
    params = to_sampling_params(req, LIMIT)
    assert params == SamplingParams(max_tokens=32, temperature=0.0, top_p=0.9, top_k=5, seed=7,
                                    stop=("\n\n",), threshold=0.6, ignore_eos=True)
    assert params.is_greedy and req.task == "code" and req.include_usage and req.logprobs == 0
    assert not to_sampling_params(validate_completion(completion(temperature=0.7), LIMIT), LIMIT).is_greedy


@pytest.mark.parametrize("prompt, expected", [
    ("abc", "abc"), (["abc"], "abc"), ([1, 2, 3], [1, 2, 3]), ([[1, 2, 3]], [1, 2, 3]),
])
def test_single_prompt_forms(prompt, expected):
    assert validate_completion(completion(prompt=prompt), LIMIT).prompt == expected


def test_chat_sampling_params():
    req = validate_chat(chat(temperature=0.5, stop=["User:"], seed=3, top_k=10), LIMIT, MODELS)
    assert isinstance(req, ChatCompletionRequest)
    assert to_sampling_params(req, LIMIT) == SamplingParams(
        max_tokens=LIMIT, temperature=0.5, stop=("User:",), seed=3, top_k=10)
    both = validate_chat(chat(max_tokens=8, max_completion_tokens=12), LIMIT)
    assert to_sampling_params(both, LIMIT).max_tokens == 12  # the newer field wins
    assert to_sampling_params(validate_chat(chat(max_tokens=8), LIMIT), LIMIT).max_tokens == 8


def test_chat_text_parts_are_joined():
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    req = validate_chat(chat(messages=[{"role": "user", "content": parts, "name": "ann"}]), LIMIT)
    assert req.messages[0].content == "one\ntwo"


# ---------------------------------------------------------------------------------------------
# Chat prompts
# ---------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


def test_chat_prompt_fallback(tmp_path):
    tokenizer = tiny_models.build_tokenizer(tmp_path)
    assert not tokenizer.chat_template
    messages = validate_chat(chat(messages=MESSAGES), LIMIT).messages
    assert chat_prompt(tokenizer, messages) == (
        "System: Be terse.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:")


def test_chat_prompt_uses_the_tokenizer_template(tmp_path):
    tokenizer = tiny_models.build_tokenizer(tmp_path)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    messages = validate_chat(chat(messages=MESSAGES[:2]), LIMIT).messages
    assert chat_prompt(tokenizer, messages) == (
        "<|system|>Be terse.<|endoftext|><|user|>Hi<|endoftext|><|assistant|>")


# ---------------------------------------------------------------------------------------------
# Responses, parsed by the openai SDK
# ---------------------------------------------------------------------------------------------

HELIOS = {"model": "helios-demo-code-6l@4", "exit_histogram": {"2": 2, "4": 1}, "forced": 1,
          "breaches": 0, "mean_exit_layer": 8 / 3, "loaded_layers": 4, "exit_layers": [2]}
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def roundtrip(obj: dict) -> dict:
    """What a client receives: the object through one SSE event (and so through JSON)."""
    event = sse(obj)
    assert event.startswith("data: ") and event.endswith("\n\n") and "\n" not in event[:-2]
    return json.loads(event[len("data: "):])


def test_completion_response():
    cid = new_completion_id()
    body = roundtrip(completion_response(cid, CREATED, MODEL, "return 1", summary(), loaded_layers=4))
    parsed = Completion.model_validate(body)
    assert parsed.id == cid and cid.startswith("cmpl-") and parsed.object == "text_completion"
    assert parsed.created == CREATED and parsed.model == MODEL
    [choice] = parsed.choices
    assert (choice.index, choice.text, choice.finish_reason, choice.logprobs) == (0, "return 1", "length", None)
    assert parsed.usage.model_dump(exclude_none=True) == USAGE
    assert body["helios"] == HELIOS and parsed.model_extra["helios"] == HELIOS


def test_completion_response_with_logprobs():
    logprobs = completion_logprobs(["ret", "urn", " 1"], [-0.1, -0.2, -0.3])
    body = roundtrip(completion_response("cmpl-1", CREATED, MODEL, "return 1", summary("stop"), 4, logprobs))
    choice = Completion.model_validate(body).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.logprobs.tokens == ["ret", "urn", " 1"] and choice.logprobs.token_logprobs == [-0.1, -0.2, -0.3]
    assert choice.logprobs.text_offset == [0, 3, 6] and choice.logprobs.top_logprobs[1] == {"urn": -0.2}
    assert completion_logprobs([" 2"], [-1.0], text_offset=8)["text_offset"] == [8]


def test_completion_stream():
    cid = new_completion_id()
    chunks = [roundtrip(completion_chunk(cid, CREATED, MODEL, "ret", include_usage=True)),
              roundtrip(completion_chunk(cid, CREATED, MODEL, "urn 1", summary(), 4, include_usage=True)),
              roundtrip(usage_chunk("text_completion", cid, CREATED, MODEL, summary()))]
    first, last, tail = chunks
    # OpenAI streams finish_reason null until the last chunk; the SDK's Completion type (shared by
    # responses and chunks) does not allow null there, which is the only complaint it has.
    with pytest.raises(ValidationError) as info:
        Completion.model_validate(first)
    assert [e["loc"] for e in info.value.errors()] == [("choices", 0, "finish_reason")]
    assert first["choices"] == [{"index": 0, "text": "ret", "logprobs": None, "finish_reason": None}]
    assert first["usage"] is None and "helios" not in first
    parsed = Completion.model_validate(last)
    assert parsed.choices[0].text == "urn 1" and parsed.choices[0].finish_reason == "length"
    assert last["helios"] == HELIOS and last["usage"] is None
    parsed = Completion.model_validate(tail)
    assert parsed.choices == [] and parsed.usage.model_dump(exclude_none=True) == USAGE
    assert {c["id"] for c in chunks} == {cid} and {c["object"] for c in chunks} == {"text_completion"}
    # Without include_usage there is no usage key at all.
    assert "usage" not in completion_chunk(cid, CREATED, MODEL, "x")


def test_chat_response():
    cid = new_chat_id()
    body = roundtrip(chat_response(cid, CREATED, MODEL, "Hello!", summary("stop"), loaded_layers=4))
    parsed = ChatCompletion.model_validate(body)
    assert cid.startswith("chatcmpl-") and parsed.id == cid and parsed.object == "chat.completion"
    assert parsed.created == CREATED and parsed.model == MODEL
    [choice] = parsed.choices
    assert choice.index == 0 and choice.finish_reason == "stop" and choice.logprobs is None
    assert choice.message.role == "assistant" and choice.message.content == "Hello!"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert parsed.usage.model_dump(exclude_none=True) == USAGE and body["helios"] == HELIOS


def test_chat_response_with_logprobs():
    logprobs = chat_logprobs(["Hé", "!"], [-0.5, -0.25])
    body = roundtrip(chat_response("chatcmpl-1", CREATED, MODEL, "Hé!", summary("stop"), 4, logprobs))
    content = ChatCompletion.model_validate(body).choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes, t.top_logprobs) for t in content] == [
        ("Hé", -0.5, [72, 195, 169], []), ("!", -0.25, [33], [])]


def test_chat_stream():
    cid = new_chat_id()
    raw = [chat_chunk(cid, CREATED, MODEL, first=True, include_usage=True),
           chat_chunk(cid, CREATED, MODEL, "Hel", include_usage=True),
           chat_chunk(cid, CREATED, MODEL, "lo", include_usage=True),
           chat_chunk(cid, CREATED, MODEL, summary=summary("stop"), loaded_layers=4, include_usage=True),
           usage_chunk("chat.completion.chunk", cid, CREATED, MODEL, summary("stop"))]
    chunks = [roundtrip(c) for c in raw]
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert {p.id for p in parsed} == {cid} and {p.object for p in parsed} == {"chat.completion.chunk"}
    assert all(p.created == CREATED and p.model == MODEL for p in parsed)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in chunks[1:4]] == [{"content": "Hel"}, {"content": "lo"}, {}]
    assert [p.choices[0].finish_reason for p in parsed[:4]] == [None, None, None, "stop"]
    assert "".join(p.choices[0].delta.content or "" for p in parsed[:4]) == "Hello"
    assert all(c["usage"] is None for c in chunks[:4]) and chunks[3]["helios"] == HELIOS
    assert parsed[4].choices == [] and parsed[4].usage.model_dump(exclude_none=True) == USAGE


def test_sse_framing_and_errors():
    assert SSE_DONE == "data: [DONE]\n\n"
    assert sse({"text": "a\nb"}) == 'data: {"text":"a\\nb"}\n\n'  # newlines stay escaped
    event = error_event("engine failed")
    assert json.loads(event.removeprefix("data: ")) == error_body("engine failed", type="server_error")
    assert event.endswith("\n\n")


def test_aborted_request_has_no_finish_reason():
    with pytest.raises(ValueError, match="abort"):
        completion_response("cmpl-1", CREATED, MODEL, "", summary("abort"), 4)


def test_models_response():
    body = models_response(["a", "b"], CREATED)
    assert body["object"] == "list"
    models = [Model.model_validate(m) for m in body["data"]]
    assert [(m.id, m.object, m.created, m.owned_by) for m in models] == [
        ("a", "model", CREATED, "helios"), ("b", "model", CREATED, "helios")]
