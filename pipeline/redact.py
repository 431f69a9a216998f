"""Credentials written into URIs (`http://user:<password>@host`): kept out of everything printed or logged.

The one rule: a URI's user-info part (`user:password@`) is dropped wherever text leaves the process (messages,
log lines, MLflow params and tags), and MLflow itself is given the URI without it plus the login on the side
(pipeline/tracking/store.py: use), so that its own printed links and error messages hold no password either.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

# scheme://user-info@ : the user-info runs up to the last "@" before the host ends (/, ?, # or a space), as
# urllib and requests split it; a password with an unencoded "@" is dropped whole.
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")


def redact(text: str) -> str:
    """`text` with the user-info (`user:password@`) of every URI in it removed."""
    return _USERINFO.sub(r"\1", text)


def split_login(uri: str) -> tuple[str, tuple[str, str] | None]:
    """(the URI without user-info, (user, password) percent-decoded or None when it holds no password)."""
    parts = urlsplit(uri)
    if parts.password is None:  # no user-info, or a user alone: left to the HTTP client as it is
        return uri, None
    bare = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()
    return bare, (unquote(parts.username or ""), unquote(parts.password))
