"""Load test of the HTTP service in several configurations: one worker, N workers, Ray Serve replicas, each with
the clients placed as a client on another machine would be (niced, or on cores of their own).

    python benchmarks/load_test.py --data_root ../shared/data --out results/service/load_test.md \\
        --configs workers:1 workers:1:taskset workers:2 ray:1 ray:2

Each configuration is a ``Run_Service.py --serve`` started in a subprocess on 127.0.0.1; the load comes from several
client processes (``load_clients.py``: httpx, asyncio; one client process cannot exceed ~500 req/s), placed per
configuration: ``nice`` (the default: the clients at nice 10 on every core), ``taskset`` (the server pinned to the
first three quarters of the cores, the clients to the rest; on 2 cores one each) or ``same`` (the clients beside the
server at its priority). Measured per configuration: ``/api/query`` p50 / p99 (one client), ``/api/predict``
throughput with one client and with 16 (``--body``: base64 PNG in JSON, or ``/api/predict/raw`` with the PNG file or
the raw pixels as the body), the server's and the clients' CPU per request (user + system time from /proc, every
process of each; the server's event loop apart), and 10,000 mixed requests from 16 clients: errors and the server's
memory (every process of the server: workers, or Ray's processes and replicas; private memory, which excludes the
shared libraries every process maps). Goals (issue 22): 16 clients >= 3x one client; 0 errors; memory flat. The
table says the load average before and after: above zero, other work ran beside it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from load_clients import BODIES, FIXED, Phase, client_init, run_phase

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from PoE.core.choices import ENGINES
from PoE.core.paths import DATA_ROOT_HELP, default_data_root

ROOT = Path(__file__).resolve().parents[1]
PLACEMENTS = ("nice", "taskset", "same")  # clients niced / on cores of their own / beside the server as equals


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


def tree_cpu_s(pid: int, main_threads: bool = False) -> float:
    """User + system CPU seconds of the process tree so far (its live processes; Linux). ``main_threads``: of
    each process's main thread only, which in a uvicorn worker is the event loop (HTTP, JSON, decoding)."""
    total = 0.0
    for q in children(pid):
        try:
            f = (
                Path(f"/proc/{q}/task/{q}/stat" if main_threads else f"/proc/{q}/stat")
                .read_text()
                .rsplit(")", 1)[1]
                .split()
            )
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


