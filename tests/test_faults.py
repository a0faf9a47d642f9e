"""Faults on a real local Ray cluster: a model replica killed under load (non-streaming requests are
retried by the ingress, a started stream ends with an error event, Serve brings the replica back),
its engine process killed (the replica goes with it, and the same holds), and the router killed
under traffic (requests go on with the last routing table; the restarted router has its policy
state back).

One app with two models. Its policy shortlists one candidate (top_k=1: the code model) and profiles
it on two requests, so the router has events, a PHT row and exit statistics to remember. The prose
model is outside the shortlist: the router never sets its depth, so requests pinned to it stay at
full depth and their greedy outputs can be compared across a kill.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402
from ray.exceptions import ActorDiedError  # noqa: E402

from deployments import ingress  # noqa: E402
from deployments.app import build_app  # noqa: E402
from deployments.openai_protocol import ProtocolError  # noqa: E402
from deployments.router import Router  # noqa: E402
from helios_core.telemetry import RequestSummary, TokenRecord  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CODE, PROSE = "helios-demo-code-6l", "helios-demo-prose-12l"
APP = "faults"
PROMPTS = [f"The function_{i} module" for i in range(6)]
TOKENS = 32


@pytest.fixture(scope="module")
def client(serve_cluster, tmp_path_factory):
    # A registry of the two models only: fewer replicas to start.
    doc = yaml.safe_load((ROOT / "models" / "registry.yaml").read_text())
    doc["models"] = [dict(m, path=str(ROOT / "models" / m["path"]))
                     for m in doc["models"] if m["name"] in (CODE, PROSE)]
    registry = tmp_path_factory.mktemp("faults") / "registry.yaml"
    registry.write_text(yaml.safe_dump(doc))
    # The batch SLO ranks by memory arithmetic, not timings: code-6l is the one candidate, and
    # prose-12l (pinned below) stays at its registry settings, so its greedy outputs never change.
    serve.run(build_app({"registry": str(registry), "memory_budget": "64MiB", "dtype": "float32", "max_tokens": 256,
                         "policy": {"profile_requests": 2, "top_k": 1, "slo": "batch"}}),
              name=APP, route_prefix=f"/{APP}")
    yield openai.OpenAI(base_url=f"{serve_cluster.url}/{APP}/v1", api_key="unused", max_retries=0, timeout=120)
    serve.delete(APP)


# --- the ingress's retry rule, in process ------------------------------------------------------------
def attempts(*outcomes):
    """An attempt that raises or returns the next outcome each time it runs, and its call count."""
    calls = []

    async def attempt():
        calls.append(1)
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return attempt, calls


INNOCENT = ingress.ReplicaLost("the engine process exited", suspect=False)  # it had been running there


def test_a_request_whose_replica_died_runs_again(monkeypatch):
    monkeypatch.setattr(ingress, "RETRY_BACKOFF_S", 0.01)
    attempt, calls = attempts(ActorDiedError(), INNOCENT, INNOCENT, "answer")  # a suspect once, then innocent
    assert asyncio.run(ingress.retrying(attempt)) == "answer" and len(calls) == 4


@pytest.mark.parametrize("second", [ActorDiedError(), ingress.ReplicaLost("the engine process exited", True)])
def test_a_request_lost_twice_as_a_suspect_is_refused_with_a_500(monkeypatch, second):
    monkeypatch.setattr(ingress, "RETRY_BACKOFF_S", 0.01)
    attempt, calls = attempts(ingress.ReplicaLost("the engine process exited", suspect=True), INNOCENT, second,
                              "answer")
    with pytest.raises(ProtocolError) as err:
        asyncio.run(ingress.retrying(attempt))
    assert len(calls) == 3 and err.value.status == 500
    assert err.value.body()["error"]["code"] == "request_crashed_replica"
    assert "failed twice" in err.value.message


def test_retries_are_bounded_and_end_in_a_503(monkeypatch):
    monkeypatch.setattr(ingress, "RETRY_BACKOFF_S", 0.01)
    attempt, calls = attempts(*[INNOCENT] * 10)
    with pytest.raises(ProtocolError) as err:
        asyncio.run(ingress.retrying(attempt))
    assert len(calls) == ingress.RETRY_ATTEMPTS
    assert err.value.status == 503 and err.value.body()["error"]["type"] == "server_error"

    monkeypatch.setattr(ingress, "RETRY_WINDOW_S", 0.0)  # past the deadline: no retry at all
    attempt, calls = attempts(*[ActorDiedError()] * 10)
    with pytest.raises(ProtocolError):
        asyncio.run(ingress.retrying(attempt))
    assert len(calls) == 1


@pytest.mark.parametrize("refusal", [ProtocolError("bad prompt", param="prompt"),
                                     ProtocolError("overloaded", status=503, type="server_error")])
def test_refused_requests_are_not_retried(refusal):
    attempt, calls = attempts(refusal, "answer")
    with pytest.raises(ProtocolError) as err:
        asyncio.run(ingress.retrying(attempt))
    assert err.value is refusal and len(calls) == 1


# --- kills on the Serve app ----------------------------------------------------------------------------
def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    """condition()'s first truthy value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)
    return value


