"""What a health-check path must be for every reader of it: the API, pleaco's own probe
(an HTTP client), and Caddy, which parses it with Go's ``url.Parse`` when it loads a config.

The API and the proxy's config builder share these rules, so a value the API accepts can
never make the proxy's boot file one Caddy refuses (a proxy that cannot boot takes every
app on the node offline).
"""

from __future__ import annotations

import re

MAX_LENGTH = 1024
# A path and an optional query: visible ASCII only (no space, no control character), and
# no fragment: a client never sends one, so the path pleaco probes would differ from the
# one Caddy probes, and Go parses it apart.
_CHARS = re.compile(r"^[\x21-\x7e]*$")
# '%' only as an escape of two hex digits (Go: 'invalid URL escape "%zz"').
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def health_path_problem(path: object) -> str | None:
    """Why ``path`` is not a usable health-check path, or None when it is one."""
    if not isinstance(path, str):
        return f"{path!r} must be a string"
    if not path.startswith("/"):
        return f"{path!r} must be a path starting with '/'"
    if path.startswith("//"):
        # Go reads "//name/x" as a host "name" and the path "/x".
        return f"{path!r} must not start with '//' (it would read as a host name)"
    if len(path) > MAX_LENGTH:
        return f"must be at most {MAX_LENGTH} characters"
    if not _CHARS.fullmatch(path):
        return f"{path!r} may hold only visible ASCII characters (no spaces or control characters)"
    if "#" in path:
        return f"{path!r} must not have a fragment ('#'): it is never sent to the app"
    if _BAD_ESCAPE.search(path):
        return f"{path!r} has a '%' that is not followed by two hex digits (escape it as %25)"
    return None
