"""`xmodal serve`: a FastAPI server over the two pipelines, with a web page at `/`.

Models load once, when the app starts. Requests are gathered by a small batcher: those
that arrive within a few milliseconds of each other (and ask for the same sampler
options) run as one batch on the model, one batch at a time, so concurrent clients
queue instead of fighting over the CPU. Bad input gets a 4xx with the reason.

Limits, so that no request can take the server's memory or time (`ServerLimits`): a body
limit enforced while the body is read (by Content-Length and by counting a streamed body),
before anything is parsed or spooled; a decoded-pixel limit per uploaded image, read from its
header; length limits on text fields; a work budget per generate request (images x network
evaluations each) with a 413 above it; and heavy generate requests run in their own queue,
so they never hold up light ones. Optional API key (`X-API-Key` or `Authorization: Bearer`),
CORS origin, and `/docs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_IMAGES_PER_REQUEST = 16
MAX_TEXT = 500
PAGE = Path(__file__).parent / "web" / "index.html"


@dataclass(frozen=True)
class ServerLimits:
    upload_bytes: int = MAX_UPLOAD_BYTES  # an uploaded image file
    json_bytes: int = 64 * 1024  # a JSON request body
    pixels: int = 16_000_000  # decoded pixels of an uploaded image, checked from its header
    image_side: int = 1024  # uploads are shrunk to this side while decoding (the models read 64 px)
    work: int = 1024  # images x network evaluations per image, per generate request
    heavy_work: int = 160  # above this a request is heavy: run alone, in chunks, between light batches
    heavy_chunk: int = 2  # images per chunk of a heavy request (a light batch waits at most one chunk)
    heavy_queue: int = 2  # heavy requests waiting at most; more get 429 (retry later)
    queue: int = 256  # light requests waiting at most per queue; more get 429


class GenerateRequest(BaseModel):
    prompt: str = Field(..., description="what to draw", max_length=MAX_TEXT)
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    seed: int = Field(0, ge=0, le=2**62)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=0, le=50, allow_inf_nan=False)
    sampler: str | None = Field(None, max_length=16)
    negative: str | None = Field(None, max_length=MAX_TEXT)


class BodyLimit:
    """ASGI middleware: a request body over its route's limit gets a 413 while it is read
    (Content-Length checked first; a streamed body counted chunk by chunk), never spooled."""

    def __init__(self, app, limit_for: Callable[[str], int]):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if length.isdigit() and int(length) <= 4 * limit:
                await _drain(receive, 4 * limit)  # read and drop it, so the client sees the 413
            return await _too_large(send, limit)
        seen, ended = 0, False

        async def counted():
            nonlocal seen, ended
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                ended = not message.get("more_body", False)
                if seen > limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            if not ended:
                await _drain(receive, 3 * limit)
            await _too_large(send, limit)


class _BodyTooLarge(BaseException):  # noqa: N818 - not an Exception: body parsers' `except Exception` must not eat it
    """Raised inside `receive` when a body passes its limit; BodyLimit answers 413."""


async def _drain(receive, budget: int) -> None:
    """Read and drop the rest of a body, up to `budget` bytes (beyond that the connection closes)."""
    while budget > 0:
        message = await receive()
        budget -= len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body is larger than {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@dataclass
class _Job:
    payload: Any
    future: asyncio.Future
    key: Any = None


@dataclass
class Batcher:
    """Runs `fn(list of payloads) -> list of results` on batches of jobs with the same key.

    The batches run on one thread of the batcher's own (not the server's pool of 40): model
    memory is then allocated by a few threads only, and freed memory goes back to the system
    after a batch (glibc `malloc_trim`, at most once a second), so RSS stays flat under load."""

    fn: Callable[[list], list]
    max_batch: int = 64
    wait_s: float = 0.005
    queue: asyncio.Queue | None = None
    _task: asyncio.Task | None = None
    batches: int = 0
    jobs: int = 0
    _pending: list = field(default_factory=list)
    _loop: Any = None
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="batch"))

    running: bool = False

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet in a running batch."""
        return (self.queue.qsize() if self.queue is not None else 0) + len(self._pending)

    async def submit(self, payload, key=None):
        loop = asyncio.get_running_loop()
        if self.queue is None or self._loop is not loop:  # first use, or a new event loop (tests)
            self._loop, self.queue, self._pending = loop, asyncio.Queue(), []
            self._task = loop.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(payload, future, key))
        return await future

    async def _run(self):
        while True:
            job = self._pending.pop(0) if self._pending else await self.queue.get()
            batch = [job]
            deadline = time.perf_counter() + self.wait_s
            while len(batch) < self.max_batch:
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                (batch if nxt.key == job.key else self._pending).append(nxt)
            self.batches += 1
            self.jobs += len(batch)
            self.running = True
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self.executor, _trimmed, self.fn, [j.payload for j in batch])
                for j, r in zip(batch, results):
                    if not j.future.done():
                        j.future.set_result(r)
            except Exception as e:  # noqa: BLE001 - handed to each waiting request
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
            finally:
                self.running = False


_last_trim = [0.0]


