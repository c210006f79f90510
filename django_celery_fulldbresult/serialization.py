"""Encoding of task arguments, results and stored JSON.

Arguments are stored as JSON with kombu's typed envelopes, so ``datetime``,
``Decimal``, ``UUID`` and ``bytes`` survive a round trip and the columns stay
queryable with Django's JSON lookups. Values JSON cannot hold (custom objects
sent with the pickle serializer) are packed with the task serializer instead,
so nothing is lost or truncated.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from kombu.exceptions import DecodeError, EncodeError
from kombu.serialization import dumps as kombu_dumps
from kombu.serialization import loads as kombu_loads
from kombu.serialization import prepare_accept_content
from kombu.utils import json as kombu_json

from . import encryption

JSON_CONTENT_TYPE = "application/json"


class JSONEncoder(kombu_json.JSONEncoder):
    """kombu's encoder: datetime, date, time, Decimal, UUID and bytes become envelopes."""


def lenient_object_hook(obj: dict) -> Any:
    """kombu's typed envelopes back to values; a corrupt envelope stays as stored.

    The model's JSON columns decode with this: one row holding a bad envelope
    must not make every query that reads it (admin pages, ``AsyncResult``) fail.
    The scheduler decodes strictly (``loads``) and fails that row instead.
    """
    try:
        return kombu_json.object_hook(obj)
    except (ValueError, TypeError, KeyError, ArithmeticError):
        return obj


class JSONDecoder(json.JSONDecoder):
    """Turns kombu's typed envelopes back into Python values (leniently, see above)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("object_hook", lenient_object_hook)
        super().__init__(*args, **kwargs)


def dumps(data: Any) -> str:
    """Encode ``data`` as JSON text with typed envelopes.

    Raises ``TypeError`` for values JSON cannot hold (the 0.5.x contract).
    """
    try:
        return json.dumps(data, cls=JSONEncoder, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"cannot encode {type(data).__name__} as JSON: {exc}") from exc


def accepted(accept: Any) -> set[str]:
    """Content types from serializer names or types; None means the app's accept_content."""
    if accept is None:
        from celery import current_app

        accept = current_app.conf.accept_content
    return prepare_accept_content(accept)


def loads(
    data: Any, content_type: str = JSON_CONTENT_TYPE, encoding: str = "utf-8", accept=None
) -> Any:
    """Decode a stored value.

    Accepts JSON text (what 0.5.x stored) as well as values a JSON column has
    already decoded, so ``serialization.loads(row.args)`` works on 0.5.x and
    1.x rows alike. Other content types go through kombu, limited to
    ``accept`` (default: the app's ``accept_content``), so pickle is refused
    unless the app accepts it.
    """
    if data is None or isinstance(data, (list, dict, int, float, bool)):
        return data
    try:
        if content_type == JSON_CONTENT_TYPE:
            return kombu_json.loads(data)
        return kombu_loads(data, content_type, encoding, accept=accepted(accept))
    except (DecodeError, ValueError) as exc:
        raise TypeError(f"cannot decode stored value: {exc}") from exc


#: Content types whose decoders build plain data and never run code (kombu's yaml uses
#: ``safe_load``): the only ones the admin decodes, whatever the app accepts.
SAFE_CONTENT_TYPES = frozenset(
    {"application/json", "application/x-msgpack", "application/x-yaml", "application/data"}
)


def safe_accept(accept: Any = None) -> set[str]:
    """What the web tier may decode: the app's accepted content types (``accept``, default
    ``accept_content``) that are in ``SAFE_CONTENT_TYPES``. Never pickle: a row anyone could
    write would otherwise run code in the web process."""
    return accepted(accept) & SAFE_CONTENT_TYPES


def not_decoded_text(content_type: str | None, size: int) -> str:
    """What the admin says instead of a value it does not decode."""
    if encryption.is_sealed(content_type):
        return f"encrypted at rest ({size:,} bytes); never shown here"
    return (
        f"stored as {content_type} ({size:,} bytes); not decoded here: decoding it could run "
        "code in the web process (a worker or the scheduler decodes it)"
    )


def text_safe(value: str | None) -> str | None:
    """A display text (a repr, a traceback) that every database's text column holds.

    PostgreSQL refuses NUL characters in text; Celery's reprs and tracebacks keep them
    raw. They are shown as ``\\x00``, as ``repr()`` shows them.
    """
    if value is None or "\x00" not in value:
        return value
    return value.replace("\x00", "\\x00")


def json_text_or_none(value: Any) -> str | None:
    """JSON text for ``value``, or None when JSON (or the database) cannot hold it.

    PostgreSQL's jsonb rejects NUL characters, so those values are packed too.
    """
    try:
        text = dumps(value)
    except TypeError:
        return None
    if "\\u0000" in text:
        return None
    return text


