"""Load test of the HTTP service in several configurations: one worker, N workers, Ray Serve replicas.

    python benchmarks/load_test.py --data_root ../shared/data --configs workers:1 workers:2 ray:1 ray:2 \\
        --out results/service/load_test.md

Each configuration is a ``Run_Service.py --serve`` started in a subprocess on 127.0.0.1; the load comes from
several client processes (httpx, asyncio; one client process cannot exceed ~500 req/s) run at lower priority
(``nice``), as a client on another machine would not compete with the server. Measured per configuration:
``/api/query`` p50 / p99 (one client), ``/api/predict`` throughput with one client and with 16, the server's and
the clients' CPU per request, and 10,000 mixed requests from 16 clients: errors and the server's memory (every
process of the server: workers, or Ray's processes and replicas; private memory, which excludes the shared
libraries every process maps). Goals (issue 22): 16 clients >= 3x one client; 0 errors; memory flat.
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
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIXED = [["people", "vehicles_1", "vehicles_2"], ["trees", "fish"], ["insects"], ["flowers", "fruit_and_vegetables"]]


# ---------------------------------------------------------------------------- the server's processes
def children(pid: int) -> list[int]:
    """``pid`` and every process below it (Ray's raylet, replicas, ...; uvicorn's workers)."""
    parent: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, todo = [], [pid]
    while todo:
        q = todo.pop()
        tree.append(q)
        todo += [c for c, pp in parent.items() if pp == q]
    return tree


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process tree so far (its live processes; Linux)."""
    total = 0.0
    for q in children(pid):
        try:
            f = Path(f"/proc/{q}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def tree_private_mb(pid: int) -> float:
    total = 0
    for q in children(pid):
        try:
            for line in Path(f"/proc/{q}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Private_Clean", "Private_Dirty")):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One configuration's server: ``workers:N`` or ``ray:N`` (replicas)."""

    spec: str
    args: argparse.Namespace
    proc: subprocess.Popen | None = None
    url: str = ""
    log: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="poe-load-", suffix=".log")[1]))

    @property
    def kind(self) -> str:
        return self.spec.split(":")[0]

    @property
    def n(self) -> int:
        return int(self.spec.split(":")[1])

    def command(self, max_batch: int) -> list[str]:
        a = self.args
        cmd = [sys.executable, "Run_Service.py", "--serve", "--db", a.db, "--data_root", a.data_root, "--device",
               "cpu", "--max_batch", str(max_batch), "--batch_wait_ms", str(a.batch_wait_ms)]  # fmt: skip
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        if self.kind == "ray":
            return [*cmd, "--ray", "--replicas", str(self.n), "--port", str(free_port())]
        return [*cmd, "--workers", str(self.n), "--port", "0"]

    def start(self, max_batch: int) -> None:
        self.proc = subprocess.Popen(self.command(max_batch), cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=self.log.open("w"), text=True)  # fmt: skip
        line = self.proc.stdout.readline()  # "serving ... at http://127.0.0.1:PORT/ ..."
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        if found is None:
            self.stop()
            raise SystemExit(f"the server did not start: {line}{self.log.read_text()[-3000:]}")
        self.url = found.group(0)
        deadline, pids = time.monotonic() + 600, set()
        while len(pids) < (self.n if self.kind == "workers" else 1) and time.monotonic() < deadline:
            with httpx.Client(timeout=600) as c:  # a new connection each time: each worker takes some
                pids.add(c.get(self.url + "/healthz").json()["pid"])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---------------------------------------------------------------------------- the clients
def client_init(nice: int) -> None:
    os.nice(nice)


def images(data_root: str) -> tuple[list[bytes], list[str]]:
    pngs = []
    for im in np.load(Path(data_root) / "cifar100" / "test.npz")["x"][:64]:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "PNG")
        pngs.append(buf.getvalue())
    return pngs, [base64.b64encode(p).decode() for p in pngs]


@dataclass
class Phase:
    """One client process's share of a phase: ``clients`` concurrent loops of ``n`` requests each."""

    url: str
    data_root: str
    kind: str  # "query", "predict" or "mixed"
    clients: int
    n: int
    seed: int
    tasks: list[str]
    start_at: float  # wall-clock time at which every process starts, so that they overlap


@dataclass
class Result:
    latencies_ms: list[float]
    errors: int
    first_error: str
    cpu_s: float
    start: float
    end: float


def run_phase(ph: Phase) -> Result:
    return asyncio.run(phase_loop(ph))


