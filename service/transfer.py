"""Moving a codebook between deployments of one model and edited module: an archive of the active
edits (``GET /admin/export``) that another deployment loads untrained (``POST /admin/import-codebook``).

The archive is an uncompressed tar of three members, in this order:

- ``manifest.json``: ``{"format": "horen-codebook", "version": 1, "identity": HorenEditor.identity,
  "edits": n, "exported_at", "columns", "config"}``; an import refuses another identity (model
  fingerprint, edited module, key and value dimensions). ``config`` (the source's HorenConfig) is
  for whoever reads the archive: routing settings are the importing deployment's own.
- ``edits.jsonl``: one JSON object per active edit in id order, every column of its ``edits`` row
  by column name except the codebook's id and the binary columns, so that a column added to the
  table travels without code here; ``gate`` is the edit's relation vector as a list of floats (or null),
  ``trail`` a long-form edit's values at its answer's tokens as a list of rows of floats (or null).
- ``vectors.safetensors``: ``keys`` [n, key_dim] and ``values`` [n, value_dim], float32; row i is the
  edit of line i (its own query and trained value, what a restart replays).

An import commits every edit of the archive in one transaction, the way an edit commits (an edit
row, its entry and an "edit" event each, under the commit lock, then a NOTIFY), into a codebook that
must have no active edit; the engines of this deployment and of its replicas then apply them from
the event log as they apply another replica's edits. The archive's entry ids are mapped to this
deployment's: the first edit of an entry creates one, later edits of it retrain it, so the codebook
equals the source's after a restart. The imported edits are new edits here: new ids, made now by the
importing key; the source's ids, times and actors stay in the archive.

Knows nothing of HTTP: raises the errors below (and ``InvalidInputError`` for content that parses
but is invalid), which the API maps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import JSON, LargeBinary, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from horen_core.errors import InvalidInputError
from service.api.schemas import MAX_ID, MAX_PROMPT_CHARS, MAX_TARGET_CHARS, TEXT, valid_unicode
from service.db import repository as repo
from service.db.models import EDIT_ACTIVE, Edit
from service.replication import notify

FORMAT = "horen-codebook"
VERSION = 1
MANIFEST, EDITS, VECTORS = "manifest.json", "edits.jsonl", "vectors.safetensors"
MEDIA_TYPE = "application/x-tar"
CHUNK_ROWS = 4096  # vectors read and checked this many rows at a time
_COPY = 1 << 20
_MAX_MANIFEST_BYTES = 1 << 20
_MAX_MEMBERS = 16  # an archive has three; a tar of many tiny members is not one of ours

# columns an import sets itself (or from the vectors), whatever the archive says
_SET_BY_IMPORT = {
    "id",
    "codebook_id",
    "status",
    "created_at",
    "rolled_back_at",
    "rolled_back_by",
    "created_by",
    "entry_id",
    "created_entry",
    "key",
    "value",
}
_GATE_DIM = 4096  # longest relation vector an archive may carry
# columns passed to repository.insert_edit (validated by ArchivedEdit)
_INSERTED = {"prompt", "target", "metadata", "steps", "loss", "train_ms", "answer_ids", "gate", "trail"}


class MalformedArchiveError(Exception):
    """The body is not a codebook archive: not a tar, a member missing, unreadable JSON or safetensors."""


class IdentityMismatchError(Exception):
    """The archive was exported from another model, edited module or dimensions."""


class CodebookNotEmptyError(Exception):
    """An import into a codebook that already has active edits."""


class ArchivedEdit(BaseModel):
    """One line of ``edits.jsonl``: the fields an import needs, checked as POST /edits checks them;
    every other column of the row is kept in ``model_extra``."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=TEXT)
    target: str = Field(min_length=1, max_length=MAX_TARGET_CHARS, pattern=TEXT)
    metadata: dict[str, Any] | None = None
    entry_id: int = Field(ge=1, le=MAX_ID)  # the source's; edits sharing one share an entry here
    answer_ids: list[int] = Field(min_length=1, max_length=2000)
    steps: int = Field(default=0, ge=0, le=MAX_ID)
    loss: float = Field(default=0.0, allow_inf_nan=False)
    train_ms: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    gate: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(default=None, max_length=_GATE_DIM)
    # one row per answer token but the last (its length is checked against value_dim on import)
    trail: list[list[Annotated[float, Field(allow_inf_nan=False)]]] | None = Field(default=None, max_length=2000)

    _check = field_validator("prompt", "target")(valid_unicode)


