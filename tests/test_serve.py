"""The Ray Serve application on a real local Ray cluster: HTTP with the official openai SDK, streaming,
concurrency, a layer load during traffic, handle calls and bad input.

One app for the whole module. Its policy never finishes profiling (N = 10**6), so the first
candidate stays at full depth and outputs can be compared with the in-process engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402

from deployments.app import autoscaling_target, build_app, servable  # noqa: E402
from helios_core.engine import EngineConfig, LLMEngine  # noqa: E402
from helios_core.policy import Registry  # noqa: E402
from helios_core.sampling import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "models" / "registry.yaml"
CODE, PROSE = "helios-demo-code-6l", "helios-demo-prose-12l"
API_KEY = "test-key"


@pytest.fixture(scope="module")
def base_url(serve_cluster):
    serve.run(build_app({"registry": str(REGISTRY), "memory_budget": "64MiB", "max_tokens": 64, "api_key": API_KEY,
                         "dtype": "float32", "max_ongoing_requests": 8, "max_queued_requests": 8,
                         "policy": {"profile_requests": 10**6}}), name="helios", route_prefix="/")
    yield serve_cluster.url
    serve.delete("helios")


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(base_url: str, path: str, body: bytes | dict, key: str | None = API_KEY) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a POST; `key` goes in the Authorization header."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(base_url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}


def engine_greedy(model: str, prompt: str, n: int) -> str:
    entry = Registry.load(REGISTRY, "float32")[model]
    engine = LLMEngine(EngineConfig(model=str(entry.path), dtype="float32", max_model_len=1024,
                                    exit=entry.exit_config()))
    [out] = engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return out.text


def test_health_and_models(base_url, client):
    with urllib.request.urlopen(base_url + "/health", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["helios", CODE, PROSE, "helios-demo-mixed-16l"]


def test_completion_matches_the_in_process_engine(client):
    out = client.completions.create(model=CODE, prompt="def fibonacci(n):", max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == engine_greedy(CODE, "def fibonacci(n):", 16)
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"
    helios = out.model_extra["helios"]
    assert helios["model"] == CODE and sum(helios["exit_histogram"].values()) == 16


def test_auto_model_is_routed_by_the_policy(base_url, client):
    req = urllib.request.Request(base_url + "/v1/helios/stats", headers={"authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        [profiled] = json.loads(r.read())["policy"]["targets"]  # the candidate being profiled
    out = client.completions.create(model="helios", prompt="import os\n", max_tokens=4, temperature=0)
    assert out.model_extra["helios"]["model"] == profiled


def test_streaming_equals_the_whole_response(client):
    kw = dict(model=PROSE, prompt="The json module", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_chat_completion_and_stream(client):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is a list?"}]
    out = client.chat.completions.create(model=PROSE, messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens <= 8
    stream = client.chat.completions.create(model=PROSE, messages=messages, max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == out.choices[0].message.content


@contextmanager
def engine_held(model: str):
    """The model replica's engine process stopped (SIGSTOP) meanwhile: requests reach the replica and
    queue, none is served, however fast or slow this machine is. It runs on once the block ends."""
    replica = serve.get_deployment_handle(f"model-{model}", "helios")
    pid = replica.stats.remote().result()["engine_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield replica
    finally:
        os.kill(pid, signal.SIGCONT)


def wait_for(condition, what: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_concurrent_requests_and_a_layer_load_during_traffic(client):
    # prose-12l is not the policy's target, so the router leaves its depth to this test.
    # 6 requests: stats calls need one of the replica's 8 slots (max_ongoing_requests) meanwhile.
    prompts = [f"The function_{i} module" for i in range(6)]

    def one(prompt: str):
        return client.completions.create(model=PROSE, prompt=prompt, max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True})

    replica = serve.get_deployment_handle(f"model-{PROSE}", "helios")
    before = replica.stats.remote().result()
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            with engine_held(PROSE):  # all reach the engine before its next step: they are batched
                futures = [pool.submit(one, p) for p in prompts]
                wait_for(lambda: replica.stats.remote().result()["requests"] == len(prompts), "the requests queued")
            assert replica.set_num_layers.remote(3).result() == 3  # unload while requests run
            results = [f.result() for f in futures]
        assert all(r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length" for r in results)
        after = replica.stats.remote().result()
        assert after["max_batch"] >= min(len(prompts), before["capacity"]) >= 2
        assert after["loaded_layers"] == 3 and after["capacity"] > before["capacity"]  # memory became batch
        assert after["weight_bytes"] < before["weight_bytes"]
    finally:
        replica.set_num_layers.remote(before["loaded_layers"]).result()
        wait_for(lambda: replica.stats.remote().result()["loaded_layers"] == before["loaded_layers"],
                 "the depth restored")


def test_handle_call_streams_from_a_model_replica():
    replica = serve.get_deployment_handle(f"model-{PROSE}", "helios")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    items = list(replica.options(stream=True).generate.remote("The json module", params))
    assert items[-1]["finished"] and items[-1]["summary"].output_tokens == 6
    assert "".join(i["text"] for i in items) == engine_greedy(PROSE, "The json module", 6)


def _slow_stream(base_url: str, body: dict, pause_s: float) -> list[dict]:
    """The SSE chunks of a streamed /v1/completions, read with a pause after each."""
    req = urllib.request.Request(base_url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"})
    chunks = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[6:]))
                time.sleep(pause_s)
    return chunks


def test_a_busy_replica_loses_no_token(base_url, client):
    # Four streams at once (a batch of 4), each read slowly: a chunk may carry several tokens (how
    # many depends on the machine's speed; the merge is tested in process below), yet every token
    # id arrives once and in order, and the text is the non-streaming text.
    bodies = [{"model": CODE, "prompt": f"def f_{i}(x):", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
               "return_token_ids": True} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        streams = list(pool.map(lambda b: _slow_stream(base_url, b, 0.02), bodies))
    for body, chunks in zip(bodies, streams):
        code, whole, _ = post(base_url, "/v1/completions", body)
        assert code == 200
        choices = [c["choices"][0] for c in chunks]
        assert [i for c in choices for i in c["token_ids"]] == whole["choices"][0]["token_ids"]
        assert "".join(c["text"] for c in choices) == whole["choices"][0]["text"]
        assert choices[-1]["finish_reason"] == "length" and chunks[-1]["helios"]["model"] == CODE


def test_build_app_checks_its_arguments():
    with pytest.raises(ValueError, match="stream_max_hold_s must be >= 0, got -1.0"):
        build_app({"registry": str(REGISTRY), "stream_max_hold_s": -1})
    with pytest.raises(ValueError, match=r"unknown build_app arguments: \['stream_hold'\]"):
        build_app({"registry": str(REGISTRY), "stream_hold": 0.2})
    with pytest.raises(ValueError, match=r"expected_seq_len must be in \[1, max_model_len=1024\], got 2000"):
        build_app({"registry": str(REGISTRY), "expected_seq_len": 2000})
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        build_app({"registry": str(REGISTRY), "block_size": 0})
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        build_app({"registry": str(REGISTRY), "max_num_seqs": 0})
    with pytest.raises(ValueError, match="enable_prefix_caching must be true or false, got 'no'"):
        build_app({"registry": str(REGISTRY), "enable_prefix_caching": "no"})


def test_models_that_do_not_fit_the_budget_at_full_depth_get_no_replica():
    """A budget sized for the smallest demo model: the others cannot be profiled, so they are not deployed."""
    entries = list(Registry.load(REGISTRY, "float32"))
    small = min(entries, key=lambda e: e.weight_bytes(e.num_layers))
    budget = small.plan(small.num_layers, 1 << 40, 1024).budget_for_blocks(1024 // 64)
    batching = {"max_num_seqs": 256, "block_size": 64}
    fitting, refused = servable(entries, budget, 1024, batching)
    assert [e.name for e in fitting] == [small.name] and small.name not in refused
    assert set(refused) == {e.name for e in entries} - {small.name}
    assert all("need at least" in reason for reason in refused.values())
    with pytest.raises(ValueError, match="no registry model fits memory_budget=1048576 bytes at full depth"):
        build_app({"registry": str(REGISTRY), "memory_budget": "1MiB"})


def test_the_autoscaling_target_counts_sequences_of_the_expected_length():
    """The paged KV cache holds more short requests than long ones: the default target follows."""
    entry = Registry.load(REGISTRY, "float32")[CODE]
    budget = 64 << 20
    plan = entry.plan(entry.num_layers, budget, 1024)
    assert autoscaling_target(entry, budget, 1024, 1024) == plan.num_blocks // (1024 // plan.block_size)
    assert autoscaling_target(entry, budget, 1024, 256) == min(plan.max_seqs, plan.num_blocks // (256 // plan.block_size))
    assert autoscaling_target(entry, budget, 1024, 256, {"max_num_seqs": 3}) == 3


def test_a_lone_stream_gets_every_token_at_once_and_the_last_is_never_held():
    from deployments.replica import _Outbox

    async def scenario() -> list[tuple[dict, float]]:
        outbox, start = _Outbox(), time.monotonic()
        item = {"text": "a", "token_ids": [1], "logprobs": [-0.1], "finished": False}
        outbox.put(item)
        taken = [await outbox.take(not_before=start)]  # no hold: at once
        outbox.put({**item, "text": "b", "token_ids": [2]})
        outbox.put({**item, "text": "c", "token_ids": [3]})
        taken.append(await outbox.take(not_before=time.monotonic() + 0.05))  # held: both, merged
        outbox.put({**item, "text": "d", "token_ids": [4], "finished": True})
        taken.append(await outbox.take(not_before=time.monotonic() + 60))  # the last one: at once
        return [(t, time.monotonic() - start) for t in taken]

    (first, _), (held, held_at), (last, last_at) = asyncio.run(scenario())
    assert first["token_ids"] == [1] and held["token_ids"] == [2, 3] and held["text"] == "bc"
    assert held["logprobs"] == [-0.1, -0.1] and held_at >= 0.05 and not held["finished"]
    assert last["token_ids"] == [4] and last["finished"] and last_at - held_at < 5


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b" " * ((1 << 20) + 1), 413, None),  # over the 1 MiB body limit
    ({"prompt": "x"}, 400, "model"),
    ({"model": "helios", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "helios", "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "helios", "prompt": 5}, 400, "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": CODE, "prompt": "word " * 3000, "max_tokens": 4}, 400, "prompt"),
])
def test_bad_input_gets_openai_errors_and_others_are_unaffected(base_url, client, body, status, param):
    code, err, _ = post(base_url, "/v1/completions", body)
    assert code == status and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["message"]
    ok = client.completions.create(model=CODE, prompt="x = ", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_metrics_reach_rays_prometheus_endpoint(client, serve_cluster):
    client.completions.create(model=CODE, prompt="import sys", max_tokens=4, temperature=0)
    wanted = ("helios_tokens", "helios_batch_capacity", "helios_loaded_layers", "helios_ttft_seconds")
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # Ray exports metrics every few seconds
        with urllib.request.urlopen(f"http://127.0.0.1:{serve_cluster.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        if all(name in text for name in wanted) and f'model="{CODE}"' in text:
            break
        time.sleep(2)
    for name in wanted:
        assert name in text
    assert f'model="{CODE}"' in text and 'exit_layer="' in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_dashboard_renders_live_stats_in_a_headless_browser(base_url, client):
    client.completions.create(model=CODE, prompt="for i in range(", max_tokens=4, temperature=0)
    req = urllib.request.Request(base_url + "/v1/helios/stats", headers={"authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        stats = json.loads(r.read())
    assert set(stats["models"]) == {CODE, PROSE, "helios-demo-mixed-16l"} and stats["policy"]["events"]
    assert stats["models"][CODE]["capacity"] >= 1 and sum(stats["models"][CODE]["exit_histogram"].values()) > 0
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         f"--user-data-dir={tempfile.mkdtemp()}", "--virtual-time-budget=8000", "--dump-dom",
         f"{base_url}/dashboard?key={API_KEY}"],
        capture_output=True, text=True, timeout=120).stdout
    status = re.search(r'<div id="status">(.*?)</div>', dom).group(1)
    assert status.startswith("updated "), status  # the script fetched the stats and rendered them
    for name in stats["models"]:
        assert f'data-model="{name}"' in dom
    assert 'class="bar"' in dom and 'class="event"' in dom  # exit histogram bars and the policy timeline


def test_reconfigure_threshold_and_memory_budget(client):
    replica = serve.get_deployment_handle("model-helios-demo-mixed-16l", "helios")
    before = replica.stats.remote().result()
    replica.reconfigure.remote({"memory_budget": "32MiB", "threshold": 2.0}).result()
    out = client.completions.create(model="helios-demo-mixed-16l", prompt="def f(x):", max_tokens=6, temperature=0)
    after = replica.stats.remote().result()
    assert after["memory_budget"] == 32 << 20 and after["capacity"] < before["capacity"]
    assert out.model_extra["helios"]["exit_histogram"] == {"16": 6}  # threshold 2: nobody exits early
    with pytest.raises(Exception, match="unknown user_config keys"):
        replica.reconfigure.remote({"colour": 1}).result()
    replica.reconfigure.remote({"memory_budget": before["memory_budget"], "threshold": 0.5}).result()


def test_app_handle_generate():
    app = serve.get_app_handle("helios")
    out = app.generate.remote("def fibonacci(n):", model=CODE, max_tokens=16, temperature=0,
                              ignore_eos=True).result()
    assert out["choices"][0]["text"] == engine_greedy(CODE, "def fibonacci(n):", 16)
    assert out["usage"]["completion_tokens"] == 16 and out["helios"]["model"] == CODE
    with pytest.raises(Exception, match="max_tokens"):
        app.generate.remote("x", max_tokens=-1).result()



@pytest.mark.parametrize("key", [None, "wrong"])
def test_api_key_is_required(base_url, key):
    code, err, _ = post(base_url, "/v1/completions", {"model": CODE, "prompt": "x", "max_tokens": 2}, key=key)
    assert code == 401 and err["error"]["code"] == "invalid_api_key"


def test_overload_gets_503_with_retry_after_and_never_hangs(base_url):
    # 8 streams run on the replica and 8 may wait; the rest of 40 at once must be refused quickly.
    # The engine is held while they arrive, so none finishes early, however fast this machine is.
    body = {"model": CODE, "prompt": "def f(x):", "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(40) as pool:
        with engine_held(CODE):
            futures = [pool.submit(post, base_url, "/v1/completions", body) for _ in range(40)]
            wait_for(lambda: any(f.done() for f in futures), "a refusal")  # nothing else can finish
        results = [f.result() for f in futures]
    statuses = [code for code, _, _ in results]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 1 and statuses.count(200) >= 8
    for code, out, headers in results:
        if code == 503:
            assert out["error"]["code"] == "overloaded" and headers.get("retry-after") == "1"
        else:
            assert out["usage"]["completion_tokens"] == 64  # the admitted ones complete in full


def test_router_state_survives_a_restart(base_url):
    from deployments.router import Router
    from helios_core.telemetry import RequestSummary, StepRecord, TokenRecord

    cls = Router.func_or_class  # the class itself, in this (Ray-connected) process: its own state key
    first = cls(str(REGISTRY), 64 << 20, 1024, {"profile_requests": 2}, state_key="test/router")
    [(model, target)] = first.policy.targets.items()  # the candidate profiled first, at full depth
    depth = target.depth
    records = [TokenRecord(2, 0.9, False, False, -0.1)] * 8
    summary = RequestSummary.from_records("r", model, 4, records, "length", 0.0, 0.0, 0.1)
    steps = [StepRecord(6e-3 + 1e-3 * n, n, depth, depth * n) for n in (1, 2, 4, 8)]
    replies = [first.report(model, depth, records, [(summary, depth, "code")], (1, 0, 12), steps) for _ in range(2)]
    # Profiled at full depth for N = 2 requests, then the next candidate's turn: the replica is told
    # to hand its queue to that model.
    following = first.routing_table()["default"]
    assert replies == [(target, None), (None, following)] and following != model
    assert first.snapshot()["pht"][model]["requests"] == 2
    assert first.snapshot()["pht"][model]["step_fit"] is not None  # fitted on the replica's step times
    events = first.snapshot()["events"]
    assert [e["kind"] for e in events] == ["profile", "profile"]  # moved on to the next candidate

    restarted = cls(str(REGISTRY), 64 << 20, 1024, {"profile_requests": 2}, state_key="test/router")
    again = restarted.snapshot()
    assert again["events"] == events and again["pht"] == first.snapshot()["pht"]
    assert again["tokens"] == 16 and again["requests"] == 2


def test_while_a_round_profiles_the_serving_model_takes_the_rest(serve_cluster):
    """Global mode over live replicas: a re-profiling round sends its candidate only the requests it
    still needs; the rest go to the model that served before, which keeps its queue; a candidate
    whose turn is over hands its queue to that model."""
    from ray.experimental import internal_kv

    from deployments.router import Router
    from helios_core.telemetry import RequestSummary, TokenRecord

    router = Router.func_or_class(str(REGISTRY), 64 << 20, 1024, {"profile_requests": 2, "reprofile_every": 4},
                                  state_key="test/router-surplus")
    policy, records = router.policy, [TokenRecord(2, 0.9, False, False, -0.1)] * 8

    def finish(model: str, n: int = 1) -> tuple:
        depth = policy.targets[model].depth if model in policy.targets else policy.registry[model].num_layers
        summary = RequestSummary.from_records("r", model, 4, records, "length", 0.0, 0.0, 0.1)
        return router.report(model, depth, records, [(summary, depth, None)] * n, (0, 0, 0))

    def profiled() -> str | None:
        [(model, target)] = policy.targets.items()
        return model if target.profiling else None

    try:
        while profiled():  # the first round: nothing serves yet, so everything goes to the candidate
            table = router.routing_table()
            assert table["default"] == profiled() and table["profile"] is None
            finish(profiled(), 2)
        serving = policy.serving
        assert router.routing_table()["default"] == serving
        while profiled() in (None, serving):  # serve until a re-profile is on another candidate's turn
            finish(profiled() or serving)
        candidate = profiled()
        table = router.routing_table()
        assert table["default"] == serving and table["profile"] == {"model": candidate, "needed": 2}
        router.report(candidate, policy.registry[candidate].num_layers, [], [], (1, 1, 0))
        assert router.routing_table()["profile"]["needed"] == 0  # two in flight there already
        assert router.report(serving, 1, [], [], (3, 5, 0)) == (None, None)  # keeps its depth and queue
        finish(candidate, 2)  # its turn is over
        assert candidate not in policy.targets and policy.serving == serving  # the next candidate's turn
        assert router.report(candidate, policy.registry[candidate].num_layers, [], [], (0, 3, 0)) == \
            (None, serving)  # neither serving nor profiling: its queue goes to the serving model
    finally:
        internal_kv._internal_kv_del(b"test/router-surplus")


def test_engine_processes_run_above_the_ray_workers_where_allowed(base_url):
    """Each engine process asks for niceness 0; Ray starts its workers (the replicas) at 15 (at 1 in
    the suite's cluster: conftest). Where this machine lets a process lower its niceness
    (CAP_SYS_NICE), the engine gets 0; elsewhere it keeps its replica's."""
    req = urllib.request.Request(base_url + "/v1/helios/stats", headers={"authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        models = json.loads(r.read())["models"]
    cap_eff = int(re.search(r"CapEff:\s*(\w+)", Path("/proc/self/status").read_text())[1], 16)
    may_lower = bool(cap_eff >> 23 & 1)  # bit 23: CAP_SYS_NICE
    for stats in models.values():
        replica = os.getpriority(os.PRIO_PROCESS, stats["pid"])
        assert stats["engine_niceness"] == (0 if may_lower else replica)
        assert replica > 0  # what Ray gives its workers




def test_a_replica_holds_the_bytes_the_registry_plans_with_its_tied_lm_head_packed(serve_cluster, tmp_path):
    """The demo model's LM head is tied: the replica's engine process packs it and maps the embedding
    from the checkpoint, and holds exactly the bytes the registry plans."""
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": [{"name": CODE, "path": str(ROOT / "models" / CODE)}]}))
    entry = Registry.load(str(registry), "float32")[CODE]
    serve.run(build_app({"registry": str(registry), "memory_budget": "64MiB", "dtype": "float32"}), name="packed",
              route_prefix="/packed")
    try:
        stats = serve.get_deployment_handle(f"model-{CODE}", "packed").stats.remote().result()
        assert stats["weight_bytes"] == entry.weight_bytes(stats["loaded_layers"])
    finally:
        serve.delete("packed")
