"""The one key type of every cache: images, reference features, the classifier, calibration.

A cache entry is named by a digest of everything that determines it, and that key is
also stored inside the entry and compared on read. The name alone cannot be trusted:
a file renamed or copied over another, one written before a key gained a field, or
a (64-bit) digest collision would be served as the wrong data. So a reader treats a
stored key that is missing or differs exactly like a damaged file: it rebuilds.

Each cache subclasses `CacheKey` as a frozen dataclass whose fields are JSON scalars,
and names its `kind`. The kind is part of the digest, so keys of two caches never
collide even when their fields agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, ClassVar

Scalar = str | int | float | bool | None
DIGEST_CHARS = 16  # 64 bits tell files apart; the stored key catches a collision


def safe_name(text: str, limit: int = 40) -> str:
    """`text` as a part of a file name: letters, digits, - and _, at most `limit` chars."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:limit]


def _canonical(value: object) -> str:
    # sorted keys, no spaces, no NaN: one text per value, whatever built the dict
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


class CacheKey:
    """Base of the cache keys: subclasses are frozen dataclasses of JSON scalars."""

    kind: ClassVar[str]  # which cache: "images", "reference-features", ...

    def __post_init__(self) -> None:
        # Checked when built, so a key that cannot be stored fails where it is made.
        for name, value in self.fields().items():
            if not isinstance(value, Scalar) or (
                isinstance(value, float) and not math.isfinite(value)
            ):
                raise TypeError(
                    f"{type(self).__name__}.{name} = {value!r}: a cache key "
                    f"holds str, int, finite float, bool or None"
                )

    def fields(self) -> dict[str, Scalar]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def as_dict(self) -> dict[str, Any]:
        """The stored form in JSON files: {"kind": ..., "fields": {...}}."""
        return {"kind": self.kind, "fields": self.fields()}

    def to_json(self) -> str:
        """The stored form in .npz files: the canonical text of `as_dict()`."""
        return _canonical(self.as_dict())

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:DIGEST_CHARS]

    def readable(self) -> tuple[str, str]:
        """The parts of the file name around the digest, for people browsing the cache."""
        return self.kind, ""

    def filename(self, ext: str = "") -> str:
        prefix, suffix = self.readable()
        return f"{prefix}-{self.digest()}{suffix}{ext}"

    def matches(self, stored: object) -> bool:
        """Whether `stored` (the text of `to_json()` or the object of `as_dict()`, as read
        back) is this key. Compared in canonical form, so 1 and 1.0 or true and 1 differ."""
        if isinstance(stored, str):
            try:
                stored = json.loads(stored)
            except ValueError:
                return False
        try:
            return _canonical(stored) == self.to_json()
        except (TypeError, ValueError):  # not JSON at all (NaN, an odd type)
            return False
