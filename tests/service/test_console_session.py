"""The console's server side: its files are served from the package with a locked-down CSP, and
/console/session names the caller's role (the page in a browser: tests/e2e/test_console.py)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.console import STATIC
from tests.service.conftest import wait_ready
from tests.service.test_api import TOKEN, assert_error, auth, make_settings

READER = "reader-key-0123456789"


@pytest.fixture()
def keyed(tmp_path, tiny_model_dir):
    s = make_settings(tmp_path, tiny_model_dir, api_keys=[{"name": "rita", "key": READER, "role": "read"}])
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        yield c


def test_every_console_file_is_served_with_its_type_and_csp(keyed):
    types = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
    files = sorted(p.name for p in STATIC.iterdir())
    assert {"index.html", "app.js", "api.js", "metrics.js", "plot.js", "console.css"} <= set(files)
    for name in files:
        r = keyed.get(f"/console/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(types[name[name.rindex(".") :]])
        assert r.headers["content-security-policy"].startswith("default-src 'self'")
    assert keyed.get("/console").text == keyed.get("/console/index.html").text
    # the page names no other host: every script and style is its own
    links = re.findall(r'(?:src|href)="([^"]*)"', (STATIC / "index.html").read_text())
    assert "app.js" in links and not [u for u in links if "//" in u or u.startswith("http")]


def test_session_names_the_key_and_its_role(keyed):
    assert keyed.get("/console/session", headers=auth(READER)).json() == {"name": "rita", "role": "read", "open": False}
    assert keyed.get("/console/session", headers=auth(TOKEN)).json()["role"] == "admin"
    assert_error(keyed.get("/console/session"), 401, "unauthorized")
    assert_error(keyed.get("/console/session", headers=auth("no-such-key-at-all")), 401, "unauthorized")


@pytest.mark.parametrize("host,role", [("127.0.0.1", "edit"), ("0.0.0.0", "read")])
def test_an_open_service_signs_in_anonymously_with_what_it_allows(tmp_path, tiny_model_dir, host, role):
    with TestClient(create_app(make_settings(tmp_path, tiny_model_dir, admin_token="", host=host))) as c:
        wait_ready(c)
        assert c.get("/console/session").json() == {"name": None, "role": role, "open": True}
