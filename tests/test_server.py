import asyncio
import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from tiny_models import save_tiny_models

from xmodal.server import Batcher, create_app


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"), seed=6)


@pytest.fixture(scope="module")
def client(model_dirs):
    with TestClient(create_app(str(model_dirs / "gen"), str(model_dirs / "cap"), max_upload_bytes=200_000)) as c:
        yield c


def png_bytes(size=64, color=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_models_and_page(client):
    assert client.get("/healthz").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["loaded"]["generator"]["model"] == "cvae"
    page = client.get("/")
    assert page.status_code == 200 and "/v1/generate" in page.text and "/v1/caption" in page.text


def test_generate_returns_seeded_pngs(client):
    r = client.post("/v1/generate", json={"prompt": "a small red circle", "n": 2, "seed": 7})
    assert r.status_code == 200
    body = r.json()
    assert [im["seed"] for im in body["images"]] == [7, 8] and body["warnings"] == []
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0]["png_base64"])))
    assert image.size == (64, 64)
    again = client.post("/v1/generate", json={"prompt": "a small red circle", "n": 1, "seed": 7}).json()
    alone = Image.open(io.BytesIO(base64.b64decode(again["images"][0]["png_base64"])))
    # the same image whatever the batch (up to float noise of batched kernels: one grey level)
    assert np.abs(np.asarray(alone).astype(int) - np.asarray(image).astype(int)).max() <= 1


@pytest.mark.parametrize("payload, status, reason", [
    ({"prompt": "   "}, 400, "empty"),
    ({"prompt": "a small red circle", "n": 0}, 422, ""),
    ({"prompt": "a small red circle", "n": 99}, 422, ""),
    ({"prompt": "a small red circle", "steps": 5}, 400, "sampler options"),
    ({"n": 1}, 422, ""),
])
def test_generate_bad_input_is_4xx(client, payload, status, reason):
    r = client.post("/v1/generate", json=payload)
    assert r.status_code == status and reason in r.text


def test_unknown_words_are_named(client):
    body = client.post("/v1/generate", json={"prompt": "a small zebra circle"}).json()
    assert "zebra" in body["warnings"][0]


def test_caption_upload_and_errors(client):
    r = client.post("/v1/caption", files={"file": ("red.png", png_bytes(), "image/png")})
    assert r.status_code == 200 and set(r.json()) == {"caption", "model"}
    bad = client.post("/v1/caption", files={"file": ("x.png", b"not an image", "image/png")})
    assert bad.status_code == 400 and "x.png" in bad.json()["detail"]
    big = client.post("/v1/caption", files={"file": ("big.bin", b"\0" * 300_000, "application/octet-stream")})
    assert big.status_code == 413
    empty = client.post("/v1/caption", files={"file": ("e.png", b"", "image/png")})
    assert empty.status_code == 400
    missing = client.post("/v1/caption")
    assert missing.status_code == 400 and "multipart" in missing.json()["detail"]


