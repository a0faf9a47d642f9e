"""The OpenAI-compatible protocol layer: request validation, sampling parameters, response shapes.

Pure Python (no Ray): the Serve ingress parses a body with `parse_body`, validates it with
`validate_completion` / `validate_chat`, builds the engine's `SamplingParams` with
`to_sampling_params`, and shapes results with the response and chunk builders. Every error is a
`ProtocolError` whose `body()` is OpenAI's error object, naming the offending parameter.

Supported subset (the OpenAI fields below are rejected with a 400 when set to anything but their
default or null; any field not modelled here is ignored, as OpenAI clients send extras):
- one prompt (a string or a list of token ids) and one choice per request (`n` = `best_of` = 1);
- at most MAX_STOP stop sequences and MAX_LOGIT_BIAS logit_bias entries (OpenAI's limits);
- no `echo`, `suffix`, `logit_bias`, presence or frequency penalties;
- logprobs of the chosen tokens only (completions `logprobs=0`, chat `logprobs=true` with
  `top_logprobs` 0): each is the token's log-probability under the distribution of the layer it
  exited at, at temperature 1 (`TokenRecord.logprob`).
Helios extras: `threshold` (exit confidence override), `task` (routing tag), `top_k`, `ignore_eos`;
completions also take `return_token_ids` (vLLM's name): the choice, and each stream chunk's choice,
then carries the `token_ids` of its text (a chunk the detokenizer held back text for carries them
with the next chunk), as the text alone cannot be re-tokenized exactly (EOS under ignore_eos).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from helios_core.sampling import SamplingParams
from helios_core.telemetry import RequestSummary

SSE_DONE = "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ProtocolError(ValueError):
    """A request the API refuses: HTTP `status` plus OpenAI's error fields.

    Statuses in use: 400 invalid request, 404 unknown model, 413 body too large, 429/503 overload
    (for those the caller picks the type, e.g. "server_error").
    """

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_event(message: str, type: str = "server_error", code: str | None = None) -> str:
    """An SSE event carrying an error object, sent when a started stream is cut."""
    return sse(error_body(message, type, None, code))


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # Strict types like OpenAI ("0.5" is not a number, true is not an int); unknown fields ignored.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer "system"
    content: str  # a list of text parts is joined into one string

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError('only text content parts ({"type": "text", "text": ...}) are supported')
            texts.append(part["text"])
        return "\n".join(texts)


# OpenAI's documented limits on list fields (one prompt per request: see CompletionRequest).
MAX_STOP = 4
MAX_LOGIT_BIAS = 300

# Fields OpenAI defines that Helios supports only at their default value.
# null is accepted for each; "logprobs" is the completions field (chosen tokens only).
_ONLY_DEFAULT: dict[str, Any] = {
    "n": 1, "best_of": 1, "echo": False, "suffix": "", "logit_bias": {},
    "presence_penalty": 0, "frequency_penalty": 0, "logprobs": 0, "top_logprobs": 0,
}


def _only_default(value: Any, info: ValidationInfo) -> Any:
    default = _ONLY_DEFAULT[info.field_name]
    if value is not None and value != default:
        raise ValueError(f"only {info.field_name}={json.dumps(default)} is supported")
    return value


def _is_token_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(type(t) is int and t >= 0 for t in prompt)


class _CommonRequest(_Strict):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)  # None -> 1; 0 -> greedy
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: list[str] | None = None  # a single string is accepted and wrapped
    seed: int | None = Field(None, ge=0, lt=2**64)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Helios extras.
    threshold: float | None = Field(None, ge=0)  # exit confidence; > 1 never exits early
    task: str | None = None  # routing tag
    top_k: int = Field(0, ge=-1)  # 0 or -1 -> disabled
    ignore_eos: bool = False

    _check_only_default = field_validator(
        "n", "presence_penalty", "frequency_penalty", "logit_bias")(_only_default)

    @field_validator("stop", mode="before")
    @classmethod
    def _wrap_stop(cls, stop: Any) -> Any:
        stop = [stop] if isinstance(stop, str) else stop
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stop)}")
        if isinstance(stop, list) and any(isinstance(s, str) and not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        return stop

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _count_logit_bias(cls, bias: Any) -> Any:  # counted before 10**5 entries are validated one by one
        if isinstance(bias, dict) and len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries are allowed, got {len(bias)}")
        return bias

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_CommonRequest):
    prompt: str | list[int]  # a one-prompt batch ([str] or [[int, ...]]) is unwrapped
    max_tokens: int | None = Field(16, ge=1)  # None -> the server's limit
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0)
    return_token_ids: bool = False  # Helios extra, see the module docstring

    _check_only_default_completion = field_validator("echo", "suffix", "best_of", "logprobs")(_only_default)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) > 1:
                raise ValueError("only one prompt per request is supported")
            prompt = prompt[0]
        if not isinstance(prompt, str) and not _is_token_ids(prompt):
            raise ValueError("prompt must be a string or a list of non-negative token ids")
        if not prompt:
            raise ValueError("prompt must not be empty")
        return prompt


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0)

    _check_only_default_chat = field_validator("top_logprobs")(_only_default)


def _param(loc: tuple[str | int, ...]) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or None


def _from_validation_error(exc: ValidationError) -> ProtocolError:
    err = exc.errors(include_url=False)[0]
    param = _param(err["loc"])
    if err["type"] == "missing":
        return ProtocolError(f"Missing required parameter: '{param}'.", param=param)
    # value_error messages are our own ("Value error, " prefix dropped); others are pydantic's.
    detail = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
    where = f" for '{param}'" if param else ""
    return ProtocolError(f"Invalid value{where}: {detail}.", param=param)


def _validate(cls: type[_CommonRequest], payload: Any, max_tokens_limit: int,
              models: Collection[str] | None) -> Any:
    if not isinstance(payload, dict):
        raise ProtocolError("The request body must be a JSON object.")
    try:
        req = cls.model_validate(payload)
    except ValidationError as exc:
        raise _from_validation_error(exc) from None
    if models is not None and req.model not in models:
        raise ProtocolError(f"The model '{req.model}' does not exist.", status=404, param="model",
                            code="model_not_found")
    if req.stream_options is not None and not req.stream:
        raise ProtocolError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                            param="stream_options")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name, None)
        if value is not None and value > max_tokens_limit:
            raise ProtocolError(f"Invalid value for '{name}': {value} exceeds this server's limit of "
                                f"{max_tokens_limit} tokens.", param=name)
    return req


def validate_completion(payload: Any, max_tokens_limit: int,
                        models: Collection[str] | None = None) -> CompletionRequest:
    """Validate a /v1/completions body; `models` (when given) are the names served (else 404)."""
    return _validate(CompletionRequest, payload, max_tokens_limit, models)


def validate_chat(payload: Any, max_tokens_limit: int,
                  models: Collection[str] | None = None) -> ChatCompletionRequest:
    """Validate a /v1/chat/completions body; `models` as for `validate_completion`."""
    return _validate(ChatCompletionRequest, payload, max_tokens_limit, models)


def openapi_request_body(cls: type[_CommonRequest]) -> dict:
    """The OpenAPI `requestBody` of a request model, for FastAPI's `openapi_extra`: the routes read
    the raw body (for our own limits and error bodies), so FastAPI cannot infer it."""
    schema = cls.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:  # "#/$defs/X" would not resolve inside an OpenAPI document
        if isinstance(node, dict) and "$ref" in node:
            return inline(defs[node["$ref"].rsplit("/", 1)[1]])
        if isinstance(node, dict):
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"required": True, "content": {"application/json": {"schema": inline(schema)}}}


def parse_body(raw: bytes, max_bytes: int) -> Any:
    """Decode a JSON request body: 413 when larger than `max_bytes`; 400 when not JSON, nested too
    deeply, or holding a string that is not valid Unicode."""
    if len(raw) > max_bytes:
        raise ProtocolError(f"The request body is {len(raw)} bytes; the limit is {max_bytes}.", status=413)
    try:
        payload = json.loads(raw)
    except RecursionError:  # e.g. 1 MiB of "[": the C decoder recurses once per level
        raise ProtocolError("The request body is not valid JSON: it is nested too deeply.") from None
    except ValueError as exc:  # also Python's cap on the digits of an int (4300)
        raise ProtocolError(f"The request body is not valid JSON: {exc}.") from None
    try:
        # A lone surrogate ("\\ud800") decodes to a str that the tokenizer refuses with a TypeError
        # and that no response (an error echoing a model name included) can be encoded with.
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ProtocolError("The request body is not valid JSON: a string holds a lone UTF-16 "
                            "surrogate (an unpaired \\ud800-\\udfff escape).") from None
    return payload


def to_sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens_limit: int) -> SamplingParams:
    """The engine's sampling parameters for a validated request (temperature 0 -> greedy)."""
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
    else:
        max_tokens = req.max_tokens
    return SamplingParams(
        max_tokens=max_tokens or max_tokens_limit,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=req.top_k,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=tuple(req.stop or ()),
        ignore_eos=req.ignore_eos,
        threshold=req.threshold,
    )


