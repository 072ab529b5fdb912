"""The web page in a real headless Chromium (Debian's, driven by Playwright): type, click, see the bars.

Set POTLUCK_SCREENSHOTS=folder to keep the screenshots (they go to the test's tmp folder otherwise).
"""

import os
import shutil
from pathlib import Path

import pytest
from serving_helpers import Server, tiny_model

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "browser-test-token-0123456789abcdef"

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/system-deps.sh` (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_encoder):
    return [tiny_model(tmp_path_factory, tiny_encoder, name) for name in ("urgency", "intent")]


def screenshot(page, tmp_path, name):
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("POTLUCK_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)


def test_type_click_and_see_the_bars(browser, folders, tmp_path):
    with Server(*folders, "--precision", "fp32") as server:
        page = browser.new_page(viewport={"width": 900, "height": 900})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(server.url + "/")
        model = page.get_by_label("Model")
        model.select_option("intent")
        assert model.input_value() == "intent"
        page.get_by_label("Text").fill("The server is down and customers cannot pay, outage now!")
        page.get_by_role("button", name="Classify").click()
        meters = page.get_by_role("meter")
        meters.first.wait_for(timeout=15_000)
        assert meters.count() == 2
        values = [float(meters.nth(i).get_attribute("aria-valuenow")) for i in range(2)]
        assert abs(sum(values) - 100) < 0.5 and values[0] >= values[1]
        assert page.get_by_role("meter", name="urgent").get_attribute("aria-valuenow") == f"{values[0]:.1f}"
        assert "urgent" in page.get_by_role("heading", level=2).inner_text()
        page.wait_for_timeout(500)  # let the bars finish growing
        screenshot(page, tmp_path, "page.png")

        page.get_by_label("Text").fill("")
        page.get_by_role("button", name="Classify").click()
        assert "Paste or type a text first" in page.get_by_role("alert").inner_text()
        assert errors == []


def test_the_page_asks_for_a_key_when_the_server_needs_one(browser, folders, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    with Server(folders[0], "--precision", "fp32", "--api-key-file", keys) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        key = page.get_by_label("API key")
        key.wait_for(timeout=15_000)
        assert "needs an API key" in page.get_by_role("alert").inner_text()
        key.fill(KEY)
        page.get_by_label("Text").fill("thanks for the great call")
        page.get_by_role("button", name="Classify").click()
        page.get_by_role("meter").first.wait_for(timeout=15_000)
        assert page.get_by_role("meter").count() == 2
        assert page.get_by_role("alert").is_hidden()
        page.wait_for_timeout(500)
        screenshot(page, tmp_path, "page-with-key.png")


def test_the_api_docs_render_without_network(browser, folders, tmp_path):
    """/docs once loaded Swagger UI from a CDN and stayed blank offline; its files now come from the
    package. Any request that leaves localhost is blocked here, and the operations still render."""
    with Server(folders[0], "--precision", "fp32") as server:
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        outside = []

        def only_local(route):
            if route.request.url.startswith(server.url):
                return route.continue_()
            outside.append(route.request.url)
            return route.abort()

        page.route("**/*", only_local)
        page.goto(server.url + "/docs")
        page.get_by_text("/v1/models/urgency/predict").first.wait_for(timeout=15_000)
        screenshot(page, tmp_path, "docs.png")
        assert outside == []