# ---- columns ----------------------------------------------------------------------------------
def _edit_columns() -> list[tuple[str, Any]]:
    """(attribute name, column) of every column of ``edits``, in table order."""
    return [(attr.key, attr.columns[0]) for attr in inspect(Edit).column_attrs]


def exported_columns() -> list[str]:
    """The columns ``edits.jsonl`` carries: all but the codebook's id and the binary ones (the vectors)."""
    return [c.name for _, c in _edit_columns() if c.name != "codebook_id" and not isinstance(c.type, LargeBinary)]


def _jsonable(v: Any) -> Any:
    return v.isoformat() if isinstance(v, datetime) else v


# ---- export -----------------------------------------------------------------------------------
@dataclass
class ExportArchive:
    """An archive written to temporary files, ready to stream: ``size`` bytes from ``chunks()``."""

    edits: int
    size: int
    filename: str
    _members: list[tuple[str, list[bytes | IO[bytes]]]] = field(repr=False)
    _files: list[IO[bytes]] = field(repr=False)
    _mtime: int = 0

    def chunks(self) -> Iterator[bytes]:
        """The tar, member by member; closes the temporary files at the end (or when abandoned)."""
        try:
            for name, parts in self._members:
                size = sum(_part_size(p) for p in parts)
                yield _tar_header(name, size, self._mtime)
                for p in parts:
                    if isinstance(p, bytes):
                        yield p
                    else:
                        p.seek(0)
                        while chunk := p.read(_COPY):
                            yield chunk
                yield b"\0" * (-size % 512)
            yield b"\0" * 1024  # the end-of-archive marker
        finally:
            self.close()

    def close(self) -> None:
        for f in self._files:
            f.close()


def _part_size(p: bytes | IO[bytes]) -> int:
    if isinstance(p, bytes):
        return len(p)
    p.flush()  # written through a buffer: the file's size counts once it is flushed
    return os.fstat(p.fileno()).st_size


def _tar_header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def export_archive(
    sessions: sessionmaker[Session],
    codebook_id: int,
    identity: dict[str, str],
    config: dict[str, Any] | None = None,
    tmp_dir: Path | None = None,
) -> ExportArchive:
    """Read the active edits of a codebook (one SELECT, so one consistent snapshot on SQLite and
    PostgreSQL) into temporary files in ``tmp_dir``, and return the archive ready to stream."""
    dk, dv = int(identity["key_dim"]), int(identity["value_dim"])
    columns = exported_columns()
    table = Edit.__table__
    files = [tempfile.TemporaryFile(dir=tmp_dir) for _ in range(3)]
    lines, keys, values = files
    n = 0
    try:
        stmt = (
            select(table)
            .where(table.c.codebook_id == codebook_id, table.c.status == EDIT_ACTIVE)
            .order_by(table.c.id)
            .execution_options(yield_per=CHUNK_ROWS)
        )
        with sessions() as session:
            for row in session.execute(stmt).mappings():
                if len(row["key"]) != 4 * dk or len(row["value"]) != 4 * dv:
                    raise ValueError(f"edit {row['id']} has vectors of another size than the codebook's")
                out = {c: _jsonable(row[c]) for c in columns}
                out["gate"] = repo.optional_vector(row["gate"]).tolist() if row["gate"] is not None else None
                trail = repo.optional_rows(row["trail"], dv)
                out["trail"] = trail.tolist() if trail is not None else None
                lines.write(json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
                keys.write(row["key"])
                values.write(row["value"])
                n += 1
    except BaseException:
        for f in files:
            f.close()
        raise
    now = datetime.now(timezone.utc)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "identity": identity,
        "edits": n,
        "exported_at": now.isoformat(),
        "columns": columns,
        "config": config or {},
    }
    header = _safetensors_header(n, dk, dv, identity)
    members: list[tuple[str, list[bytes | IO[bytes]]]] = [
        (MANIFEST, [json.dumps(manifest, indent=1, default=str).encode() + b"\n"]),
        (EDITS, [lines]),
        (VECTORS, [header, keys, values]),
    ]
    size = 1024
    for name, parts in members:
        body = sum(_part_size(p) for p in parts)
        size += len(_tar_header(name, body, int(now.timestamp()))) + body + (-body % 512)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    return ExportArchive(
        n, size, f"horen-codebook-{identity['model']}-{stamp}.tar", members, files, int(now.timestamp())
    )


