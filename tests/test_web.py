"""The web page end to end: the real server (``Run_Service.py --serve``) and headless Chromium via Selenium.

Skipped where Chromium, its driver or Selenium is absent, unless POE_REQUIRE_DATA is set (CI), then it fails.
``POE_SCREENSHOT=path`` also saves a screenshot of the page showing its prediction (the README's picture).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from PoE.core.data import Normalizer
from PoE.core.datasets import load_split
from PoE.core.evaluate import accuracy
from PoE.core.runtime import CPU
from PoE.query.pool import Pool

from .conftest import ROOT

QUERY = ["people", "vehicles_1", "vehicles_2"]
BICYCLE = 800  # CIFAR-100 test image 800, a bicycle the pool recognises (99.95%): the README's example


def required(what: str, found: object) -> None:
    """Skip without ``what``, unless CI says everything must be there (then fail), as conftest's ``need``."""
    if not found:
        if os.environ.get("POE_REQUIRE_DATA"):
            pytest.fail(f"required for the browser test, missing: {what}")
        pytest.skip(f"browser test: {what} not found")


def browser() -> tuple[str, str]:
    required("the selenium package (pip install -r requirements-dev.txt)", importlib.util.find_spec("selenium"))
    chrome = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    required("chromium (apt-get install chromium)", chrome)
    driver = shutil.which("chromedriver")
    required("chromedriver (apt-get install chromium-driver)", driver)
    return chrome, driver


@pytest.fixture(scope="module")
def server(data_root):
    """``Run_Service.py --serve --port 0`` in a subprocess; yields its base URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "Run_Service.py",
            "--serve",
            "--port",
            "0",
            "--device",
            "cpu",
            "--db",
            str(ROOT / "DB_PoE"),
            "--data_root",
            str(data_root),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(120, proc.kill)  # a server that never says its URL must not hang the suite
    watchdog.start()
    try:
        line = proc.stdout.readline()
    finally:
        watchdog.cancel()
    url = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if url is None:
        proc.kill()
        pytest.fail(f"the server did not start: {line}{proc.stdout.read()}")
    yield url.group(0)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def driver():
    chrome, chromedriver = browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield d
    d.quit()


def wait_for(d, script: str, timeout: float = 60):
    """Wait until the JavaScript expression is truthy; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(f"return {script}"))


def test_page_picks_tasks_shows_the_model_and_predicts(driver, server, data_root, tmp_path):
    from selenium.webdriver.common.by import By

    pool = Pool.open(ROOT / "DB_PoE", "cifar100", device="cpu", precision="fp32")
    model = pool.query(QUERY)
    test = load_split("cifar100", data_root, "test", progress=False)
    acc, n = accuracy(model.module, test, model.classes, Normalizer(pool.cfg.mean, pool.cfg.std), CPU)
    macs, params = model.cost()

    driver.get(server)
    wait_for(driver, "document.body.dataset.state === 'idle'")
    assert_no_model_shown(driver)  # first load: no empty model fields, no empty preview, no dead download link
    assert len(driver.find_elements(By.CSS_SELECTOR, "#tasks .task")) == 20
    assert "baby, boy, girl, man, woman" in driver.find_element(By.CSS_SELECTOR, "label[for=task-people]").text
    for task in QUERY:
        driver.find_element(By.CSS_SELECTOR, f"label[for=task-{task}]").click()
        wait_for(driver, "document.body.dataset.state === 'ready'")
    value = lambda id_: driver.find_element(By.ID, id_).get_attribute("data-value")  # noqa: E731
    assert float(value("accuracy")) == round(acc, 2) and int(value("n-test")) == n
    assert (int(value("flops")), int(value("params"))) == (macs, params)
    assert float(value("build-ms")) > 0
    assert driver.find_element(By.ID, "params").text == f"{params:,}"
    assert driver.find_element(By.ID, "accuracy").text == f"{acc:.2f}%"
    for link in ("download", "download-onnx"):  # the .pt2 and the .onnx
        href = driver.find_element(By.ID, link).get_attribute("href")
        with urllib.request.urlopen(href, timeout=120) as r:
            assert r.status == 200 and len(r.read()) > 10_000

    assert int(test.y[BICYCLE]) in model.classes  # a real test image of the query's classes, clearly a bicycle
    image = test.x[BICYCLE].permute(1, 2, 0).numpy()
    path = tmp_path / "cifar_test.png"
    Image.fromarray(image).save(path)
    driver.find_element(By.ID, "file").send_keys(str(path))
    wait_for(driver, "document.body.dataset.predict === 'ready'")
    rows = driver.find_elements(By.CSS_SELECTOR, "#prediction tbody tr")
    shown = [
        (int(r.get_attribute("data-id")), r.get_attribute("data-name"), float(r.get_attribute("data-p"))) for r in rows
    ]
    want = model.predict(image).top(0, 5)
    assert [(s[0], s[1]) for s in shown] == [(w["id"], w["name"]) for w in want]
    for s, w in zip(shown, want, strict=True):
        assert s[2] == pytest.approx(w["probability"], abs=2e-6)
    first = rows[0].text
    assert want[0]["name"].replace("_", " ") in first and f"{100 * want[0]['probability']:.2f}%" in first

    if os.environ.get("POE_SCREENSHOT"):
        from PoE.core.checkpoint import atomic_write

        driver.execute_script("window.scrollTo(0, 0)")
        png = driver.get_screenshot_as_png()
        atomic_write(Path(os.environ["POE_SCREENSHOT"]), lambda f: f.write(png))

    driver.find_element(By.ID, "clear").click()
    wait_for(driver, "document.body.dataset.state === 'idle'")
    assert_no_model_shown(driver)  # nothing of the cleared query stays on screen
    page = driver.find_element(By.TAG_NAME, "body").text  # the text a user sees (hidden elements excluded)
    assert f"{acc:.2f}%" not in page and "download .pt2" not in page
    assert driver.execute_script("return document.getElementById('classes').textContent") == ""


def assert_no_model_shown(d) -> None:
    """With no task picked, only the prompt shows: not the model's fields, its link, nor a prediction."""
    from selenium.webdriver.common.by import By

    assert d.find_element(By.ID, "model-empty").is_displayed()
    for id_ in ("model", "download", "download-onnx", "result-row", "preview", "prediction"):
        assert not d.find_element(By.ID, id_).is_displayed(), f"#{id_} is shown with no task picked"
    assert d.find_element(By.ID, "download").get_attribute("href") is None
    assert d.find_element(By.ID, "download-onnx").get_attribute("href") is None


def test_api_docs_render_offline(driver, server):
    """Swagger UI at /docs draws every endpoint from the server's own scripts (no CDN: CI has no internet)."""
    from selenium.webdriver.common.by import By

    driver.get(server + "docs")
    wait_for(driver, "document.querySelectorAll('.opblock-summary-path').length >= 5")
    paths = {e.text.replace("\u200b", "") for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/api/pool", "/api/query", "/api/predict", "/api/predict/upload", "/healthz"} <= paths
