"""The HTTP app of `fastdiff serve`: AUTOMATIC1111's web API (`/sdapi/v1/...`) over a `Service`.

    app = create_app(Service(Catalog.discover()), api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=7860)

Errors answer as A1111's do, a JSON body with "error" and "detail" (and "field" for a bad request field): 422 for a
bad field, 401 without the key or credentials when the server has them, 413 for a body over the limit, 503 (with
Retry-After) when the queue is full or a request waited too long.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import socket
import threading
import time
from typing import Any, Iterator, Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from fastdiff import __version__

from . import a1111
from .batcher import QueueFull
from .service import Service

MAX_BODY_BYTES = 64 * 2**20  # a request body larger than this is refused (413) before it is read


def create_app(service: Service, api_key: Optional[str] = None, api_auth: Optional[tuple[str, str]] = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app. With `api_key` every request needs `Authorization: Bearer KEY` (or `X-API-Key: KEY`); with
    `api_auth` (user, password) HTTP Basic credentials, as A1111's --api-auth."""
    app = FastAPI(title="fastdiff", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if not _authorised(request, api_key, api_auth):
            scheme = "Basic" if api_auth else "Bearer"
            return _error(401, "Unauthorized", "missing or wrong credentials", headers={"WWW-Authenticate": scheme})
        length = request.headers.get("content-length")
        if request.method == "POST" and (length is None or not length.isdigit()):
            return _error(411, "LengthRequired", "a request body needs a Content-Length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return _error(413, "PayloadTooLarge", f"the body is {length} bytes, at most {max_body_bytes} are read")
        return await call_next(request)

    async def generate(model: type, request: Request) -> JSONResponse:
        try:
            body = model.model_validate(await request.json())
            return JSONResponse(await run_in_threadpool(service.generate, body))
        except ValidationError as e:
            first = e.errors()[0]
            return _error(422, "RequestError", first["msg"], field=".".join(map(str, first["loc"])))
        except ValueError as e:  # a1111.RequestError, a LoRA file that does not fit, a bad JSON body
            return _error(422, type(e).__name__, str(e), field=getattr(e, "field", None))
        except QueueFull as e:
            return _error(503, "QueueFull", str(e), headers={"Retry-After": str(max(1, round(e.retry_after_s)))})
        except TimeoutError as e:
            return _error(503, "Timeout", str(e), headers={"Retry-After": "1"})

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request) -> JSONResponse:
        return await generate(a1111.Txt2ImgRequest, request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> JSONResponse:
        return await generate(a1111.Img2ImgRequest, request)

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": str(path),
                 "config": None} for name, path in service.catalog.models.items()]

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        return a1111.sampler_list()

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return a1111.scheduler_list()

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        return [{"name": name, "alias": name, "path": str(path), "metadata": {}}
                for name, path in service.catalog.loras.items()]

    @app.get("/sdapi/v1/scripts")
    def scripts() -> dict[str, list]:
        return {"txt2img": [], "img2img": []}  # no A1111 scripts (clients ask for them to find extensions)

    @app.get("/sdapi/v1/progress")
    def progress() -> dict[str, Any]:
        return service.batcher.state()

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict[str, Any]:
        service.batcher.interrupt()
        return {}

    @app.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        return {"sd_model_checkpoint": service.current_model, "CLIP_stop_at_last_layers": 1,
                "sd_checkpoint_hash": None}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request) -> JSONResponse:
        options = await request.json()
        if not isinstance(options, dict):
            return _error(422, "RequestError", "the body must be a JSON object of options")
        unknown = sorted(set(options) - {"sd_model_checkpoint"})
        if unknown:
            return _error(422, "RequestError", f"fastdiff sets only sd_model_checkpoint, got {', '.join(unknown)}",
                          field=unknown[0])
        if "sd_model_checkpoint" in options:
            try:
                service.set_model(options["sd_model_checkpoint"])
            except a1111.RequestError as e:
                return _error(422, "RequestError", str(e), field=e.field)
        return JSONResponse(None)

    return app


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """Run `app` with uvicorn in a background thread for the block (a free port when port is 0); yields the port."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def _authorised(request: Request, api_key: Optional[str], api_auth: Optional[tuple[str, str]]) -> bool:
    """Whether the request carries the server's key or credentials (compared in constant time); True without."""
    if api_key is None and api_auth is None:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if api_key is not None:
        given = value if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), api_key.encode())
    try:
        user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return scheme.lower() == "basic" and hmac.compare_digest(f"{user}:{password}".encode(),
                                                             f"{api_auth[0]}:{api_auth[1]}".encode())


def _error(status: int, error: str, detail: str, field: Optional[str] = None,
           headers: Optional[dict[str, str]] = None) -> JSONResponse:
    body = {"error": error, "detail": detail, **({"field": field} if field else {})}
    return JSONResponse(body, status_code=status, headers=headers)
