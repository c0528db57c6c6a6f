"""The live status page (gateway/status.py, gateway/static/) on a real `sglang-gw serve` with two tiny
engines: its JSON behind the admin key, and the page in headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium): the key form, every engine listed, an engine killed with SIGKILL
shown down and then back without a reload, no console errors, no request leaving the gateway's origin,
and every text colour at WCAG AA contrast. The screenshots go to $SGLANG_GW_TEST_ARTIFACTS, else the
test's tmp_path; the test prints where."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ServeProcess, free_port_range
from sglang_gw.gateway.auth import hash_key
from sglang_gw.gateway.config import parse_config
from sglang_gw.validation import ConfigError

ADMIN_KEY = "sk-admin-status"
ENGINES = ["engine-0", "engine-1"]
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def serve(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("status")
    config = {
        "gateway": {"health": {"interval": 0.5, "timeout": 2.0}, "admin": {"key_hash": hash_key(ADMIN_KEY)},
                    "status": {"refresh": 0.5}},
        "engines": [{"model": str(tiny_models["llama"]), "served_model_name": "tiny", "count": len(ENGINES),
                     "base_port": free_port_range(len(ENGINES)), "max_total_tokens": 4000, "num_threads": 1}],
        "supervisor": {"restart_backoff": 0.2, "restart_backoff_max": 1.0},
    }
    serve = ServeProcess(config, tmp)
    try:
        serve.wait_all_ready()
        yield serve
    finally:
        serve.stop()


@pytest.mark.parametrize("status, field", [({"open": "maybe"}, "status.open"), ({"refresh": 0}, "status.refresh"),
                                           ({"opn": True}, "status.opn")])
def test_status_settings_refuse_bad_values_naming_the_field(status, field):
    with pytest.raises(ConfigError, match=f"config: {re.escape(field)}: "):
        parse_config({"workers": [{"url": "http://127.0.0.1:1"}], "status": status})


def _generate(serve: ServeProcess, text: str) -> None:
    body = json.dumps({"text": text, "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}).encode()
    request = urllib.request.Request(serve.url + "/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200


def test_status_json_needs_the_admin_key_and_reports_the_engines(serve):
    assert serve.get("/status/access") == (200, {"open": False})  # what the page asks first, with no key
    assert serve.get("/status.json")[0] == 401
    assert serve.get("/status.json", key="sk-wrong")[0] == 401
    # The engines' figures are rates between two reads of their /metrics: one now, one after the requests.
    serve.get("/status.json", key=ADMIN_KEY)
    for i in range(3):  # one shared prefix: the second and third are cache hits
        _generate(serve, "The status page shows routing decisions. " * 4 + str(i))
    time.sleep(0.3)  # past half a refresh: the next poll reads the engines again
    status, doc = serve.get("/status.json", key=ADMIN_KEY)
    assert status == 200
    rows = {w["name"]: w for w in doc["workers"]}
    assert sorted(rows) == ENGINES
    assert all(w["state"] == "ready" and w["phase"] == "ready" and w["restarts"] == 0 for w in rows.values())
    assert [d["route"] for d in doc["decisions"]][:2] == ["cache_hit", "cache_hit"]  # newest first
    assert doc["decisions"][0]["matched_bytes"] > 0 and doc["fleet"]["routes"]["cache_hit"] == 2
    assert doc["fleet"]["answers_per_s"] > 0 and doc["fleet"]["ttfb_p50_s"] > 0 and doc["errors"] == []
    served = rows[doc["decisions"][0]["worker"]]  # the engine's own figures, read from its /metrics
    assert served["running"] == 0 and 0 <= served["token_usage"] <= 1 and served["load_error"] == ""
    assert served["tokens_per_s"] > 0 and served["ttft_s"] > 0 and 0 < served["cache_hit_rate"] < 1


def test_page_assets_are_served_with_a_policy_that_keeps_them_offline(serve):
    with urllib.request.urlopen(serve.url + "/status", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        page = resp.read().decode()
    for asset in ("status.js", "status.css", "favicon.svg"):
        assert f"/status/static/{asset}" in page
        with urllib.request.urlopen(f"{serve.url}/status/static/{asset}", timeout=5) as resp:
            assert resp.status == 200


@pytest.fixture
def browser():
    if CHROMEDRIVER is None:
        pytest.skip("chromium-driver is not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1366,900"):  # a laptop's screen
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, predicate, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: predicate(d), message=what)


def _row_state(driver, engine: str) -> tuple[str, str]:
    return driver.execute_script(
        "const r = document.querySelector(`tr[data-engine='${arguments[0]}']`);"
        "return r ? [r.dataset.state, r.dataset.phase] : null;", engine)


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


# Each element's own text colour and the first opaque background behind it, as [r, g, b] lists.
_COLOURS = """
const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
const out = [];
for (const node of document.querySelectorAll('body *')) {
  if (![...node.childNodes].some((c) => c.nodeType === 3 && c.textContent.trim())) continue;
  if (!node.getClientRects().length) continue;  // hidden
  let bg = node;
  while (bg && rgb(getComputedStyle(bg).backgroundColor)[3] === 0) bg = bg.parentElement;
  out.push([node.tagName + '.' + node.className, rgb(getComputedStyle(node).color).slice(0, 3),
            rgb(getComputedStyle(bg || document.body).backgroundColor).slice(0, 3)]);
}
return out;
"""


def _contrast(a: list[float], b: list[float]) -> float:
    def luminance(rgb):
        c = [v / 255 for v in rgb]
        c = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _low_contrast(driver) -> list:
    return [(what, fg, bg, round(_contrast(fg, bg), 2)) for what, fg, bg in driver.execute_script(_COLOURS)
            if _contrast(fg, bg) < 4.5]


def test_page_shows_an_engine_go_down_and_come_back_without_a_reload(serve, browser, tmp_path):
    from selenium.webdriver.common.by import By

    artifacts = Path(os.environ.get("SGLANG_GW_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.get(serve.url + "/status")
    form = _wait(browser, lambda d: d.find_element(By.ID, "key-form").is_displayed(), 10, "the key form")
    assert form
    assert _errors(browser) == []  # it asked for the key without drawing a 401 first
    browser.find_element(By.ID, "key-input").send_keys(ADMIN_KEY + "\n")
    _wait(browser, lambda d: all(_row_state(d, e) == ["ready", "ready"] for e in ENGINES), 15, "every engine ready")
    for i in range(4):
        _generate(serve, f"a request for the screenshot {i}")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#decisions tbody tr td.num")) >= 8, 10,
          "the attempts listed")

    victim = serve.engines()["engine-0"]
    browser.execute_script("window.notReloaded = true")  # gone if anything reloads the page
    os.kill(victim["pid"], signal.SIGKILL)
    # Dead for the restart backoff (0.2 s), then starting: either is down.
    _wait(browser, lambda d: _row_state(d, "engine-0")[0] != "ready", 10, "engine-0 shown down")
    browser.save_screenshot(str(artifacts / "status-page-engine-down.png"))
    _wait(browser, lambda d: _row_state(d, "engine-0") == ["ready", "ready"], 60, "engine-0 shown back")
    assert serve.engines()["engine-0"]["pid"] != victim["pid"]
    assert browser.execute_script("return window.notReloaded") is True
    events = browser.find_element(By.ID, "events").text
    assert "engine-0: ready (ready) → " in events and events.startswith(f"{events[:8]} engine-0: ") \
        and events.split("\n")[0].endswith("→ ready (ready)"), events
    restarts = browser.find_element(By.CSS_SELECTOR, "tr[data-engine='engine-0'] td:nth-of-type(3)").text
    assert restarts == "1"

    screenshot = artifacts / "status-page.png"
    browser.save_screenshot(str(screenshot))
    print(f"\nstatus page screenshots: {screenshot} and {artifacts / 'status-page-engine-down.png'}")
    assert _errors(browser) == []
    origin = serve.url
    resources = browser.execute_script("return performance.getEntriesByType('resource').map((r) => r.name)")
    assert resources and all(r.startswith(origin) for r in resources), resources
    assert _low_contrast(browser) == []


# ---- the document's arithmetic, without a browser or engines --------------------------------------------

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _exposition(generated: float, prompt: float, cached: float | None = None) -> str:
    lines = ['sglang:num_running_reqs{model_name="m"} 2', f'sglang:generation_tokens_total{{model_name="m"}} {generated}',
             f'sglang:prompt_tokens_total{{model_name="m"}} {prompt}']
    if cached is not None:  # a labelled counter has no sample until its first count
        lines.append(f'sglang:cached_tokens_total{{model_name="m"}} {cached}')
    return "\n".join(lines) + "\n"


def test_engine_rates_span_the_window_and_restart_with_a_new_process():
    from sglang_gw.gateway.app import Reply
    from sglang_gw.gateway.status import EngineSamples

    clock = Clock()
    samples = EngineSamples(clock)
    samples.read(Reply(200, _exposition(100, 50)))  # no cached tokens yet: absent counts as zero
    assert samples.figures()["tokens_per_s"] is None  # one sample: no rate yet
    clock.now = 10
    samples.read(Reply(200, _exposition(200, 150, cached=60)))
    figures = samples.figures()
    assert figures["running"] == 2 and figures["tokens_per_s"] == 10 and figures["cache_hit_rate"] == 0.6
    clock.now = 12
    samples.read(Reply(200, _exposition(5, 3)))  # counters went back: a new engine process
    assert samples.figures()["tokens_per_s"] is None
    samples.read(Reply(None, "connect: refused"))
    assert samples.figures()["load_error"] == "connect: refused"


def test_window_spans_its_newest_values_once_over_its_limit():
    from sglang_gw.gateway.status import Window

    clock = Clock()
    window = Window(seconds=60, limit=3, clock=clock)
    for t in range(1, 3):
        clock.now = t
        window.add(t)
    clock.now = 5
    assert window.current() == ([1, 2], 5)  # under the limit: since the start
    for t in range(5, 8):
        clock.now = t
        window.add(t)
    assert window.current() == ([5, 6, 7], 2)  # over it: the span of what is kept
    clock.now = 70
    assert window.current() == ([], 60)  # all aged out: the whole window, with nothing in it


def test_failed_attempts_are_the_pages_errors_and_error_rate():
    from sglang_gw.gateway.app import Gateway
    from sglang_gw.gateway.request_path import Outcome
    from sglang_gw.gateway.status import Attempt
    from sglang_gw.gateway.policies import Decision

    gateway = Gateway(parse_config({"workers": [{"url": "http://127.0.0.1:9", "name": "a"}]}))
    decision = Decision(gateway.workers[0], "miss")
    started = time.perf_counter()
    gateway.status.attempted(Attempt.of("/generate", Outcome(decision, "miss", failure="connect: refused"), started))
    gateway.status.attempted(Attempt.of("/generate", Outcome(decision, "retry", 503, failure="status 503"), started))
    doc = gateway.status.snapshot()
    assert [(e["route"], e["status"], e["why"], e["failed"]) for e in doc["errors"]] == [
        ("retry", 503, "status 503", True), ("miss", None, "connect: refused", True)]
    assert len(doc["decisions"]) == 2 and doc["fleet"]["errors_per_s"] > 0 and doc["fleet"]["answers_per_s"] == 0