async def phase_loop(ph: Phase) -> Result:
    pngs, b64 = images(ph.data_root)
    lat: list[float] = []
    errors, first = 0, ""
    limits = httpx.Limits(max_connections=ph.clients, max_keepalive_connections=ph.clients)
    async with httpx.AsyncClient(base_url=ph.url, timeout=300, limits=limits) as http:

        async def call(method: str, url: str, **kw) -> httpx.Response | None:
            nonlocal errors, first
            t = time.perf_counter()
            try:
                r = await http.request(method, url, **kw)
                ok, why = r.status_code == 200, f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as e:
                r, ok, why = None, False, repr(e)
            lat.append((time.perf_counter() - t) * 1e3)
            if not ok:
                errors += 1
                first = first or f"{method} {url}: {why}"
            return r

        def predict(i: int, k: int = 1, tasks: list[str] | None = None) -> dict:
            return {"tasks": tasks or FIXED[i % 4], "images": [b64[(i + j) % 64] for j in range(k)]}

        async def loop(k: int) -> None:
            r = random.Random(ph.seed * 1000 + k)
            for i in range(ph.n):
                if ph.kind == "query":
                    await call("POST", "/api/query", json={"tasks": r.sample(ph.tasks, r.randint(1, 5))})
                elif ph.kind == "predict":
                    await call("POST", "/api/predict", json=predict(k * ph.n + i))
                else:
                    await mixed_request(r, i, call, predict, pngs, ph.tasks)

        await asyncio.sleep(max(0.0, ph.start_at - time.time()))
        cpu, start = time.process_time(), time.time()
        await asyncio.gather(*(loop(k) for k in range(ph.clients)))
        return Result(lat, errors, first, time.process_time() - cpu, start, time.time())


async def mixed_request(r: random.Random, i: int, call, predict, pngs: list[bytes], tasks: list[str]) -> None:
    """Query 35%, evaluate 1%, download 0.5%, predict 1 image 33.5%, 4 images 10%, upload 10%, pool 5%, health 5%."""
    x = r.random()
    if x < 0.35:
        await call("POST", "/api/query", json={"tasks": r.sample(tasks, r.randint(1, 5))})
    elif x < 0.36:
        await call("POST", "/api/query", json={"tasks": FIXED[i % 4], "evaluate": True})
    elif x < 0.365:
        answer = await call("POST", "/api/query", json={"tasks": FIXED[i % 4]})
        if answer is not None and answer.status_code == 200:
            await call("GET", answer.json()["model"])
    elif x < 0.70:
        await call("POST", "/api/predict", json=predict(i, 1, r.sample(tasks, r.randint(1, 5))))
    elif x < 0.80:
        await call("POST", "/api/predict", json=predict(i, 4))
    elif x < 0.90:
        files = [("images", ("a.png", pngs[i % 64], "image/png"))]
        await call("POST", "/api/predict/upload", data={"tasks": FIXED[i % 4]}, files=files)
    elif x < 0.95:
        await call("GET", "/api/pool")
    else:
        await call("GET", "/healthz")


@dataclass
class Measured:
    requests: int
    wall_s: float
    latencies_ms: list[float]
    errors: int
    first_error: str
    server_cpu_ms: float  # per request
    client_cpu_ms: float  # per request

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s


