"""Serving: a real `potluck serve` on loopback under 1, 8, 32 and 64 concurrent clients, against the
offline batch throughput of the same model measured in the same run; and the cold start of
`potluck predict`.

    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/serve.py           # 15 s per level
    .venv/bin/python benchmarks/serve.py --quick                               # 4 s per level

The model is the one of benchmarks/inference.py (MiniLM + a head fine-tuned on ag_news, built there if
missing), served with the default settings (precision auto). Each request carries one text: the
throughput texts are those of benchmarks/inference.py (20-200 words, seed 0); the latency goal uses
short texts (sst2_sentences test, 5-15 words). The offline anchor is `Predictor.predict_proba` on the
same texts in big length-sorted batches, in this process, while the server is not running.

The load generator is a minimal HTTP/1.1 keep-alive client on asyncio streams, one connection per
client, so that it takes little of the CPU the server needs (its CPU seconds are reported). Each level
runs 1 s of warm-up, then --seconds of measurement; every answer is checked (status 200, a JSON list).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from common import ROOT, load_split, write_result
from inference import MODEL, bench_texts, build_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
LEVELS = [1, 8, 32, 64]


async def one_client(port: int, path: str, bodies: list[bytes], start: int, deadline: float, record) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    i = start
    try:
        while time.perf_counter() < deadline:
            body = bodies[i % len(bodies)]
            i += 1
            started = time.perf_counter()
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            data = await reader.readexactly(length)
            record(time.perf_counter() - started, status == 200 and data.startswith(b"[{"))
    finally:
        writer.close()


async def load(port: int, path: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` connections sending one request after another for `seconds` (after 1 s of warm-up)."""
    latencies: list[float] = []
    errors = [0]

    def record(latency: float, ok: bool) -> None:
        if measuring[0]:
            latencies.append(latency)
            errors[0] += not ok

    measuring = [False]
    start = time.perf_counter()
    deadline = start + 1 + seconds
    tasks = [asyncio.create_task(one_client(port, path, bodies, k * 37, deadline, record)) for k in range(clients)]
    await asyncio.sleep(1)
    measuring[0], cpu0, t0 = True, time.process_time(), time.perf_counter()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - t0
    failures = [r for r in results if isinstance(r, Exception)]
    lat = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "texts_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "errors": errors[0] + len(failures), "client_cpu_s": round(time.process_time() - cpu0, 2),
            "seconds": round(elapsed, 1)}


def offline_throughput(model: Path, texts: list[str], rounds: int = 2) -> tuple[float, str]:
    from potluck.inference import Predictor

    predictor = Predictor.from_folder(model)
    predictor.predict_proba(texts[:64])
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        predictor.predict_proba(texts)
        best = max(best, len(texts) / (time.perf_counter() - started))
    return best, predictor.precision_used


def start_server(model: Path, port: int, timeout: float = 120) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "potluck", "serve", str(model), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready")


def batch_counters(port: int, model: str) -> tuple[float, float]:
    """(texts run, model runs) so far, from the server's Prometheus /metrics."""
    values = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        for key in ("potluck_batch_texts_sum", "potluck_batch_texts_count"):
            if line.startswith(f'{key}{{model="{model}"}}'):
                values[key] = float(line.split()[-1])
    return values.get("potluck_batch_texts_sum", 0.0), values.get("potluck_batch_texts_count", 0.0)


def cold_start(model: Path, runs: int) -> dict:
    """Wall time of `potluck predict MODEL "text"` from launch to exit (the answer is printed at the end)."""
    potluck = str(Path(sys.executable).with_name("potluck"))
    walls, floor = [], []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run([potluck, "predict", str(model), "Stocks fell sharply after the report."],
                              capture_output=True, text=True)
        walls.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"potluck predict failed: {done.stderr}")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        floor.append(time.perf_counter() - started)
    return {"runs": runs, "wall_s_median": round(statistics.median(walls), 2), "wall_s_best": round(min(walls), 2),
            "wall_s_all": [round(w, 2) for w in walls], "import_torch_alone_s_median": round(statistics.median(floor), 2),
            "goal_s": 3.0, "met": statistics.median(walls) <= 3.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per concurrency level")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--port", type=int, default=18731)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4 s per level, 500 texts, 1 cold start")
    parser.add_argument("--out", default="serve")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.texts, args.cold_runs, args.out = 4.0, 500, 1, args.out + "-quick"
    load_before = os.getloadavg()
    build_model(args.model)
    texts = bench_texts(args.texts)
    short = [t for t in load_split("sst2_sentences", "test")[0] if 5 <= len(t.split()) <= 15][:500]
    offline, precision = offline_throughput(args.model, texts)
    print(f"offline: {offline:.1f} texts/s ({precision})", flush=True)

    bodies = [json.dumps({"inputs": t}).encode() for t in texts]
    short_bodies = [json.dumps({"inputs": t}).encode() for t in short]
    path = "/v1/models/" + args.model.resolve().name + "/predict"
    server = start_server(args.model, args.port)
    try:
        latency = asyncio.run(load(args.port, path, short_bodies, 1, args.seconds))
        print(f"1 client, short texts: p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms", flush=True)
        levels = []
        name = args.model.resolve().name
        for clients in LEVELS:
            before = batch_counters(args.port, name)
            level = asyncio.run(load(args.port, path, bodies, clients, args.seconds))
            after = batch_counters(args.port, name)
            level["share_of_offline"] = round(level["texts_per_s"] / offline, 3)
            level["texts_per_model_run"] = round((after[0] - before[0]) / max(1.0, after[1] - before[1]), 1)
            levels.append(level)
            print(f"{clients:3d} clients: {level['texts_per_s']:7.1f} texts/s ({100 * level['share_of_offline']:.0f} % "
                  f"of offline), p50 {level['p50_ms']} ms, p99 {level['p99_ms']} ms, errors {level['errors']}, "
                  f"{level['texts_per_model_run']} texts per model run", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    cold = cold_start(args.model, args.cold_runs)
    print(f"cold start of potluck predict: {cold['wall_s_median']} s (import torch alone "
          f"{cold['import_torch_alone_s_median']} s)")
    at32 = next(level for level in levels if level["clients"] == 32)
    goals = {"32_clients_share_of_offline": {"target": 0.70, "got": at32["share_of_offline"],
                                             "met": at32["share_of_offline"] >= 0.70},
             "1_client_short_text_p99_ms": {"target": 50, "got": latency["p99_ms"], "met": latency["p99_ms"] <= 50},
             "errors": {"target": 0, "got": sum(level["errors"] for level in levels) + latency["errors"]},
             "cold_start_s": {"target": 3.0, "got": cold["wall_s_median"], "met": cold["met"]}}
    path_out = write_result(args.out, {
        "model": str(args.model), "precision": precision, "texts": len(texts), "seconds_per_level": args.seconds,
        "server": "potluck serve defaults (uvicorn, h11; max_wait_ms 3, max_batch_texts 64, max_batch_tokens 8192)",
        "offline_texts_per_s": round(offline, 1), "latency_1_client_short_texts": latency, "levels": levels,
        "cold_start": cold, "goals": goals,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]})
    print(f"wrote {path_out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    main()
