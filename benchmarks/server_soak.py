"""Soak test: N clients for M minutes against `xmodal serve`, mixing normal, heavy, oversize and
malformed requests; reports errors, p50/p99 per kind, and the server's RSS over time.

    python benchmarks/server_soak.py [--clients 50] [--minutes 10] [--generator shapes-diffusion]
    python benchmarks/server_soak.py --scenario fairness [--minutes 2]

`fairness`: one client sends maximal allowed generates back to back while another sends normal
ones; reports the normal ones' latency (the question: does a maximal request hold up a light one?).

Each client loops over a fixed mix: captions of a Shapes picture, normal generates (n=1,
default sampler), a maximal allowed generate (the work budget's worth), a pixel bomb (a few-KB
PNG of 25 MP), an oversize upload (declared and streamed), an oversize JSON body, and malformed
JSON. Expected answers: 200 for the normal ones, 200 or 429 (busy: retry later) for the maximal
generate, 4xx for the hostile ones; a 5xx or a dropped
connection is an error. RSS of the server process is sampled every 5 s; `rss_growth_after_first_minute`
compares the last sample with the first one after 60 s. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from server_load import free_port, multipart  # noqa: E402

from xmodal.data.shapes import ShapesDataset  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def requests_mix(base: str) -> list[tuple[str, urllib.request.Request, set[int]]]:
    png = io.BytesIO()
    Image.fromarray(ShapesDataset("test", 1, seed=5).item(0)[1]).save(png, format="PNG")
    bomb = io.BytesIO()
    Image.new("1", (5000, 5000)).save(bomb, format="PNG")
    caption_body, caption_type = multipart("file", "shape.png", png.getvalue())
    bomb_body, bomb_type = multipart("file", "bomb.png", bomb.getvalue())
    big_body, big_type = multipart("file", "big.png", b"\0" * (9 * 1024 * 1024))

    def post(path, body, ctype):
        return urllib.request.Request(base + path, data=body, headers={"Content-Type": ctype}, method="POST")

    def generate(payload):
        return post("/v1/generate", json.dumps(payload).encode(), "application/json")

    return [
        ("caption", post("/v1/caption", caption_body, caption_type), {200}),
        ("generate", generate({"prompt": "a small red circle above a large blue square", "n": 1}), {200}),
        ("caption", post("/v1/caption", caption_body, caption_type), {200}),
        ("generate_max", generate({"prompt": "a large green cross", "n": 16, "steps": 32, "guidance": 5}), {200, 429}),
        ("pixel_bomb", post("/v1/caption", bomb_body, bomb_type), {400}),
        ("oversize_upload", post("/v1/caption", big_body, big_type), {413}),
        ("oversize_json", generate({"prompt": "a" * 200_000}), {413}),
        ("malformed_json", post("/v1/generate", b"{not json", "application/json"), {422}),
        ("too_much_work", generate({"prompt": "a red circle", "n": 16, "steps": 995, "guidance": 50}), {413}),
        ("generate", generate({"prompt": "a small purple circle", "n": 1, "seed": 3}), {200}),
    ]


def client(mix, stop: float, results: dict, lock: threading.Lock, offset: int) -> None:
    i = offset
    while time.time() < stop:
        kind, request, expected = mix[i % len(mix)]
        i += 1
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                status = r.status
                r.read()
        except urllib.error.HTTPError as e:
            status = e.code
            e.read()
        except Exception as e:  # noqa: BLE001 - a dropped connection or timeout is counted, not raised
            status = f"{type(e).__name__}"
        elapsed = time.perf_counter() - start
        with lock:
            entry = results.setdefault(kind, {"latencies": [], "unexpected": {}})
            entry["latencies"].append(elapsed)
            if status not in expected:
                entry["unexpected"][str(status)] = entry["unexpected"].get(str(status), 0) + 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--generator", default="shapes-diffusion")
    parser.add_argument("--scenario", choices=["mixed", "fairness"], default="mixed")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "xmodal", "serve", "--port", str(port), "--generator",
                               args.generator], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("server did not start") from None
                time.sleep(0.5)
        mix, results, lock = requests_mix(base), {}, threading.Lock()
        start = time.time()
        stop = start + 60 * args.minutes
        if args.scenario == "fairness":
            kinds = {m[0]: m for m in mix}
            mixes = [[kinds["generate_max"]], [kinds["generate"]]]
            threads = [threading.Thread(target=client, args=(m, stop, results, lock, 0)) for m in mixes]
        else:
            threads = [threading.Thread(target=client, args=(mix, stop, results, lock, k)) for k in range(args.clients)]
        for t in threads:
            t.start()
        samples = []
        while any(t.is_alive() for t in threads):
            samples.append((round(time.time() - start, 1), round(rss_mb(server.pid), 1)))
            if len(samples) % 12 == 0:
                print(f"{samples[-1][0]:.0f} s: RSS {samples[-1][1]} MB", file=sys.stderr, flush=True)
            time.sleep(5)
        for t in threads:
            t.join()
    finally:
        server.terminate()
        try:
            stop_s = time.perf_counter()
            server.wait(timeout=60)
            shutdown_s = round(time.perf_counter() - stop_s, 2)
        except subprocess.TimeoutExpired:
            server.kill()
            shutdown_s = None  # did not stop within 60 s of SIGTERM
    after_minute = [rss for t, rss in samples if t >= 60] or [samples[-1][1]]
    report = {"scenario": args.scenario, "clients": args.clients if args.scenario == "mixed" else 2,
              "minutes": args.minutes, "generator": args.generator,
              "shutdown_s_after_sigterm": shutdown_s,
              "rss_mb_first": samples[0][1], "rss_mb_after_first_minute": after_minute[0],
              "rss_mb_last": samples[-1][1], "rss_mb_max": max(r for _, r in samples),
              "rss_growth_after_first_minute": round(samples[-1][1] / after_minute[0] - 1, 4),
              "rss_samples": samples, "kinds": {}}
    for kind, entry in sorted(results.items()):
        lat = sorted(entry["latencies"])
        report["kinds"][kind] = {"requests": len(lat), "unexpected": entry["unexpected"],
                                 "p50_s": round(statistics.median(lat), 3),
                                 "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3)}
    report["errors"] = sum(sum(e["unexpected"].values()) for e in results.values())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
