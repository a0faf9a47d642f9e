"""OpenAI-compatible HTTP ingress: FastAPI under `@serve.ingress`.

Routes: /v1/completions, /v1/chat/completions (streaming or not), /v1/models, /health. The model
"helios" lets the policy choose (per task tag in per-request mode); a registry model's name pins
it. The routing table is cached and refreshed from the router at most once a second.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` as a class, not a string.
import asyncio
import hmac
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from helios_core.engine import load_tokenizer
from helios_core.policy import Registry

from . import openai_protocol as oa

AUTO_MODEL = "helios"
ROUTING_TTL_S = 1.0
MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = 1
DASHBOARD_HTML = (Path(__file__).parent / "dashboard.html").read_text()

app = FastAPI(title="Helios", description="OpenAI-compatible API over early-exit models")


@app.exception_handler(oa.ProtocolError)
async def protocol_error(_: Request, err: oa.ProtocolError) -> JSONResponse:
    """Every refused request: OpenAI's error body, its status, Retry-After on overload."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256, max_queued_requests=1024)
@serve.ingress(app)
class Ingress:
    def __init__(self, router, replicas: dict, registry: str, max_tokens_limit: int = 512,
                 api_key: str | None = None):
        self.router, self.replicas = router, replicas
        self.models = list(replicas)
        self.max_tokens_limit = max_tokens_limit
        self.api_key = api_key
        self.tokenizer = load_tokenizer(Registry.load(registry)[self.models[0]].path)
        self.created = int(time.time())
        self._table: dict | None = None
        self._table_time = 0.0

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
                self._table = await self.router.routing_table.remote()
                self._table_time = time.monotonic()
            except Exception:  # router down: keep the last table (or the first model)
                if self._table is None:
                    return self.models[0]
        return self._table["tasks"].get(task, self._table["default"]) if task else self._table["default"]

    async def _body(self, request: Request, chat: bool):
        self._check_key(request)
        payload = oa.parse_body(await request.body(), MAX_BODY_BYTES)
        validate = oa.validate_chat if chat else oa.validate_completion
        return validate(payload, self.max_tokens_limit, models=[AUTO_MODEL, *self.models])

    async def _stream(self, model: str, prompt, params, task):
        """The replica's stream, with the first item already taken (a refused prompt -> 400)."""
        stream = self.replicas[model].options(stream=True).generate.remote(prompt, params, task)
        try:
            first = await stream.__anext__()
        except BackPressureError:
            raise oa.ProtocolError(f"model {model} is overloaded; retry later", status=503, type="server_error",
                                   code="overloaded") from None
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

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    async def _handle(self, request: Request, chat: bool):
        req = await self._body(request, chat)
        first, stream = await self._start(req, chat)
        rid, created = (oa.new_chat_id() if chat else oa.new_completion_id()), int(time.time())
        if req.stream:
            return StreamingResponse(self._sse(chat, rid, created, req, first, stream),
                                     media_type="text/event-stream")
        return await self._collect(chat, rid, created, req, first, stream)

    async def _start(self, req, chat: bool):
        params = oa.to_sampling_params(req, self.max_tokens_limit)
        prompt = oa.chat_prompt(self.tokenizer, req.messages) if chat else req.prompt
        model = await self._model_for(req.model, req.task)
        return await self._stream(model, prompt, params, req.task)

    async def _collect(self, chat: bool, rid: str, created: int, req, first: dict, stream) -> dict:
        text, item = first["text"], first
        while not item["finished"]:
            item = await stream.__anext__()
            text += item["text"]
        build = oa.chat_response if chat else oa.completion_response
        return build(rid, created, req.model, text, item["summary"], item["loaded_layers"])

    async def generate(self, prompt: str | list[int], **fields) -> dict:
        """For Ray handles: `serve.get_app_handle("helios").generate.remote("def f():", max_tokens=16)`.
        Takes the /v1/completions fields as keywords (model defaults to "helios"); returns the same
        response dict; a bad request raises ProtocolError."""
        req = oa.validate_completion({"model": AUTO_MODEL, **fields, "prompt": prompt, "stream": False},
                                     self.max_tokens_limit, models=[AUTO_MODEL, *self.models])
        first, stream = await self._start(req, chat=False)
        return await self._collect(False, oa.new_completion_id(), int(time.time()), req, first, stream)

    async def _sse(self, chat: bool, rid: str, created: int, req, first: dict, stream):
        usage = req.include_usage
        try:
            if chat:
                yield oa.sse(oa.chat_chunk(rid, created, req.model, first=True, include_usage=usage))
            item = first
            while True:
                done = item["finished"]
                summary = item["summary"] if done else None
                if chat:
                    if item["text"]:
                        yield oa.sse(oa.chat_chunk(rid, created, req.model, item["text"], include_usage=usage))
                    if done:
                        yield oa.sse(oa.chat_chunk(rid, created, req.model, summary=summary,
                                                   loaded_layers=item["loaded_layers"], include_usage=usage))
                elif item["text"] or done:
                    yield oa.sse(oa.completion_chunk(rid, created, req.model, item["text"], summary,
                                                     item["loaded_layers"], include_usage=usage))
                if done:
                    break
                item = await stream.__anext__()
            if usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield oa.sse(oa.usage_chunk(obj, rid, created, req.model, summary))
            yield oa.SSE_DONE
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as err:  # a replica died mid-stream: end with a clean error event
            yield oa.error_event(f"the stream was cut: {type(err).__name__}")
            yield oa.SSE_DONE
