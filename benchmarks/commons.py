"""The commons under load: accepting a MiniLM-sized weights contribution, and leasing jobs with 8 workers.

    flock /tmp/potluck-cpu.lock .venv/bin/python benchmarks/commons.py             # SQLite and PostgreSQL
    .venv/bin/python benchmarks/commons.py --quick --backends sqlite                # a quick look

Accepting (per backend, `--repeats` times, each in a fresh subprocess so peak memory is its own): the
embedded MiniLM body plus N(0, 1e-3) noise and a 2-label head (an 86.7 MiB contribution file), taken
through the server's own path (`uploads.accept_weights_file`: stream into the blob store, every check,
rename into place, store the head, commit the record). Peak memory is reported twice: the rise of the
peak RSS during the operation (VmHWM, reset through /proc/self/clear_refs; it counts the pages of
memory-mapped safetensors files that were read, which the kernel can drop at will), and the rise of the
anonymous RSS (RssAnon sampled every 5 ms: memory the process allocated). Two anchors run the same way in
the same session: `store only` (hash, fsync and rename the same bytes: the floor of any acceptance) and
`naive check` (safetensors.torch.load_file of the whole file, then the same name/shape/dtype/finite
checks tensor by tensor). The same upload is also timed end to end over HTTP against a real server,
with the server's peak RSS rise.

Leasing (per backend, a real `potluck commons serve` on loopback): `--jobs` queued jobs, then 8 client
threads each leasing until the queue is empty (every lease is one transaction: requeue expired leases,
pick, claim); anchor: 1 thread on the same queue size. The registry alone (8 threads, no HTTP) is timed
as well. PostgreSQL is a throwaway server started here with fsync on (tests/commons/commons_pg.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "commons"))  # the throwaway PostgreSQL helper and the live server
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def pid_rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


# -- one measured operation, in a child process ----------------------------------------------------

def child(args) -> None:
    """Run one operation on the contribution file and print {"seconds", "peak_mb"} as JSON."""
    import torch
    from safetensors.torch import load_file

    from potluck.commons.service import Commons
    from potluck.commons.store import CHUNK
    from potluck.commons.uploads import accept_weights_file

    commons = Commons.open(args.root, args.db)
    who = commons.registry.authenticate(args.token)
    task = commons.registry.task("bench")
    spec = commons.registry.base(0).spec
    path = Path(args.file)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before, anon_before = rss_mb("VmRSS"), rss_mb("RssAnon")
    sampler = AnonPeak()
    start = time.perf_counter()
    if args.child in ("store", "accept"):
        with commons.store.begin() as pending, open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                pending.write(chunk)
            if args.child == "store":
                sha = pending.commit()
            else:
                sha = accept_weights_file(commons, pending, who, task)["blob_sha"]
    else:  # the naive check: everything in memory at once
        dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
        tensors = load_file(path)
        assert set(spec) == {name for name in tensors if not name.startswith("head.")}
        for name, (dtype, shape) in spec.items():
            assert list(tensors[name].shape) == shape and tensors[name].dtype == dtypes[dtype]
            assert torch.isfinite(tensors[name]).all()
        assert all(torch.isfinite(t).all() for name, t in tensors.items() if name.startswith("head."))
        sha = None
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": rss_mb("VmHWM") - before,
                      "peak_anon_mb": sampler.stop() - anon_before, "sha": sha}))


class AnonPeak:
    """Samples the process's anonymous RSS (what it allocates, without mapped file pages) every 5 ms."""

    def __init__(self):
        self.peak, self._stop = rss_mb("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_mb("RssAnon"))


def measure(op: str, setup: dict, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        command = [sys.executable, __file__, "--child", op, "--root", setup["root"], "--file", setup["file"],
                   "--token", setup["token"], *(["--db", setup["db"]] if setup["db"] else [])]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        run = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append(run)
        if run["sha"]:  # remove the stored blob so that the next repeat writes it again
            commons_blob = Path(setup["root"]) / "blobs" / "sha256" / run["sha"][:2] / run["sha"]
            commons_blob.unlink(missing_ok=True)
    return {"seconds_median": round(statistics.median(r["seconds"] for r in runs), 3),
            "seconds": [round(r["seconds"], 3) for r in runs],
            "peak_mb_median": round(statistics.median(r["peak_mb"] for r in runs), 1),
            "peak_mb": [round(r["peak_mb"], 1) for r in runs],
            "peak_anon_mb_median": round(statistics.median(r["peak_anon_mb"] for r in runs), 1)}


# -- setup -----------------------------------------------------------------------------------------

def make_commons(workdir: Path, db: str | None) -> dict:
    """A commons with MiniLM as base 0, a contributor, its task, and a perturbed MiniLM contribution file."""
    import torch
    from safetensors.torch import load_file, save_file

    from potluck.commons.formats import contribution_metadata
    from potluck.commons.service import Commons

    commons, admin = Commons.create(workdir / "commons", base="minilm", db_url=db)
    who, token = commons.registry.add_contributor("bench", "contributor")
    commons.registry.put_task("bench", ["calm", "urgent"], who)
    base = commons.registry.base(0)
    generator = torch.Generator().manual_seed(0)
    tensors = {k: v + 1e-3 * torch.randn(v.shape, generator=generator)
               for k, v in load_file(commons.store.path(base.weights_sha)).items()}
    tensors["head.classifier.weight"] = 0.02 * torch.randn(2, 384, generator=generator)
    tensors["head.classifier.bias"] = torch.zeros(2)
    path = workdir / "contribution.safetensors"
    save_file(tensors, str(path), metadata=contribution_metadata(
        base_version=0, base_sha256=base.weights_sha, labels=["calm", "urgent"], n_examples=1000,
        metrics={"macro_f1": 0.9}, task="bench"))
    commons.registry.close()
    return {"root": str(commons.root), "db": db, "file": str(path), "token": token, "admin": admin,
            "file_mb": round(path.stat().st_size / 2**20, 1)}


def http_accept(url: str, pid: int, setup: dict, repeats: int) -> dict:
    from potluck.commons.client import CommonsClient

    client = CommonsClient(url, setup["token"])
    runs = []
    for _ in range(repeats):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        before = pid_rss_mb(pid, "VmRSS")
        start = time.perf_counter()
        record = client.upload("/v1/tasks/bench/weights", Path(setup["file"]))
        runs.append((time.perf_counter() - start, pid_rss_mb(pid, "VmHWM") - before))
        assert record["status"] == "accepted"
        (Path(setup["root"]) / "blobs" / "sha256" / record["blob_sha"][:2] / record["blob_sha"]).unlink()
    client.close()
    return {"seconds_median": round(statistics.median(r[0] for r in runs), 3), "seconds": [round(r[0], 3) for r in runs],
            "server_peak_mb_median": round(statistics.median(r[1] for r in runs), 1)}


def queue_jobs(setup: dict, n: int) -> None:
    from potluck.commons.service import Commons

    commons = Commons.open(setup["root"], setup["db"])
    registry = commons.registry
    who = registry.authenticate(setup["token"])
    task = registry.task("bench")
    for _ in range(n):
        registry.accept_dataset(actor=who, task=task, n_train=100, n_eval=20, blob_sha="0" * 64,
                                eval_sha="0" * 64, eval_only=False, details={})
    registry.close()


def lease_rate(lease_one, workers: int, expected: int) -> dict:
    """Threads each calling lease_one() until it returns None; jobs leased per second."""
    counts, errors, barrier = [0] * workers, [], threading.Barrier(workers + 1)

    def work(i):
        try:
            barrier.wait()
            while lease_one(i) is not None:
                counts[i] += 1
        except Exception as err:
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors or sum(counts) != expected:
        raise RuntimeError(f"leased {sum(counts)} of {expected}: {errors[:3]}")
    return {"workers": workers, "jobs": expected, "seconds": round(seconds, 3),
            "jobs_per_s": round(expected / seconds, 1)}


def leasing(url: str, setup: dict, n: int) -> dict:
    from potluck.commons.client import CommonsClient
    from potluck.commons.service import Commons

    out = {}
    for workers in (1, 8):
        queue_jobs(setup, n)
        clients = [CommonsClient(url, setup["token"]) for _ in range(workers)]
        out[f"http_{workers}_workers"] = lease_rate(lambda i, c=clients: c[i].lease(f"bench-{i}"), workers, n)
        for c in clients:
            c.close()
    queue_jobs(setup, n)
    commons = Commons.open(setup["root"], setup["db"])
    who = commons.registry.authenticate(setup["token"])
    out["registry_8_workers"] = lease_rate(lambda i: commons.registry.lease_job(who, f"bench-{i}"), 8, n)
    commons.registry.close()
    out["ratio_8_vs_1_http"] = round(out["http_8_workers"]["jobs_per_s"] / out["http_1_workers"]["jobs_per_s"], 2)
    return out


def run_backend(name: str, db: str | None, args, workdir: Path) -> dict:
    from commons_helpers import live_server

    print(f"[{name}] making a commons with MiniLM as base 0", flush=True)
    setup = make_commons(workdir / name, db)
    result = {"contribution_file_mb": setup["file_mb"]}
    for op in ("store", "naive", "accept"):
        print(f"[{name}] {op} x{args.repeats}", flush=True)
        result[op] = measure(op, setup, args.repeats)
    acc, store, naive = result["accept"], result["store"], result["naive"]
    result["ratios"] = {
        "accept_vs_store_time": round(acc["seconds_median"] / store["seconds_median"], 2),
        "accept_vs_naive_time": round(acc["seconds_median"] / naive["seconds_median"], 2),
        "accept_vs_naive_peak_rss": round(acc["peak_mb_median"] / max(naive["peak_mb_median"], 1e-9), 3),
        "accept_vs_naive_peak_anon": round(acc["peak_anon_mb_median"] / max(naive["peak_anon_mb_median"], 1e-9), 3),
        "accept_peak_anon_vs_file_size": round(acc["peak_anon_mb_median"] / setup["file_mb"], 3),
    }
    with live_server(Path(setup["root"]), db, log=workdir / f"{name}-server.log") as (url, process):
        print(f"[{name}] accept over HTTP x{args.repeats}", flush=True)
        result["accept_http"] = http_accept(url, process.pid, setup, args.repeats)
        print(f"[{name}] leasing {args.jobs} jobs", flush=True)
        result["lease"] = leasing(url, setup, args.jobs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each acceptance measurement")
    parser.add_argument("--jobs", type=int, default=400, help="jobs queued for each leasing measurement")
    parser.add_argument("--quick", action="store_true", help="--repeats 1 --jobs 80")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("--root", "--file", "--token", "--db"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.repeats, args.jobs = 1, 80
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import write_result
    from commons_pg import fresh_database, throwaway_postgres

    results = {}
    with tempfile.TemporaryDirectory(prefix="potluck-bench-commons-") as tmp:
        for backend in args.backends.split(","):
            if backend == "sqlite":
                results["sqlite"] = run_backend("sqlite", None, args, Path(tmp))
            else:
                with throwaway_postgres(durable=True) as server:
                    results["postgres"] = run_backend("postgres", fresh_database(server), args, Path(tmp))
    path = write_result("commons", {
        "settings": {"repeats": args.repeats, "jobs": args.jobs, "workers": [1, 8], "noise_std": 1e-3,
                     "base": "minilm (embedded all-MiniLM-L6-v2)", "head_labels": 2,
                     "postgres": "throwaway server, fsync on" if "postgres" in results else None,
                     "sqlite": "WAL, synchronous=FULL, BEGIN IMMEDIATE"},
        "results": results})
    print(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
