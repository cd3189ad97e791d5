"""What an annotator sends for one item, checked strictly, and the request problems the API reports.

A label is one of:
- `{"item_id": N, "ranks": [r_1, ..., r_K]}`: one rank per response, 1 = best, equal numbers = a tie;
- `{"item_id": N, "skip": true}`: the annotator passes; the item goes to someone else;
- `{"item_id": N, "none_acceptable": true}`: every response is unacceptable (a judgment; it makes no pair);
each optionally with `"comment": "..."`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

FIELDS = ("item_id", "ranks", "skip", "none_acceptable", "comment")
MAX_COMMENT_CHARS = 10_000


class Problem(Exception):
    """A request the server refuses: an HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Label:
    item_id: int
    ranks: tuple[int, ...] | None = None
    skip: bool = False
    none_acceptable: bool = False
    comment: str | None = None

    def same_as(self, stored: dict) -> bool:
        """True when `stored` (a row from the store) says exactly this: a retry of the same request."""
        return (list(self.ranks) if self.ranks is not None else None) == stored["ranks"] \
            and self.skip == stored["skip"] and self.none_acceptable == stored["none_acceptable"] \
            and (self.comment or None) == (stored["comment"] or None)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise Problem(400, f"field '{key}': must be true or false, got {type(value).__name__}")
    return value


def parse_label(body) -> Label:
    """Check the shape of a POST /api/labels body (the ranks against the item come later, `check_ranks`)."""
    if not isinstance(body, dict):
        raise Problem(400, f"the body must be a JSON object with item_id and ranks (or skip), "
                           f"got {type(body).__name__}")
    unknown = [key for key in body if key not in FIELDS]
    if unknown:
        raise Problem(400, f"unknown field '{unknown[0]}' (fields: {', '.join(FIELDS)})")
    if "item_id" not in body:
        raise Problem(400, "field 'item_id': missing")
    item_id = body["item_id"]
    if not _is_int(item_id):
        raise Problem(400, f"field 'item_id': must be an integer, got {item_id!r}"[:200])
    skip, none_acceptable = _flag(body, "skip"), _flag(body, "none_acceptable")
    ranks = body.get("ranks")
    given = [name for name, on in (("ranks", ranks is not None), ("skip", skip),
                                   ("none_acceptable", none_acceptable)) if on]
    if not given:
        raise Problem(400, "give 'ranks' (one per response, 1 = best, equal = tie), or 'skip': true, "
                           "or 'none_acceptable': true")
    if len(given) > 1:
        raise Problem(400, f"give only one of ranks, skip and none_acceptable, got {' and '.join(given)}")
    if ranks is not None:
        if not isinstance(ranks, list):
            raise Problem(400, f"field 'ranks': must be a list of integers, got {type(ranks).__name__}")
        for i, rank in enumerate(ranks):
            if not _is_int(rank):
                raise Problem(422, f"field 'ranks[{i}]': must be an integer, got {rank!r}"[:200])
        ranks = tuple(int(r) for r in ranks)
    comment = body.get("comment")
    if comment is not None:
        if not isinstance(comment, str):
            raise Problem(400, f"field 'comment': must be a string, got {type(comment).__name__}")
        if len(comment) > MAX_COMMENT_CHARS:
            raise Problem(422, f"field 'comment': {len(comment):,} characters, over the limit of "
                               f"{MAX_COMMENT_CHARS:,}")
        comment = comment.strip() or None
    return Label(int(item_id), ranks, skip, none_acceptable, comment)


def check_ranks(ranks: tuple[int, ...], n_responses: int, item_id: int) -> None:
    """One rank per response, each between 1 (best) and the number of responses, and 1 among them."""
    if len(ranks) != n_responses:
        raise Problem(422, f"field 'ranks': item {item_id} has {n_responses} responses, got {len(ranks)} ranks")
    for i, rank in enumerate(ranks):
        if not 1 <= rank <= n_responses:
            raise Problem(422, f"field 'ranks[{i}]': {rank} is not between 1 (best) and {n_responses}")
    if 1 not in ranks:
        raise Problem(422, "field 'ranks': no response is ranked 1 (the best)")