def split_cpus(cpus: list[int]) -> tuple[list[int], list[int]]:
    """(the server's cores, the clients' cores) for ``taskset``: the clients get the last quarter (at least one)."""
    k = max(1, len(cpus) // 4)
    return cpus[:-k], cpus[-k:]


def temp_log() -> Path:
    """The server's stderr: kept (and named) only if the server failed (``Server.stop``)."""
    fd, path = tempfile.mkstemp(prefix="poe-load-", suffix=".log")
    os.close(fd)
    return Path(path)


@dataclass
class Server:
    """One configuration's server: ``workers:N`` or ``ray:N`` (replicas), then optionally ``:PLACEMENT`` (where the
    clients run: ``nice``, ``taskset`` or ``same``; default ``--placement``)."""

    spec: str
    args: argparse.Namespace
    proc: subprocess.Popen | None = None
    url: str = ""
    log: Path | None = None  # the server's stderr, made when it starts

    @property
    def kind(self) -> str:
        return self.spec.split(":")[0]

    @property
    def n(self) -> int:
        return int(self.spec.split(":")[1])

    @property
    def placement(self) -> str:
        parts = self.spec.split(":")
        return parts[2] if len(parts) > 2 else self.args.placement

    def cpus(self) -> tuple[list[int] | None, list[int] | None]:
        """(the server's cores, the clients' cores); None: all of them."""
        return split_cpus(sorted(os.sched_getaffinity(0))) if self.placement == "taskset" else (None, None)

    def client_settings(self) -> tuple[int, list[int] | None]:
        """(nice, cores) of the client processes."""
        return (self.args.nice if self.placement == "nice" else 0), self.cpus()[1]

    def command(self, max_batch: int) -> list[str]:
        a = self.args
        cmd = [
            sys.executable,
            "Run_Service.py",
            "--serve",
            "--db",
            a.db,
            "--data_root",
            a.data_root,
            "--device",
            a.device,
            "--max_batch",
            str(max_batch),
            "--batch_wait_ms",
            str(a.batch_wait_ms),
        ]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        cmd += ["--engine", a.engine]
        if self.kind == "ray":
            return [*cmd, "--ray", "--replicas", str(self.n), "--port", str(free_port())]
        return [*cmd, "--workers", str(self.n), "--port", "0"]

    def start(self, max_batch: int) -> None:
        cores = self.cpus()[0]
        pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None  # Ray's processes inherit it
        self.log = temp_log()
        self.proc = subprocess.Popen(
            self.command(max_batch),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            preexec_fn=pin,
        )
        line = self.proc.stdout.readline()  # "serving ... at http://127.0.0.1:PORT/ ..."
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        if found is None:
            log = self.log.read_text()[-3000:]
            self.stop()
            raise SystemExit(f"the server did not start: {line}{log}")
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
                self.proc.wait()
        if self.log is None:
            return
        if self.proc is None or self.proc.returncode == 0:
            self.log.unlink(missing_ok=True)
        else:
            print(f"{self.spec}: the server exited with {self.proc.returncode}; its log: {self.log}", file=sys.stderr)


@dataclass
class Measured:
    requests: int
    wall_s: float
    latencies_ms: list[float]
    errors: int
    first_error: str
    server_cpu_ms: float  # per request
    client_cpu_ms: float  # per request
    loop_cpu_ms: float = 0.0  # per request, the server's main threads (a worker's event loop)

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s


def phase(
    ex: ProcessPoolExecutor,
    server: Server,
    a: argparse.Namespace,
    kind: str,
    clients: int,
    total: int,
    seed: int,
    tasks: list[str],
) -> Measured:
    """``total`` requests of ``kind`` from ``clients`` clients spread over the client processes."""
    procs = min(a.client_procs, clients)
    per_client = max(1, total // clients)
    share = [clients // procs + (p < clients % procs) for p in range(procs)]
    start_at = time.time() + 1.0
    jobs = [
        Phase(server.url, a.data_root, kind, c, per_client, seed + p, tasks, start_at, a.body)
        for p, c in enumerate(share)
    ]
    cpu, loop = tree_cpu_s(server.proc.pid), tree_cpu_s(server.proc.pid, main_threads=True)
    results = list(ex.map(run_phase, jobs))
    server_cpu = tree_cpu_s(server.proc.pid) - cpu
    loop_cpu = tree_cpu_s(server.proc.pid, main_threads=True) - loop
    n = per_client * clients
    wall = max(r.end for r in results) - min(r.start for r in results)
    lat = [x for r in results for x in r.latencies_ms]
    errors = sum(r.errors for r in results)
    first = next((r.first_error for r in results if r.first_error), "")
    client_cpu = sum(r.cpu_s for r in results)
    return Measured(n, wall, lat, errors, first, server_cpu / n * 1e3, client_cpu / n * 1e3, loop_cpu / n * 1e3)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def measure(spec: str, a: argparse.Namespace, max_batch: int) -> dict:
    """One configuration: start its server, warm it, run every phase, stop it. The client processes are made
    for it (their priority and cores follow the configuration's placement)."""
    server = Server(spec, a)
    t0 = time.monotonic()
    server.start(max_batch)
    ex = ProcessPoolExecutor(a.client_procs, initializer=client_init, initargs=server.client_settings())
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
        out["took_s"] = time.monotonic() - t0
        return out
    finally:
        ex.shutdown()
        server.stop()


# ---------------------------------------------------------------------------- the report
BODY_NAMES = {
    "json": "base64 PNG in JSON to /api/predict",
    "png": "the PNG file as the body of /api/predict/raw",
    "raw": "uint8 pixels as the body of /api/predict/raw",
}
WHERE = {"nice": "clients niced", "taskset": "clients on other cores", "same": "clients beside, same priority"}


def describe(server: Server) -> str:
    n, s = server.n, "s" * (server.n != 1)
    what = f"{n} worker{s}" if server.kind == "workers" else f"Ray Serve, {n} replica{s}"
    return f"{what}; {WHERE[server.placement]}"


def table(a: argparse.Namespace, results: list[dict], where: str) -> str:
    ok = lambda cond: "yes" if cond else "**no**"  # noqa: E731
    c = a.clients
    rows = [
        f"| server | predict, 1 client | predict, {c} clients | gain | goal >= 3x | query p50 / p99 "
        f"| server CPU per predict, 1 / {c} clients | of it the event loop, 1 / {c} clients "
        f"| client CPU per predict, 1 / {c} clients "
        f"| {a.n_mixed:,} mixed: errors, req/s | server memory (private): warm / max / end | flat (5%) | start, took |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        one, many, q = r["one"], r["many"], r["query"]
        gain = many.rps / one.rps
        name = describe(Server(r["spec"], a)) + (" (batching off)" if r["max_batch"] == 1 else "")
        mixed, mem = r.get("mixed"), r.get("mem", [])
        mix = f"{mixed.errors}, {mixed.rps:.0f}" if mixed else "-"
        flat = abs(mem[-1] - r["mem_warm"]) <= 0.05 * r["mem_warm"] if mem else None
        mems = f"{r['mem_warm']:.0f} / {max(mem):.0f} / {mem[-1]:.0f} MB" if mem else f"{r['mem_warm']:.0f} MB"
        rows.append(
            f"| {name} | {one.rps:.0f} req/s | {many.rps:.0f} req/s | {gain:.1f}x | {ok(gain >= 3)} "
            f"| {pct(q.latencies_ms, 50):.1f} / {pct(q.latencies_ms, 99):.1f} ms "
            f"| {one.server_cpu_ms:.2f} / {many.server_cpu_ms:.2f} ms "
            f"| {one.loop_cpu_ms:.2f} / {many.loop_cpu_ms:.2f} ms "
            f"| {one.client_cpu_ms:.2f} / {many.client_cpu_ms:.2f} ms "
            f"| {mix} | {mems} | {'-' if flat is None else ok(flat)} | {r['start_s']:.0f} s, {r['took_s']:.0f} s |"
        )
    errors = [
        f"{describe(Server(r['spec'], a))}: {m.first_error}"
        for r in results
        for m in (r["warm"], r["query"], r["one"], r["many"], r.get("mixed"))
        if m is not None and m.errors
    ]
    server_cpus, client_cpus = split_cpus(sorted(os.sched_getaffinity(0)))
    notes = [
        f"Servers: `Run_Service.py --serve --max_batch {a.max_batch} --batch_wait_ms {a.batch_wait_ms}"
        f"{f' --threads {a.threads}' if a.threads else ''} --engine {a.engine} [--workers N | --ray --replicas N]` "
        f"(fp32, {a.device}, shipped pool). Predictions: one 32x32 image each, {BODY_NAMES[a.body]}. "
        f"Clients: {a.client_procs} processes (httpx, asyncio); 'niced': at "
        f"nice {a.nice}, every core; 'other cores': the server pinned to CPUs {server_cpus}, the clients to "
        f"{client_cpus} (sched_setaffinity, as taskset does); {a.n_latency} requests per latency phase, "
        f"{a.n_latency * 2} for {c} clients; before them {a.n_warm_mixed:,} mixed requests warm every worker's "
        "caches. CPU: user + system time of every process of the server (workers, or Ray's own processes and its "
        "replicas) and of every client process during the phase, per request; 'the event loop': the main thread "
        "of each server process (a worker's HTTP, JSON and decoding; under Ray not the replicas' work); 'start': "
        "until the server answers (all workers up); 'took': the whole configuration.",
        f"Machine: {where}.",
    ]
    if errors:
        notes.append("First errors: " + "; ".join(errors))
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="DB_PoE")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="the server's device")
    p.add_argument("--data_root", default=str(default_data_root()), help=f"folder holding cifar100/ ({DATA_ROOT_HELP})")
    p.add_argument(
        "--configs",
        nargs="+",
        default=["workers:1", "workers:1:taskset", "workers:2", "ray:1", "ray:2"],
        help="workers:N or ray:N (replicas), then optionally :nice, :taskset or :same (where the clients "
        "run; default --placement); workers:1 is the single-process server",
    )
    p.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="nice",
        help="nice: clients at lower priority; taskset: server and clients on different cores; same: "
        "clients beside the server at the same priority",
    )
    p.add_argument(
        "--body",
        choices=BODIES,
        default="json",
        help="the predict phases' body: json (POST /api/predict, base64 PNG), png (POST /api/predict/raw, the PNG "
        "file) or raw (POST /api/predict/raw, uint8 pixels); the mixed phases send JSON and multipart as before",
    )
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
    p.add_argument("--engine", default="auto", choices=ENGINES, help="the server's --engine")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    a = p.parse_args(argv)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    usable = len(os.sched_getaffinity(0))  # a taskset'd benchmark has fewer than the machine
    where = f"{usable} CPUs usable of {os.cpu_count()}, load average {load}"
    where += " (1 / 5 / 15 min) before the first server started"
    if os.getloadavg()[0] >= 0.5:
        where += " (other work was running: every figure is contended)"
    for spec in a.configs:  # refuse a bad spec before anything runs
        if not re.fullmatch(rf"(workers|ray):[1-9]\d*(:({'|'.join(PLACEMENTS)}))?", spec):
            p.error(f"bad configuration {spec!r}; accepted: workers:N or ray:N, optionally :nice, :taskset or :same")
    results = []
    for spec in a.configs:
        results.append(measure(spec, a, a.max_batch))
        print(table(a, results[-1:], where), flush=True)
    if a.batching_off:
        results.append(measure("workers:1", a, 1))
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
    # SIGTERM (timeout, CI, a wrapper) as Ctrl-C: the finally blocks stop the server this run started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
