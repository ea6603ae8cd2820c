"""The one cache key type: a stable digest of kind and fields, and the check on read."""

import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from dcgan.cache_key import CacheKey, safe_name


@dataclass(frozen=True)
class AB(CacheKey):
    kind: ClassVar[str] = "thing"
    a: int
    b: str


@dataclass(frozen=True)
class BA(CacheKey):  # the same kind and fields, declared in the other order
    kind: ClassVar[str] = "thing"
    b: str
    a: int


@dataclass(frozen=True)
class Other(CacheKey):  # another cache with the same fields
    kind: ClassVar[str] = "other"
    a: int
    b: str


@dataclass(frozen=True)
class Loose(CacheKey):
    kind: ClassVar[str] = "loose"
    value: object


def test_digest_is_stable_across_field_order_and_pinned_to_the_canonical_text():
    key = AB(1, "x")
    assert key.to_json() == '{"fields":{"a":1,"b":"x"},"kind":"thing"}'
    # pinned: a change of the canonical form would silently orphan every cache on disk
    assert key.digest() == hashlib.sha256(key.to_json().encode()).hexdigest()[:16]
    assert BA("x", 1).digest() == key.digest() and BA("x", 1).matches(key.to_json())
    assert AB(2, "x").digest() != key.digest() and AB(1, "y").digest() != key.digest()


def test_different_kinds_never_collide():
    assert Other(1, "x").fields() == AB(1, "x").fields()
    assert Other(1, "x").digest() != AB(1, "x").digest()
    assert not Other(1, "x").matches(AB(1, "x").to_json())
    assert not AB(1, "x").matches(Other(1, "x").as_dict())


def test_matches_the_stored_forms_only():
    key = AB(1, "x")
    assert key.matches(key.to_json()) and key.matches(key.as_dict())
    assert key.matches(json.loads(json.dumps(key.as_dict(), indent=2)))  # as a JSON file holds it
    assert key.matches(json.dumps(key.as_dict(), indent=1))  # any spacing of the same JSON
    for stored in (
        None,
        "",
        "{not json",
        "[]",
        1,
        {"kind": "thing"},
        {"kind": "thing", "fields": {"a": 1.0, "b": "x"}},  # 1.0 is not 1
        {"kind": "thing", "fields": {"a": True, "b": "x"}},  # nor is true
        {"kind": "thing", "fields": {"a": 1, "b": "x", "c": 0}},  # nor more fields
        {"kind": "thing", "fields": {"a": float("nan"), "b": "x"}},
    ):
        assert not key.matches(stored), stored


def test_fields_must_be_json_scalars():
    for value in ("s", 1, 1.5, True, None):
        Loose(value).digest()
    for value in ([1], {"a": 1}, float("nan"), float("inf"), b"x"):
        with pytest.raises(TypeError, match="cache key"):
            Loose(value)


def test_filename_is_the_readable_parts_around_the_digest():
    key = AB(1, "x")
    assert key.filename() == f"thing-{key.digest()}"
    assert key.filename(".json") == f"thing-{key.digest()}.json"
    assert safe_name("my data/set (v2)!") == "my_data_set__v2__"
    assert len(safe_name("x" * 100)) == 40
