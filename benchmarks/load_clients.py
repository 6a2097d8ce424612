"""The client side of ``load_test.py``: client processes (niced or pinned to their own cores), each running
several concurrent request loops (httpx, asyncio), and timing what they send."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

FIXED = [["people", "vehicles_1", "vehicles_2"], ["trees", "fish"], ["insects"], ["flowers", "fruit_and_vegetables"]]


def client_init(nice: int, cpus: list[int] | None) -> None:
    """Each client process: below the server's priority (``nice``) and/or on cores of its own (``cpus``)."""
    os.nice(nice)
    if cpus:
        os.sched_setaffinity(0, cpus)


BODIES = ("json", "png", "raw")  # a predict's body: base64 PNG in JSON, the PNG file, the raw uint8 pixels


def images(data_root: str) -> tuple[list[bytes], list[str], list[bytes]]:
    """64 CIFAR-100 test images as PNG bytes, as base64 text and as raw uint8 pixels (32 x 32 x 3)."""
    pngs, pixels = [], []
    for im in np.load(Path(data_root) / "cifar100" / "test.npz")["x"][:64]:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "PNG")
        pngs.append(buf.getvalue())
        pixels.append(im.tobytes())
    return pngs, [base64.b64encode(p).decode() for p in pngs], pixels


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
    body: str = "json"  # the predict phase's body (BODIES): /api/predict's JSON or /api/predict/raw's bytes


@dataclass
class Result:
    latencies_ms: list[float]
    errors: int
    first_error: str
    cpu_s: float  # this client process's own CPU (user + system) during the phase
    start: float
    end: float


def run_phase(ph: Phase) -> Result:
    return asyncio.run(phase_loop(ph))


async def phase_loop(ph: Phase) -> Result:
    pngs, b64, pixels = images(ph.data_root)
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

        def predict_request(i: int) -> tuple[str, dict]:
            """One image, one of the FIXED queries, in the body ``ph.body`` says: (URL, httpx's arguments)."""
            if ph.body == "json":
                return "/api/predict", {"json": predict(i)}
            data, kind = (
                (pngs[i % 64], "image/png") if ph.body == "png" else (pixels[i % 64], "application/octet-stream")
            )
            return "/api/predict/raw", {
                "params": {"tasks": FIXED[i % 4]},
                "content": data,
                "headers": {"content-type": kind},
            }

        async def loop(k: int) -> None:
            r = random.Random(ph.seed * 1000 + k)
            for i in range(ph.n):
                if ph.kind == "query":
                    await call("POST", "/api/query", json={"tasks": r.sample(ph.tasks, r.randint(1, 5))})
                elif ph.kind == "predict":
                    url, kw = predict_request(k * ph.n + i)
                    await call("POST", url, **kw)
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
