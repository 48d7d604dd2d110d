"""`fastdiff serve --ray`: the AUTOMATIC1111 app of `fastdiff.serve.app` on Ray Serve, one engine per replica.

    handle = deploy(Catalog.discover(), replicas=2, gpus_per_replica=1, port=7860)
    serve_forever()   # until Ctrl-C, then Serve shuts down

Each replica is a Ray actor that holds its own `Service` (its Pipeline, its batcher) and answers HTTP with the app
`create_app` builds, so routes, errors, keys and limits are those of `fastdiff serve`. Ray Serve's HTTP proxy takes
the requests on host:port and hands each to a replica; the replica's batcher then batches what it was given.

State that A1111 keeps per server is kept per replica, and each request reaches whichever replica Serve picks:
`POST /sdapi/v1/options` sets sd_model_checkpoint on one replica only, `/sdapi/v1/progress` reports one replica's
work, `/sdapi/v1/interrupt` stops one replica's batch. With more than one replica, a client names its model in each
request (override_settings) rather than setting it once.

Only this module imports ray: fastdiff runs without it.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from .a1111 import Limits
from .app import create_app
from .service import Catalog, Service

APP_NAME = "fastdiff"  # the Serve application's name, and its deployment's
CPUS_PER_REPLICA = 1.0  # what Ray reserves for each replica's worker process, GPU or not
# Serve sends a replica at most max_ongoing_requests requests at a time and holds the rest in its router, unbounded.
# A replica takes a running batch, a full queue and this many requests more (/progress, /interrupt, ...), so its own
# batcher decides, as under `fastdiff serve`: it batches what waits, and answers 503 when its queue is full.
LIGHT_REQUESTS = 8


@serve.deployment(name=APP_NAME)
@serve.ingress()
class Replica:
    """One engine: a Service on this replica's device, its model loaded before the replica takes requests, and the
    A1111 app over it."""

    def __init__(self, catalog: Catalog, api_key: Optional[str], api_auth: Optional[tuple[str, str]],
                 service_options: dict[str, Any]) -> None:
        self.service = Service(catalog, **service_options)
        self.service.preload()
        self.api_key, self.api_auth = api_key, api_auth

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve once, after __init__."""
        return create_app(self.service, api_key=self.api_key, api_auth=self.api_auth)

    def __del__(self) -> None:
        self.service.close()


def deploy(catalog: Catalog, *, replicas: int = 1, gpus_per_replica: float = 0.0, host: str = "127.0.0.1",
           port: int = 7860, api_key: Optional[str] = None, api_auth: Optional[tuple[str, str]] = None,
           limits: Limits = Limits(), device: Optional[str] = None, dtype=None, max_queue: int = 64,
           max_batch: int = 8, queue_timeout_s: float = 600.0) -> DeploymentHandle:
    """Run `replicas` engines behind Ray Serve's HTTP proxy on host:port and return once every one has loaded
    the model. Joins the Ray cluster `ray.init()` finds (RAY_ADDRESS, else a new local one) unless this process
    is connected already. Each replica reserves `gpus_per_replica` GPUs (0: a CPU engine; a fraction shares a
    GPU between replicas) and sees only those. Every replica gets this `catalog`, so all serve the same names;
    its paths must exist on every node. The other arguments are those of `Service` and `create_app`, per
    replica. ValueError when the cluster lacks the CPUs or GPUs the replicas reserve (Ray would wait for them
    forever); RuntimeError when the replicas fail to start."""
    if not ray.is_initialized():
        ray.init()
    needed = {"CPU": replicas * CPUS_PER_REPLICA, "GPU": replicas * gpus_per_replica}
    available = ray.cluster_resources()
    for resource, amount in needed.items():
        if amount > available.get(resource, 0):
            raise ValueError(f"{replicas} replica(s) reserve {amount:g} {resource}(s) in all, the Ray cluster has "
                             f"{available.get(resource, 0):g}")
    serve.start(http_options={"host": host, "port": port})
    deployment = Replica.options(num_replicas=replicas,
                                 ray_actor_options={"num_cpus": CPUS_PER_REPLICA, "num_gpus": gpus_per_replica},
                                 max_ongoing_requests=max_queue + max_batch + LIGHT_REQUESTS)
    service_options = dict(limits=limits, device=device, dtype=dtype, max_queue=max_queue, max_batch=max_batch,
                           queue_timeout_s=queue_timeout_s)
    return serve.run(deployment.bind(catalog, api_key, api_auth, service_options), name=APP_NAME, route_prefix="/")


def serve_forever() -> None:
    """Block until Ctrl-C, then delete the deployment and stop Serve."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