# ---------------------------------------------------------------------------------------------
# Chat prompt
# ---------------------------------------------------------------------------------------------

_FALLBACK_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def chat_prompt(tokenizer: Any, messages: Sequence[ChatMessage]) -> str:
    """The prompt text for a chat.

    With a chat template: `tokenizer.apply_chat_template(..., add_generation_prompt=True)`.
    Without one (the demo models), one "Role: content" line per message ("System", "User",
    "Assistant"; "developer" counts as "System") and a final "Assistant:" to be continued:

        System: You are terse.
        User: Hi
        Assistant:
    """
    if getattr(tokenizer, "chat_template", None):
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        return tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
    lines = [f"{_FALLBACK_ROLES[m.role]}: {m.content}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


# ---------------------------------------------------------------------------------------------
# Responses and stream chunks
# ---------------------------------------------------------------------------------------------


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def new_chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _finish_reason(summary: RequestSummary) -> str:
    # "abort" (a cancelled request) has no OpenAI equivalent: a cut stream ends with error_event.
    if summary.finish_reason not in ("stop", "length"):
        raise ValueError(f"no OpenAI finish_reason for {summary.finish_reason!r}")
    return summary.finish_reason


def usage(summary: RequestSummary) -> dict:
    return {"prompt_tokens": summary.prompt_tokens, "completion_tokens": summary.output_tokens,
            "total_tokens": summary.prompt_tokens + summary.output_tokens}


def helios_info(summary: RequestSummary, loaded_layers: int) -> dict:
    """The `helios` object: where the request's tokens exited, on which model, how deep it was loaded and
    which exit points were checked (null: the model's configured ones)."""
    return {
        "model": summary.model,
        "exit_histogram": {str(depth): n for depth, n in summary.exit_histogram.items()},  # JSON keys
        "forced": summary.forced,
        "breaches": summary.breaches,
        "mean_exit_layer": summary.mean_exit_layer,
        "loaded_layers": loaded_layers,
        "exit_layers": None if summary.exit_layers is None else list(summary.exit_layers),
    }


def completion_logprobs(tokens: Sequence[str], logprobs: Sequence[float], text_offset: int = 0) -> dict:
    """Completions `logprobs` for the chosen tokens; `text_offset` is where the first token starts
    in the output text (nonzero for later stream chunks)."""
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": list(tokens), "token_logprobs": list(logprobs),
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs)], "text_offset": offsets}