def test_hostile_uploads_are_refused_cheaply(client):
    """Oversize bodies (declared or streamed), pixel bombs, odd names: clean 4xx, nothing spooled."""
    huge = client.post("/v1/caption", content=b"x" * 300_000, headers={"content-type": "multipart/form-data; boundary=b"})
    assert huge.status_code == 413 and "larger than" in huge.json()["detail"]
    streamed = client.post("/v1/caption", content=(b"x" * 65536 for _ in range(8)),
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413
    streamed_json = client.post("/v1/generate", content=(b"x" * 65536 for _ in range(4)),
                                headers={"content-type": "application/json"})
    assert streamed_json.status_code == 413
    big_json = client.post("/v1/generate", content=b'{"prompt": "' + b"a" * 100_000 + b'"}',
                           headers={"content-type": "application/json"})
    assert big_json.status_code == 413
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")  # 25 MP in a few KB
    assert len(buffer.getvalue()) < 200_000
    bomb = client.post("/v1/caption", files={"file": ("bomb.png", buffer.getvalue(), "image/png")})
    assert bomb.status_code == 400 and "too many pixels" in bomb.json()["detail"]
    large = io.BytesIO()
    Image.new("RGB", (3000, 2000), (200, 30, 30)).save(large, format="JPEG")
    assert client.post("/v1/caption", files={"file": ("photo.jpg", large.getvalue(), "image/jpeg")}).status_code == 200
    long_name = client.post("/v1/caption", files={"file": ("x." + "e" * 300, png_bytes(), "image/png")})
    assert long_name.status_code == 200
    no_name = client.post("/v1/caption", files={"file": ("", b"secret bytes " * 10, "image/png")})
    assert no_name.status_code == 400 and b"secret" not in no_name.content
    long_prompt = client.post("/v1/generate", json={"prompt": "a " * 300})
    assert long_prompt.status_code == 422 and "500" in long_prompt.text
    nan = client.post("/v1/generate", content=b'{"prompt": "a red circle", "guidance": NaN}',
                      headers={"content-type": "application/json"})
    assert nan.status_code == 422 and "guidance" in nan.text and "finite" in nan.text


def test_api_key_and_docs_switch(model_dirs):
    app = create_app(str(model_dirs / "gen"), str(model_dirs / "cap"), api_key="s3cret", docs=False)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        assert c.post("/v1/generate", json={"prompt": "a small red circle"}).status_code == 401
        ok = c.post("/v1/generate", json={"prompt": "a small red circle"}, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200
        assert c.get("/docs").status_code == 404 and c.get("/openapi.json").status_code == 404


def test_concurrent_captions_are_batched(client):
    batcher = client.app.state.batchers["caption"]
    run, sizes = batcher.fn, []

    def slow(images):  # hold each batch a moment so that concurrent requests queue behind it
        sizes.append(len(images))
        time.sleep(0.2)
        return run(images)

    batcher.fn = slow
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: client.post("/v1/caption", files={"file": ("a.png", png_bytes(), "image/png")}),
                                    range(16)))
    finally:
        batcher.fn = run
    assert all(r.status_code == 200 for r in results)
    assert len({r.json()["caption"] for r in results}) == 1
    assert sum(sizes) == 16 and max(sizes) > 1 and len(sizes) <= 8  # queued requests ran together


def test_batcher_groups_jobs():
    calls = []

    def fn(items):
        calls.append(list(items))
        return [i * 2 for i in items]

    async def main():
        batcher = Batcher(fn, max_batch=10, wait_s=0.05)
        return await asyncio.gather(*(batcher.submit(i) for i in range(6)))

    assert asyncio.run(main()) == [0, 2, 4, 6, 8, 10]
    assert len(calls) < 6  # gathered, not one call per job


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make test installs it when apt can run)")
@pytest.mark.slow
def test_web_page_in_real_chromium(model_dirs, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "xmodal", "serve", "--port", str(port), "--generator",
                               str(model_dirs / "gen"), "--captioner", str(model_dirs / "cap")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request

        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.3)
        (tmp_path / "red.png").write_bytes(png_bytes())
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#prompt", "a large blue square")
            page.fill("#n", "3")
            page.click("#generate")
            page.wait_for_selector("#images figure:nth-child(3) img", timeout=30_000)
            assert page.locator("#images img").count() == 3
            page.set_input_files("#file", str(tmp_path / "red.png"))
            page.wait_for_selector("#caption[data-state=done]", timeout=30_000)
            assert page.inner_text("#caption") and "error" not in (page.get_attribute("#caption", "class") or "")
            page.fill("#prompt", " ")
            page.click("#generate")
            page.wait_for_selector("#gen-status.error", timeout=10_000)
            assert "empty" in page.inner_text("#gen-status")
            page.screenshot(path=str(tmp_path / "page.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(10)
