"""Annotators' tokens: made with `secrets`, shown once, stored only as a SHA-256 hash, checked in constant time.

A token reads `ID.SECRET`: the annotator's id (to find the row without comparing against every hash) and 32
random bytes, URL-safe. SHA-256 is enough for the hash: a 256-bit random secret cannot be guessed from it, so a
slow password hash would only slow every request down. There is no default token: a project has no annotator
until `rlhfkit label add-annotator` makes one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from rlhfkit.errors import UserError
from rlhfkit.label.store import Annotator, Store

ROLES = ("annotator", "admin")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")
_DUMMY_HASH = hashlib.sha256(b"no such annotator").hexdigest()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_annotator(store: Store, name: str, role: str = "annotator") -> str:
    """Add an annotator (or an admin, who sees progress and agreement but does not label); return the token,
    which is not stored anywhere and cannot be shown again."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    if not NAME.match(name):
        raise UserError(f"annotator name {name!r}: use 1-64 letters, digits, spaces or ._@- "
                        f"(starting with a letter or digit)")
    with store.write() as conn:
        if conn.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
            raise UserError(f"{store.path}: an annotator named {name!r} already exists")
        cursor = conn.execute("INSERT INTO annotators (name, token_hash, role, created_at) VALUES (?, '', ?, ?)",
                              (name, role, time.time()))
        token = f"{cursor.lastrowid}.{secrets.token_urlsafe(32)}"
        conn.execute("UPDATE annotators SET token_hash = ? WHERE id = ?", (hash_token(token), cursor.lastrowid))
    return token


def authenticate(store: Store, token: str | None) -> Annotator | None:
    """The annotator whose token this is, or None. The hash comparison takes the same time whether the id
    exists or not and wherever the hashes differ."""
    if not token:
        return None
    head, dot, _ = token.partition(".")
    row = store.annotator_row(int(head)) if dot and head.isdigit() and len(head) < 12 else None
    expected = row["token_hash"] if row is not None else _DUMMY_HASH
    if not hmac.compare_digest(hash_token(token), expected) or row is None:
        return None
    return Annotator(row["id"], row["name"], row["role"])


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
