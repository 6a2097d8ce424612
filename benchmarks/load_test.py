"""Load test of the HTTP service: starts ``Run_Service.py --serve`` on 127.0.0.1 (a free port) in a subprocess,
runs bounded client loops against it (httpx, asyncio) and prints a Markdown table.

    python benchmarks/load_test.py --data_root ../shared/data --out results/service/load_test.md

Measures, with goals: ``/api/query`` without evaluation, p50 / p99 (<= 10 / <= 50 ms); ``/api/predict`` of one
32x32 image, p50 (<= 20 ms); ``/api/predict`` throughput at 16 concurrent clients (one image each) against
one client at a time (>= 3x; also against the same clients with batching off, a second server); 10,000 mixed
requests from 16 clients, their error count (0), and the server's resident memory at start, after warm-up and
through the mixed requests (flat).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PoE.store import atomic_write

ROOT = Path(__file__).resolve().parents[1]
FIXED = [["people", "vehicles_1", "vehicles_2"], ["trees", "fish"], ["insects"], ["flowers", "fruit_and_vegetables"]]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def start_server(a: argparse.Namespace, log: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "Run_Service.py", "--serve", "--port", "0", "--db", a.db, "--data_root", a.data_root,
           "--device", "cpu", "--max_batch", str(max_batch), "--batch_wait_ms", str(a.batch_wait_ms)]  # fmt: skip
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    line = proc.stdout.readline()  # "serving ... at http://127.0.0.1:PORT/ ..."
    url = re.search(r"http://127\.0\.0\.1:\d+", line)
    if url is None:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{log.read_text()}")
    return proc, url.group(0)


class Client:
    """Counts every answer that is not a 200 (or no answer at all) as an error."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http, self.errors, self.first_error = http, 0, ""

    async def call(self, method: str, url: str, **kw) -> float:
        t = time.perf_counter()
        try:
            r = await self.http.request(method, url, **kw)
            ok = r.status_code == 200
            why = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            ok, why = False, repr(e)
        if not ok:
            self.errors += 1
            self.first_error = self.first_error or f"{method} {url}: {why}"
        return (time.perf_counter() - t) * 1e3


def random_tasks(rng: random.Random, tasks: list[str]) -> list[str]:
    return rng.sample(tasks, rng.randint(1, 5))


