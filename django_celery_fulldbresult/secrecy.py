"""Secret tasks: which tasks are secret, and what the package keeps of them.

A task is secret, and its arguments are never stored in any row, when:

* every task: ``DJANGO_CELERY_FULLDBRESULT_STORE_ARGS = False``;
* by name: ``DJANGO_CELERY_FULLDBRESULT_SECRET_TASKS = ["billing.*"]`` (fnmatch patterns);
* by attribute: ``@shared_task(store_args=False)`` (known where the task is registered);
* per call: ``apply_async(..., headers=secret_headers())``, or ``sig.set(headers=...)``.

What is kept of a secret task (README, "Security"):

* no args, kwargs or packed arguments; ``replayable`` is False;
* ``argsrepr``/``kwargsrepr``: ``<N hidden>``, or a repr the caller chose
  (``apply_async(argsrepr=...)``). The publisher also puts ``<N hidden>`` in the message
  itself (Celery's default repr would carry the secret to the broker, the workers' logs and
  their events) and marks the message with ``SECRET_HEADER``; a worker keeps a message's repr
  only when that mark says a publisher of this package checked it;
* in the options of other rows (``link``, ``link_error``, ``chain``, ``chord``) the secret
  task's signature is kept without its arguments (``HIDDEN_KEY`` says so), and that row is
  not replayable either (its copy would run the secret task without its arguments);
* result and traceback: kept (``AsyncResult.get()`` needs them) unless
  ``DJANGO_CELERY_FULLDBRESULT_SECRET_RESULTS = False`` (``hide_outcome``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from celery.utils.saferepr import saferepr
from kombu.utils import json as kombu_json

from . import conf, encryption

#: The message header that marks a call secret (set by the caller, or by this package's
#: publisher for every secret task, once it has hidden the message's reprs).
SECRET_HEADER = "fulldbresult_secret"

#: Its value once this package's publisher has checked the message's reprs (a caller marks
#: a call secret with any other true value).
CHECKED = "checked"

#: Set on a stored signature whose arguments were taken out.
HIDDEN_KEY = "fulldbresult_hidden"

#: Option keys that hold signatures (Celery's protocol 2 embed and ``apply_async``).
SIGNATURE_OPTIONS = ("link", "link_error", "chain", "chord")

#: What a secret task's exception message becomes with ``SECRET_RESULTS = False``.
HIDDEN_MESSAGE = "(hidden: secret task)"

#: Why a row cannot be sent again, for the admin and ``replay``.
REFUSALS = {
    "secret": "it is a secret task: its arguments are not stored",
    "secret-callback": (
        "its link, chain or chord holds a secret task, whose arguments are not stored"
    ),
    "unencodable": "its arguments could not be stored",
    "imported": (
        "it was imported from django-celery-results, which keeps only a repr of the arguments"
    ),
}

#: ``options["imported_from"]`` of a row imported from another result backend.
IMPORTED_KEY = "imported_from"


def secret_headers() -> dict[str, Any]:
    """``apply_async(..., headers=secret_headers())``: this call is secret."""
    return {SECRET_HEADER: True}


def is_secret(name: str | None, task: Any = None, headers: Mapping[str, Any] | None = None) -> bool:
    """Whether the arguments of a call of ``name`` must never be stored."""
    if headers and headers.get(SECRET_HEADER):
        return True
    if not conf.get("STORE_ARGS"):
        return True
    if task is not None and getattr(task, "store_args", True) is False:
        return True
    return bool(name) and any(
        fnmatch.fnmatchcase(name, pattern) for pattern in conf.get("SECRET_TASKS")
    )


# -- reprs ------------------------------------------------------------------------------


def hidden_repr(value: Any) -> str:
    try:
        count = len(value or ())
    except TypeError:
        count = 1
    return f"<{count} hidden>"


def _default_reprs(value: Any, app: Any) -> set[str]:
    """The reprs Celery would have put in the message by itself for ``value``."""
    maxsize = getattr(app.amqp, "argsrepr_maxsize", 1024)
    maxlevels = app.conf.get("task_repr_maxlevels", 3)
    if isinstance(value, Mapping):
        forms: list[Any] = [value]
    else:
        forms = [tuple(value or ()), list(value or ())]
    return {saferepr(form, maxsize, maxlevels=maxlevels) for form in forms}


def chosen_or_hidden(given: Any, value: Any, app: Any) -> str:
    """A repr the caller chose on purpose (``apply_async(argsrepr=...)``, Celery's way of
    hiding secrets), else ``<N hidden>``. Only where ``value`` is the caller's own Python
    value (the publisher): Celery's default repr of it is recognised and replaced."""
    if isinstance(given, str) and given not in _default_reprs(value, app):
        return given
    return hidden_repr(value)


def hide_message_reprs(headers: dict[str, Any], args: Any, kwargs: Any, app: Any) -> None:
    """Publisher side, in place on the message's headers: no secret in the reprs, and the
    mark that they were checked (``SECRET_HEADER``)."""
    headers["argsrepr"] = chosen_or_hidden(headers.get("argsrepr"), args, app)
    headers["kwargsrepr"] = chosen_or_hidden(headers.get("kwargsrepr"), kwargs, app)
    headers[SECRET_HEADER] = CHECKED


def reprs_checked(value: Any) -> bool:
    """Whether a message's ``SECRET_HEADER`` says this package's publisher checked it."""
    return value == CHECKED


