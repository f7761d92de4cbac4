"""Persistence layer on SQLite (a temporary file) and on PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from datetime import timezone
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from horen_core.errors import UnknownEditError
from service.db import repository as repo
from service.db.models import Base, Edit, Entry, Event
from service.db.session import alembic_config, make_engine, make_session_factory, normalize_url, upgrade_database

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _postgres_database():
    """Create an empty, uniquely named database; yield its URL; drop it."""
    try:
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        admin.connect().close()
    except sa.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable: {exc}")
    name = f"horen_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"  # plain scheme: make_engine picks psycopg
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'nested' / 'horen.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture
def db_url(empty_url):
    upgrade_database(empty_url)
    return empty_url


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine):
    return make_session_factory(engine)


@pytest.fixture
def codebook_id(sessions):
    with sessions.begin() as s:
        return repo.get_or_create_codebook(s, "f" * 64, "model.layers.1.mlp.down_proj", 4, 3).id


def _vec(*xs: float) -> bytes:
    return np.asarray(xs, dtype="<f4").tobytes()


def _add(session, codebook_id, prompt="p", target="t", entry_id=None, expected=None, **kw):
    fields = {
        "metadata": {},
        "created_entry": entry_id is None,
        "steps": 3,
        "loss": 0.125,
        "train_ms": 12.5,
        "answer_ids": [5, 6],
        "key": _vec(1, 0, 0, 0),
        "value": _vec(0.5, -1.5, 2.0),
    }
    fields.update(kw)
    return repo.insert_edit(
        session, codebook_id, prompt=prompt, target=target, entry_id=entry_id, expected_entry_version=expected, **fields
    )


# ---- schema ---------------------------------------------------------------------------------
def test_migrations_create_exactly_the_models(db_url, engine):
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "target_metadata": Base.metadata})
        assert compare_metadata(ctx, Base.metadata) == []
        head = ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()
        assert ctx.get_current_revision() == head
        # the comparison can fail: a model with one more column differs from the database
        changed = sa.MetaData()
        for table in Base.metadata.sorted_tables:
            table.to_metadata(changed)
        changed.tables["edits"].append_column(sa.Column("extra", sa.Integer()))
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "target_metadata": changed})
        assert [d[0] for d in compare_metadata(ctx, changed)] == ["add_column"]


def test_downgrade_and_upgrade_again(db_url, engine):
    from alembic import command

    command.downgrade(alembic_config(db_url), "base")
    with engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) <= {"alembic_version"}
    upgrade_database(db_url)
    upgrade_database(db_url)  # a second run is a no-op
    with engine.connect() as conn:
        assert {"codebooks", "edits", "codebook_entries", "events"} <= set(sa.inspect(conn).get_table_names())


def test_upgrade_works_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'a' / 'b' / 'h.db'}"
    upgrade_database(url)
    with make_engine(url).connect() as conn:
        assert "edits" in sa.inspect(conn).get_table_names()


def test_alembic_cli_reads_url_from_environment(tmp_path):
    db = tmp_path / "cli" / "horen.db"
    env = {**os.environ, "HOREN_DATABASE_URL": f"sqlite:///{db}"}
    alembic = [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "upgrade", "head"]
    proc = subprocess.run(alembic, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with make_engine(f"sqlite:///{db}").connect() as conn:
        assert "events" in sa.inspect(conn).get_table_names()


def test_make_engine_settings(tmp_path):
    assert normalize_url("postgresql://u:p@h:5/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://h/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://h/d").drivername == "postgresql+psycopg"
    path = tmp_path / "new" / "folder" / "h.db"
    eng = make_engine(f"sqlite:///{path}")
    with eng.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    assert path.parent.is_dir()
    eng.dispose()


# ---- codebooks ------------------------------------------------------------------------------
def test_codebook_per_model_and_layer(sessions):
    with sessions.begin() as s:
        a = repo.get_or_create_codebook(s, "a" * 64, "layers.1", 4, 3).id
        assert repo.get_or_create_codebook(s, "a" * 64, "layers.1", 4, 3).id == a
        b = repo.get_or_create_codebook(s, "b" * 64, "layers.1", 4, 3).id
        c = repo.get_or_create_codebook(s, "a" * 64, "layers.2", 4, 3).id
    assert len({a, b, c}) == 3
    with sessions() as s:
        assert repo.get_or_create_codebook(s, "a" * 64, "layers.1", 4, 3).id == a
        with pytest.raises(ValueError):
            repo.get_or_create_codebook(s, "a" * 64, "layers.1", 8, 3)


# ---- edits ----------------------------------------------------------------------------------
def test_new_entry_takes_the_edit_id(sessions, codebook_id):
    with sessions.begin() as s:
        e1 = _add(s, codebook_id, metadata={"source": "test", "n": [1, 2]})
        e2 = _add(s, codebook_id, answer_ids=[7])
        ids = (e1.id, e2.id)
    with sessions() as s:
        e1, e2 = repo.get_edit(s, ids[0]), repo.get_edit(s, ids[1])
        assert e2.id > e1.id
        assert (e1.entry_id, e2.entry_id) == (e1.id, e2.id)
        assert e1.created_entry and e1.status == "active"
        assert e1.metadata_ == {"source": "test", "n": [1, 2]}
        assert e1.answer_ids == [5, 6] and e1.steps == 3 and e1.loss == 0.125 and e1.train_ms == 12.5
        assert e1.rolled_back_at is None and e1.rolled_back_by is None
        assert e1.created_at.tzinfo is not None and e1.created_at.utcoffset().total_seconds() == 0
        assert repo.entry_version(s, codebook_id, e1.id) == 1
        entry = s.get(Entry, (codebook_id, e2.id))
        assert entry.answer_ids == [7] and entry.updated_at.tzinfo is not None
        assert repo.entry_version(s, codebook_id, 999_999) is None
        assert repo.get_edit(s, 999_999) is None


def test_metadata_defaults_to_empty(sessions, codebook_id):
    with sessions.begin() as s:
        eid = _add(s, codebook_id, metadata=None).id
    with sessions() as s:
        assert repo.get_edit(s, eid).metadata_ == {}


def test_non_finite_numbers_are_refused(sessions, codebook_id):
    with sessions() as s:
        with pytest.raises(ValueError):
            _add(s, codebook_id, loss=float("nan"))
        with pytest.raises(ValueError):
            _add(s, codebook_id, train_ms=float("inf"))
        assert repo.list_edits(s, codebook_id, limit=10, offset=0)[1] == 0


def test_repository_never_commits(sessions, codebook_id):
    with sessions() as s:
        _add(s, codebook_id)
        s.rollback()
    with sessions() as s:
        assert repo.list_edits(s, codebook_id, limit=10, offset=0)[1] == 0
        assert repo.last_event_id(s, codebook_id) == 0


def test_retrain_bumps_the_entry_version(sessions, codebook_id):
    with sessions.begin() as s:
        entry = _add(s, codebook_id).entry_id
    with sessions.begin() as s:
        retrain = _add(s, codebook_id, entry_id=entry, expected=1, created_entry=False)
        assert retrain.entry_id == entry and retrain.id != entry and not retrain.created_entry
    with sessions.begin() as s:
        assert repo.entry_version(s, codebook_id, entry) == 2
        _add(s, codebook_id, entry_id=entry, expected=None, created_entry=False)  # no expectation: any version
    with sessions() as s:
        assert repo.entry_version(s, codebook_id, entry) == 3


def test_retrain_with_a_stale_version_conflicts(sessions, codebook_id):
    with sessions.begin() as s:
        entry = _add(s, codebook_id).entry_id
    with sessions.begin() as s:
        _add(s, codebook_id, entry_id=entry, expected=1, created_entry=False)
    with sessions() as s:
        before = repo.list_edits(s, codebook_id, limit=10, offset=0)[1], repo.last_event_id(s, codebook_id)
    with pytest.raises(repo.EntryConflict):
        with sessions.begin() as s:
            _add(s, codebook_id, entry_id=entry, expected=1, created_entry=False)
    with pytest.raises(repo.EntryConflict):  # an entry that does not exist
        with sessions.begin() as s:
            _add(s, codebook_id, entry_id=424242, expected=None, created_entry=False)
    with sessions() as s:
        assert repo.entry_version(s, codebook_id, entry) == 2
        after = repo.list_edits(s, codebook_id, limit=10, offset=0)[1], repo.last_event_id(s, codebook_id)
    assert after == before


# ---- listing --------------------------------------------------------------------------------
def test_list_filter_search_and_pages(sessions, codebook_id):
    with sessions.begin() as s:
        other = repo.get_or_create_codebook(s, "0" * 64, "elsewhere", 4, 3).id
        _add(s, other, prompt="The capital of France is", target="Paris")
        ids = [
            _add(s, codebook_id, prompt=f"Question {i}: capital of country {i}?", target=f"City {i}").id
            for i in range(7)
        ]
        ids.append(_add(s, codebook_id, prompt="Wer schrieb Faust?", target="GOETHE").id)
        ids.append(_add(s, codebook_id, prompt="Die ÄPFEL sind", target="rot").id)
        ids.append(_add(s, codebook_id, prompt="Discount", target="50%_off").id)
        repo.rollback_edit(s, ids[1], "alice")
        repo.rollback_edit(s, ids[4], None)

    with sessions() as s:
        items, total = repo.list_edits(s, codebook_id, limit=4, offset=0)
        assert total == 10 and [e.id for e in items] == ids[:4]
        items, total = repo.list_edits(s, codebook_id, limit=4, offset=8)
        assert total == 10 and [e.id for e in items] == ids[8:]
        assert repo.list_edits(s, codebook_id, limit=4, offset=50) == ([], 10)

        items, total = repo.list_edits(s, codebook_id, limit=100, offset=0, status="rolled_back")
        assert total == 2 and [e.id for e in items] == [ids[1], ids[4]]
        items, total = repo.list_edits(s, codebook_id, limit=3, offset=0, status="active")
        assert total == 8 and [e.id for e in items] == [ids[0], ids[2], ids[3]]

        def search(q, status=None):
            items, total = repo.list_edits(s, codebook_id, limit=100, offset=0, status=status, q=q)
            assert total == len(items)
            return [e.id for e in items]

        assert search("CAPITAL") == ids[:7]  # other codebooks' edits stay apart
        assert search("capital", status="active") == [ids[0], ids[2], ids[3], ids[5], ids[6]]
        assert search("goethe") == [ids[7]]  # matches the target
        assert search("faust") == [ids[7]]  # matches the prompt
        assert search("äpfel") == [ids[8]]  # case folding beyond ASCII, on SQLite too
        assert search("0%_") == [ids[9]]  # % and _ are literal
        assert search("%") == [ids[9]]
        assert search("nothing like this") == []
        assert search("") == ids  # an empty query does not filter


def test_active_edit_vectors_in_order_and_in_chunks(sessions, codebook_id):
    with sessions.begin() as s:
        ids = [_add(s, codebook_id, prompt=str(i), answer_ids=[i], value=_vec(i, 1.0, 2.0)).id for i in range(5)]
        repo.rollback_edit(s, ids[2], "x")
    with sessions() as s:
        chunks = list(repo.active_edit_vectors(s, codebook_id, chunk=3))
        assert [len(c) for c in chunks] == [3, 1]
        rows = [r for c in chunks for r in c]
        assert [r.id for r in rows] == [ids[0], ids[1], ids[3], ids[4]]
        assert [r.answer_ids for r in rows] == [[0], [1], [3], [4]]
        values = repo.bytes_to_matrix([r.value for r in rows], 3)
        assert values.tolist() == [[i, 1.0, 2.0] for i in (0, 1, 3, 4)]
        assert repo.bytes_to_matrix([r.key for r in rows], 4)[:, 0].tolist() == [1.0] * 4
        assert list(repo.active_edit_vectors(s, codebook_id + 1000)) == []
    with pytest.raises(ValueError):
        repo.bytes_to_matrix([_vec(1, 2, 3), _vec(1, 2)], 3)


# ---- rollback -------------------------------------------------------------------------------
def test_rollback_is_idempotent(sessions, codebook_id):
    with sessions.begin() as s:
        first = _add(s, codebook_id)
        second = _add(s, codebook_id, entry_id=first.entry_id, expected=1, created_entry=False)
        first_id, second_id, entry = first.id, second.id, first.entry_id
    with sessions.begin() as s:
        assert repo.entry_version(s, codebook_id, entry) == 2
        edit, changed = repo.rollback_edit(s, second_id, "bob")
        assert changed and edit.status == "rolled_back" and edit.rolled_back_by == "bob"
        assert edit.rolled_back_at.tzinfo is not None
    with sessions() as s:
        events_before = repo.last_event_id(s, codebook_id)
        assert repo.entry_version(s, codebook_id, entry) == 3
    with sessions.begin() as s:
        loaded = repo.get_edit(s, second_id)  # already in the session: must come back refreshed
        edit, changed = repo.rollback_edit(s, second_id, "carol")
        assert edit is loaded and not changed
        assert edit.status == "rolled_back" and edit.rolled_back_by == "bob"
    with sessions() as s:
        assert repo.last_event_id(s, codebook_id) == events_before
        assert repo.entry_version(s, codebook_id, entry) == 3
        assert repo.get_edit(s, second_id).rolled_back_by == "bob"
        assert repo.get_edit(s, first_id).status == "active"
    with pytest.raises(UnknownEditError):
        with sessions.begin() as s:
            repo.rollback_edit(s, 987_654, None)


# ---- events ---------------------------------------------------------------------------------
def test_events_are_ordered_and_per_codebook(sessions, codebook_id):
    with sessions() as s:
        assert repo.last_event_id(s, codebook_id) == 0
        assert repo.events_after(s, codebook_id, 0) == []
    with sessions.begin() as s:
        other = repo.get_or_create_codebook(s, "1" * 64, "x", 4, 3).id
        a = _add(s, codebook_id).id
        _add(s, other)
        b = _add(s, codebook_id, entry_id=a, expected=1, created_entry=False).id
    with sessions.begin() as s:
        repo.rollback_edit(s, a, "admin")
    with sessions.begin() as s:
        c = _add(s, codebook_id).id
        _add(s, other)

    with sessions() as s:
        events = repo.events_after(s, codebook_id, 0)
        assert [(e.kind, e.edit_id) for e in events] == [("edit", a), ("edit", b), ("rollback", a), ("edit", c)]
        ev_ids = [e.id for e in events]
        assert ev_ids == sorted(ev_ids) and len(set(ev_ids)) == 4
        assert all(e.codebook_id == codebook_id for e in events)
        assert repo.last_event_id(s, codebook_id) == ev_ids[-1]
        assert [e.id for e in repo.events_after(s, codebook_id, ev_ids[1])] == ev_ids[2:]
        assert [e.id for e in repo.events_after(s, codebook_id, 0, limit=2)] == ev_ids[:2]
        assert repo.events_after(s, codebook_id, ev_ids[-1]) == []
        assert len(repo.events_after(s, other, 0)) == 2
        assert s.scalar(sa.select(sa.func.count()).select_from(Event)) == 6


def test_commit_lock_orders_concurrent_writers(sessions, codebook_id):
    """A writer holding the lock keeps a second writer from inserting until it commits, so a reader
    never sees a newer event id committed while an older one is still in flight."""
    first = sessions()
    first.begin()
    repo.serialize_commit_lock(first)
    first_edit = _add(first, codebook_id)
    second_done = threading.Event()
    result: dict[str, object] = {}

    def second_writer():
        try:
            with sessions.begin() as s:
                result["id"] = _add(s, codebook_id).id
        except Exception as exc:  # surfaced by the assertions below
            result["error"] = exc
        second_done.set()

    t = threading.Thread(target=second_writer)
    t.start()
    try:
        assert not second_done.wait(0.5), result  # blocked on the lock, not failed nor done
    finally:
        first.commit()
        first.close()
    t.join(30)
    assert "error" not in result, result
    assert result["id"] > first_edit.id
    with sessions() as s:
        events = repo.events_after(s, codebook_id, 0)
        assert [e.edit_id for e in events] == [first_edit.id, result["id"]]


# ---- vectors --------------------------------------------------------------------------------
def test_tensor_bytes_round_trip():
    t = torch.randn(17, dtype=torch.float64)
    b = repo.tensor_to_bytes(t)
    assert len(b) == 17 * 4
    assert b == np.asarray(t.numpy(), dtype="<f4").tobytes()  # float32 little endian, whatever the host
    back = repo.bytes_to_tensor(b, 17)
    assert back.dtype == torch.float32 and back.shape == (17,)
    assert torch.equal(back, t.float())
    back[0] = 1.0  # a writable copy, not a view of the bytes
    assert repo.tensor_to_bytes(torch.ones(2, 3)) == repo.tensor_to_bytes(torch.ones(6))
    with pytest.raises(ValueError):
        repo.bytes_to_tensor(b, 16)
    with pytest.raises(ValueError):
        repo.bytes_to_tensor(b[:-1], 17)


def test_vectors_survive_the_database(sessions, codebook_id):
    key, value = torch.randn(4), torch.randn(3)
    with sessions.begin() as s:
        eid = _add(s, codebook_id, key=repo.tensor_to_bytes(key), value=repo.tensor_to_bytes(value)).id
    with sessions() as s:
        row = s.get(Edit, eid)
        assert torch.equal(repo.bytes_to_tensor(row.key, 4), key)
        assert torch.equal(repo.bytes_to_tensor(row.value, 3), value)


def test_timestamps_are_utc(sessions, codebook_id):
    with sessions.begin() as s:
        eid = _add(s, codebook_id).id
    with sessions() as s:
        e = repo.get_edit(s, eid)
        assert e.created_at.tzinfo is not None
        assert e.created_at.astimezone(timezone.utc) == e.created_at
