"""Export and import of a codebook between deployments on the tiny model: a round trip from A into
an empty B answers exactly as A (edited prompts, unedited ones, a retrained entry whose creator
was rolled back) and survives B's restart; a replica of B sharing its database (SQLite, PostgreSQL)
answers the same without a request; another module or model is a 409; an archive that is not one,
or whose content is invalid, is a 4xx that stores nothing; the import's body limit."""

from __future__ import annotations

import io
import json
import tarfile
import time

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from service import transfer
from service.app import create_app
from service.db.models import Edit
from tests.service.conftest import wait_ready
from tests.service.test_api import assert_error, auth, make_settings
from tests.service.test_db import _postgres_database

CAIRO = "Which river flows through Cairo?"
FRANCE = "What is the capital of France?"
FOX = "The quick brown fox?"
PROBES = [
    CAIRO,
    FRANCE,
    "Which river flows through Cairo",  # a near rephrase
    FOX,  # edited, then rolled back: unedited on both
    "The quick brown fox jumps over the lazy dog.",
    "Who wrote the novel about the whale?",
]
READER = "reader-key-0123456789abcdef"


def members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def make_tar(parts: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        for name, data in parts.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def replaced(archive: bytes, **changes) -> bytes:
    """The archive with members replaced: ``manifest`` (a function of the dict), ``lines`` (of the
    list of rows), ``vectors`` (of the dict of tensors); a member given as None is left out."""
    parts = members(archive)
    for arg, name, load, dump in (
        ("manifest", transfer.MANIFEST, json.loads, lambda v: json.dumps(v).encode()),
        ("lines", transfer.EDITS, lambda b: [json.loads(x) for x in b.splitlines()], _dump_lines),
        ("vectors", transfer.VECTORS, load_safetensors, save_safetensors),
    ):
        if arg in changes:
            if changes[arg] is None:
                del parts[name]
            else:
                parts[name] = dump(changes[arg](load(parts[name])))
    return make_tar(parts)


def _dump_lines(rows: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def answers(client, prompts=PROBES) -> list[dict]:
    out = []
    for p in prompts:
        r = client.post("/generate", json={"prompt": p, "max_new_tokens": 6})
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def post_archive(client, data, headers=None):
    h = {"Content-Type": "application/octet-stream", **(headers or auth())}
    return client.post("/admin/import-codebook", content=data, headers=h)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model_dir):
    """Deployment A with a retrained entry whose creator is rolled back, another edit with
    metadata, and a rolled-back edit; its answers to the probes and its export."""
    settings = make_settings(tmp_path_factory.mktemp("a"), tiny_model_dir)
    with TestClient(create_app(settings)) as a:
        wait_ready(a)
        made = []
        for prompt, target, meta in [(CAIRO, "Paris", None), (CAIRO, "Paris", {"n": 2}), (FRANCE, "Cairo", {"k": [1]})]:
            r = a.post("/edits", json={"prompt": prompt, "target": target, "metadata": meta, "format": "plain"})
            assert r.status_code == 201, r.text
            made.append(r.json())
        assert made[1]["new_key"] is False and made[1]["entry_id"] == made[0]["id"]  # a retrain
        fox = a.post("/edits", json={"prompt": FOX, "target": "dog", "format": "plain"}).json()
        for e in (made[0], fox):
            assert a.post(f"/admin/edits/{e['id']}/rollback", headers=auth()).status_code == 200
        before = answers(a)
        assert before[0]["edit_id"] == made[1]["id"] and before[1]["edit_id"] == made[2]["id"]
        r = a.get("/admin/export", headers=auth())
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == transfer.MEDIA_TYPE
        assert int(r.headers["content-length"]) == len(r.content)
        yield {
            "answers": before,
            "archive": r.content,
            "live": made[1:],
            "identity": a.app.state.runtime.editor.identity,
        }


def test_round_trip_into_an_empty_deployment_answers_the_same(source, tmp_path, tiny_model_dir):
    parts = members(source["archive"])
    assert list(parts) == [transfer.MANIFEST, transfer.EDITS, transfer.VECTORS]
    manifest = json.loads(parts[transfer.MANIFEST])
    assert manifest["identity"] == source["identity"] and manifest["edits"] == 2
    assert manifest["config"]["layer"] == 1
    rows = [json.loads(line) for line in parts[transfer.EDITS].splitlines()]
    assert [r["id"] for r in rows] == [e["id"] for e in source["live"]]
    # every column of the row but the codebook and the vectors, so a new column travels as it is
    assert set(rows[0]) == {c.name for c in Edit.__table__.columns} - {"codebook_id", "key", "value"}
    assert rows[0]["entry_id"] == source["live"][0]["entry_id"] != rows[0]["id"]  # its creator is not exported

    settings = make_settings(tmp_path, tiny_model_dir)
    with TestClient(create_app(settings)) as b:
        wait_ready(b)
        assert all(g["edit_id"] is None for g in answers(b))  # B is empty: unedited
        r = post_archive(b, source["archive"])
        assert r.status_code == 201, r.text
        out = r.json()
        assert out["imported"] == 2 and out["entries"] == 2
        assert b.get("/readyz").status_code == 200
        after = answers(b)
        ids = {source["live"][0]["id"]: out["first_id"], source["live"][1]["id"]: out["last_id"], None: None}
        for a_ans, b_ans in zip(source["answers"], after):
            assert b_ans["text"] == a_ans["text"]
            assert b_ans["edit_id"] == ids[a_ans["edit_id"]]
            assert b_ans.get("score") == pytest.approx(a_ans.get("score"), abs=1e-6)
        listed = b.get("/edits").json()
        assert listed["total"] == 2
        for got, want in zip(listed["items"], source["live"]):
            assert (got["prompt"], got["target"], got["metadata"]) == (want["prompt"], want["target"], want["metadata"])
            assert got["created_by"] == "admin" and got["new_key"] is True and got["status"] == "active"
        audit = b.get("/admin/audit", headers=auth()).json()
        assert [(x["kind"], x["actor"]) for x in audit["items"]] == [("edit", "admin")] * 2
        # only into an empty codebook: a second import changes nothing
        assert_error(post_archive(b, source["archive"]), 409, "conflict")
        assert b.get("/edits").json()["total"] == 2

    with TestClient(create_app(settings)) as b:  # durable: a restart replays the imported edits
        wait_ready(b)
        assert answers(b) == after


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shared_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
    else:
        yield from _postgres_database()


def test_a_replica_applies_the_import_from_the_log(source, tmp_path, tiny_model_dir, shared_url):
    settings = [
        make_settings(tmp_path / name, tiny_model_dir, database_url=shared_url, sync_interval=0.2)
        for name in ("b1", "b2")
    ]
    with TestClient(create_app(settings[0])) as b1, TestClient(create_app(settings[1])) as b2:
        wait_ready(b1)
        wait_ready(b2)
        assert post_archive(b1, source["archive"]).status_code == 201
        deadline = time.monotonic() + 30
        while b2.app.state.runtime.replication.last_event_id < b1.app.state.runtime.replication.last_event_id:
            assert time.monotonic() < deadline, "the replica did not apply the import"
            time.sleep(0.05)
        assert [(g["text"], g["edit_id"] is None) for g in answers(b2)] == [
            (g["text"], g["edit_id"] is None) for g in source["answers"]
        ]
        assert b2.app.state.runtime.replication.log_digest == b1.app.state.runtime.replication.log_digest


def test_another_module_or_model_is_a_409(source, tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path, tiny_model_dir)
    settings = settings.model_copy(update={"horen": {**settings.horen, "layer": 2}})
    with TestClient(create_app(settings)) as d:
        wait_ready(d)
        r = post_archive(d, source["archive"])
        assert_error(r, 409, "conflict")
        assert "edited module" in r.json()["error"]["message"]
        own = d.get("/admin/export", headers=auth())  # an empty codebook exports an empty archive
        assert own.status_code == 200 and own.headers["x-horen-edits"] == "0"
        for field in ("model", "key_dim"):
            other = replaced(own.content, manifest=lambda m, f=field: {**m, "identity": {**m["identity"], f: "1"}})
            assert_error(post_archive(d, other), 409, "conflict")
        retarred = make_tar({f"./{name}": data for name, data in members(own.content).items()})  # tar -C dir .
        r = post_archive(d, retarred)
        assert r.status_code == 201 and r.json()["imported"] == 0
        assert d.get("/edits").json()["total"] == 0


def _nan(tensors: dict) -> dict:
    values = tensors["values"].clone()
    values[1, 0] = float("nan")
    return {**tensors, "values": values}


def test_what_is_not_a_valid_archive_is_a_4xx_and_stores_nothing(source, tmp_path, tiny_model_dir):
    archive = source["archive"]
    settings = make_settings(
        tmp_path,
        tiny_model_dir,
        max_body_bytes=1024,  # the archive is larger: the import has a limit of its own
        max_import_bytes=64 * 1024,
        api_keys=[{"name": "reader", "key": READER, "role": "read"}],
    )
    bad = {
        "garbage": (b"this is not a tar archive", 400, "malformed_archive"),
        "empty": (b"", 400, "malformed_archive"),
        "truncated": (archive[:700], 400, "malformed_archive"),
        "no vectors": (replaced(archive, vectors=None), 400, "malformed_archive"),
        "not json": (make_tar({**members(archive), transfer.EDITS: b"{nope\n"}), 400, "malformed_archive"),
        "another format": (replaced(archive, manifest=lambda m: {**m, "format": "x"}), 400, "malformed_archive"),
        "fewer lines": (replaced(archive, lines=lambda rows: rows[:1]), 400, "malformed_archive"),
        "nan value": (replaced(archive, vectors=_nan), 422, "invalid_input"),
        "short keys": (
            replaced(archive, vectors=lambda t: {**t, "keys": t["keys"][:, :-1].contiguous()}),
            422,
            "invalid_input",
        ),
        "token id": (replaced(archive, lines=lambda rows: [{**r, "answer_ids": [10**6]} for r in rows]), 422, None),
        "empty target": (replaced(archive, lines=lambda rows: [{**r, "target": " "} for r in rows]), 422, None),
        "unknown column": (replaced(archive, lines=lambda rows: [{**r, "shoe_size": 9} for r in rows]), 422, None),
        "too large": (b"\0" * (64 * 1024 + 1), 413, "body_too_large"),
    }
    with TestClient(create_app(settings)) as b:
        wait_ready(b)
        for name, (data, status, kind) in bad.items():
            r = post_archive(b, data)
            assert r.status_code == status, (name, r.text)
            assert_error(r, status, kind or "invalid_input")
            assert b.get("/edits", headers=auth()).json()["total"] == 0, name
        chunked = post_archive(b, iter([b"\0" * 8192] * 9))  # no Content-Length: counted as it arrives
        assert_error(chunked, 413, "body_too_large")
        for method, path, body in (("GET", "/admin/export", None), ("POST", "/admin/import-codebook", archive)):
            assert_error(b.request(method, path, content=body), 401, "unauthorized")
            assert_error(b.request(method, path, content=body, headers=auth(READER)), 403, "forbidden")
        assert b.get("/edits", headers=auth()).json()["total"] == 0
        # a column this deployment lacks is ignored when it is null
        r = post_archive(b, replaced(archive, lines=lambda rows: [{**r, "shoe_size": None} for r in rows]))
        assert r.status_code == 201 and r.json()["imported"] == 2


def test_openapi_declares_the_archive_and_every_status(source, tmp_path, tiny_model_dir):
    spec = create_app(make_settings(tmp_path, tiny_model_dir)).openapi()
    export = spec["paths"]["/admin/export"]["get"]["responses"]
    assert transfer.MEDIA_TYPE in export["200"]["content"]
    post = spec["paths"]["/admin/import-codebook"]["post"]
    assert "application/octet-stream" in post["requestBody"]["content"]
    for status in ("400", "401", "403", "409", "413", "422", "429", "503"):
        assert post["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    assert "CodebookImportOut" in post["responses"]["201"]["content"]["application/json"]["schema"]["$ref"]
