"""OpenAI-compatible HTTP ingress: FastAPI under `@serve.ingress`.

Routes: /v1/completions, /v1/chat/completions (streaming or not), /v1/models, /health. The model
"helios" lets the policy choose (per task tag in per-request mode); a registry model's name pins
it. The routing table is cached and refreshed from the router at most once a second; while the
router is down (Serve restarts it) the last table is used.

Faults: a request whose model replica dies (Serve replaces it) is sent again from scratch to the
same model, for up to RETRY_WINDOW_S, then refused with 503. A stream is retried only while nothing
was sent; once tokens went out, a cut stream ends with an error event and `[DONE]`. A request that
may have caused the death (the replica says so; or it died before the request's first token) is a
suspect, and is retried once: lost a second time as a suspect, it is refused with a 500, so one
poisonous request kills at most two replicas and the requests beside it run on.

Hostile input is refused before it costs work: a body over `max_body_bytes` (413, by its
Content-Length or as it streams in), a text prompt longer than any prompt of max_model_len tokens
can be (by its characters: `helios_core.prompt_limits`), a token-id prompt by its length, and the
list fields over OpenAI's limits (`openai_protocol`), each a 400 naming the field.

Switches: when the router switches models (global mode), the old model's replica hands back the
requests the policy routed there that have not started, and they go to the new model, as queued
requests do in process. A request that names a model stays with it.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` as a class, not a string.
import asyncio
import functools
import hmac
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from helios_core.engine import load_tokenizer
from helios_core.policy import Registry
from helios_core.prompt_limits import PromptTooLong, check_prompt_size, max_prompt_chars

from . import openai_protocol as oa

AUTO_MODEL = "helios"
ROUTING_TTL_S = 1.0
MAX_BODY_BYTES = 1 << 20  # default max_body_bytes
RETRY_AFTER_S = 1
ROUTER_TIMEOUT_S = 2.0  # a routing-table call waits this long for a restarting router, then the last table serves
# A replica that died (or is going) under a request: RayActorError covers ActorDiedError and
# ActorUnavailableError; Serve raises ReplicaUnavailableError when it picked a replica just removed.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError)
RETRY_WINDOW_S = 60.0  # how long a request is retried while Serve replaces its replica
RETRY_ATTEMPTS = 5
RETRY_BACKOFF_S = 0.5  # the first pause before a retry, doubled after each
logger = logging.getLogger("ray.serve")
DASHBOARD_HTML = (Path(__file__).parent / "dashboard.html").read_text()

app = FastAPI(title="Helios", description="OpenAI-compatible API over early-exit models")


@app.exception_handler(oa.ProtocolError)
async def protocol_error(_: Request, err: oa.ProtocolError) -> JSONResponse:
    """Every refused request: OpenAI's error body, its status, Retry-After on overload."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class ReplicaLost(Exception):
    """The model replica serving an attempt died; `suspect`: the request may be what killed it."""

    def __init__(self, cause: str, suspect: bool):
        super().__init__(cause)
        self.cause, self.suspect = cause, suspect


async def retrying(attempt):
    """`await attempt()`, again from scratch while the model replica serving it dies (Serve starts a
    new one meanwhile): at most RETRY_ATTEMPTS times within RETRY_WINDOW_S, then a 503; but a
    suspect twice (ReplicaLost.suspect; a bare Ray error: died before its first item) gets a 500."""
    deadline, backoff, suspected = time.monotonic() + RETRY_WINDOW_S, RETRY_BACKOFF_S, 0
    for n in range(1, RETRY_ATTEMPTS + 1):
        try:
            return await attempt()
        except ReplicaLost as err:
            lost, suspect = err.cause, err.suspect
        except REPLICA_LOST as err:
            lost, suspect = type(err).__name__, True
        suspected += suspect
        if suspected == 2:
            logger.error("ingress: refusing a request that was in hand twice when its model replica died (%s)", lost)
            raise oa.ProtocolError("the model replica failed twice while taking this request in; it is refused as "
                                   f"the likely cause ({lost})", status=500, type="server_error",
                                   code="request_crashed_replica")
        if n == RETRY_ATTEMPTS or time.monotonic() + backoff > deadline:
            break
        logger.warning("ingress: model replica lost (%s) on attempt %d; retrying in %.1f s", lost, n, backoff)
        await asyncio.sleep(backoff)
        backoff *= 2
    raise oa.ProtocolError(f"the model replica is unavailable ({lost}); retry later", status=503,
                           type="server_error", code="replica_unavailable")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to be over `max_bytes`: by its
    Content-Length before any of it is read, else once what has streamed in is over."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise oa.ProtocolError(f"The request body is {declared} bytes; the limit is {max_bytes}.", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise oa.ProtocolError(f"The request body is over the limit of {max_bytes} bytes.", status=413)
    return bytes(body)