def stored_reprs(argsrepr: Any, kwargsrepr: Any, args: Any, kwargs: Any, checked: bool):
    """The reprs to store for a secret call read from a message (worker side, or a row
    written from a message): the message's own when a publisher of this package checked
    them (``checked``), else ``<N hidden>`` (the arguments there have been through the
    serializer: a tuple became a list, so Celery's default repr cannot be recognised)."""
    if checked:
        return argsrepr, kwargsrepr
    return hidden_repr(args), hidden_repr(kwargs)


# -- signatures in options --------------------------------------------------------------


def _signatures(value: Any) -> list[dict]:
    if isinstance(value, Mapping):
        return [value]  # type: ignore[list-item]
    if isinstance(value, (list, tuple)):
        return [item for item in value if isinstance(item, Mapping)]
    return []


def _hide_in_signature(sig: Mapping[str, Any], app: Any) -> tuple[dict[str, Any], bool]:
    """A copy of a signature (a dict, as messages carry them) without the arguments of any
    secret task in it, and whether anything was hidden."""
    sig = dict(sig)
    hidden = False
    options = sig.get("options")
    if isinstance(options, Mapping):
        options, hidden = hide_in_options(options, app)
        sig["options"] = options
    kind = sig.get("subtask_type")
    inner = sig.get("kwargs")
    if kind in ("group", "chain", "chord") and isinstance(inner, Mapping):
        inner = dict(inner)
        for key in ("tasks", "header", "body"):
            if key in inner:
                inner[key], found = _hide_in_value(inner[key], app)
                hidden = hidden or found
        sig["kwargs"] = inner
        return sig, hidden
    name = sig.get("task")
    headers = options.get("headers") if isinstance(options, Mapping) else None
    task = app.tasks.get(name) if (app.finalized and isinstance(name, str)) else None
    if is_secret(name, task, headers if isinstance(headers, Mapping) else None):
        sig["args"], sig["kwargs"], sig[HIDDEN_KEY] = [], {}, True
        hidden = True
    elif encryption.applies_to(name) and (sig.get("args") or sig.get("kwargs")):
        # Kept, encrypted (``reveal_in_options`` opens it where the call is sent again).
        call = kombu_json.dumps([list(sig.get("args") or ()), dict(sig.get("kwargs") or {})])
        token, _content_type = encryption.seal(call.encode("utf-8"), "application/json")
        sig["args"], sig["kwargs"], sig[encryption.SEALED_KEY] = [], {}, token.decode("ascii")
    return sig, hidden


def _hide_in_value(value: Any, app: Any) -> tuple[Any, bool]:
    if isinstance(value, Mapping):
        return _hide_in_signature(value, app)
    if isinstance(value, (list, tuple)):
        hidden = False
        items = []
        for item in value:
            if isinstance(item, Mapping):
                item, found = _hide_in_signature(item, app)
                hidden = hidden or found
            items.append(item)
        return items, hidden
    return value, False


def hide_in_options(options: Mapping[str, Any], app: Any) -> tuple[dict[str, Any], bool]:
    """A copy of a call's options whose signatures (``SIGNATURE_OPTIONS``) hold no secret
    task's arguments, and whether any were taken out."""
    options = dict(options)
    hidden = False
    for key in SIGNATURE_OPTIONS:
        if _signatures(options.get(key)):
            options[key], found = _hide_in_value(options[key], app)
            hidden = hidden or found
    return options, hidden


def reveal_in_options(value: Any) -> Any:
    """Stored options (or a part of them) with the encrypted arguments of their signatures
    opened (``encryption.SEALED_KEY``), for sending the call again."""
    if isinstance(value, Mapping):
        value = {key: reveal_in_options(item) for key, item in value.items()}
        token = value.pop(encryption.SEALED_KEY, None)
        if isinstance(token, str):
            payload, _content_type = encryption.open_sealed(token.encode("ascii"), "")
            value["args"], value["kwargs"] = kombu_json.loads(payload.decode("utf-8"))
        return value
    if isinstance(value, list):
        return [reveal_in_options(item) for item in value]
    return value


def holds_hidden(options: Any) -> bool:
    """Whether stored options hold a signature whose arguments were taken out."""
    if isinstance(options, Mapping):
        if options.get(HIDDEN_KEY):
            return True
        return any(holds_hidden(value) for value in options.values())
    if isinstance(options, (list, tuple)):
        return any(holds_hidden(item) for item in options)
    return False


def refusal(row: Any) -> str:
    """Why a row that is not replayable cannot be sent again."""
    options = row.options if isinstance(row.options, Mapping) else {}
    headers = options.get("headers") if isinstance(options.get("headers"), Mapping) else None
    if is_secret(row.task, None, headers):
        return REFUSALS["secret"]
    if options.get(IMPORTED_KEY):
        return REFUSALS["imported"]
    if holds_hidden(options):
        return REFUSALS["secret-callback"]
    if row.argsrepr and row.argsrepr.startswith("<") and row.argsrepr.endswith(" hidden>"):
        return REFUSALS["secret"]  # secret by an attribute this process does not know
    return REFUSALS["unencodable"]


# -- results ----------------------------------------------------------------------------


def hide_outcome() -> bool:
    """``SECRET_RESULTS = False``: a secret task's result, traceback and exception message
    are not stored (its state and exception type are)."""
    return not conf.get("SECRET_RESULTS")
