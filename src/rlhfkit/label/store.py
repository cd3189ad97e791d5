"""The labelling project: one SQLite file (`DIR/labels.sqlite`) holding the items to rank (a prompt and its
K responses), the settings, the annotators (names and token hashes) and their labels.

Durability: the file is in WAL mode with `synchronous=FULL`, so a committed transaction has its WAL frames
fsync'ed before COMMIT returns; the server answers 200 only after that, so an acknowledged label survives
SIGKILL of the server and a power cut (NORMAL would survive SIGKILL too, but not a power cut). Writers go
through `Store.write()`: one lock per process and `BEGIN IMMEDIATE`, so the checks and the insert of one
request see no other writer in between (a second process on the same file waits on SQLite's busy timeout).

Every thread gets its own connection (SQLite connections are not shared between threads); readers never
block the writer in WAL mode, so `rlhfkit label export` can run while the server is up.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.errors import UserError

SCHEMA_VERSION = 1
DEFAULT_LEASE_SECONDS = 1800  # an assignment not answered in 30 minutes goes back to the pool
PROJECT_FILE = "labels.sqlite"

SCHEMA = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- JSON values
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,                 -- JSON: a string or a list of {"role", "content"} messages
    responses TEXT NOT NULL,              -- JSON list of responses
    n_responses INTEGER NOT NULL CHECK (n_responses >= 2)
);
CREATE TABLE annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL,             -- SHA-256 of the token; the token itself is never stored
    role TEXT NOT NULL CHECK (role IN ('annotator', 'admin')),
    created_at REAL NOT NULL
);
CREATE TABLE assignments (                -- open leases: an item handed out and not answered yet
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    leased_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (item_id, annotator_id)
);
CREATE INDEX assignments_by_annotator ON assignments (annotator_id);
CREATE TABLE labels (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    ranks TEXT,                           -- JSON list, one rank per response, 1 = best, equal = tie
    skip INTEGER NOT NULL DEFAULT 0,
    none_acceptable INTEGER NOT NULL DEFAULT 0,
    comment TEXT,
    created_at REAL NOT NULL,
    UNIQUE (item_id, annotator_id),       -- one label per annotator and item: a retry cannot duplicate it
    CHECK ((ranks IS NOT NULL) + skip + none_acceptable = 1)
);
CREATE INDEX labels_by_annotator ON labels (annotator_id);
"""


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    role: str  # 'annotator' or 'admin'


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write transaction is explicit (Store.write).
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def create_project(path, items: list[dict], *, overlap: int = 1, guidelines: str | None = None,
                   lease_seconds: int = DEFAULT_LEASE_SECONDS, source: dict | None = None) -> Path:
    """Write a new labelling project at `path` from `items` ({"prompt", "responses"}), atomically: it is built
    in a temporary file and renamed into place, so a crash leaves no half-made project. Refuses to replace an
    existing file (it may hold people's work)."""
    path = Path(path)
    if path.exists():
        raise UserError(f"{path}: already exists (a labelling project may hold people's labels); "
                        f"choose another --output-dir or remove it")
    if overlap < 1:
        raise UserError(f"overlap must be >= 1, got {overlap}")
    if lease_seconds < 1:
        raise UserError(f"lease_seconds must be >= 1, got {lease_seconds}")
    for n, item in enumerate(items, start=1):
        if len(item["responses"]) < 2:
            raise UserError(f"item {n}: needs at least 2 responses to rank, got {len(item['responses'])}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    conn = _connect(tmp)
    try:
        conn.execute("PRAGMA journal_mode = WAL")  # persistent: every later connection opens in WAL mode
        conn.executescript(SCHEMA)  # a temporary file: atomicity comes from the rename below
        conn.execute("BEGIN")
        settings = {"schema_version": SCHEMA_VERSION, "overlap": overlap, "lease_seconds": lease_seconds,
                    "guidelines": guidelines or "", "created_at": time.time(), "source": source or {}}
        conn.executemany("INSERT INTO settings (key, value) VALUES (?, ?)",
                         [(k, json.dumps(v)) for k, v in settings.items()])
        conn.executemany("INSERT INTO items (prompt, responses, n_responses) VALUES (?, ?, ?)",
                         [(json.dumps(item["prompt"], ensure_ascii=False),
                           json.dumps(list(item["responses"]), ensure_ascii=False), len(item["responses"]))
                          for item in items])
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    os.chmod(tmp, 0o600)  # token hashes and people's labels: the owner's only (SQLite gives -wal/-shm the same)
    os.replace(tmp, path)
    return path


class Store:
    """An open labelling project. Thread-safe: each thread uses its own connection."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no labelling project here (make one with "
                            f"`rlhfkit annotate --annotator human --output-dir DIR`)")
        self._local = threading.local()
        self._write_lock = threading.Lock()
        try:
            rows = self.conn.execute("SELECT key, value FROM settings").fetchall()
            self.settings = {row["key"]: json.loads(row["value"]) for row in rows}
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path}: not an rlhfkit labelling project ({exc})") from None
        version = self.settings.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(f"{self.path}: labelling project of schema version {version}; this rlhfkit reads "
                            f"version {SCHEMA_VERSION}")

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
        return conn

    def close(self) -> None:
        """Close the calling thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def write(self):
        """One write transaction, committed (and fsync'ed) when the block ends without an exception."""
        with self._write_lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")  # returns once the WAL frames are on disk (synchronous=FULL)
            except BaseException:
                if conn.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def read(self):
        """One read transaction: every query inside sees the same snapshot."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    # --- settings -------------------------------------------------------------------------------------------
    @property
    def overlap(self) -> int:
        return int(self.settings["overlap"])

    @property
    def lease_seconds(self) -> int:
        return int(self.settings["lease_seconds"])

    @property
    def guidelines(self) -> str:
        return self.settings.get("guidelines") or ""

    # --- rows -----------------------------------------------------------------------------------------------
    def item(self, item_id: int, conn: sqlite3.Connection | None = None) -> dict | None:
        row = (conn or self.conn).execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else item_dict(row)

    def items(self, conn: sqlite3.Connection | None = None) -> list[dict]:
        return [item_dict(row) for row in (conn or self.conn).execute("SELECT * FROM items ORDER BY id")]

    def annotator_row(self, annotator_id: int) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM annotators WHERE id = ?", (annotator_id,)).fetchone()

    def annotators(self, conn: sqlite3.Connection | None = None) -> list[Annotator]:
        rows = (conn or self.conn).execute("SELECT id, name, role FROM annotators ORDER BY id")
        return [Annotator(row["id"], row["name"], row["role"]) for row in rows]

    def labels(self, annotator_id: int | None = None, conn: sqlite3.Connection | None = None) -> list[dict]:
        """Labels (all, or one annotator's) in the order they were stored, with the annotator's name."""
        query = ("SELECT labels.*, annotators.name AS annotator FROM labels "
                 "JOIN annotators ON annotators.id = labels.annotator_id")
        args: tuple = ()
        if annotator_id is not None:
            query += " WHERE labels.annotator_id = ?"
            args = (annotator_id,)
        return [label_dict(row) for row in (conn or self.conn).execute(query + " ORDER BY labels.id", args)]

    def label(self, item_id: int, annotator_id: int, conn: sqlite3.Connection | None = None) -> dict | None:
        row = (conn or self.conn).execute(
            "SELECT labels.*, annotators.name AS annotator FROM labels JOIN annotators "
            "ON annotators.id = labels.annotator_id WHERE item_id = ? AND annotator_id = ?",
            (item_id, annotator_id)).fetchone()
        return None if row is None else label_dict(row)


def item_dict(row: sqlite3.Row) -> dict:
    return {"item_id": row["id"], "prompt": json.loads(row["prompt"]), "responses": json.loads(row["responses"])}


def label_dict(row: sqlite3.Row) -> dict:
    return {"item_id": row["item_id"], "annotator": row["annotator"],
            "ranks": None if row["ranks"] is None else json.loads(row["ranks"]),
            "skip": bool(row["skip"]), "none_acceptable": bool(row["none_acceptable"]),
            "comment": row["comment"], "created_at": row["created_at"]}