def _lost(item: dict) -> None:
    """Raise ReplicaLost for the replica's notice that its engine died."""
    if "lost" in item:
        raise ReplicaLost(item["lost"], item["suspect"])


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256, max_queued_requests=1024)
@serve.ingress(app)
class Ingress:
    def __init__(self, router, replicas: dict, registry: str, max_tokens_limit: int = 512,
                 api_key: str | None = None, max_model_len: int = 1024, max_body_bytes: int = MAX_BODY_BYTES):
        self.router, self.replicas = router, replicas
        self.models = list(replicas)
        self.max_tokens_limit = max_tokens_limit
        self.api_key = api_key
        self.max_model_len, self.max_body_bytes = max_model_len, max_body_bytes
        entries = Registry.load(registry)
        self.tokenizers = {m: load_tokenizer(entries[m].path) for m in self.models}  # each renders its own chats
        # The longest text any model could take: beyond it a prompt is refused without a tokenizer.
        self.max_prompt_chars = max((max_prompt_chars(t, max_model_len) for t in self.tokenizers.values()
                                     if t is not None), default=None)
        self.created = int(time.time())
        self._table: dict | None = None
        self._table_time = 0.0
        self._profile_sent = 0  # requests sent to a profiling candidate since the table was read

    # --- helpers --------------------------------------------------------------------------------
    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise oa.ProtocolError("Incorrect API key provided.", status=401, type="invalid_request_error",
                                   code="invalid_api_key")

    async def _model_for(self, requested: str, task: str | None) -> str:
        if requested != AUTO_MODEL:
            return requested
        if self._table is None or time.monotonic() - self._table_time > ROUTING_TTL_S:
            try:
                self._table = await asyncio.wait_for(self.router.routing_table.remote(), ROUTER_TIMEOUT_S)
                self._profile_sent = 0
            except Exception:  # router down or restarting: keep the last table (or the first model)
                if self._table is None:
                    return self.models[0]
            self._table_time = time.monotonic()  # either way, ask again in a second, not per request
        profile = self._table.get("profile")
        if profile is not None and self._profile_sent < profile["needed"]:
            # The round's live requests (at least N in all: each ingress replica sends what the
            # table says is needed, and the table lags the candidate by up to a report).
            self._profile_sent += 1
            return profile["model"]
        return self._table["tasks"].get(task, self._table["default"]) if task else self._table["default"]

    async def _body(self, request: Request, chat: bool):
        self._check_key(request)
        payload = oa.parse_body(await read_body(request, self.max_body_bytes), self.max_body_bytes)
        validate = oa.validate_chat if chat else oa.validate_completion
        return validate(payload, self.max_tokens_limit, models=[AUTO_MODEL, *self.models])

    def _chat_prompt(self, model: str, messages) -> str:
        """The chat rendered for `model`: its own chat template, or the plain fallback without one."""
        prompt = oa.chat_prompt(self.tokenizers[model], messages)
        try:
            check_prompt_size(prompt, self.max_model_len, self.max_prompt_chars)
        except PromptTooLong as err:
            raise oa.ProtocolError(f"Invalid value for 'messages': {err}.", param="messages") from None
        return prompt

    async def _stream(self, model: str, prompt, params, task, routed: bool, messages=None):
        """The replica's stream, with the first item already taken (a refused prompt -> 400).

        A `routed` request (the policy chose its model) that a switch hands back before it started
        goes to the model the router now serves; at most once per model and once more (a profiling
        round visits every model, then the choice), then it stays where it is. A chat (`messages`)
        is rendered again with the new model's template."""
        for moves_left in range(len(self.models) + 1, -1, -1):
            stream = self.replicas[model].options(stream=True).generate.remote(prompt, params, task,
                                                                               routed and moves_left > 0)
            try:
                first = await stream.__anext__()
            except BackPressureError:
                raise oa.ProtocolError(f"model {model} is overloaded; retry later", status=503,
                                       type="server_error", code="overloaded") from None
            except REPLICA_LOST as err:  # before its first item: it may be the cause
                raise ReplicaLost(type(err).__name__, suspect=True) from err
            _lost(first)
            if "moved" not in first:
                break
            model = first["moved"]
            if messages is not None:
                prompt = self._chat_prompt(model, messages)
            self._table_time = 0.0  # the router switched: new requests follow at once
        if "error" in first:
            raise oa.ProtocolError(first["error"], param="prompt" if "prompt" in first["error"] else None)
        return first, stream

    # --- routes ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/helios/stats")
    async def stats(self, request: Request):
        """Per model: depth, capacity and use, memory, exit histogram; the policy's state and events."""
        self._check_key(request)
        replies = await asyncio.gather(*(h.stats.remote() for h in self.replicas.values()), return_exceptions=True)
        models = {name: (r if isinstance(r, dict) else {"error": type(r).__name__})
                  for name, r in zip(self.replicas, replies)}
        try:
            policy = await self.router.snapshot.remote()
        except Exception as err:  # the router restarts: the page still shows the models
            policy = {"error": type(err).__name__}
        return {"time": time.time(), "models": models, "policy": policy}

    @app.get("/dashboard")
    async def dashboard(self):
        return HTMLResponse(DASHBOARD_HTML)

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._check_key(request)
        return oa.models_response([AUTO_MODEL, *self.models], self.created)

    @app.post("/v1/completions", openapi_extra={"requestBody": oa.openapi_request_body(oa.CompletionRequest)})
    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    @app.post("/v1/chat/completions",
              openapi_extra={"requestBody": oa.openapi_request_body(oa.ChatCompletionRequest)})
    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    async def _handle(self, request: Request, chat: bool):
        req = await self._body(request, chat)
        call = await self._call(req, chat)
        rid, created = (oa.new_chat_id() if chat else oa.new_completion_id()), int(time.time())
        if req.stream:
            first, stream = await retrying(functools.partial(self._stream, *call))
            return StreamingResponse(self._sse(chat, rid, created, req, first, stream),
                                     media_type="text/event-stream")
        return await retrying(functools.partial(self._collect, call, chat, rid, created, req))

    async def _call(self, req, chat: bool) -> tuple:
        """(model, prompt, params, task, routed, messages): the model is chosen once, so a retry after a
        lost replica goes to the same model; only a switch moves a routed request (`_stream`). A chat
        is rendered with the chosen model's template (`messages` is None for a completion)."""
        params = oa.to_sampling_params(req, self.max_tokens_limit)
        field = "messages" if chat else "prompt"
        try:  # a chat's messages alone, before a template is rendered over them
            text = "".join(m.content for m in req.messages) if chat else req.prompt
            check_prompt_size(text, self.max_model_len, self.max_prompt_chars)
        except PromptTooLong as err:
            raise oa.ProtocolError(f"Invalid value for '{field}': {err}.", param=field) from None
        model = await self._model_for(req.model, req.task)
        prompt = self._chat_prompt(model, req.messages) if chat else req.prompt
        return model, prompt, params, req.task, req.model == AUTO_MODEL, req.messages if chat else None

    async def _collect(self, call: tuple, chat: bool, rid: str, created: int, req) -> dict:
        first, stream = await self._stream(*call)
        text, item, ids = first["text"], first, list(first["token_ids"])
        while not item["finished"]:
            try:
                item = await stream.__anext__()
            except REPLICA_LOST as err:  # it had been running there: not the cause
                raise ReplicaLost(type(err).__name__, suspect=False) from err
            _lost(item)
            text, ids = text + item["text"], ids + item["token_ids"]
        if chat:
            return oa.chat_response(rid, created, req.model, text, item["summary"], item["loaded_layers"])
        return oa.completion_response(rid, created, req.model, text, item["summary"], item["loaded_layers"],
                                      token_ids=ids if req.return_token_ids else None)

    async def generate(self, prompt: str | list[int], **fields) -> dict:
        """For Ray handles: `serve.get_app_handle("helios").generate.remote("def f():", max_tokens=16)`.
        Takes the /v1/completions fields as keywords (model defaults to "helios"); returns the same
        response dict; a bad request raises ProtocolError."""
        req = oa.validate_completion({"model": AUTO_MODEL, **fields, "prompt": prompt, "stream": False},
                                     self.max_tokens_limit, models=[AUTO_MODEL, *self.models])
        call = await self._call(req, chat=False)
        return await retrying(functools.partial(self._collect, call, False, oa.new_completion_id(),
                                                int(time.time()), req))

    async def _sse(self, chat: bool, rid: str, created: int, req, first: dict, stream):
        usage = req.include_usage
        try:
            if chat:
                yield oa.sse(oa.chat_chunk(rid, created, req.model, first=True, include_usage=usage))
            item, ids = first, []  # ids: token ids not sent yet (return_token_ids)
            while True:
                done = item["finished"]
                summary = item["summary"] if done else None
                ids += item["token_ids"]
                if chat:
                    if item["text"]:
                        yield oa.sse(oa.chat_chunk(rid, created, req.model, item["text"], include_usage=usage))
                    if done:
                        yield oa.sse(oa.chat_chunk(rid, created, req.model, summary=summary,
                                                   loaded_layers=item["loaded_layers"], include_usage=usage))
                elif item["text"] or done:
                    yield oa.sse(oa.completion_chunk(rid, created, req.model, item["text"], summary,
                                                     item["loaded_layers"], include_usage=usage,
                                                     token_ids=ids if req.return_token_ids else None))
                    ids = []
                if done:
                    break
                item = await stream.__anext__()
                _lost(item)
            if usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield oa.sse(oa.usage_chunk(obj, rid, created, req.model, summary))
            yield oa.SSE_DONE
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as err:  # a replica died mid-stream: end with a clean error event
            yield oa.error_event(f"the stream was cut: {type(err).__name__}")
            yield oa.SSE_DONE