def _safetensors_header(n: int, dk: int, dv: int, identity: dict[str, str]) -> bytes:
    """The safetensors header of ``keys`` then ``values``, float32, whose bytes follow it as written."""
    kb, vb = 4 * n * dk, 4 * n * dv
    head = {
        "__metadata__": {**identity, "format": FORMAT},
        "keys": {"dtype": "F32", "shape": [n, dk], "data_offsets": [0, kb]},
        "values": {"dtype": "F32", "shape": [n, dv], "data_offsets": [kb, kb + vb]},
    }
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


# ---- import -----------------------------------------------------------------------------------
@dataclass
class ImportArchive:
    """A read and checked archive: its rows, and its vectors in a temporary safetensors file."""

    rows: list[ArchivedEdit]
    extras: list[dict[str, Any]]  # per row: attribute name -> value of further columns of ``edits``
    _vectors: IO[bytes] = field(repr=False)

    def __enter__(self) -> ImportArchive:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._vectors.close()

    def vectors(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first row, keys, values) ``CHUNK_ROWS`` rows at a time, float32 on cpu."""
        from safetensors import safe_open

        with safe_open(self._vectors.name, framework="pt") as f:
            keys, values = f.get_slice("keys"), f.get_slice("values")
            for start in range(0, len(self.rows), CHUNK_ROWS):
                stop = min(start + CHUNK_ROWS, len(self.rows))
                yield start, keys[start:stop], values[start:stop]


def read_archive(
    body: IO[bytes], identity: dict[str, str], vocab_size: int, tmp_dir: Path | None = None
) -> ImportArchive:
    """Read and check an archive from a seekable binary file: ``MalformedArchiveError`` when it is
    not one, ``IdentityMismatchError`` when it is another codebook's, ``InvalidInputError`` for
    content that would not make valid edits (checked before anything is stored)."""
    body.seek(0)
    try:
        tar = tarfile.open(fileobj=body, mode="r:")  # uncompressed only: no decompression bomb
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MalformedArchiveError(f"the body is not an uncompressed tar archive ({exc})") from None
    with tar:
        members = _members(tar)
        manifest = _read_manifest(tar, members[MANIFEST])
        _check_identity(manifest.get("identity"), identity)
        n = manifest.get("edits")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise MalformedArchiveError(f"{MANIFEST}: 'edits' must be the number of edits")
        rows, extras = _read_rows(tar, members[EDITS], n, vocab_size, int(identity["value_dim"]))
        vectors = tempfile.NamedTemporaryFile(suffix=".safetensors", dir=tmp_dir)
        try:
            _extract(tar, members[VECTORS], vectors)
            archive = ImportArchive(rows, extras, vectors)
            _check_vectors(archive, n, int(identity["key_dim"]), int(identity["value_dim"]))
        except BaseException:
            vectors.close()
            raise
    return archive


def _members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    found: dict[str, tarfile.TarInfo] = {}
    try:
        for count, info in enumerate(iter(tar.next, None)):
            if count >= _MAX_MEMBERS:
                break
            name = info.name.removeprefix("./")  # as `tar -C dir .` writes names
            if name in (MANIFEST, EDITS, VECTORS) and info.isfile():
                found.setdefault(name, info)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MalformedArchiveError(f"the tar archive is damaged ({exc})") from None
    missing = [m for m in (MANIFEST, EDITS, VECTORS) if m not in found]
    if missing:
        raise MalformedArchiveError(
            f"not a codebook archive: no {', '.join(missing)} in it (GET /admin/export makes one)"
        )
    return found


def _member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    f = tar.extractfile(info)
    if f is None:  # pragma: no cover - _members keeps regular files only
        raise MalformedArchiveError(f"{info.name} is not a regular file")
    return f


def _read_manifest(tar: tarfile.TarFile, info: tarfile.TarInfo) -> dict[str, Any]:
    if info.size > _MAX_MANIFEST_BYTES:
        raise MalformedArchiveError(f"{MANIFEST} is larger than {_MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(_member(tar, info).read())
    except (ValueError, tarfile.TarError, EOFError, OSError):
        raise MalformedArchiveError(f"{MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MalformedArchiveError(f"{MANIFEST} does not describe a {FORMAT} archive")
    if manifest.get("version") != VERSION:
        raise MalformedArchiveError(f"archive version {manifest.get('version')!r}; this service reads {VERSION}")
    return manifest


def _check_identity(theirs: Any, ours: dict[str, str]) -> None:
    if not isinstance(theirs, dict):
        raise MalformedArchiveError(f"{MANIFEST} has no identity")
    names = {"model": "model", "module": "edited module", "key_dim": "key dimension", "value_dim": "value dimension"}
    for k, v in ours.items():
        if theirs.get(k) != v:
            raise IdentityMismatchError(
                f"the archive belongs to another {names.get(k, k)}: {theirs.get(k)!r}, this deployment's is {v!r}; "
                "a codebook can only be imported into a deployment of the same model and edited module"
            )


def _read_rows(
    tar: tarfile.TarFile, info: tarfile.TarInfo, n: int, vocab_size: int, dv: int
) -> tuple[list[ArchivedEdit], list[dict[str, Any]]]:
    columns = {c.name: (key, c) for key, c in _edit_columns()}
    rows: list[ArchivedEdit] = []
    extras: list[dict[str, Any]] = []
    answers: dict[int, tuple[int, ...]] = {}  # source entry id -> its answer
    try:
        for i, raw in enumerate(_member(tar, info), 1):
            if not raw.strip():
                continue
            if len(rows) == n:
                raise MalformedArchiveError(f"{EDITS} has more lines than the manifest's {n} edits")
            try:
                line = json.loads(raw)
            except ValueError:
                raise MalformedArchiveError(f"{EDITS} line {i} is not JSON") from None
            if not isinstance(line, dict):
                raise MalformedArchiveError(f"{EDITS} line {i} is not a JSON object")
            try:
                row = ArchivedEdit.model_validate(line)
            except ValidationError as exc:
                raise InvalidInputError(f"{EDITS} line {i}: {_first_error(exc)}") from None
            if any(not 0 <= t < vocab_size for t in row.answer_ids):
                raise InvalidInputError(f"{EDITS} line {i}: answer_ids must be token ids below {vocab_size}")
            if row.trail is not None and any(len(r) != dv for r in row.trail):
                raise InvalidInputError(f"{EDITS} line {i}: trail rows must have {dv} values (the value dimension)")
            answer = tuple(row.answer_ids)
            if answers.setdefault(row.entry_id, answer) != answer:
                raise InvalidInputError(f"{EDITS} line {i}: entry {row.entry_id} is retrained with another answer")
            extras.append(_extra_columns(row.model_extra or {}, columns, i))
            rows.append(row)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MalformedArchiveError(f"{EDITS} cannot be read ({exc})") from None
    if len(rows) != n:
        raise MalformedArchiveError(f"{EDITS} has {len(rows)} edits, the manifest says {n}")
    return rows, extras


def _first_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    where = ".".join(str(x) for x in e.get("loc", ()))
    return f"{where}: {e.get('msg')}" if where else str(e.get("msg"))


def _extra_columns(extra: dict[str, Any], columns: dict[str, tuple[str, Any]], line: int) -> dict[str, Any]:
    """The archive's further columns that this deployment's ``edits`` has, by attribute name, checked
    against the column's type. A column it lacks is refused unless its value is null."""
    out: dict[str, Any] = {}
    for name, value in extra.items():
        if name in _SET_BY_IMPORT or name in _INSERTED:
            continue
        if name not in columns:
            if value is None:
                continue
            raise InvalidInputError(
                f"{EDITS} line {line}: column {name!r} is not a column of this deployment's edits "
                "(an archive of a newer version?)"
            )
        attr, column = columns[name]
        try:
            out[attr] = _column_value(column, value)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{EDITS} line {line}: {name}: {exc}") from None
    return out


