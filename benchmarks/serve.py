"""Serving: a real `potluck serve` on loopback under 1, 8, 32 and 64 concurrent clients, against the
offline batch throughput of the same model measured beside each level in the same run; the same
server with its models on threads (--no-processes) at 32 clients; and the cold start of `potluck predict`.

    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/serve.py           # 3 rounds, 10 s per level
    .venv/bin/python benchmarks/serve.py --quick                               # 1 round, 4 s per level

The model is the one of benchmarks/inference.py (MiniLM + a head fine-tuned on ag_news, built there if
missing), served with the default settings (precision auto, one model process per core). Each request
carries one text: the throughput texts are those of benchmarks/inference.py (20-200 words, seed 0);
the latency goal uses short texts (sst2_sentences test, 5-15 words). The offline anchor is
`Predictor.predict_proba` on the same texts in big length-sorted batches, in this process, while the
servers are idle.

This machine's speed moves by 2x within minutes, so every measurement of a level is paired with the
mean of the offline runs just before and just after it, and the share of offline is the median over
rounds of those paired ratios (the rounds go through the levels in turn). Processes against threads
at 32 clients is the median of the per-round ratios of their throughputs (measured a minute apart).

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


def offline_throughput(predictor, texts: list[str]) -> float:
    """Texts per second of one `predict_proba` over all texts (big length-sorted batches)."""
    started = time.perf_counter()
    predictor.predict_proba(texts)
    return len(texts) / (time.perf_counter() - started)


def start_server(model: Path, port: int, *options: str, timeout: float = 120) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "potluck", "serve", str(model), "--port", str(port), *options],
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


def summarize(runs: list[dict]) -> dict:
    """One level over its rounds: medians, and every round's figures."""
    def median(key):
        values = [r[key] for r in runs if r[key] is not None]
        return round(statistics.median(values), 3 if key == "share_of_offline" else 1) if values else None

    return {"clients": runs[0]["clients"], "texts_per_s": median("texts_per_s"),
            "offline_texts_per_s": median("offline_texts_per_s"), "share_of_offline": median("share_of_offline"),
            "p50_ms": median("p50_ms"), "p99_ms": median("p99_ms"), "texts_per_model_run": median("texts_per_model_run"),
            "errors": sum(r["errors"] for r in runs), "rounds": runs}


def main() -> None:
    from dataclasses import asdict

    from potluck.inference import Predictor
    from potluck.serving.settings import ServeSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--port", type=int, default=18731)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, 4 s per level, 500 texts, 1 cold start")
    parser.add_argument("--out", default="serve")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.texts, args.cold_runs, args.out = 4.0, 1, 500, 1, args.out + "-quick"
    load_before = os.getloadavg()
    build_model(args.model)
    texts = bench_texts(args.texts)
    short = [t for t in load_split("sst2_sentences", "test")[0] if 5 <= len(t.split()) <= 15][:500]
    predictor = Predictor.from_folder(args.model)
    predictor.predict_proba(texts)  # warm-up
    bodies = [json.dumps({"inputs": t}).encode() for t in texts]
    short_bodies = [json.dumps({"inputs": t}).encode() for t in short]
    name = args.model.resolve().name
    path = "/v1/models/" + name + "/predict"
    servers = {"processes": start_server(args.model, args.port),
               "threads": start_server(args.model, args.port + 1, "--no-processes")}
    ports = {"processes": args.port, "threads": args.port + 1}
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        latency = asyncio.run(load(args.port, path, short_bodies, 1, args.seconds))
        print(f"1 client, short texts: p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms", flush=True)
        plan = [("processes", clients) for clients in LEVELS] + [("threads", 32)]
        for round_ in range(args.rounds):
            offline_before = offline_throughput(predictor, texts)
            for mode, clients in plan:
                before = batch_counters(ports[mode], name)
                level = asyncio.run(load(ports[mode], path, bodies, clients, args.seconds))
                after = batch_counters(ports[mode], name)
                offline_after = offline_throughput(predictor, texts)
                offline = (offline_before + offline_after) / 2  # the anchor: runs just before and just after
                offline_before = offline_after
                level["offline_texts_per_s"] = round(offline, 1)
                level["share_of_offline"] = round(level["texts_per_s"] / offline, 3)
                level["texts_per_model_run"] = round((after[0] - before[0]) / max(1.0, after[1] - before[1]), 1)
                runs.setdefault((mode, clients), []).append(level)
                print(f"round {round_ + 1} {mode:9s} {clients:3d} clients: {level['texts_per_s']:7.1f} texts/s, "
                      f"offline {offline:6.1f} ({100 * level['share_of_offline']:.0f} %), p50 {level['p50_ms']} ms, "
                      f"p99 {level['p99_ms']} ms, errors {level['errors']}, {level['texts_per_model_run']} texts per "
                      "model run", flush=True)
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.wait(60)
    levels = [summarize(runs[("processes", clients)]) for clients in LEVELS]
    threads32 = summarize(runs[("threads", 32)])
    for level in levels + [threads32]:
        print(f"median {level['clients']:3d} clients: {level['texts_per_s']} texts/s, "
              f"{100 * level['share_of_offline']:.0f} % of offline")
    cold = cold_start(args.model, args.cold_runs)
    print(f"cold start of potluck predict: {cold['wall_s_median']} s (import torch alone "
          f"{cold['import_torch_alone_s_median']} s)")
    at32 = next(level for level in levels if level["clients"] == 32)
    goals = {"32_clients_share_of_offline": {"target": 0.70, "got": at32["share_of_offline"],
                                             "met": at32["share_of_offline"] >= 0.70},
             "1_client_short_text_p99_ms": {"target": 50, "got": latency["p99_ms"], "met": latency["p99_ms"] <= 50},
             "errors": {"target": 0, "got": sum(level["errors"] for level in levels + [threads32]) + latency["errors"]},
             "cold_start_s": {"target": 3.0, "got": cold["wall_s_median"], "met": cold["met"]}}
    path_out = write_result(args.out, {
        "model": str(args.model), "precision": predictor.precision_used, "texts": len(texts),
        "seconds_per_level": args.seconds, "rounds": args.rounds,
        "server": {"settings": asdict(ServeSettings()), "uvicorn": "uvloop + httptools where installed"},
        "offline_predictor": {"batch_size": predictor.batch_size, "max_tokens": predictor.max_tokens,
                              "workers": predictor.workers},
        "latency_1_client_short_texts": latency, "levels": levels,
        "threads_instead_of_processes_32_clients": threads32,
        "processes_vs_threads_32_clients": round(statistics.median(
            p["texts_per_s"] / t["texts_per_s"] for p, t in zip(at32["rounds"], threads32["rounds"], strict=True)), 2),
        "cold_start": cold, "goals": goals,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]})
    print(f"wrote {path_out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    main()
