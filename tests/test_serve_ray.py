"""`fastdiff serve --ray` on a local Ray instance: two CPU replicas of the embedded default model behind Ray Serve's
HTTP proxy, driven by the AUTOMATIC1111 client `webuiapi`, then a load test during which one replica is killed; and
the checks of `fastdiff serve --ray`'s arguments.

What a client sees when a replica dies (Ray 2.60's proxy): the requests that replica had taken, running or queued in
its batcher, answer 500 with the plain-text body "Internal Server Error" and are not retried elsewhere (Ray retries
only the choice of a replica, never a request a replica has accepted); an answer the replica was sending is cut off
(the status line went out, the body never ends: requests raises ChunkedEncodingError); every request sent once the
replica is dead goes to the survivor and succeeds; Serve starts a replacement replica.
"""
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Union

import numpy as np
import pytest
import requests

from fastdiff.serve.service import Catalog

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
webuiapi = pytest.importorskip("webuiapi")

from fastdiff.serve.ray_serve import APP_NAME, deploy  # noqa: E402  (imports ray)

CAPTION = "a red circle on the left on a white background"
SMALL = dict(width=64, height=64, steps=2, sampler_name="Euler a", cfg_scale=7.5)
LOAD = dict(width=64, height=64, steps=20, sampler_name="Euler a", cfg_scale=7.5)  # about a second a request here
AUTH = ("user", "pass")
TIMEOUT_S = 60  # no request may take longer: a hung request fails the test