class Load:
    """The client side: test images, request bodies, and each measured phase."""

    def __init__(self, a: argparse.Namespace, http: httpx.AsyncClient, pid: int, tasks: list[str]) -> None:
        self.a, self.http, self.pid, self.c, self.tasks = a, http, pid, Client(http), tasks
        data = np.load(Path(a.data_root) / "cifar100" / "test.npz")
        self.pngs = []
        for im in data["x"][:64]:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, "PNG")
            self.pngs.append(buf.getvalue())
        self.b64 = [base64.b64encode(p).decode() for p in self.pngs]

    def predict(self, i: int, k: int = 1, tasks: list[str] | None = None) -> dict:
        return {"tasks": tasks or FIXED[i % 4], "images": [self.b64[(i + j) % 64] for j in range(k)]}

    async def warm_up(self) -> None:
        """First batches and queries, the test split read once, torch.export's machinery loaded once."""
        rng = random.Random(1)
        for i in range(100):
            await self.c.call("POST", "/api/query", json={"tasks": random_tasks(rng, self.tasks)})
            await self.c.call("POST", "/api/predict", json=self.predict(i))
        for t in FIXED:
            await self.c.call("POST", "/api/query", json={"tasks": t, "evaluate": True})
            await self.c.call("GET", (await self.http.post("/api/query", json={"tasks": t})).json()["model"])

    async def serial(self) -> dict:
        rng, n = random.Random(0), self.a.n_latency
        query = [await self.c.call("POST", "/api/query", json={"tasks": random_tasks(rng, self.tasks)})
                 for _ in range(n)]  # fmt: skip
        t, cpu, own = time.perf_counter(), cpu_s(self.pid), time.process_time()
        predict = [await self.c.call("POST", "/api/predict", json=self.predict(i)) for i in range(n)]
        wall = time.perf_counter() - t
        return {"query_ms": query, "predict_ms": predict, "rps": n / wall,
                "cpu": ((cpu_s(self.pid) - cpu) / n * 1e3, (time.process_time() - own) / n * 1e3)}  # fmt: skip

    async def concurrent(self) -> dict:
        clients, per_client = self.a.clients, max(1, self.a.n_latency * 2 // self.a.clients)
        before = (await self.http.get("/api/stats")).json()

        async def loop(k: int) -> None:
            for i in range(per_client):
                await self.c.call("POST", "/api/predict", json=self.predict(k * per_client + i))

        t, cpu, own = time.perf_counter(), cpu_s(self.pid), time.process_time()
        await asyncio.gather(*(loop(k) for k in range(clients)))
        wall, n = time.perf_counter() - t, clients * per_client
        after = (await self.http.get("/api/stats")).json()
        forwards = max(1, after["forwards"] - before["forwards"])
        return {"rps": n / wall, "per_forward": (after["requests"] - before["requests"]) / forwards,
                "cpu": ((cpu_s(self.pid) - cpu) / n * 1e3, (time.process_time() - own) / n * 1e3)}  # fmt: skip

    async def mixed(self, total: int, seed: int = 100) -> dict:
        """``total`` mixed requests from ``a.clients`` clients; the server's RSS after each fifth of them."""
        a, http, c, tasks = self.a, self.http, self.c, self.tasks
        errors_before, c.errors = c.errors, 0
        rss, done = [], 0

        async def one_client(k: int, n: int) -> None:
            nonlocal done
            r = random.Random(seed + k)
            for i in range(n):
                done += 1
                if done % max(1, total // 5) == 0:
                    rss.append(rss_mb(self.pid))
                x = r.random()
                if x < 0.35:
                    await c.call("POST", "/api/query", json={"tasks": random_tasks(r, tasks)})
                elif x < 0.36:
                    await c.call("POST", "/api/query", json={"tasks": FIXED[i % 4], "evaluate": True})
                elif x < 0.365:
                    await c.call("GET", (await http.post("/api/query", json={"tasks": FIXED[i % 4]})).json()["model"])
                elif x < 0.70:
                    await c.call("POST", "/api/predict", json=self.predict(i, 1, random_tasks(r, tasks)))
                elif x < 0.80:
                    await c.call("POST", "/api/predict", json=self.predict(i, 4))
                elif x < 0.90:
                    files = [("images", ("a.png", self.pngs[i % 64], "image/png"))]
                    await c.call("POST", "/api/predict/upload", data={"tasks": FIXED[i % 4]}, files=files)
                elif x < 0.95:
                    await c.call("GET", "/api/pool")
                else:
                    await c.call("GET", "/healthz")

        t = time.perf_counter()
        share = [total // a.clients + (k < total % a.clients) for k in range(a.clients)]
        await asyncio.gather(*(one_client(k, n) for k, n in enumerate(share)))
        return {"s": time.perf_counter() - t, "errors": c.errors, "errors_before": errors_before,
                "first_error": c.first_error, "rss": rss, "stats": (await http.get("/api/stats")).json()}  # fmt: skip


async def measure(a: argparse.Namespace, base: str, pid: int, full: bool) -> dict:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        pool = (await http.get("/api/pool")).json()
        load = Load(a, http, pid, [t["name"] for t in pool["tasks"] if t["present"]])
        res: dict = {"rss_start": rss_mb(pid)}
        await load.warm_up()
        if full and a.n_warm_mixed:  # the bounded caches fill and the allocators reach their working size
            res["warm_mixed"] = await load.mixed(a.n_warm_mixed, seed=10_000)
        res["rss_warm"] = rss_mb(pid)
        if full:
            res["serial"] = await load.serial()
        res["concurrent"] = await load.concurrent()
        if full:
            res["mixed"] = await load.mixed(a.n_mixed)
    return res


def with_server(a: argparse.Namespace, max_batch: int, full: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc, base = start_server(a, log, max_batch)
        try:
            return asyncio.run(measure(a, base, proc.pid, full))
        finally:
            proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if proc.returncode != 0:
                print(f"note: the server exited with {proc.returncode}: {log.read_text()[-2000:]}", file=sys.stderr)


def table(a: argparse.Namespace, r: dict, off: dict, where: str) -> str:
    ok = lambda cond: "yes" if cond else "**no**"  # noqa: E731
    ser, con, mix = r["serial"], r["concurrent"], r["mixed"]
    q50, q99 = pct(ser["query_ms"], 50), pct(ser["query_ms"], 99)
    p50, p99 = pct(ser["predict_ms"], 50), pct(ser["predict_ms"], 99)
    speedup = con["rps"] / ser["rps"]
    growth = mix["rss"][-1] - r["rss_warm"] if mix["rss"] else float("nan")
    rows = [
        "| measure | result | goal | met |",
        "| --- | --- | --- | --- |",
        f"| `/api/query` without evaluation, p50 / p99 ({a.n_latency} random 1-5-task queries, one client) "
        f"| {q50:.1f} / {q99:.1f} ms | <= 10 / <= 50 ms | {ok(q50 <= 10 and q99 <= 50)} |",
        f"| `/api/predict`, one 32x32 PNG, p50 (p99) ({a.n_latency} requests, one client) "
        f"| {p50:.1f} ms ({p99:.1f} ms) | <= 20 ms | {ok(p50 <= 20)} |",
        f"| `/api/predict` throughput, one client at a time | {ser['rps']:.0f} req/s | | |",
        f"| `/api/predict` throughput, {a.clients} concurrent clients, one image each "
        f"| {con['rps']:.0f} req/s = {speedup:.1f}x one at a time ({con['per_forward']:.1f} requests per forward) "
        f"| >= 3x | {ok(speedup >= 3)} |",
        f"| same {a.clients} clients, batching off (`--max_batch 1`, separate server) | {off['concurrent']['rps']:.0f} "
        f"req/s: batching gives {con['rps'] / off['concurrent']['rps']:.1f}x | | |",
        f"| {a.n_mixed:,} mixed requests, {a.clients} clients (query, evaluate, download, predict JSON 1 and 4 "
        f"images, upload, pool, healthz) | {mix['errors']} errors, {mix['s']:.1f} s ({a.n_mixed / mix['s']:.0f} req/s) "
        f"| 0 errors | {ok(mix['errors'] == 0)} |",
        f"| server RSS: start / after warm-up / after each fifth of the mixed requests | {r['rss_start']:.0f} / "
        f"{r['rss_warm']:.0f} / {' / '.join(f'{m:.0f}' for m in mix['rss'])} MB ({100 * growth / r['rss_warm']:+.1f}%) "
        f"| flat after warm-up (within 5%) | {ok(abs(growth) <= 0.05 * r['rss_warm'])} |",
    ]
    s, warm_mixed = mix["stats"], ""
    if "warm_mixed" in r:
        w = r["warm_mixed"]
        warm_mixed = (f", then {a.n_warm_mixed:,} mixed requests as below (RSS after each fifth: "
                      f"{' / '.join(f'{m:.0f}' for m in w['rss'])} MB; {w['errors']} errors)")  # fmt: skip
    notes = [
        f"Server: `Run_Service.py --serve --max_batch {a.max_batch} --batch_wait_ms {a.batch_wait_ms}"
        f"{f' --threads {a.threads}' if a.threads else ''}` (fp32, CPU); in all, {s['forwards']:,} library forwards "
        f"answered {s['requests']:,} prediction requests (largest batch {s['largest_batch_requests']} requests / "
        f"{s['largest_batch_images']} images). Warm-up (before the measurements): 100 queries, 100 predictions, "
        f"evaluate + download of {len(FIXED)} queries{warm_mixed}.",
        f"HTTP stack: uvicorn {uvicorn_stack()}.",
        f"CPU time per `/api/predict` request, server / client: {ser['cpu'][0]:.2f} / {ser['cpu'][1]:.2f} ms one at "
        f"a time, {con['cpu'][0]:.2f} / {con['cpu'][1]:.2f} ms with {a.clients} clients "
        f"({off['concurrent']['cpu'][0]:.2f} / {off['concurrent']['cpu'][1]:.2f} ms with batching off).",
        f"Machine: {where}. Client and server share it.",
    ]
    if mix["first_error"] or mix["errors_before"]:
        notes.append(f"Errors before the mixed phase: {mix['errors_before']}; first error: {mix['first_error']}")
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


def uvicorn_stack() -> str:
    """uvicorn's version and the event loop / HTTP parser it picks here (uvloop and httptools when installed)."""
    import importlib.util

    import uvicorn

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{uvicorn.__version__} ({loop}, {http})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="DB_PoE")
    p.add_argument("--data_root", default="data")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--n_latency", type=int, default=500, help="requests per latency measurement")
    p.add_argument("--n_mixed", type=int, default=10_000)
    p.add_argument("--n_warm_mixed", type=int, default=2_000, help="mixed requests of the warm-up (0: none)")
    p.add_argument("--max_batch", type=int, default=64)
    p.add_argument("--batch_wait_ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: its own)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    a = p.parse_args(argv)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    where = f"{os.cpu_count()} CPUs, load average {load} (1 / 5 / 15 min) before the first server started"
    result = with_server(a, a.max_batch, full=True)
    batching_off = with_server(a, 1, full=False)
    text = table(a, result, batching_off, where)
    print(text)
    if a.out:
        atomic_write(a.out, lambda f: f.write(text.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
