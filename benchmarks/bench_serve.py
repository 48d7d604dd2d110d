"""`fastdiff serve` under load: images per second at 1, 4 and 16 concurrent clients, each sending one-image txt2img
requests over HTTP, against calling the Pipeline directly (one image at a time) in the same process.

SD1.5's architecture with random weights (a diffusers folder written first, which the server loads as it would a
real checkpoint), fp16, 512x512, 25 steps of Euler, guidance 7.5, on the default fast path. The server batches
concurrent requests (up to 8 images); every batch size is warmed (graphs captured) before timing. Without CUDA the
same run uses tiny shapes, which checks that the benchmark works, not how fast anything is.

    python benchmarks/bench_serve.py            # prints the table
    pytest benchmarks/bench_serve.py --benchmark-only
"""
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

import bench_e2e as e2e
import fastdiff

CLIENTS = (1, 4, 16)
MAX_BATCH = 8
PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 64 if e2e.TINY else 512
REQUEST = dict(prompt=PROMPT, width=SIZE, height=SIZE, steps=e2e.STEPS, sampler_name="Euler", cfg_scale=7.5)
JSON_PATH = Path(os.environ.get("FASTDIFF_SERVE_JSON", Path(tempfile.gettempdir()) / "fastdiff_serve_results.json"))


def measure() -> dict:
    """{"direct": images/s, "server": {clients: images/s}, "batches": {clients: mean images per batch}}."""
    from fastdiff.serve.app import create_app, serve_in_thread
    from fastdiff.serve.service import Catalog, Service

    with tempfile.TemporaryDirectory() as folder:
        e2e.build_diffusers("sd15").to(e2e.DTYPE).save_pretrained(folder)
        direct = fastdiff.Pipeline.from_pretrained(folder)
        service = Service(Catalog.discover(model=folder), max_batch=MAX_BATCH, max_queue=256)
        service.preload()
        kw = dict(steps=e2e.STEPS, height=SIZE, width=SIZE, scheduler="euler", karras=False, progress=False)
        direct(PROMPT, seed=0, **kw)  # its graphs
        started = time.perf_counter()
        for seed in range(8):
            direct(PROMPT, seed=seed, **kw)
        e2e.sync()
        result = {"direct": 8 / (time.perf_counter() - started), "server": {}, "batches": {}}
        with serve_in_thread(create_app(service)) as port:
            url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
            for batch in range(1, MAX_BATCH + 1):  # a graph per batch size, before any timing
                assert requests.post(url, json=dict(REQUEST, seed=1, batch_size=batch)).status_code == 200
            for clients in CLIENTS:
                count = max(8, 4 * clients)
                before = service.batcher.stats
                started = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    answers = list(pool.map(lambda s: requests.post(url, json=dict(REQUEST, seed=s)), range(count)))
                seconds = time.perf_counter() - started
                after = service.batcher.stats
                assert all(a.status_code == 200 for a in answers)
                result["server"][clients] = count / seconds
                result["batches"][clients] = (after.jobs_done - before.jobs_done) / (after.batches - before.batches)
        service.close()
    result["device"] = torch.cuda.get_device_name() if e2e.ON_GPU else "cpu"
    result["versions"] = e2e.versions()
    return result


def summary(result: dict) -> str:
    lines = [f"{result['device']}, {result['versions']}",
             "| clients | server images/s | images per batch | vs the Pipeline one at a time |", "|---|---|---|---|"]
    for clients, rate in result["server"].items():
        lines.append(f"| {clients} | {rate:.2f} | {result['batches'][clients]:.1f} | {rate / result['direct']:.2f}x |")
    lines.append(f"| Pipeline directly, one image at a time | {result['direct']:.2f} | 1 | 1.00x |")
    return "\n".join(lines)


def test_server_throughput(benchmark):
    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "versions"})
    JSON_PATH.write_text(json.dumps(result, default=str, indent=1))
    print("\n" + summary(result))
    assert statistics.fmean(result["server"].values()) > 0


if __name__ == "__main__":
    measured = measure()
    JSON_PATH.write_text(json.dumps(measured, default=str, indent=1))
    print(summary(measured))
