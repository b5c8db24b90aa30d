"""SDFS file-name rules: one function decides what a valid name is."""

from __future__ import annotations

import fnmatch
import unicodedata

MAX_NAME_LEN = 255


class BadName(ValueError):
    pass


def validate_name(name: object, max_len: int = MAX_NAME_LEN) -> str:
    """Return the name if it is a safe relative SDFS name, else raise BadName with the reason.

    Names look like relative POSIX paths (``data/img_001.jpg``) but are stored flattened, so even a
    name that slipped through could not escape the storage directory; the rules make errors clear.
    """
    if not isinstance(name, str):
        raise BadName("file name must be a string")
    if not name:
        raise BadName("file name is empty")
    try:
        encoded = name.encode()
    except UnicodeEncodeError:
        raise BadName("file name is not valid UTF-8 text") from None
    if len(encoded) > max_len:
        raise BadName(f"file name longer than {max_len} bytes")
    if name.startswith("/"):
        raise BadName(f"absolute path not allowed: {name!r}")
    for ch in name:
        if ch == "\0" or unicodedata.category(ch) in ("Cc", "Cf"):
            raise BadName(f"control character {ch!r} in file name")
    if "\\" in name:
        raise BadName("backslash not allowed in file name")
    parts = name.split("/")
    if any(p in ("..", ".") for p in parts):
        raise BadName(f"'.' and '..' path components are not allowed: {name!r}")
    if any(p == "" for p in parts):
        raise BadName(f"empty path component in {name!r}")
    return name


def match(pattern: str, name: str) -> bool:
    """``ls`` matching: a glob, or a plain prefix when the pattern has no glob characters."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern)
