"""The change feed: every record write and delete, in order, per model, so indexes follow the store
without scanning it.

Each store appends to the feed of a record's model in the same atomic step as the write itself (one
MULTI/EXEC on Redis with a Stream beside the records, one LMDB write transaction with a log under the
model's key range), so a reader that sees a change finds the record as the change left it.

A reader keeps a `FeedPosition`: the backend's offset of the last change it applied and `seq`, how many
changes the feed had written up to it. Feeds are trimmed to a bounded length; a store knows how many
changes it has trimmed in all, so a reader whose next change (`seq + 1`) is among them learns it from
`FeedTrimmedError` and rebuilds its index from the store instead of silently missing changes.

Changes are facts about the store, not commands: applying one twice, or a put of a record that is
already indexed, changes nothing. A put's record may be gone by the time it is read (deleted or, on
Redis, evicted); readers pass it over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, cast

from cache.errors import CacheError

logger = logging.getLogger(__name__)

Op = Literal["put", "delete"]
OPS: tuple[Op, ...] = ("put", "delete")
DEFAULT_FEED_LENGTH = 1_000_000  # changes kept per model: ~100 MB of Stream on Redis


class FeedTrimmedError(CacheError):
    """Changes after the reader's position were trimmed from the feed: rebuild the index from the store."""


@dataclass(frozen=True)
class Change:
    op: Op
    image_id: str

    @classmethod
    def read(cls, op: str, image_id: str, fingerprint: str) -> Change:
        """A change as a store read it back; an op it never writes is a ValueError (a damaged feed)."""
        if op not in OPS:
            raise ValueError(
                f"unknown change {op!r} of image {image_id!r} in the feed of model {fingerprint}"
            )
        return cls(cast(Op, op), image_id)


@dataclass(frozen=True)
class FeedPosition:
    """Where a reader of one model's feed stands: after the change at `offset` (a Redis Stream entry id,
    or the LMDB log's sequence number as text; "" before the first), which was change number `seq`."""

    offset: str = ""
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "seq": self.seq}

    @classmethod
    def from_dict(cls, data: Any) -> FeedPosition:
        """Inverse of `to_dict`; ValueError for anything else (a damaged manifest)."""
        if not isinstance(data, dict) or not isinstance(data.get("offset"), str):
            raise ValueError(f"not a feed position: {data!r}")
        seq = data.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError(f"not a feed position: {data!r}")
        return cls(data["offset"], seq)


@dataclass(frozen=True)
class FeedRead:
    changes: list[Change]  # in the order they were written
    position: FeedPosition  # after the last of them (the position read from when there are none)


def check_trimmed(fingerprint: str, after: FeedPosition, trimmed: int, written: int) -> None:
    """Raise FeedTrimmedError when a reader at `after` has lost changes: the feed of `fingerprint` has
    trimmed `trimmed` of the `written` changes it ever held. A feed that wrote fewer changes than the
    reader has read was itself lost and started again (a Redis key deleted or evicted)."""
    if trimmed > after.seq:
        raise FeedTrimmedError(
            f"the change feed of model {fingerprint} trimmed changes {after.seq + 1}..{trimmed} before "
            "this index read them"
        )
    if written < after.seq:
        raise FeedTrimmedError(
            f"the change feed of model {fingerprint} holds {written} changes but this index read "
            f"{after.seq}: the feed was lost and started again"
        )
