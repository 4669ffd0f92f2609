"""Load check: concurrent clients on loopback against `xmodal serve`.

    python benchmarks/server_load.py [--clients 50] [--requests 10] [--generate-every 5] [--runtime torch]

Starts the server as a subprocess on a free loopback port, runs `--clients` threads that
each send `--requests` requests (every `--generate-every`-th one a /v1/generate with n=1,
the rest /v1/caption uploads of a Shapes picture), and reports throughput, p50/p99 latency
and errors. Bounded in count and time; stops the server at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

from PIL import Image

from xmodal.data.shapes import ShapesDataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--generate-every", type=int, default=5)
    parser.add_argument("--generator", default=None)
    parser.add_argument("--runtime", choices=("auto", "torch", "onnx"), default="auto", help="the captioner's (xmodal serve --runtime)")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "xmodal", "serve", "--port", str(port), "--runtime", args.runtime]
    if args.generator:
        cmd += ["--generator", args.generator]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.3)
        record, pixels = ShapesDataset("test", 1, seed=94).item(0)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        body, content_type = multipart("file", "shape.png", buffer.getvalue())
        latencies: dict[str, list[float]] = {"caption": [], "generate": []}
        errors: list[str] = []
        lock = threading.Lock()

        def client(index: int) -> None:
            for j in range(args.requests):
                if args.generate_every and (index + j) % args.generate_every == 0:
                    kind = "generate"
                    payload = json.dumps({"prompt": record["captions"][0], "n": 1, "seed": index * 100 + j}).encode()
                    req = urllib.request.Request(base + "/v1/generate", payload, {"Content-Type": "application/json"})
                else:
                    kind = "caption"
                    req = urllib.request.Request(base + "/v1/caption", body, {"Content-Type": content_type})
                start = time.perf_counter()
                try:
                    with urllib.request.urlopen(req, timeout=args.timeout) as response:
                        response.read()
                        ok = response.status == 200
                except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                    ok = False
                    with lock:
                        errors.append(f"{kind}: {type(e).__name__}: {e}")
                with lock:
                    if ok:
                        latencies[kind].append(time.perf_counter() - start)

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start

        def summary(values: list[float]) -> dict:
            if not values:
                return {"count": 0}
            values = sorted(values)
            return {"count": len(values), "p50_ms": round(1000 * statistics.median(values), 1),
                    "p99_ms": round(1000 * values[min(len(values) - 1, int(0.99 * len(values)))], 1)}

        total = sum(len(v) for v in latencies.values())
        print(json.dumps({"runtime": args.runtime, "clients": args.clients, "requests": args.clients * args.requests, "ok": total,
                          "errors": len(errors), "error_examples": errors[:3], "seconds": round(seconds, 2),
                          "requests_per_s": round(total / seconds, 1),
                          "caption": summary(latencies["caption"]), "generate": summary(latencies["generate"])}))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
