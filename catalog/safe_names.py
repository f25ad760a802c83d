"""File names that come from servers, made safe to create inside a folder we chose, and URLs
made safe to show and store.

A server (or a model page) names the file; that name must never climb out of the target folder
(`../../.bashrc`), hide itself (`.bashrc`), carry control characters or characters other
systems refuse, or be too long for the file system. A URL's query may hold a signature or a
token, and its user part a password, so messages and the catalog keep URLs without them.
"""

from __future__ import annotations

import re
import unicodedata
from email.message import Message
from email.utils import collapse_rfc2231_value
from urllib.parse import unquote, urlsplit

MAX_NAME_BYTES = 200  # well under the usual 255, leaving room for `.partial.json`
_REFUSED = re.compile(r'[\x00-\x1f\x7f<>:"|?*\\/]')
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
             *(f"lpt{i}" for i in range(10))}


def safe_file_name(name: str | None, fallback: str = "download") -> str:
    """`name` reduced to a plain, visible file name (never empty, never a path)."""
    name = unicodedata.normalize("NFC", name or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]  # the last part of any path given
    name = _REFUSED.sub("_", name).strip().strip(".").strip()
    name = re.sub(r"\s+", " ", name)
    if not name:
        name = fallback
    elif name.split(".")[0].lower() in _RESERVED:  # names Windows keeps for devices
        name = f"{fallback}-{name}"
    return _shorten(name)


def _shorten(name: str) -> str:
    if len(name.encode("utf-8")) <= MAX_NAME_BYTES:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or len(suffix) > 20:
        stem, suffix = name, ""
    budget = MAX_NAME_BYTES - len(suffix.encode("utf-8")) - (1 if suffix else 0)
    cut = stem.encode("utf-8")[:budget].decode("utf-8", "ignore").rstrip()
    return f"{cut}.{suffix}" if suffix else cut


def name_from_disposition(header: str | None) -> str | None:
    """The file name a Content-Disposition header gives (RFC 6266: `filename*`, the encoded
    one, wins over `filename`)."""
    if not header:
        return None
    message = Message()
    message["Content-Disposition"] = header
    plain = None
    for key, value in message.get_params(header="content-disposition")[1:]:
        if key.lower() != "filename":
            continue
        if isinstance(value, tuple):  # filename*=CHARSET'LANG'VALUE, already split
            return collapse_rfc2231_value(value) or None
        plain = plain or value
    return plain or None


def name_from_url(url: str) -> str | None:
    path = unquote(urlsplit(url).path)
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return last or None


def bare_url(url) -> str:
    """`url` (a string or httpx.URL) without its query, fragment and user:password@."""
    text = str(url)
    try:
        parts = urlsplit(text)
    except ValueError:  # it does not parse (`http://[::1/x`): cut it by hand, never raise
        scheme, sep, rest = re.split(r"[?#]", text, maxsplit=1)[0].partition("://")
        authority, slash, path = rest.partition("/")
        return f"{scheme.lower()}{sep}{authority.rpartition('@')[2]}{slash}{path}"
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def printable_ref(ref: str) -> str:
    """A download reference as output may show it: a URL bare (its query or user part may be
    a token; any scheme but ours, in any case), the other references as they are."""
    scheme, sep, _ = ref.strip().partition("://")
    if sep and scheme.lower() not in ("civitai", "hf"):
        return bare_url(ref.strip())
    return ref