def _column_value(column: Any, value: Any) -> Any:
    """``value`` as read from JSON, checked (and converted) for ``column``; raises TypeError or ValueError."""
    if value is None:
        if not column.nullable:
            raise ValueError("must not be null")
        return None
    if isinstance(column.type, JSON):
        return value
    try:
        py = column.type.python_type
    except NotImplementedError:
        return value
    if py is datetime:
        if not isinstance(value, str):
            raise TypeError("must be an ISO 8601 date-time")
        t = datetime.fromisoformat(value)
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    if py is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, py) or (py in (int, float) and isinstance(value, bool)):
        raise TypeError(f"must be of type {py.__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be finite")
    if isinstance(value, str):
        valid_unicode(value)
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        length = getattr(column.type, "length", None)
        if length is not None and len(value) > length:
            raise ValueError(f"must be at most {length} characters")
    return value


def _extract(tar: tarfile.TarFile, info: tarfile.TarInfo, dest: IO[bytes]) -> None:
    try:
        shutil.copyfileobj(_member(tar, info), dest, _COPY)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MalformedArchiveError(f"{VECTORS} cannot be read ({exc})") from None
    dest.flush()


def _check_vectors(archive: ImportArchive, n: int, dk: int, dv: int) -> None:
    from safetensors import safe_open

    try:
        with safe_open(archive._vectors.name, framework="pt") as f:
            names = set(f.keys())
            shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in names}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise MalformedArchiveError(f"{VECTORS} is not a safetensors file ({exc})") from None
    want = {"keys": ([n, dk], "F32"), "values": ([n, dv], "F32")}
    for k, (shape, dtype) in want.items():
        if k not in shapes:
            raise MalformedArchiveError(f"{VECTORS} has no tensor {k!r}")
        if (list(shapes[k][0]), shapes[k][1]) != (shape, dtype):
            got = f"{shapes[k][1]} {list(shapes[k][0])}"
            raise InvalidInputError(f"{VECTORS}: {k} is {got}, expected F32 {shape} (edits x dimension)")
    try:
        for start, keys, values in archive.vectors():
            if not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
                raise InvalidInputError(f"{VECTORS}: a key or value from row {start} on is NaN or infinite")
            if not bool((keys.norm(dim=1) > 1e-6).all()):
                raise InvalidInputError(f"{VECTORS}: a key from row {start} on is zero")
    except InvalidInputError:
        raise
    except Exception as exc:
        raise MalformedArchiveError(f"{VECTORS} cannot be read ({exc})") from None