@dataclass(frozen=True)
class EncodedCall:
    """How a task's args/kwargs are stored: JSON columns, or a packed payload."""

    args: str | None  # JSON text
    kwargs: str | None  # JSON text
    packed: bytes | None = None
    packed_content_type: str | None = None


def encode_call_json(args: Any, kwargs: Any) -> EncodedCall | None:
    """args/kwargs as the JSON columns hold them; None when those cannot (JSON messages can
    carry NaN, Infinity and strings with NUL, which the JSON columns cannot hold). The caller
    then packs them (``encode_packed``) with the serializer the task message uses: what the
    message carried, the row holds, and no serializer the app did not choose is introduced."""
    args_text = json_text_or_none(list(args or ()))
    kwargs_text = json_text_or_none(dict(kwargs or {}))
    if args_text is None or kwargs_text is None:
        return None
    return EncodedCall(args_text, kwargs_text)


def encode_packed(args: Any, kwargs: Any, serializer: str, encrypt: bool = False) -> EncodedCall:
    """args/kwargs as one payload of ``serializer`` (sealed when ``encrypt``). Raises kombu's
    ``EncodeError`` when ``serializer`` cannot encode them."""
    content_type, _encoding, payload = kombu_dumps(
        [list(args or ()), dict(kwargs or {})], serializer=serializer
    )
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if encrypt:  # ``encryption``: one encrypted payload, nothing readable in the row
        payload, content_type = encryption.seal(payload, content_type)
    return EncodedCall(None, None, payload, content_type)


def decode_packed(payload: bytes, content_type: str, accept) -> tuple[list, dict]:
    """Decode a packed (args, kwargs) pair; ``accept`` guards against pickle."""
    payload = bytes(payload)
    if encryption.is_sealed(content_type):
        payload, content_type = encryption.open_sealed(payload, content_type)
    args, kwargs = kombu_loads(payload, content_type, "binary", accept=accepted(accept))
    return list(args), dict(kwargs)


@dataclass(frozen=True)
class EncodedResult:
    data: str | None
    content_type: str
    content_encoding: str


def encode_result(value: Any, serializer: str) -> EncodedResult:
    """Encode a result with ``serializer``; binary payloads are stored as base64 text."""
    content_type, content_encoding, data = kombu_dumps(value, serializer=serializer)
    if content_encoding == "binary":
        data = base64.b64encode(data).decode("ascii")
    elif isinstance(data, bytes):
        data = data.decode(content_encoding or "utf-8")
    return EncodedResult(data, content_type, content_encoding)


def forced_json(value: Any) -> EncodedResult:
    """The FORCE_JSON envelope for a value JSON cannot hold."""
    data = dumps({"value": str(value), "forced_json": True})
    return EncodedResult(data, JSON_CONTENT_TYPE, "utf-8")


def encode_result_json(value: Any, force: bool) -> EncodedResult:
    """Encode a result as JSON, optionally forcing values JSON cannot hold (FORCE_JSON).

    Strict JSON when it can (queryable as a JSON column); NaN and Infinity, which Celery's
    JSON messages and results carry, as kombu's JSON (the stored text is what Celery would
    store; only a cast of that row to a JSON column refuses it).
    """
    try:
        return EncodedResult(dumps(value), JSON_CONTENT_TYPE, "utf-8")
    except TypeError as exc:
        try:
            return EncodedResult(kombu_json.dumps(value), JSON_CONTENT_TYPE, "utf-8")
        except (TypeError, ValueError):
            if force:
                return forced_json(value)
            raise EncodeError(str(exc)) from exc


def seal_result(encoded: EncodedResult) -> EncodedResult:
    """An encoded result, encrypted (``encryption``): base64 text of the token, the content
    type saying what it holds, the holder's encoding kept."""
    if encoded.data is None:
        return encoded
    raw = encoded.data.encode("ascii") if encoded.content_encoding == "binary" else None
    payload = base64.b64decode(raw) if raw is not None else encoded.data.encode("utf-8")
    token, content_type = encryption.seal(payload, encoded.content_type)
    return EncodedResult(token.decode("ascii"), content_type, encoded.content_encoding)


def decode_result(data: str | None, content_type: str, content_encoding: str, accept) -> Any:
    """Decode a stored result; raises kombu's ContentDisallowed for untrusted types."""
    if data is None:
        return None
    if encryption.is_sealed(content_type):
        payload, content_type = encryption.open_sealed(data.encode("ascii"), content_type)
        return kombu_loads(payload, content_type, content_encoding, accept=accepted(accept))
    payload: str | bytes = data
    if content_encoding == "binary":
        payload = base64.b64decode(data)
    return kombu_loads(payload, content_type, content_encoding, accept=accepted(accept))