def phase(ex: ProcessPoolExecutor, server: Server, a: argparse.Namespace, kind: str, clients: int, total: int,
          seed: int, tasks: list[str]) -> Measured:  # fmt: skip
    """``total`` requests of ``kind`` from ``clients`` clients spread over the client processes."""
    procs = min(a.client_procs, clients)
    per_client = max(1, total // clients)
    share = [clients // procs + (p < clients % procs) for p in range(procs)]
    start_at = time.time() + 1.0
    jobs = [Phase(server.url, a.data_root, kind, c, per_client, seed + p, tasks, start_at) for p, c in enumerate(share)]
    cpu = tree_cpu_s(server.proc.pid)
    results = list(ex.map(run_phase, jobs))
    server_cpu = tree_cpu_s(server.proc.pid) - cpu
    n = per_client * clients
    wall = max(r.end for r in results) - min(r.start for r in results)
    lat = [x for r in results for x in r.latencies_ms]
    errors = sum(r.errors for r in results)
    first = next((r.first_error for r in results if r.first_error), "")
    return Measured(n, wall, lat, errors, first, server_cpu / n * 1e3, sum(r.cpu_s for r in results) / n * 1e3)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def measure(spec: str, a: argparse.Namespace, ex: ProcessPoolExecutor, max_batch: int) -> dict:
    server = Server(spec, a)
    t0 = time.monotonic()
    server.start(max_batch)
    try:
        start_s = time.monotonic() - t0
        pool = httpx.get(server.url + "/api/pool", timeout=300).json()
        tasks = [t["name"] for t in pool["tasks"] if t["present"]]
        out: dict = {"spec": spec, "start_s": start_s, "max_batch": max_batch}
        for tasks_ in FIXED * 2 * server.n:  # each worker reads the test split and exports once, before timing
            with httpx.Client(base_url=server.url, timeout=600) as c:
                c.get(c.post("/api/query", json={"tasks": tasks_, "evaluate": True}).json()["model"])
        out["warm"] = phase(ex, server, a, "mixed", a.clients, a.n_warm_mixed, 1, tasks)  # every worker's caches
        out["mem_warm"] = tree_private_mb(server.proc.pid)
        out["query"] = phase(ex, server, a, "query", 1, a.n_latency, 2, tasks)
        out["one"] = phase(ex, server, a, "predict", 1, a.n_latency, 3, tasks)
        out["many"] = phase(ex, server, a, "predict", a.clients, a.n_latency * 2, 4, tasks)
        if a.n_mixed:
            mem: list[float] = []
            done = threading.Event()

            def sample() -> None:
                while not done.wait(1.0):
                    mem.append(tree_private_mb(server.proc.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            out["mixed"] = phase(ex, server, a, "mixed", a.clients, a.n_mixed, 5, tasks)
            done.set()
            sampler.join()
            out["mem"] = [*mem, tree_private_mb(server.proc.pid)]
        with httpx.Client(timeout=60) as c:
            out["stats"] = c.get(server.url + "/api/stats").json()
        return out
    finally:
        server.stop()


# ---------------------------------------------------------------------------- the report
def describe(spec: str) -> str:
    kind, n = spec.split(":")
    return f"{n} worker{'s' if n != '1' else ''}" if kind == "workers" else f"Ray Serve, {n} replica{'s' * (n != '1')}"


def table(a: argparse.Namespace, results: list[dict], where: str) -> str:
    ok = lambda cond: "yes" if cond else "**no**"  # noqa: E731
    rows = [
        f"| server | predict, 1 client | predict, {a.clients} clients | gain | goal >= 3x | query p50 / p99 "
        f"| server / client CPU per predict (1; {a.clients} clients) | {a.n_mixed:,} mixed: errors, req/s "
        "| server memory (private): warm / max / end | flat (5%) | start |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        one, many, q = r["one"], r["many"], r["query"]
        gain = many.rps / one.rps
        name = describe(r["spec"]) + (" (batching off)" if r["max_batch"] == 1 else "")
        mixed, mem = r.get("mixed"), r.get("mem", [])
        mix = f"{mixed.errors}, {mixed.rps:.0f}" if mixed else "-"
        flat = abs(mem[-1] - r["mem_warm"]) <= 0.05 * r["mem_warm"] if mem else None
        mems = f"{r['mem_warm']:.0f} / {max(mem):.0f} / {mem[-1]:.0f} MB" if mem else f"{r['mem_warm']:.0f} MB"
        rows.append(
            f"| {name} | {one.rps:.0f} req/s | {many.rps:.0f} req/s | {gain:.1f}x | {ok(gain >= 3)} "
            f"| {pct(q.latencies_ms, 50):.1f} / {pct(q.latencies_ms, 99):.1f} ms "
            f"| {one.server_cpu_ms:.2f} / {one.client_cpu_ms:.2f}; "
            f"{many.server_cpu_ms:.2f} / {many.client_cpu_ms:.2f} ms "
            f"| {mix} | {mems} | {'-' if flat is None else ok(flat)} | {r['start_s']:.0f} s |"
        )  # fmt: skip
    errors = [f"{describe(r['spec'])}: {m.first_error}" for r in results for m in
              (r["warm"], r["query"], r["one"], r["many"], r.get("mixed")) if m is not None and m.errors]  # fmt: skip
    notes = [
        f"Servers: `Run_Service.py --serve --max_batch {a.max_batch} --batch_wait_ms {a.batch_wait_ms}"
        f"{f' --threads {a.threads}' if a.threads else ''} [--workers N | --ray --replicas N]` (fp32, CPU, shipped "
        f"pool). Clients: {a.client_procs} processes at nice {a.nice} (httpx, asyncio); {a.n_latency} requests per "
        f"latency phase, {a.n_latency * 2} for {a.clients} clients; before them {a.n_warm_mixed:,} mixed requests "
        "warm every worker's caches. CPU: every process of the server (workers, or Ray's own processes and its "
        "replicas) and every client process; 'start': until the server answers (all workers up).",
        f"Machine: {where}.",
    ]
    if errors:
        notes.append("First errors: " + "; ".join(errors))
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="DB_PoE")
    p.add_argument("--data_root", default="data")
    p.add_argument("--configs", nargs="+", default=["workers:1", "workers:2", "ray:1", "ray:2"],
                   help="workers:N or ray:N (replicas); workers:1 is the single-process server")  # fmt: skip
    p.add_argument("--batching_off", action="store_true", help="also workers:1 with --max_batch 1")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--client_procs", type=int, default=4, help="client processes the clients are spread over")
    p.add_argument("--nice", type=int, default=10, help="the client processes' nice value (0: same priority)")
    p.add_argument("--n_latency", type=int, default=500, help="requests per latency phase")
    p.add_argument("--n_mixed", type=int, default=10_000)
    p.add_argument("--n_warm_mixed", type=int, default=2_000, help="mixed requests of the warm-up")
    p.add_argument("--max_batch", type=int, default=64)
    p.add_argument("--batch_wait_ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads per worker (default: its own)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    a = p.parse_args(argv)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    where = f"{os.cpu_count()} CPUs, load average {load} (1 / 5 / 15 min) before the first server started"
    results = []
    with ProcessPoolExecutor(a.client_procs, initializer=client_init, initargs=(a.nice,)) as ex:
        for spec in a.configs:
            results.append(measure(spec, a, ex, a.max_batch))
            print(table(a, results[-1:], where), flush=True)
        if a.batching_off:
            results.append(measure("workers:1", a, ex, 1))
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    text = table(a, results, f"{where}; {load} at the end")
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
