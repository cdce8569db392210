"""The status page in a real browser: Debian's headless Chromium, driven through its ChromeDriver,
opens `/` after a short loop on tiny models and finds plots drawn from real data. The screenshot is
kept under artifacts/ (the README's comes from it)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from test_worker import job, make_worker, seed_project
from werkzeug.serving import make_server

from backend.app import create_app
from backend.settings import load_settings

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: `make debian-tools` installs Debian's chromium and chromium-driver")
        pytest.skip("Debian's chromium and chromium-driver are not installed (make debian-tools)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def served_loop(tiny_env):
    """A backend whose project 1 ran a short loop: 12 rankings, a reward model, a published policy update."""
    env = {**tiny_env, "PPO_STEPS": "4"}
    worker = make_worker(env)
    seed_project(worker.store, annotated=12)
    worker.fit_reward(job("fit_reward"))
    worker.train_policy(job("train_policy"))
    server = make_server("127.0.0.1", 0, create_app(load_settings(env)), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def plotted_points(browser, plot_id: str) -> list[int]:
    return [int(line.get_attribute("data-count"))
            for line in browser.find_elements("css selector", f"#{plot_id} polyline")]


def test_the_status_page_plots_the_loops_real_data_in_chromium(browser, served_loop, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{served_loop}/?project=1")
    WebDriverWait(browser, 30).until(lambda d: d.find_element("tag name", "body").get_attribute("data-loaded") == "true")
    assert plotted_points(browser, "signal-plot") == [12, 12]  # pairs and annotations, one point per pair
    assert plotted_points(browser, "reward-plot") == [1]  # one reward version
    assert plotted_points(browser, "policy-reward-plot") == [4]  # the update's four steps
    assert plotted_points(browser, "policy-kl-plot") == [4]
    verdicts = browser.find_element("id", "verdicts").text
    assert verdicts.startswith("v1: published (ppo, 4/4 steps)")
    assert browser.find_element("id", "model-version").text.startswith("policy-v1.reward-v")
    assert "Previous: policy v0" in browser.find_element("id", "previous").text
    assert "train_policy" in browser.find_element("id", "jobs").text  # fit_reward's trigger queued the next one
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    screenshot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    shutil.copy(screenshot, artifacts / "status-page.png")
