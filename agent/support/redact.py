"""URLs as logs, health and status may show them: no password, token or credential parameter left in."""

from __future__ import annotations

import re

_SECRET_PARAM = re.compile(r"pass|pwd|token|key|secret|auth|sig|user|login|cred", re.IGNORECASE)


def redact_url(url: str) -> str:
    """rtsp://user:secret@host/...?password=x -> rtsp://user:***@host/...?password=*** for logs and health.

    A user alone may be a token, so it goes too. Query parameters that name a credential keep only their name.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    before_query, q, query = rest.partition("?")
    # The last '@' before the query ends the credentials, even with '@' or '/' inside a password.
    cred, at, path = before_query.rpartition("@")
    if at:
        path = (f"{cred.split(':', 1)[0]}:***@" if ":" in cred else "***@") + path
    if q:
        params = [(k, "***" if v and _SECRET_PARAM.search(k) else v)
                  for k, _, v in (p.partition("=") for p in query.split("&"))]
        path += "?" + "&".join(f"{k}={v}" if v else k for k, v in params)
    return f"{scheme}://{path}"
