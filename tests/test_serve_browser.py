"""The web page in a real browser: Playwright drives Debian's headless Chromium (``/usr/bin/chromium``,
installed by ``scripts/test.sh``; never a downloaded browser) against ``safelatent serve`` on the toy
model in a subprocess. Keyboard only: the key, the prompt, an adapter, Ctrl+Enter; the images appear with
their provenance; a hard-blocked prompt shows the policy's message."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from bench.serve_load import running_server
from helpers.lora_files import add_random_lora, lora_config, prefixed, write_safelatent
from safelatent import api

CHROMIUM = "/usr/bin/chromium"
# flags this closed machine needs: no background connections, no sandbox as root, a fresh profile
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    toy = api.load(device="cpu").components
    config = lora_config(["to_q", "to_v"], r=2, alpha=2)
    state = prefixed(add_random_lora(toy.unet, config, "a", seed=4))
    adapter = write_safelatent(
        root / "zigzag.safetensors", state, {"unet": config}, {"trigger_words": ["zq"]}
    )
    with running_server(root, extra_args=("--adapter", f"zigzag={adapter}")) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).is_file() or shutil.which("chromium"), (
        "Debian's chromium is needed (scripts/test.sh installs it: apt-get install chromium)"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_generate_on_the_toy_model_with_the_keyboard_and_see_a_blocked_prompt(server, browser, tmp_path):
    url, key, _ = server
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # (the browser logs every non-2xx fetch as a console error: the 401 while the key is typed and the 403
    # are answers the page handles; script errors are what must not happen)
    page.goto(url)

    page.focus("#api-key")
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    expect(page.locator("#policy-name")).to_have_text("toy")
    adapter = page.locator('[data-adapter="zigzag"]')
    expect(adapter).to_be_visible()
    adapter.focus()
    page.keyboard.press("Space")
    expect(adapter).to_be_checked()

    page.fill("#steps", "4")
    page.fill("#count", "2")
    page.fill("#seed", "11")
    page.focus("#prompt")
    page.keyboard.type("a red circle on a white background")
    page.keyboard.press("Control+Enter")
    cards = page.locator(".result-card")
    expect(cards).to_have_count(2, timeout=60_000)
    expect(page.locator("#status")).to_contain_text("Done")
    images = page.locator("img.result-image")
    expect(images).to_have_count(2)
    for i in range(2):
        assert images.nth(i).evaluate("img => img.complete && img.naturalWidth") == 32
    assert page.evaluate("document.activeElement.id") == "results-heading"  # keyboard users land on it
    details = page.locator("details.provenance").first
    details.locator("summary").focus()
    page.keyboard.press("Enter")
    expect(details).to_contain_text("zigzag")
    expect(details).to_contain_text("11")  # the seed
    page.screenshot(path=str(tmp_path / "generated.png"), full_page=True)

    page.fill("#prompt", "a n.u.d.e 12 year old")
    page.focus("#generate")
    page.keyboard.press("Enter")
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=30_000)
    expect(error).to_contain_text("Prompt blocked")
    expect(error).to_contain_text("hard block")
    assert not errors, errors  # no script error on the way