def _trimmed(fn: Callable, *args):
    """fn(*args), then (at most once a second) freed heap memory handed back to the system
    (glibc `malloc_trim`; a no-op elsewhere), so that RSS stays flat under load."""
    try:
        return fn(*args)
    finally:
        if time.monotonic() - _last_trim[0] > 1.0:
            _last_trim[0] = time.monotonic()
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)


RUNTIMES = ("auto", "torch", "onnx")


def _load_captioner(name: str, runtime: str) -> tuple:
    """(captioner, its model's kind, "onnx" or "torch"): as `xmodal caption` chooses, the model's
    ONNX export where `runtime` allows and the model has one for its own decoding (greedy), else
    the PyTorch pipeline. The server captions with the model's own decoding and no attention maps,
    which the export gives: the same captions, one picture in 2.6-3.6 ms of model time against
    4.9-7.3 ms in PyTorch on a 2-core CPU (benchmarks/captioner.py; README item 18)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime != "torch":
        from xmodal.runtime import OnnxCaptioner, OnnxExportError, find_export

        try:
            export = find_export(name, None, require=runtime == "onnx")
        except OnnxExportError as e:
            raise OnnxExportError(f"--runtime onnx, captioner {name}: {e} (or serve with --runtime auto)") from None
        if export is not None:
            captioner = OnnxCaptioner(export)
            return captioner, captioner.meta["model"], "onnx"
    from xmodal.pipelines import load_pipeline

    pipe = load_pipeline(name, "image-to-text")
    return pipe, pipe.model.registry_name, "torch"


class _Service:
    """The loaded pipelines and their batchers: what every route talks to."""

    def __init__(self, generator: str, captioner: str, limits: ServerLimits, runtime: str = "auto"):
        from xmodal.pipelines import load_pipeline

        self.generator, self.captioner, self.limits = generator, captioner, limits
        self.gen_pipe = load_pipeline(generator, "text-to-image")
        self.cap_pipe, self.cap_model, self.cap_runtime = _load_captioner(captioner, runtime)
        # one thread runs every generate batch: light batches and the chunks of a heavy request
        # take turns on it, so a maximal request never holds up a light one for more than a chunk
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.gen_batcher = Batcher(self.run_generate, max_batch=8, executor=self.model_thread)
        self.cap_batcher = Batcher(self.run_caption, max_batch=64)
        self.heavy_slot = asyncio.Semaphore(1)
        self.heavy_waiting = 0
        self.heavy_done = 0

    async def run_heavy(self, req, options) -> list:
        """A heavy request alone, `heavy_chunk` images at a time between light batches."""
        if self.heavy_waiting >= self.limits.heavy_queue:
            raise HTTPException(429, "the server is busy with large requests; retry later", {"Retry-After": "5"})
        self.heavy_waiting += 1
        try:
            await self.heavy_slot.acquire()
        finally:
            self.heavy_waiting -= 1
        try:
            out, loop, k = [], asyncio.get_running_loop(), self.limits.heavy_chunk
            for start in range(0, req.n, k):
                await self._light_first()
                part = req.model_copy(update={"seed": req.seed + start, "n": min(k, req.n - start)})
                out += (await loop.run_in_executor(self.model_thread, _trimmed, self.run_generate,
                                                   [(part, options)]))[0]
            self.heavy_done += 1
            return out
        finally:
            self.heavy_slot.release()
    async def _light_first(self, most_s: float = 0.5) -> None:
        """Let waiting light requests go before the next heavy chunk (for at most `most_s` per chunk, so
        that a heavy request still finishes under a stream of light ones)."""
        deadline = time.monotonic() + most_s
        while (self.gen_batcher.waiting or self.gen_batcher.running) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def run_generate(self, jobs: list) -> list:
        """One model batch for (request, options) jobs with the same options (the batcher's key)."""
        from xmodal.sheets import png_base64

        prompts, seeds = [], []
        for r, _ in jobs:
            prompts += [r.prompt] * r.n
            seeds += [r.seed + k for k in range(r.n)]
        images = self.gen_pipe.render(prompts, seeds, jobs[0][1])
        out, i = [], 0
        for r, _ in jobs:
            out.append([{"seed": s, "png_base64": png_base64(im)} for s, im in zip(seeds[i:i + r.n], images[i:i + r.n])])
            i += r.n
        return out

    def run_caption(self, images: list) -> list[str]:
        return self.cap_pipe(images, batch_size=64)

    def body_limit(self, path: str) -> int:
        return self.limits.upload_bytes + 64 * 1024 if path == "/v1/caption" else self.limits.json_bytes


def create_app(generator: str = "shapes-diffusion-fast", captioner: str = "shapes-captioner-transformer",
               max_upload_bytes: int = MAX_UPLOAD_BYTES, limits: ServerLimits | None = None,
               api_key: str | None = None, cors_origin: str | None = None, docs: bool = True,
               runtime: str = "auto") -> FastAPI:
    """The app; `api_key` (default: $XMODAL_API_KEY) guards every /v1 route when set; `runtime`
    is the captioner's (`_load_captioner`)."""
    limits = limits or ServerLimits(upload_bytes=max_upload_bytes)
    service = _Service(generator, captioner, limits, runtime)
    app = FastAPI(title="xmodal", description="text -> image and image -> text",
                  docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.state.batchers = {"generate": service.gen_batcher, "caption": service.cap_batcher}
    app.state.service = service
    app.add_middleware(BodyLimit, limit_for=service.body_limit)
    if cors_origin:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key", "Authorization"])

    @app.exception_handler(ValueError)
    async def value_error(_: Request, exc: ValueError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        # where and why, never the input back (it may be huge, binary, or NaN that JSON cannot carry)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    guard = [Depends(_api_key_check(api_key if api_key is not None else os.environ.get("XMODAL_API_KEY")))]
    _info_routes(app, service, guard)
    _generate_route(app, service, guard)
    _caption_route(app, service, guard)
    return app


def _api_key_check(key: str | None):
    import hmac

    def check(request: Request) -> None:
        if not key:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise HTTPException(401, "missing or wrong API key (X-API-Key header)")

    return check


def _info_routes(app: FastAPI, service: _Service, guard: list) -> None:
    import xmodal

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "generator": service.gen_pipe.name, "captioner": service.captioner}

    @app.get("/v1/models", dependencies=guard)
    def models():
        return {"loaded": {"generator": {"name": service.generator, "model": service.gen_pipe.model.registry_name},
                           "captioner": {"name": service.captioner, "model": service.cap_model,
                                         "runtime": service.cap_runtime}},
                "bundled": xmodal.list_models()}

    @app.get("/", response_class=HTMLResponse)
    def index():
        return PAGE.read_text(encoding="utf-8")


def _generate_route(app: FastAPI, service: _Service, guard: list) -> None:
    from xmodal.data.text import UnknownWordsError
    from xmodal.models.base import GenerateOptions

    @app.post("/v1/generate", dependencies=guard)
    async def generate(req: GenerateRequest):
        if not req.prompt.strip():
            raise HTTPException(400, "prompt is empty")
        try:  # bad options and unknown words are named now, in this request's answer
            options = service.gen_pipe.options(GenerateOptions(req.steps, req.guidance, req.sampler, req.negative))
            if options.negative is not None:
                service.gen_pipe.check_prompts([options.negative])
            caught = service.gen_pipe.check_prompts([req.prompt])
        except (UnknownWordsError, ValueError) as e:
            raise HTTPException(400, str(e)) from None
        work = service.gen_pipe.work(req.n, options)
        if work > service.limits.work:
            raise HTTPException(413, f"this request is {work} network evaluations (n x steps, x2 with guidance); "
                                     f"the limit is {service.limits.work}: ask for fewer images or steps")
        if work > service.limits.heavy_work:
            images = await service.run_heavy(req, options)
        else:
            if service.gen_batcher.waiting >= service.limits.queue:
                raise HTTPException(429, "the server is busy; retry later", {"Retry-After": "2"})
            images = await service.gen_batcher.submit((req, options), key=options)
        return {"model": service.generator, "prompt": req.prompt, "images": images, "warnings": caught}


def _caption_route(app: FastAPI, service: _Service, guard: list) -> None:
    from starlette.datastructures import UploadFile

    from xmodal.data.images import ImageLoadError

    @app.post("/v1/caption", dependencies=guard)
    async def caption(request: Request):
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as e:  # noqa: BLE001 - a malformed multipart body is the client's error
            raise HTTPException(400, f"expected a multipart form with a file field 'file' ({type(e).__name__})") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, "expected an image file in the multipart field 'file' (with a filename)")
        data = await upload.read(service.limits.upload_bytes + 1)
        if len(data) > service.limits.upload_bytes:
            raise HTTPException(413, f"upload is larger than {service.limits.upload_bytes} bytes")
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        name = (upload.filename or "upload")[-80:]
        try:
            image = await run_in_threadpool(_decode_image, data, name, service.limits)
        except ImageLoadError as e:
            raise HTTPException(400, str(e)) from None
        text = await service.cap_batcher.submit(image)
        return {"caption": text, "model": service.captioner}


def _decode_image(data: bytes, name: str, limits: ServerLimits):
    """Bytes -> RGB PIL image, with the same checks as files: a pixel limit read from the header,
    shrunk while decoding, clear errors; nothing is written to disk."""
    from xmodal.data.images import load_image

    return load_image(io.BytesIO(data), max_pixels=limits.pixels, max_side=limits.image_side, name=name)


def serve(host: str = "127.0.0.1", port: int = 8000, generator: str = "shapes-diffusion-fast",
          captioner: str = "shapes-captioner-transformer", api_key: str | None = None, cors_origin: str | None = None,
          docs: bool = True, runtime: str = "auto") -> None:
    import uvicorn

    app = create_app(generator, captioner, api_key=api_key, cors_origin=cors_origin, docs=docs, runtime=runtime)
    # graceful shutdown waits for requests in flight, but not for ever
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)


__all__ = ["create_app", "serve", "ServerLimits"]
