"""Label selectors: which devices a policy, a model assignment or a rollout applies to.

A selector is a set of `key=value` requirements, all of which a device's labels must meet (`site=lab,cam=front`);
the empty selector matches every device. Written as text on the command line, kept as a JSON object.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from cloud_sync.errors import InvalidArgument

__all__ = ["Selector", "check_selector", "format_selector", "matches", "parse_selector"]

Selector = dict[str, str]

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
_MAX_TERMS = 32
_MAX_VALUE_CHARS = 256


def check_selector(selector: Mapping[str, str]) -> Selector:
    """`selector` as a plain dict if valid; InvalidArgument names the bad term."""
    if not isinstance(selector, Mapping):
        raise InvalidArgument("a selector is an object of label key -> value")
    if len(selector) > _MAX_TERMS:
        raise InvalidArgument(f"a selector has at most {_MAX_TERMS} terms, not {len(selector)}")
    for key, value in selector.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise InvalidArgument(
                f"selector key {key!r}: 1-63 characters of A-Z a-z 0-9 . _ / -, starting with a letter or digit"
            )
        if not isinstance(value, str) or len(value) > _MAX_VALUE_CHARS or "\0" in value or "," in value:
            raise InvalidArgument(
                f"selector {key!r}: the value must be a string of at most {_MAX_VALUE_CHARS} "
                "characters, without ',' or NUL"
            )
    return dict(selector)


def parse_selector(text: str) -> Selector:
    """`site=lab,cam=front` -> {"site": "lab", "cam": "front"}; "" (or "*") -> {} (every device)."""
    text = text.strip()
    if text in ("", "*"):
        return {}
    selector: Selector = {}
    for term in text.split(","):
        key, sep, value = term.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise InvalidArgument(f"selector term {term!r} is not key=value (e.g. site=lab,cam=front)")
        if key in selector:
            raise InvalidArgument(f"selector names {key!r} twice")
        selector[key] = value
    return check_selector(selector)


def format_selector(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "*"


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a device with `labels` meets every term of `selector`."""
    return all(labels.get(key) == value for key, value in selector.items())
