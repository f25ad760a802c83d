"""HTTP for the remote clients: jittered back-off on 429 and 5xx, and redirects followed by hand.

httpx would forward an `Authorization` header along a redirect within the same host only, but a
token must not even reach another port of that host, and Civitai's downloads redirect to a storage
host with a signed URL. So redirects are followed here, one hop at a time, and the token (and
any header meant for the API alone) is added to a hop only when its origin (scheme, host, port)
is the API's own. Nothing here logs or repeats a header; messages name URLs without queries.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from catalog.config import NetworkSettings
from catalog.safe_names import bare_url
from mergekit_sd.errors import WorkFailed

MAX_REDIRECTS = 10
USER_AGENT = "mergekit-sd"


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port); an address that does not parse has none (and gets no token)."""
    try:
        parts = urlsplit(str(url))
        port = parts.port
    except ValueError:
        return "", "", 0
    default = {"http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.scheme, (parts.hostname or "").lower(), port or default


def is_retryable(status: int) -> bool:
    return status == 429 or 500 <= status < 600


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_settings(cls, network: NetworkSettings) -> RetryPolicy:
        return cls(network.attempts, network.backoff, network.max_backoff)

    def delay(self, retry: int, retry_after: str | None = None) -> float:
        """Seconds before retry number `retry` (0-based): the server's Retry-After when it gives
        one, else "full jitter" (a random wait up to backoff * 2**retry), so many clients that
        failed together do not come back together."""
        if retry_after and retry_after.strip().isdigit():
            return min(self.max_backoff, float(retry_after.strip()))
        return random.uniform(0, min(self.max_backoff, self.backoff * 2 ** retry))


class GuardedClient:
    """An httpx client whose token and API-only headers go to one origin only."""

    def __init__(self, api_base: str | None = None, token: str | None = None,
                 api_headers: dict[str, str] | None = None, retry: RetryPolicy | None = None,
                 timeout: float = 60.0, service: str = "the server"):
        self.api_origin = origin(api_base) if api_base else None
        self._token = token
        self._api_headers = dict(api_headers or {})
        self.retry = retry or RetryPolicy()
        self.service = service
        self.requests = 0  # requests sent (every retry and redirect hop counts)
        self._count_lock = threading.Lock()
        self._client = httpx.Client(follow_redirects=False, headers={"User-Agent": USER_AGENT},
                                    timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)))

    def __repr__(self) -> str:  # never shows the token
        return f"GuardedClient({self.service}, token={'set' if self._token else 'none'})"

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> GuardedClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, url: str, *, what: str, params=None, json=None,
                headers: dict[str, str] | None = None, stream: bool = False) -> httpx.Response:
        """The final response after redirects, retried on 429, 5xx and connection failures with
        back-off. A 429/5xx that outlasts the retries is returned for the caller to word; a
        connection that keeps failing raises WorkFailed. With `stream`, the caller closes it."""
        attempts = max(1, self.retry.attempts)
        for attempt in range(attempts):
            last = attempt + 1 == attempts
            try:
                response = self._follow(method, url, params, json, headers or {}, stream)
            except (httpx.InvalidURL, httpx.UnsupportedProtocol):
                # an address that can never work (a redirect to ftp://, a Location that does
                # not parse): trying again would only wait
                raise WorkFailed(f"{what}: the address (or one it redirected to) is not a "
                                 "valid http(s) URL; check the link") from None
            except httpx.TransportError as exc:
                if last:
                    raise WorkFailed(f"{what}: {self.service} could not be reached "
                                     f"({describe_transport_error(exc)}) after {attempts} tries; "
                                     "check the connection and try again") from None
                self.retry.sleep(self.retry.delay(attempt))
                continue
            if is_retryable(response.status_code) and not last:
                retry_after = response.headers.get("Retry-After")
                response.close()
                self.retry.sleep(self.retry.delay(attempt, retry_after))
                continue
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _follow(self, method: str, url: str, params, json, headers: dict[str, str],
                stream: bool) -> httpx.Response:
        for _ in range(MAX_REDIRECTS + 1):
            hop_headers = dict(headers)
            if self.api_origin is not None and origin(url) == self.api_origin:
                hop_headers.update(self._api_headers)
                if self._token:
                    hop_headers["Authorization"] = f"Bearer {self._token}"
            request = self._client.build_request(method, url, params=params, json=json,
                                                 headers=hop_headers)
            with self._count_lock:
                self.requests += 1
            response = self._client.send(request, stream=stream)
            if not (response.is_redirect and "Location" in response.headers):
                return response
            response.close()
            url = urljoin(str(request.url), response.headers["Location"])
            params = None  # the Location is complete; the first hop's query is not carried on
            if response.status_code == 303 or (response.status_code in (301, 302)
                                               and method == "POST"):
                method, json = "GET", None
        raise WorkFailed(f"{bare_url(url)}: more than {MAX_REDIRECTS} redirects; the link is "
                         "broken, try again later")


def describe_transport_error(exc: httpx.TransportError) -> str:
    """A few words for a connection failure, without the request it carried."""
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or host unknown"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return "the connection dropped"
    return exc.__class__.__name__