def replicas(app: str, deployment: str) -> list[str]:
    """Names of the deployment's live replica actors (Serve gives a new replica a new name)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def kill(deployment: str) -> str:
    [name] = replicas(APP, deployment)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def complete(client: openai.OpenAI, prompt: str, model: str = PROSE, max_tokens: int = TOKENS):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True})


def test_non_streaming_requests_survive_a_model_replica_kill(client):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        before = [r.choices[0].text for r in pool.map(lambda p: complete(client, p), PROMPTS)]
    replica = serve.get_deployment_handle(f"model-{PROSE}", APP)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(complete, client, p) for p in PROMPTS]
        wait_until(lambda: replica.stats.remote().result()["running"] >= len(PROMPTS) // 2, 60, "requests running")
        killed = kill(f"model-{PROSE}")
        results = [f.result() for f in futures]  # none may fail: the ingress retries them
    assert all(r.usage.completion_tokens == TOKENS and r.choices[0].finish_reason == "length" for r in results)
    assert [r.choices[0].text for r in results] == before  # greedy: the retried outputs are the same

    [new] = wait_until(lambda: replicas(APP, f"model-{PROSE}"), 60, "a new model replica")
    assert new != killed
    # The requests cut by the kill ran again, from scratch, on the new replica.
    assert replica.stats.remote().result()["tokens"] >= TOKENS
    assert complete(client, PROMPTS[0]).choices[0].text == before[0]  # and it serves as before


def test_requests_survive_the_engine_process_dying(client):
    """The engine's child process killed (as the OOM killer would): its replica exits with it, Serve
    starts a new one, and the ingress runs the cut requests again there."""
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        before = [r.choices[0].text for r in pool.map(lambda p: complete(client, p), PROMPTS)]
    replica = serve.get_deployment_handle(f"model-{PROSE}", APP)
    [old] = replicas(APP, f"model-{PROSE}")
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(complete, client, p) for p in PROMPTS]
        stats = wait_until(lambda: (s := replica.stats.remote().result())["running"] >= len(PROMPTS) // 2 and s,
                           60, "requests running")
        os.kill(stats["engine_pid"], signal.SIGKILL)
        results = [f.result() for f in futures]  # none may fail: the ingress retries them
    assert [r.choices[0].text for r in results] == before
    assert wait_until(lambda: [n for n in replicas(APP, f"model-{PROSE}") if n != old], 60, "a new model replica")
    after = replica.stats.remote().result()
    assert after["engine_pid"] != stats["engine_pid"] and after["pid"] != stats["pid"]


def sse_events(response: http.client.HTTPResponse):
    """The `data:` payloads of a server-sent event stream, one by one, until the server closes it."""
    while line := response.readline():
        if line.startswith(b"data: "):
            yield line[len(b"data: "):].strip().decode()


def stream(serve_cluster, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    url = urlsplit(serve_cluster.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)  # bounds every read below
    body = {"model": PROSE, "temperature": 0, "stream": True, "ignore_eos": True, **body}
    conn.request("POST", f"/{APP}/v1/completions", json.dumps(body), {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
    return conn, response


def test_a_stream_cut_by_a_replica_kill_ends_with_an_error_event(client, serve_cluster):
    conn, response = stream(serve_cluster, {"prompt": "The json module", "max_tokens": 256})
    events = sse_events(response)
    first = json.loads(next(events))
    kill(f"model-{PROSE}")  # 256 tokens take far longer than this: the stream is cut
    rest = list(events)
    conn.close()
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert "cut" in error["message"]
    chunks = [first] + [json.loads(e) for e in rest[:-2]]
    assert all(c["object"] == "text_completion" and c["choices"][0]["finish_reason"] is None for c in chunks)

    # A stream asked for while Serve replaces the replica waits for (or is retried on) the new one.
    conn, response = stream(serve_cluster, {"prompt": "The json module", "max_tokens": 8,
                                            "stream_options": {"include_usage": True}})
    events = list(sse_events(response))
    conn.close()
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 8
    assert all("error" not in json.loads(e) for e in events[:-1])


def test_router_kill_keeps_traffic_and_state(client):
    router = serve.get_deployment_handle("Router", APP)

    def kinds() -> list[str]:
        return [e["kind"] for e in router.snapshot.remote().result()["events"]]

    # The candidate is profiled on live traffic, then served partially loaded.
    deadline = time.monotonic() + 120
    while "serve" not in kinds():
        assert time.monotonic() < deadline, "timed out waiting for the policy's choice"
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda i: complete(client, f"def g_{i}(y):", "helios", 8), range(2)))
    before = router.snapshot.remote().result()  # the router saves its state with every report that changes it
    assert [e["kind"] for e in before["events"]][:2] == ["profile", "serve"]
    assert before["pht"][CODE]["requests"] == 2 and sum(before["pht"][CODE]["exit_histogram"].values()) > 0

    # Traffic goes on while the router is killed and Serve restarts it.
    stop, served, failures = threading.Event(), [], []

    def traffic(worker: int) -> None:
        while not stop.is_set():
            try:
                served.append(complete(client, f"def h_{worker}_{len(served)}(z):", "helios", 8))
            except Exception as err:  # recorded, asserted below
                failures.append(err)

    with ThreadPoolExecutor(2) as pool:
        workers = [pool.submit(traffic, w) for w in range(2)]
        try:
            wait_until(lambda: len(served) >= 2, 60, "traffic")
            killed = kill("Router")
            wait_until(lambda: [n for n in replicas(APP, "Router") if n != killed], 60, "a new router")
            after = router.snapshot.remote().result()  # waits until the new router is up
            count = len(served)
            wait_until(lambda: len(served) >= count + 2, 60, "traffic after the restart")
        finally:
            stop.set()
        [w.result() for w in workers]
    assert not failures, failures
    assert all(r.usage.completion_tokens == 8 and r.model_extra["helios"]["model"] == CODE for r in served)

    # The restarted router resumed from the saved state, not from a fresh policy.
    assert after["events"][:len(before["events"])] == before["events"]
    # The profiled rows change only in a new profiling round; the step-time fit beside them takes
    # every report's steps, so it moves with the traffic between the two snapshots.
    def rows(snapshot: dict) -> dict:
        return {m: {k: v for k, v in row.items() if k != "step_fit"} for m, row in snapshot["pht"].items()}

    assert rows(after) == rows(before)
    assert after["requests"] >= before["requests"] and after["tokens"] >= before["tokens"]


def test_the_router_saves_the_state_of_every_report(serve_cluster):
    """Not only on policy events: a restart between two events loses no request or exit statistic."""
    from ray.experimental import internal_kv

    args, key = (str(ROOT / "models" / "registry.yaml"), 64 << 20, 1024, {"profile_requests": 10**6}), "test/faults"
    router = Router.func_or_class(*args, state_key=key)  # the class itself, in this Ray-connected process
    records = [TokenRecord(2, 0.9, False, False, -0.1)] * 4
    [(model, target)] = router.policy.targets.items()  # the candidate profiled first, at full depth
    try:
        for i in range(3):  # the first report saves the "profile" event; the next two change only statistics
            summary = RequestSummary.from_records(f"r{i}", model, 4, records, "length", 0.0, 0.0, 0.1)
            router.report(model, target.depth, records, [(summary, target.depth, None)], (1, 0, 8))
        restarted = Router.func_or_class(*args, state_key=key).snapshot()
        assert restarted == router.snapshot() and restarted["requests"] == 3 and restarted["tokens"] == 12
        assert restarted["pht"][model]["exit_histogram"] == {2: 12}
    finally:
        internal_kv._internal_kv_del(key.encode())
