"""Credentials out of every URI that leaves the process: metadata, logs, MLflow, CLI output, errors.

`redact_uri` hides the password of the user info (`user:***@`; a lone user info, which may be a
token, becomes `***@`) and the value of every query or fragment parameter whose name looks like a
secret (password, token, secret, key, signature, credential, ...). `redact_text` does the same to
every URI inside a message, and to `password=...`-style pairs outside URIs (libpq DSNs).
Everything else is kept byte for byte, so a redacted URI still says where it points.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

REDACTED = "***"

# Parameter names (lower case, without - _ .) that carry a secret: exact names, then name parts.
_SECRET_NAMES = {"key", "sig", "pass", "pw", "code", "auth"}
_SECRET_PARTS = ("password", "passwd", "pwd", "secret", "token", "signature", "credential", "apikey",
                 "accesskey", "privatekey", "sharedkey", "accountkey", "sessionkey", "authorization")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# user:password@ where urlsplit would not see it (a '/', '?' or '#' inside an unencoded password).
_RAW_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/?#@\s]*):(?P<rest>[^@\s]*)@")
_TEXT_PAIR = re.compile(r"(?P<key>\b[\w.\-]*?(?:password|passwd|pwd|secret|token|signature|api[_-]?key)[\w.\-]*)"
                        r"(?P<sep>\s*=\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^\s&;,'\"]+)", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether a query parameter (or key=value key) of this name holds a secret."""
    flat = re.sub(r"[-_.\s]", "", unquote(name).lower())
    return flat in _SECRET_NAMES or any(part in flat for part in _SECRET_PARTS)


def _redact_params(part: str) -> str:
    out = []
    for pair in re.split(r"([&;])", part):
        key, eq, value = pair.partition("=")
        out.append(f"{key}={REDACTED}" if eq and value and is_secret_name(key) else pair)
    return "".join(out)


def _hide_userinfo(uri: str) -> str:
    try:
        netloc = urlsplit(uri).netloc
    except ValueError:  # e.g. a broken IPv6 literal: only the raw pattern below applies
        netloc = ""
    if "@" in netloc and netloc in uri:  # (urlsplit drops tabs and newlines: then not `in uri`)
        userinfo = netloc.rpartition("@")[0]
        start = uri.index(netloc)  # right after "scheme://": a scheme holds no '@'
        user, colon, _ = userinfo.partition(":")
        return uri[:start] + (f"{user}:{REDACTED}" if colon else REDACTED) + uri[start + len(userinfo):]
    raw = _RAW_USERINFO.match(uri)
    if raw and not re.split(r"[/?#]", raw.group("rest"))[0].isdigit():  # digits: a port, not a password
        # user:pass@ with a '/', '?' or '#' in the password: urlsplit took the password for a path.
        return f"{raw.group('head')}{raw.group('user')}:{REDACTED}@{uri[raw.end():]}"
    return uri


def redact_uri(uri: str) -> str:
    """`uri` with its password, token-like user info and secret parameters replaced by ***."""
    if not uri or not isinstance(uri, str):
        return uri
    head, hash_, fragment = _hide_userinfo(uri).partition("#")
    base, question, query = head.partition("?")
    # Parameters: in the query and in the fragment (OAuth puts tokens there).
    out = base + (question + _redact_params(query) if question else "")
    return out + (hash_ + _redact_params(fragment) if hash_ else "")


def has_credentials(uri: str) -> bool:
    """Whether `uri` carries a credential that `redact_uri` would hide."""
    return bool(uri) and redact_uri(uri) != uri


def redact_text(text: str) -> str:
    """`text` (an error message, a log line) with every URI in it redacted, and `password=...` pairs."""
    if not text or not isinstance(text, str):
        return text
    out = _URI.sub(lambda m: redact_uri(m.group(0)), text)
    return _TEXT_PAIR.sub(lambda m: f"{m.group('key')}{m.group('sep')}{REDACTED}"
                          if m.group("value") != REDACTED else m.group(0), out)


def redact_values(value: Any) -> Any:
    """A JSON-like structure (dicts, lists, strings) with `redact_text` applied to every string."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return value