def import_archive(sessions: sessionmaker[Session], codebook_id: int, archive: ImportArchive, by: str | None) -> dict:
    """Commit every edit of ``archive`` into the codebook in one transaction (``CodebookNotEmptyError``
    when it has an active edit); returns what was imported. The engines apply them from the log."""
    t0 = time.perf_counter()
    entries: dict[int, int] = {}  # the source's entry id -> this codebook's
    ids: list[int] = []
    with sessions.begin() as session:
        repo.serialize_commit_lock(session)  # from here no other edit commits, so the check holds
        active = repo.count_active_edits(session, codebook_id)
        if active:
            raise CodebookNotEmptyError(
                f"this deployment's codebook has active edits ({active}); a codebook is imported only into an "
                "empty one (roll them back, or import into a fresh database)"
            )
        for start, keys, values in archive.vectors():
            for j in range(keys.shape[0]):
                row, extra = archive.rows[start + j], archive.extras[start + j]
                mapped = entries.get(row.entry_id)
                edit = repo.insert_edit(
                    session,
                    codebook_id,
                    prompt=row.prompt,
                    target=row.target,
                    metadata=row.metadata or {},
                    entry_id=mapped,
                    created_entry=mapped is None,
                    steps=row.steps,
                    loss=row.loss,
                    train_ms=row.train_ms,
                    answer_ids=row.answer_ids,
                    key=repo.tensor_to_bytes(keys[j]),
                    value=repo.tensor_to_bytes(values[j]),
                    expected_entry_version=None,
                    created_by=by,
                    gate=repo.tensor_to_bytes(torch.tensor(row.gate)) if row.gate else None,
                    trail=repo.tensor_to_bytes(torch.tensor(row.trail)) if row.trail else None,
                )
                for attr, value in extra.items():
                    setattr(edit, attr, value)
                if mapped is None:
                    entries[row.entry_id] = edit.entry_id
                ids.append(edit.id)
        if ids:
            session.flush()
            notify(session, codebook_id, repo.last_event_id(session, codebook_id))
    return {
        "imported": len(ids),
        "entries": len(entries),
        "first_id": ids[0] if ids else None,
        "last_id": ids[-1] if ids else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
