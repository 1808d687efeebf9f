"""
``POST /jobs`` with a JSON body (``Content-Type: application/json``): the job asked for, parsed
and checked here, once, into a typed `JobRequest`.

    {"input": {"key": "incoming/alice/movie.mov"}, "presets": ["mp4-720p"], "name": "movie.mov",
     "priority": "high", "notify": ["https://you.example/hook"], "notify_progress": false}

Every field is checked for its type and size; a field this version does not know, a key given
twice, or anything that is not one JSON object is a ``400 bad_body`` that names the known
fields. A field added later (webhooks' ``notify``, output templates) is one entry in `FIELDS`
and one attribute of `JobRequest`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gridnode import priority as priorities
from gridnode.errors import GridnodeError
from gridnode.notify.targets import MAX_URLS, NotifyRefused, parse_url

#: the fields a JSON job request may hold
FIELDS = ("input", "presets", "outputs", "name", "priority", "notify", "notify_progress")
#: the input's fields
INPUT_FIELDS = ("key",)
MAX_PRESETS = 32
#: inline output specs a request may carry (each checked field by field by media/templates.py)
MAX_OUTPUTS = 16


def bad_body(message: str) -> GridnodeError:
    return GridnodeError(f"{message}; send {{\"input\": {{\"key\": \"<key in the bucket>\"}}, \"presets\": [...]}} "
                         f"(fields: {', '.join(FIELDS)})", code="bad_body", status=400)


@dataclass(frozen=True)
class InputRef:
    """An object already in the pool's bucket, under the store's prefix."""

    key: str


@dataclass(frozen=True)
class JobRequest:
    input: InputRef
    #: None: the node's default presets
    presets: tuple[str, ...] | None = None
    #: the file name shown in the job (data only, never a key); None: the key's last segment
    name: str | None = None
    #: inline output specs, as sent (media/templates.py checks every field: 400 bad_spec)
    outputs: tuple[Any, ...] | None = None
    #: high, normal or low (gridnode/priority.py)
    priority: str = priorities.DEFAULT
    #: notify URLs, their syntax checked (where they resolve to: when the job is submitted)
    notify: tuple[str, ...] = ()
    notify_progress: bool = False

    @classmethod
    def parse(cls, body: bytes) -> JobRequest:
        try:
            raw = json.loads(body, object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_body(f"the body is not JSON ({str(e)[:80]})") from None
        fields = _object(raw, "the body", FIELDS)
        if "input" not in fields:
            raise bad_body("no input")
        source = _object(fields["input"], "input", INPUT_FIELDS)
        key = source.get("key")
        if not isinstance(key, str) or not key or len(key) > 1024:
            raise bad_body("input.key must be a key of 1-1024 characters")
        presets = fields.get("presets")
        if presets is not None:
            if (not isinstance(presets, list) or not 1 <= len(presets) <= MAX_PRESETS
                    or not all(isinstance(p, str) and 0 < len(p) <= 64 for p in presets)):
                raise bad_body(f"presets must be a list of 1-{MAX_PRESETS} preset names")
            presets = tuple(presets)
        name = fields.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 255):
            raise bad_body("name must be a string of at most 255 characters")
        outputs = fields.get("outputs")
        if outputs is not None:
            if not isinstance(outputs, list) or not 1 <= len(outputs) <= MAX_OUTPUTS:
                raise bad_body(f"outputs must be a list of 1-{MAX_OUTPUTS} output specs")
            outputs = tuple(outputs)
        level = fields.get("priority")
        if level is not None and not isinstance(level, str):
            raise priorities.bad_priority(level)
        notify = fields.get("notify", [])
        if not isinstance(notify, list) or not all(isinstance(u, str) for u in notify):
            raise bad_body("notify must be a list of http(s) URLs")
        if len(notify) > MAX_URLS:
            raise NotifyRefused(f"a job may name at most {MAX_URLS} notify URLs; it named {len(notify)}")
        for url in notify:
            parse_url(url)  # notify_refused, as from the query
        progress = fields.get("notify_progress", False)
        if not isinstance(progress, bool):
            raise bad_body("notify_progress must be true or false")
        return cls(InputRef(key), presets, name, outputs, priorities.parse(level), tuple(dict.fromkeys(notify)),
                   progress)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for k, v in pairs:
        if k in found:
            raise ValueError(f"{k[:40]!r} given twice")
        found[k] = v
    return found


def _object(value: Any, what: str, known: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_body(f"{what} must be a JSON object")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise bad_body(f"{what} has fields this node does not know: {', '.join(repr(u[:40]) for u in unknown[:5])}")
    return value
