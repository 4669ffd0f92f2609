"""`xmodal serve`: a FastAPI server over the two pipelines, with a web page at `/`.

Models load once, when the app starts. Requests are gathered by a small batcher: those
that arrive within a few milliseconds of each other (and ask for the same sampler
options) run as one batch on the model, one batch at a time, so concurrent clients
queue instead of fighting over the CPU. Bad input gets a 4xx with the reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_IMAGES_PER_REQUEST = 16
PAGE = Path(__file__).parent / "web" / "index.html"


class GenerateRequest(BaseModel):
    prompt: str = Field(..., description="what to draw")
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    seed: int = Field(0, ge=0, le=2**62)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=0, le=50)
    sampler: str | None = None
    negative: str | None = None


@dataclass
class _Job:
    payload: Any
    future: asyncio.Future
    key: Any = None


@dataclass
class Batcher:
    """Runs `fn(list of payloads) -> list of results` on batches of jobs with the same key."""

    fn: Callable[[list], list]
    max_batch: int = 64
    wait_s: float = 0.005
    queue: asyncio.Queue | None = None
    _task: asyncio.Task | None = None
    batches: int = 0
    jobs: int = 0
    _pending: list = field(default_factory=list)
    _loop: Any = None

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
            try:
                results = await run_in_threadpool(self.fn, [j.payload for j in batch])
                for j, r in zip(batch, results):
                    if not j.future.done():
                        j.future.set_result(r)
            except Exception as e:  # noqa: BLE001 - handed to each waiting request
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)


class _Service:
    """The loaded pipelines and their batchers: what every route talks to."""

    def __init__(self, generator: str, captioner: str, max_upload_bytes: int):
        from xmodal.models.hub import load_model
        from xmodal.pipelines import pipeline_for

        self.generator, self.captioner, self.max_upload_bytes = generator, captioner, max_upload_bytes
        self.gen_pipe = pipeline_for(load_model(generator), "text-to-image")
        self.cap_pipe = pipeline_for(load_model(captioner), "image-to-text")
        self.gen_batcher = Batcher(self.run_generate, max_batch=8)
        self.cap_batcher = Batcher(self.run_caption, max_batch=64)

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


def create_app(generator: str = "shapes-diffusion", captioner: str = "shapes-captioner",
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    service = _Service(generator, captioner, max_upload_bytes)
    app = FastAPI(title="xmodal", description="text -> image and image -> text")
    app.state.batchers = {"generate": service.gen_batcher, "caption": service.cap_batcher}

    @app.exception_handler(ValueError)
    async def value_error(_: Request, exc: ValueError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    _info_routes(app, service)
    _generate_route(app, service)
    _caption_route(app, service)
    return app


def _info_routes(app: FastAPI, service: _Service) -> None:
    import xmodal

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "generator": service.gen_pipe.name, "captioner": service.cap_pipe.name}

    @app.get("/v1/models")
    def models():
        return {"loaded": {"generator": {"name": service.generator, "model": service.gen_pipe.model.registry_name},
                           "captioner": {"name": service.captioner, "model": service.cap_pipe.model.registry_name}},
                "bundled": xmodal.list_models()}

    @app.get("/", response_class=HTMLResponse)
    def index():
        return PAGE.read_text(encoding="utf-8")


def _generate_route(app: FastAPI, service: _Service) -> None:
    from xmodal.models.base import GenerateOptions
    from xmodal.models.text_encoders import UnknownWordsError

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest):
        if not req.prompt.strip():
            raise HTTPException(400, "prompt is empty")
        if len(req.prompt) > 500:
            raise HTTPException(400, "prompt is longer than 500 characters")
        try:  # bad options and unknown words are named now, in this request's answer
            options = service.gen_pipe.options(GenerateOptions(req.steps, req.guidance, req.sampler, req.negative))
            if options.negative is not None:
                service.gen_pipe.check_prompts([options.negative])
            caught = service.gen_pipe.check_prompts([req.prompt])
        except (UnknownWordsError, ValueError) as e:
            raise HTTPException(400, str(e)) from None
        images = await service.gen_batcher.submit((req, options), key=options)
        return {"model": service.generator, "prompt": req.prompt, "images": images, "warnings": caught}


def _caption_route(app: FastAPI, service: _Service) -> None:
    from xmodal.data.images import ImageLoadError

    @app.post("/v1/caption")
    async def caption(file: UploadFile = File(...)):
        data = bytearray()
        while chunk := await file.read(1 << 16):
            data += chunk
            if len(data) > service.max_upload_bytes:
                raise HTTPException(413, f"upload is larger than {service.max_upload_bytes} bytes")
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        try:
            image = await run_in_threadpool(_decode_image, bytes(data), file.filename or "upload")
        except ImageLoadError as e:
            raise HTTPException(400, str(e)) from None
        text = await service.cap_batcher.submit(image)
        return {"caption": text, "model": service.captioner}


def _decode_image(data: bytes, name: str):
    """Bytes -> RGB PIL image, with the same checks as files (bombs refused, clear errors)."""
    import tempfile

    from xmodal.data.images import ImageLoadError, load_image

    with tempfile.NamedTemporaryFile(suffix=Path(name).suffix or ".img") as f:
        f.write(data)
        f.flush()
        try:
            return load_image(f.name)
        except ImageLoadError as e:
            raise ImageLoadError(str(e).replace(f.name, name)) from None


def serve(host: str = "127.0.0.1", port: int = 8000, generator: str = "shapes-diffusion",
          captioner: str = "shapes-captioner") -> None:
    import uvicorn

    uvicorn.run(create_app(generator, captioner), host=host, port=port, log_level="info")


__all__ = ["create_app", "serve"]