@pytest.fixture(scope="module")
def port():
    """The HTTP port of 2 replicas on a local Ray instance (2 CPUs, a small object store), with HTTP Basic auth."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            free = sock.getsockname()[1]
        deploy(Catalog.discover(), replicas=2, device="cpu", port=free, api_auth=AUTH)
        yield free
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_as_one_a1111_server(port):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username=AUTH[0], password=AUTH[1])
    first = api.txt2img(prompt=CAPTION, seed=5, **SMALL)
    again = api.txt2img(prompt=CAPTION, seed=5, **SMALL)
    assert first.image.size == (64, 64) and first.info["seed"] == 5 and first.info["all_seeds"] == [5]
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image)), "the same image on either replica"
    assert [m["title"] for m in api.get_sd_models()] == ["default"]
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    url = f"http://127.0.0.1:{port}/sdapi/v1"
    assert requests.get(f"{url}/progress", timeout=TIMEOUT_S).status_code == 401, "each replica asks for the key"
    bad = requests.post(f"{url}/txt2img", json={"prompt": "a", **SMALL, "steps": 0}, auth=AUTH, timeout=TIMEOUT_S)
    assert bad.status_code == 422 and bad.json()["field"] == "steps"


@dataclass
class Outcome:
    seed: int
    sent: float  # time.monotonic()
    answered: float
    status: Union[int, str]  # the HTTP status, or the exception's name when no answer came


def test_a_replica_killed_under_load(port):
    url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"

    def post(seed: int, steps: int = LOAD["steps"]) -> Outcome:
        sent = time.monotonic()
        try:
            answer = requests.post(url, json={**LOAD, "prompt": CAPTION, "seed": seed, "steps": steps}, auth=AUTH,
                                   timeout=TIMEOUT_S)
            ok = answer.status_code != 200 or answer.json()["parameters"]["seed"] == seed
            status = answer.status_code if ok else "wrong seed"
        except requests.RequestException as e:
            status = type(e).__name__
        return Outcome(seed, sent, time.monotonic(), status)

    replicas = _replica_actors()
    assert len(replicas) == 2
    with ThreadPoolExecutor(5) as pool:
        long = pool.submit(post, 99, steps=150)  # seconds of sampling on one replica: the one to kill
        victim = _the_busy_one([ray.get_actor(*replica) for replica in replicas])
        futures = [pool.submit(post, seed) for seed in range(100, 116)]  # 4 at a time beside the long one
        # the load is flowing once one of its requests is answered (by the other replica: one that Serve routed to
        # the busy replica waits there behind the long request)
        assert wait(futures, TIMEOUT_S, return_when=FIRST_COMPLETED).done, f"no request answered in {TIMEOUT_S} s"
        assert not long.done(), "the long request is running when its replica is killed"
        killed = time.monotonic()
        ray.kill(victim, no_restart=True)
        dead = _when_dead(victim)
        outcomes = [future.result(TIMEOUT_S) for future in futures]
        long_outcome = long.result(TIMEOUT_S)

    in_flight = [o for o in outcomes if o.sent < killed < o.answered]
    after = [o for o in outcomes if o.sent > dead]
    failed = [o for o in outcomes if o.status != 200]
    print(f"\nkilled a replica {killed - outcomes[0].sent:.1f} s into the load, seen dead {dead - killed:.2f} s "
          f"later. The long request on it: {long_outcome.status}; the load's 16 requests: "
          f"{[o.status for o in outcomes]}; of them in flight at the kill: {[o.status for o in in_flight]}, sent "
          f"once it was dead: {[o.status for o in after]}")
    assert long_outcome.status == 500, "a request the killed replica was running answers 500, not retried elsewhere"
    assert all(o.status in (200, 500, "ChunkedEncodingError") for o in outcomes), "every request answered; none hung"
    assert all(o.sent < dead and o.answered > killed for o in failed), "only requests in flight at the kill fail"
    assert after and all(o.status == 200 for o in after), "once the replica is dead, every request succeeds"

    def replaced() -> bool:
        return len(set(_replica_actors()) - set(replicas)) == 1 and _running_replicas() == 2

    while not replaced() and time.monotonic() - dead < TIMEOUT_S:
        time.sleep(0.2)
    print(f"Serve had 2 running replicas again {time.monotonic() - killed:.1f} s after the kill")
    assert replaced(), "Serve replaced the killed replica"
    assert post(200).status == 200


def _the_busy_one(replicas: list):
    """The replica actor that has taken a request while the other has none (Serve's own count of its requests)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        ongoing = ray.get([replica.get_num_ongoing_requests.remote() for replica in replicas])
        if sorted(ongoing) == [0, 1]:
            return replicas[ongoing.index(1)]
        time.sleep(0.02)
    raise AssertionError(f"no replica took the request in {TIMEOUT_S} s")


def _when_dead(actor) -> float:
    """time.monotonic() once Ray answers a call on `actor` with RayActorError."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=1)
        except ray.exceptions.RayActorError:
            return time.monotonic()
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the killed replica still answers after {TIMEOUT_S} s")


def _replica_actors() -> list[tuple[str, str]]:
    """(name, namespace) of each replica actor of the deployment."""
    return [(actor["name"], actor["namespace"]) for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")]


def _running_replicas() -> int:
    return serve.status().applications[APP_NAME].deployments[APP_NAME].replica_states.get("RUNNING", 0)


RAY_ARGUMENT_ERRORS = [
    (["--replicas", "2"], "--replicas and --gpus-per-replica need --ray"),
    (["--ray", "--replicas", "0"], "--replicas: must be a positive integer, got 0"),
    (["--ray", "--gpus-per-replica", "-1"], "--gpus-per-replica: must be a number of GPUs >= 0, got -1"),
    (["--ray", "--gpus-per-replica", "1.5"], "--gpus-per-replica 1.5: above 1, a replica takes whole GPUs"),
    (["--ray", "--device", "cpu", "--gpus-per-replica", "0.5"], "a CPU engine takes no GPU"),
]


@pytest.mark.parametrize("argv, message", RAY_ARGUMENT_ERRORS, ids=[" ".join(row[0]) for row in RAY_ARGUMENT_ERRORS])
def test_serve_ray_argument_errors_answer_in_one_line(argv, message):
    done = subprocess.run([sys.executable, "-m", "fastdiff", "serve", *argv], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, "one line"


def test_serve_ray_without_ray_says_how_to_install_it_and_the_rest_never_imports_ray():
    without_ray = "import sys; sys.modules['ray'] = None; from fastdiff.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", without_ray, "serve", "--ray"], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 2
    assert done.stderr == "fastdiff: fastdiff serve --ray needs ray[serve]: pip install 'ray[serve]'\n"
    imports = "import sys, fastdiff.cli, fastdiff.serve.app, fastdiff.serve.service; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True,
                          timeout=TIMEOUT_S).stdout.strip() == "False"