def chat_logprobs(tokens: Sequence[str], logprobs: Sequence[float]) -> dict:
    """Chat `logprobs` for the chosen tokens (no alternatives: top_logprobs is empty)."""
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs)],
            "refusal": None}


def _envelope(object: str, id: str, created: int, model: str, choices: list[dict]) -> dict:
    return {"id": id, "object": object, "created": created, "model": model, "choices": choices}


def completion_response(id: str, created: int, model: str, text: str, summary: RequestSummary,
                        loaded_layers: int, logprobs: dict | None = None, token_ids: list[int] | None = None) -> dict:
    """A finished /v1/completions response ("text_completion"); `token_ids` when asked for."""
    choice = {"index": 0, "text": text, "finish_reason": _finish_reason(summary), "logprobs": logprobs}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {**_envelope("text_completion", id, created, model, [choice]),
            "usage": usage(summary), "helios": helios_info(summary, loaded_layers)}


def chat_response(id: str, created: int, model: str, content: str, summary: RequestSummary,
                  loaded_layers: int, logprobs: dict | None = None) -> dict:
    """A finished /v1/chat/completions response ("chat.completion")."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content},
              "finish_reason": _finish_reason(summary), "logprobs": logprobs}
    return {**_envelope("chat.completion", id, created, model, [choice]),
            "usage": usage(summary), "helios": helios_info(summary, loaded_layers)}


def _chunk(object: str, id: str, created: int, model: str, choice: dict, summary: RequestSummary | None,
           loaded_layers: int, include_usage: bool) -> dict:
    # The chunk that carries the summary is the last one with a choice: finish_reason and helios.
    choice["finish_reason"] = None if summary is None else _finish_reason(summary)
    out = _envelope(object, id, created, model, [choice])
    if include_usage:  # OpenAI: usage is null on every chunk but the trailing usage chunk
        out["usage"] = None
    if summary is not None:
        out["helios"] = helios_info(summary, loaded_layers)
    return out


def completion_chunk(id: str, created: int, model: str, text: str, summary: RequestSummary | None = None,
                     loaded_layers: int = 0, logprobs: dict | None = None, include_usage: bool = False,
                     token_ids: list[int] | None = None) -> dict:
    """A streamed "text_completion" chunk with `text` as the delta (and its `token_ids` when asked
    for); pass the request's summary (and the loaded depth) on the last one to set finish_reason and
    the helios object."""
    choice = {"index": 0, "text": text, "logprobs": logprobs}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return _chunk("text_completion", id, created, model, choice, summary, loaded_layers, include_usage)


def chat_chunk(id: str, created: int, model: str, content: str | None = None, *, first: bool = False,
               summary: RequestSummary | None = None, loaded_layers: int = 0, logprobs: dict | None = None,
               include_usage: bool = False) -> dict:
    """A streamed "chat.completion.chunk".

    first=True: the opening delta {"role": "assistant", "content": ""}; otherwise {"content": ...}
    when there is content, else {} (the usual last chunk, which passes `summary` and
    `loaded_layers` to set finish_reason and the helios object).
    """
    if first:
        delta = {"role": "assistant", "content": ""}
    else:
        delta = {"content": content} if content else {}
    choice = {"index": 0, "delta": delta, "logprobs": logprobs}
    return _chunk("chat.completion.chunk", id, created, model, choice, summary, loaded_layers, include_usage)


def usage_chunk(object: Literal["text_completion", "chat.completion.chunk"], id: str, created: int,
                model: str, summary: RequestSummary) -> dict:
    """The trailing chunk sent when stream_options.include_usage: no choices, only usage."""
    return {**_envelope(object, id, created, model, []), "usage": usage(summary)}


def sse(obj: dict) -> str:
    """One server-sent event: "data: <json>" and a blank line."""
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def models_response(names: Sequence[str], created: int) -> dict:
    """The /v1/models list."""
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "helios"} for name in names]}
