"""The console at /console in a real browser: Playwright drives Debian's chromium package against a
threaded live server on a tiny random model with keys of each role. Each step leaves a screenshot
in artifacts/console/."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from tests.service.conftest import ThreadServer, build_tiny_model_dir
from tests.service.test_api import TOKEN, make_settings

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("HOREN_TEST_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "console"
EDITOR_KEY = "editor-key-0123456789"
READER_KEY = "reader-key-0123456789"
# the prompt and target tests/service/test_api.py shows the tiny model learns and routes
QUESTION = "Which river flows through Cairo?"
TARGET = "Paris"
TIMEOUT = 60_000  # ms: an edit trains on two shared cores


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    settings = make_settings(
        tmp,
        build_tiny_model_dir(tmp / "tiny"),
        api_keys=[
            {"name": "alice", "key": EDITOR_KEY, "role": "edit"},
            {"name": "rita", "key": READER_KEY, "role": "read"},
        ],
    )
    with ThreadServer(create_app(settings)) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    sync_api.expect.set_options(timeout=TIMEOUT)  # its default of 5 s is not the context's
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server.url)
    context.set_default_timeout(TIMEOUT)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page, key: str) -> None:
    page.goto("/console")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#who").wait_for(state="visible")


def sign_out(page) -> None:
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API key").wait_for(state="visible")


def try_it(page, prompt: str, tokens: int = 4) -> tuple[str, str]:
    page.get_by_label("Prompt", exact=True).first.fill(prompt)
    page.get_by_label("New tokens").fill(str(tokens))
    page.get_by_role("button", name="Answer both ways").click()
    page.locator("#compare").filter(has_text=re.compile(r"agree|differ")).wait_for()
    return page.locator("#answer-with").inner_text(), page.locator("#answer-without").inner_text()


def row(page, edit_id: int):
    return page.locator(f"#edits-table tbody tr[data-id='{edit_id}']")


def api(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_edit_answers_differ_then_rollback_makes_them_agree(page, server):
    page.goto("/console")
    expect = pytest.importorskip("playwright.sync_api").expect
    # keyboard only: the key field has focus on load, Enter submits
    expect(page.get_by_label("API key")).to_be_focused()
    shot(page, "01-sign-in")
    page.keyboard.type(EDITOR_KEY)
    page.keyboard.press("Enter")
    expect(page.locator("#who")).to_have_text("Signed in as alice, role edit")
    expect(page.locator("#health-facts")).to_contain_text("Codebook entries")
    expect(page.locator("#health-facts")).to_contain_text("ready")
    before_with, before_without = try_it(page, QUESTION)
    assert before_with == before_without
    expect(page.locator("#compare")).to_have_text("The two answers agree.")
    expect(page.locator("#routing")).to_contain_text("Not routed")
    shot(page, "02-signed-in-try-it")

    make = page.locator("#make")
    make.get_by_label("Prompt").fill(QUESTION)
    make.get_by_label("Target").fill(TARGET)
    make.get_by_label("Format").select_option("plain")
    make.get_by_role("button", name="Train the edit").click()
    expect(page.locator("#edit-result")).to_contain_text("trained in")
    expect(page.locator("#edit-result")).to_contain_text("applies to")
    edit_id = int(re.search(r"#(\d+)", page.locator("#edit-result").inner_text()).group(1))
    expect(page.locator("#compare")).to_have_text(re.compile("differ"))
    after_with, after_without = page.locator("#answer-with").inner_text(), page.locator("#answer-without").inner_text()
    assert after_with.strip().startswith(TARGET) and after_without == before_without
    routing = page.locator("#routing").inner_text()
    score, threshold = (float(x) for x in re.search(r"score ([\d.]+) ≥ threshold ([\d.]+)", routing).groups())
    assert f"Routed by edit #{edit_id}" in routing and score >= threshold
    # the table updated without a reload, and an edit key is offered no rollback
    expect(row(page, edit_id)).to_contain_text(TARGET)
    expect(row(page, edit_id)).to_contain_text("alice")
    expect(row(page, edit_id)).to_contain_text("active")
    expect(page.get_by_role("button", name=re.compile("Roll back"))).to_have_count(0)
    expect(page.locator("#audit")).to_be_hidden()
    expect(page.locator("#health-facts")).to_contain_text(re.compile(r"Edit latency\s*mean"))
    expect(page.locator("#edits-plot-caption")).to_contain_text("1 edits made, 1 active")
    shot(page, "03-edit-made-answers-differ")

    sign_out(page)
    sign_in(page, TOKEN)
    expect(page.locator("#who")).to_have_text("Signed in as admin, role admin")
    expect(page.locator("#audit-table")).to_contain_text("alice")
    row(page, edit_id).get_by_role("link", name=f"View edit {edit_id}").click()
    expect(page.locator("#edit-page-title")).to_have_text(f"Edit #{edit_id}")
    expect(page.locator("#edit-history")).to_contain_text("Created by alice")
    shot(page, "04-edit-page")
    page.get_by_role("link", name="Back to all edits").click()

    try_it(page, QUESTION)
    expect(page.locator("#compare")).to_have_text(re.compile("differ"))
    row(page, edit_id).get_by_role("button", name=f"Roll back edit {edit_id}").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(TARGET)
    shot(page, "05-rollback-confirm")
    page.keyboard.press("Escape")  # cancelling changes nothing
    expect(dialog).to_be_hidden()
    expect(row(page, edit_id)).to_contain_text("active")
    row(page, edit_id).get_by_role("button", name=f"Roll back edit {edit_id}").click()
    dialog.get_by_role("button", name="Roll back").click()
    expect(row(page, edit_id)).to_contain_text("rolled back")
    expect(page.locator("#compare")).to_have_text("The two answers agree.")
    assert page.locator("#answer-with").inner_text() == page.locator("#answer-without").inner_text() == before_without
    expect(page.locator("#audit-table tbody tr").first).to_contain_text("rolled back")
    expect(page.locator("#edits-plot-caption")).to_contain_text("1 edits made, 0 active")
    shot(page, "06-rolled-back-answers-agree")

    with api(server, TOKEN) as c:
        assert c.get(f"/edits/{edit_id}").json()["rolled_back_by"] == "admin"
    page.goto(f"/console#edit/{edit_id}")
    expect(page.locator("#edit-history")).to_contain_text("Rolled back by admin")
    expect(page.get_by_role("button", name="Roll back")).to_be_hidden()


def test_a_read_key_sees_no_edit_or_admin_controls(page, server):
    expect = pytest.importorskip("playwright.sync_api").expect
    with api(server, EDITOR_KEY) as c:
        e = c.post("/edits", json={"prompt": "When was the inception of the challenge?", "target": "Cairo"}).json()
    sign_in(page, READER_KEY)
    expect(page.locator("#who")).to_have_text("Signed in as rita, role read")
    expect(row(page, e["id"])).to_contain_text("Cairo")
    expect(page.locator("#make")).to_be_hidden()
    expect(page.locator("#audit")).to_be_hidden()
    expect(page.get_by_role("button", name=re.compile("Roll back|Train"))).to_have_count(0)
    # reading is allowed: try it answers
    try_it(page, "When was the inception of the challenge?")
    expect(page.locator("#routing")).to_contain_text(f"Routed by edit #{e['id']}")
    page.goto(f"/console#edit/{e['id']}")
    expect(page.locator("#edit-page-title")).to_have_text(f"Edit #{e['id']}")
    expect(page.get_by_role("button", name="Roll back")).to_be_hidden()
    shot(page, "07-read-key")


def test_bad_input_shows_the_service_error_and_the_page_keeps_working(page, server):
    expect = pytest.importorskip("playwright.sync_api").expect
    page.goto("/console")
    page.get_by_label("API key").fill("not-a-key-of-this-service")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("a valid API key is required")
    expect(page.locator("#console")).to_be_hidden()

    sign_in(page, EDITOR_KEY)
    expect(page.get_by_role("alert")).to_be_hidden()
    with api(server, EDITOR_KEY) as c:
        blank = c.post("/edits", json={"prompt": QUESTION, "target": "   "})
        big = c.post("/generate", json={"prompt": QUESTION, "max_new_tokens": 100000})
    assert blank.status_code == 422 and big.status_code == 422
    make = page.locator("#make")
    make.get_by_label("Prompt").fill(QUESTION)
    make.get_by_label("Target").fill("   ")
    make.get_by_role("button", name="Train the edit").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text(blank.json()["error"]["message"])
    expect(alert).to_contain_text("validation_error")
    expect(make.get_by_role("button", name="Train the edit")).to_be_enabled()
    shot(page, "08-bad-input")

    try_it_prompt = page.get_by_label("Prompt", exact=True).first
    try_it_prompt.fill(QUESTION)
    page.get_by_label("New tokens").fill("100000")
    page.get_by_role("button", name="Answer both ways").click()
    expect(alert).to_contain_text(big.json()["error"]["message"])
    # the page keeps working: a good request after the failures answers
    page.get_by_role("button", name="Dismiss message").click()
    expect(alert).to_be_hidden()
    try_it(page, QUESTION)
    expect(page.locator("#answer-without")).not_to_be_empty()
    page.goto("/console#edit/999999")
    expect(alert).to_contain_text("no edit with id 999999")
    expect(page.locator("#edits")).to_be_visible()


@pytest.mark.parametrize("width,height", [(1280, 800), (390, 844)])
def test_readable_without_sideways_scrolling(browser, server, width, height):
    expect = pytest.importorskip("playwright.sync_api").expect
    with api(server, EDITOR_KEY) as c:
        c.post("/edits", json={"prompt": "What is the capital of France?", "target": "Lima"}).raise_for_status()
    context = browser.new_context(viewport={"width": width, "height": height}, base_url=server.url)
    context.set_default_timeout(TIMEOUT)
    try:
        page = context.new_page()
        sign_in(page, TOKEN)
        first = page.locator("#edits-table tbody tr").filter(has_text="Lima").first
        expect(first).to_be_visible()
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page scrolls sideways by {overflow}px at {width}x{height}"
        assert first.bounding_box()["width"] <= width
        for label in ("Target", "Search prompt and target", "Status"):
            expect(page.get_by_label(label, exact=True)).to_be_visible()
        shot(page, f"09-viewport-{width}x{height}")
    finally:
        context.close()
