"""`amber serve --ray --replicas 2`: a real local Ray cluster, an ingress and two engine replicas.

The official SDKs' own tests (tests/api/test_sdk_*.py) run unchanged through it; a custom model
trained through it is served by whichever replica a request lands on, from the shared files; a
replica killed mid-request ends that request with a retryable 503, the SDK's retry succeeds, and
Ray replaces the replica.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

import tests.api.test_cancel as cancel
import tests.api.test_sdk_ai21 as ai21_sdk
import tests.api.test_sdk_openai as openai_sdk
from tests.api.conftest import live_server, registry
from tests.api.sdk import CLIENTS, VENVS
from tests.api.test_custom_models import synthetic, train, upload, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_server(default_checkpoint, tiny_checkpoint, tmp_path_factory):
    home = tmp_path_factory.mktemp("ray-home")
    with live_server(home, registry(default_checkpoint, tiny_checkpoint), "--ray", "--replicas", "2",
                     ready_within=300) as s:  # a Ray cluster, then two replicas loading the model
        yield s


def health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=30).json()


def replicas(server) -> dict[int, dict]:
    """The live engine replicas by pid, as /health lists them (each posts its stats to Ray)."""
    listed = health(server).get("replicas", {}).values()
    return {r["pid"]: r for r in listed if Path(f"/proc/{r['pid']}").exists()}


def busiest(server, client: subprocess.Popen | None = None, timeout: float = 60) -> int:
    """The replica decoding the lone request in flight (that `client` is making): the only one busy
    in two looks a second apart (a replica's stats may be half a second old)."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        assert client is None or client.poll() is None, client.communicate()
        busy = [pid for pid, r in replicas(server).items()
                if any(e["running_samples"] for e in r["engines"].values())]
        if len(busy) == 1 and busy == last:
            return busy[0]
        assert time.monotonic() < deadline, "no replica is decoding"
        last = busy
        time.sleep(1.0)


def both_busy(server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(any(e["running_samples"] for e in r["engines"].values()) for r in replicas(server).values()) < 2:
        assert time.monotonic() < deadline, "the two requests did not spread over both replicas"
        time.sleep(0.2)


def wait_for_two(server, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(replicas(server)) < 2:
        assert time.monotonic() < deadline, "Ray did not replace the replica"
        time.sleep(0.5)


@pytest.mark.parametrize("sdk_test", [
    lambda s: ai21_sdk.test_completion_create_with_every_parameter(s, "j2-light"),
    lambda s: ai21_sdk.test_j2_chat_create(s, "j2-light"),
    ai21_sdk.test_v4_chat_completions,
    openai_sdk.test_openai_sdk,
], ids=["ai21-complete", "ai21-j2-chat", "ai21-v4-chat", "openai"])
def test_the_official_sdks_tests_pass_through_ray(ray_server, sdk_test):
    sdk_test(ray_server)


def test_health_lists_both_replicas_and_a_disconnect_frees_the_batch(ray_server):
    wait_for_two(ray_server)
    assert all(r["engines"]["smollm2-135m-instruct"]["kv_blocks"] > 0 for r in replicas(ray_server).values())
    deadline = time.monotonic() + 10  # a replica's stats may still show the last test's request
    while cancel.running(ray_server):
        assert time.monotonic() < deadline, health(ray_server)
        time.sleep(0.2)
    cancel.test_disconnect_aborts_the_generation(ray_server)  # the engine counters are summed over replicas


def complete(server, model: str, tokens: int, base: str = "tiny") -> httpx.Response:
    return httpx.post(f"{server.url}/studio/v1/{base}/{model}/complete", headers=server.headers, timeout=240,
                      json={"prompt": "Item 7 colour:", "maxTokens": tokens, "temperature": 0})


def complete_retrying(server, model: str) -> httpx.Response:
    """As a client with retries does: a 503 (Ray has not yet noticed a dead replica) is asked again."""
    for _ in range(20):
        r = complete(server, model, 8)
        if r.status_code != 503:
            return r
        time.sleep(float(r.headers["retry-after"]))
    return r


def trained_through_ray(server) -> dict:
    """A custom model trained through the Ray path (upload, train, its worker), as a user would."""
    d = upload(server, "ray-colours", synthetic(60))
    assert d.status_code == 200, d.text
    model = train(server, d.json()["id"], "ray-colours", 1)
    assert wait_for(server, model["id"])["status"] == "COMPLETED"
    return model


def sdk_completion(server) -> subprocess.Popen:
    """The openai SDK, its default retries, a long greedy completion; prints the HTTP statuses it
    saw (an httpx response hook) and the tokens it got."""
    variable, venv = CLIENTS["openai"]
    python = Path(os.environ.get(variable, VENVS / venv / "bin/python"))
    script = ("import sys, json, openai; seen = []; "
              "http = openai.DefaultHttpxClient(event_hooks={'response': [lambda r: seen.append(r.status_code)]}); "
              "c = openai.OpenAI(api_key=sys.argv[2], base_url=sys.argv[1] + '/v1', http_client=http); "
              "r = c.completions.create(model='j2-light', prompt='Once upon a time', max_tokens=300, temperature=0); "
              "print(json.dumps({'statuses': seen, 'tokens': r.usage.completion_tokens}))")
    return subprocess.Popen([python, "-c", script, server.url, server.key], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_replica_killed_mid_request_is_a_503_the_sdk_retries_and_any_replica_serves_a_custom_model(ray_server):
    model = trained_through_ray(ray_server)
    first = complete(ray_server, model["id"], 8)
    assert first.status_code == 200, first.text
    answer = first.json()["completions"]

    # the replica decoding the SDK's request is killed under it: a 503, retried, answered
    wait_for_two(ray_server)
    proc = sdk_completion(ray_server)
    victim = busiest(ray_server, proc)
    survivor = next(pid for pid in replicas(ray_server) if pid != victim)
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["statuses"] == [503, 200] and report["tokens"] > 0, report

    # the survivor serves the custom model; then the survivor is killed under a plain client's long
    # request (a 503 with Retry-After, which the SDKs act on), and Ray's new replica, which never
    # served the custom model, serves it too, from the shared files: the same greedy answer each time
    again = complete_retrying(ray_server, model["id"])
    assert (again.status_code, again.json()["completions"]) == (200, answer)
    wait_for_two(ray_server)
    (fresh,) = set(replicas(ray_server)) - {survivor}
    # two long requests: Ray's router puts the second on the replica the first left idle
    result: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: result.append(
        httpx.post(f"{ray_server.url}/studio/v1/j2-light/complete", headers=ray_server.headers, timeout=240,
                   json={"prompt": "Once upon a time", "maxTokens": 400, "temperature": 0}))) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.5)
    both_busy(ray_server)
    os.kill(survivor, signal.SIGKILL)
    for t in threads:
        t.join(240)
    (cut,) = [r for r in result if r.status_code != 200]
    assert cut.status_code == 503 and cut.headers["retry-after"] == "1", cut.text
    assert "retry" in cut.json()["detail"]
    from_fresh = complete_retrying(ray_server, model["id"])
    assert (from_fresh.status_code, from_fresh.json()["completions"]) == (200, answer)
    assert fresh in replicas(ray_server) and victim not in replicas(ray_server)
