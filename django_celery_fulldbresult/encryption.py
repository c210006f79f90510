"""Arguments, and optionally results, encrypted at rest (``cryptography``'s Fernet).

Opt in with ``DJANGO_CELERY_FULLDBRESULT_ENCRYPTION_KEYS = [key, ...]`` (Fernet keys, from
``Fernet.generate_key()``; the first encrypts, every one decrypts, so a new key is put first
and an old one removed once no row needs it) and ``ENCRYPTED_TASKS`` (task-name patterns,
default every task). For those tasks the row keeps its call as one encrypted payload in
``packed_args`` (args and kwargs empty; the signature of such a task in another row's
options carries it under ``SEALED_KEY``), so Retry, Send now and the scheduler still send
it exactly, while a database dump shows nothing readable. ``ENCRYPT_RESULTS = True`` does
the same for their results. JSON lookups (``args__0=...``) cannot see encrypted values, and
the admin never shows them.

An encrypted payload's content type names what it holds: ``application/x-fulldbresult-fernet;
inner=<content type>``. What it holds is decoded as any stored value is: pickle only where
the app accepts it, never in the admin.
"""

from __future__ import annotations

import fnmatch
import functools
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from . import conf

PREFIX = "application/x-fulldbresult-fernet"
#: Where a signature in another row's options keeps its encrypted arguments.
SEALED_KEY = "fulldbresult_sealed"


class DecryptionError(ValueError):
    """No configured key opens a stored payload."""


def keys() -> tuple[str, ...]:
    value = conf.get("ENCRYPTION_KEYS") or ()
    if isinstance(value, (str, bytes)):
        value = (value,)
    return tuple(key.decode() if isinstance(key, bytes) else str(key) for key in value)


def enabled() -> bool:
    return bool(keys())


def applies_to(task_name: str | None) -> bool:
    """Whether the calls of ``task_name`` are stored encrypted."""
    if not task_name or not enabled():
        return False
    return any(fnmatch.fnmatchcase(task_name, pattern) for pattern in conf.get("ENCRYPTED_TASKS"))


def results_apply_to(task_name: str | None) -> bool:
    return bool(conf.get("ENCRYPT_RESULTS")) and applies_to(task_name)


@functools.lru_cache(maxsize=4)
def _fernet(configured: tuple[str, ...]) -> Any:
    try:
        from cryptography.fernet import Fernet, MultiFernet
    except ImportError as exc:  # pragma: no cover - the extra is not installed
        raise ImproperlyConfigured(
            "DJANGO_CELERY_FULLDBRESULT_ENCRYPTION_KEYS needs the cryptography package: "
            "pip install 'django-celery-fulldbresult[encryption]'"
        ) from exc
    try:
        return MultiFernet([Fernet(key) for key in configured])
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(
            f"DJANGO_CELERY_FULLDBRESULT_ENCRYPTION_KEYS: not a Fernet key ({exc}); make one "
            "with cryptography.fernet.Fernet.generate_key()"
        ) from exc


def is_sealed(content_type: str | None) -> bool:
    return bool(content_type) and content_type.startswith(PREFIX)


def inner_content_type(content_type: str | None) -> str | None:
    """What an encrypted payload holds (the content type itself for any other)."""
    if not is_sealed(content_type):
        return content_type
    return content_type.partition(";inner=")[2] or None


def seal(payload: bytes, content_type: str) -> tuple[bytes, str]:
    """Encrypt ``payload`` with the first key; (token, the content type that says so)."""
    return _fernet(keys()).encrypt(payload), f"{PREFIX};inner={content_type}"


def open_sealed(token: bytes | str, content_type: str) -> tuple[bytes, str]:
    """(payload, its content type) of an encrypted value; ``DecryptionError`` if no
    configured key opens it."""
    from cryptography.fernet import InvalidToken

    configured = keys()
    if not configured:
        raise DecryptionError(
            "this value is encrypted and DJANGO_CELERY_FULLDBRESULT_ENCRYPTION_KEYS is empty"
        )
    try:
        payload = _fernet(configured).decrypt(token)
    except InvalidToken as exc:
        raise DecryptionError(
            "no key in DJANGO_CELERY_FULLDBRESULT_ENCRYPTION_KEYS opens this value (was its "
            "key removed?)"
        ) from exc
    return payload, inner_content_type(content_type) or ""
