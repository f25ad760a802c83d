"""Civitai's public API: model search, models and versions by id, versions by file hash (one and
in bulk), and the download endpoint with its file selectors.

The JSON comes back as Civitai sends it (dicts): `.civitai.info` sidecars store it unchanged,
which is what Civitai Helper and the web UIs read. Refusals become one sentence each: 401 (no or
a bad token), 403 (early access, with its deadline), 404 (no such id), 410 (archived).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlencode

import httpx

from catalog.config import CIVITAI_TOKEN_ENV, RemoteSettings
from catalog.remote_http import GuardedClient, RetryPolicy, is_retryable
from mergekit_sd.errors import UserError, WorkFailed

BY_HASH_BATCH = 100  # POST /model-versions/by-hash takes at most 100 hashes
BY_HASH_IDS_BATCH = 10_000  # POST /model-versions/by-hash/ids takes at most 10,000
MODELS_BY_ID_BATCH = 100  # GET /models?ids=... answers at most 100 models a page

MODEL_TYPES = ("Checkpoint", "TextualInversion", "Hypernetwork", "AestheticGradient", "LORA",
               "LoCon", "DoRA", "Controlnet", "Upscaler", "MotionModule", "VAE", "Poses",
               "Wildcards", "Workflows", "Other")
SORTS = ("Highest Rated", "Most Downloaded", "Newest")
PERIODS = ("AllTime", "Year", "Month", "Week", "Day")
# what the download endpoint lets one choose among a version's files
FILE_TYPES = ("Model", "Pruned Model", "VAE", "Config", "Text Encoder", "Negative",
              "Training Data", "Archive")
FORMATS = ("SafeTensor", "PickleTensor", "GGUF", "Diffusers", "Core ML", "ONNX", "Other")


class CivitaiRefused(UserError):
    """Civitai said no (401, 403, 404, 410 ...): one sentence with what to do."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass
class SearchPage:
    items: list[dict]
    next_cursor: str | None


@dataclass(frozen=True)
class FileChoice:
    """Selectors of the download endpoint; None leaves the choice to Civitai (the primary)."""
    type: str | None = None
    format: str | None = None
    size: str | None = None  # full, pruned
    fp: str | None = None  # fp16, fp32, bf16, fp8, nf4


class CivitaiClient:
    def __init__(self, base_url: str, token: str | None = None,
                 retry: RetryPolicy | None = None, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        # Content-Type: the download endpoint answers refusals as JSON only when asked this way;
        # without it, it redirects to a login page that would be saved as the "model"
        self.http = GuardedClient(self.base_url, token, {"Content-Type": "application/json"},
                                  retry, timeout, service="Civitai")

    @classmethod
    def from_settings(cls, settings: RemoteSettings) -> CivitaiClient:
        network = settings.network
        return cls(settings.civitai_base_url, settings.civitai_token,
                   RetryPolicy.from_settings(network), network.timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> CivitaiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- search and look-ups -----------------------------------------------------------------

    def search_models(self, query: str | None = None, types: Iterable[str] = (),
                      base_models: Iterable[str] = (), sort: str | None = None,
                      period: str | None = None, nsfw: bool | None = None, limit: int = 20,
                      cursor: str | None = None) -> SearchPage:
        """One page of GET /api/v1/models; `next_cursor` asks for the next."""
        types, base_models = list(types), list(base_models)
        for value, allowed, option in ((sort, SORTS, "--sort"), (period, PERIODS, "--period")):
            if value is not None and value not in allowed:
                raise UserError(f"{option} {value!r}: choose one of {', '.join(allowed)}")
        for value in types:
            if value not in MODEL_TYPES:
                raise UserError(f"--type {value!r}: choose one of {', '.join(MODEL_TYPES)}")
        params: list[tuple[str, str]] = [("limit", str(limit))]
        if query:
            params.append(("query", query))
        params += [("types", t) for t in types] + [("baseModels", b) for b in base_models]
        for key, value in (("sort", sort), ("period", period), ("cursor", cursor)):
            if value is not None:
                params.append((key, value))
        if nsfw is not None:
            params.append(("nsfw", "true" if nsfw else "false"))
        doc = self._json("GET", "/api/v1/models", "the model search", params=params)
        items = doc.get("items", [])
        # list() of a string would give its characters, and every caller reads items as objects
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise unexpected("the model search")
        metadata = mapping(doc.get("metadata"))
        cursor = metadata.get("nextCursor")
        return SearchPage(items, str(cursor) if cursor else None)

    def iter_models(self, max_items: int, page_size: int = 100, **filters) -> Iterator[dict]:
        """Search results across pages (following `nextCursor`), up to `max_items`."""
        cursor, given = None, 0
        while given < max_items:
            page = self.search_models(cursor=cursor, limit=min(page_size, max_items - given),
                                      **filters)
            for item in page.items[:max_items - given]:
                given += 1
                yield item
            if not page.next_cursor or not page.items:
                return
            cursor = page.next_cursor

    def model(self, model_id: int) -> dict:
        return self._json("GET", f"/api/v1/models/{int(model_id)}", f"model {model_id}")

    def models_by_ids(self, model_ids: Iterable[int]) -> list[dict]:
        """Many models in few requests (GET /api/v1/models?ids=1,2,...)."""
        ids = sorted({int(i) for i in model_ids})
        found = []
        for start in range(0, len(ids), MODELS_BY_ID_BATCH):
            chunk = ids[start:start + MODELS_BY_ID_BATCH]
            params = [("ids", ",".join(map(str, chunk))), ("limit", str(len(chunk))),
                      ("nsfw", "true")]
            doc = self._json("GET", "/api/v1/models", f"{len(chunk)} models", params=params)
            found.extend(i for i in sequence(doc.get("items")) if isinstance(i, dict))
        return found

    def version(self, version_id: int) -> dict:
        return self._json("GET", f"/api/v1/model-versions/{int(version_id)}",
                          f"model version {version_id}")

    def version_by_hash(self, file_hash: str) -> dict | None:
        """The version that has a file with this hash (SHA256, AutoV2, CRC32 ...), or None."""
        try:
            return self._json("GET", f"/api/v1/model-versions/by-hash/{file_hash}",
                              f"the file with hash {file_hash[:12]}")
        except CivitaiRefused as exc:
            if exc.status == 404:
                return None
            raise

    def versions_by_hashes(self, sha256s: Iterable[str]) -> list[dict]:
        """Full versions of files with these SHA256s, 100 hashes a request."""
        hashes = _unique_upper(sha256s)
        versions = []
        for start in range(0, len(hashes), BY_HASH_BATCH):
            chunk = hashes[start:start + BY_HASH_BATCH]
            versions.extend(self._json("POST", "/api/v1/model-versions/by-hash",
                                       f"the look-up of {len(chunk)} file hashes", json=chunk,
                                       shape=list))
        return [v for v in versions if isinstance(v, dict)]

    def version_ids_by_hashes(self, sha256s: Iterable[str]) -> dict[str, int]:
        """SHA256 (lowercase) -> version id of every hash Civitai knows, 10,000 hashes a
        request: the cheap first pass over a whole library."""
        hashes = _unique_upper(sha256s)
        found: dict[str, int] = {}
        for start in range(0, len(hashes), BY_HASH_IDS_BATCH):
            chunk = hashes[start:start + BY_HASH_IDS_BATCH]
            answer = self._json("POST", "/api/v1/model-versions/by-hash/ids",
                                f"the look-up of {len(chunk)} file hashes", json=chunk,
                                shape=list)
            for item in answer:
                # the endpoint answers {modelVersionId, hash} pairs; bare ids came before that
                pair = mapping(item)
                version_id = pair.get("modelVersionId")
                if isinstance(pair.get("hash"), str) and isinstance(version_id, int):
                    found[pair["hash"].lower()] = version_id
        return found

    # --- downloads ----------------------------------------------------------------------------

    def download_url(self, version_id: int, choice: FileChoice = FileChoice()) -> str:
        params = {key: value for key, value in (("type", choice.type), ("format", choice.format),
                                                ("size", choice.size), ("fp", choice.fp))
                  if value}
        query = f"?{urlencode(params)}" if params else ""
        return f"{self.base_url}/api/download/models/{int(version_id)}{query}"

    def refusal(self, response: httpx.Response, what: str) -> Exception:
        """The sentence for a response that is not the thing asked for."""
        return refusal(response, what, self.http.has_token)

    # --- plumbing -----------------------------------------------------------------------------

    def _json(self, method: str, path: str, what: str, params=None, json=None,
              shape: type = dict):
        """The answer's JSON, which must be a `shape` (an object, or a list)."""
        response = self.http.request(method, self.base_url + path, what=what, params=params,
                                     json=json)
        if response.status_code != 200:
            raise self.refusal(response, what)
        try:
            doc = response.json()
        except (ValueError, RecursionError):
            kind = response.headers.get("Content-Type", "no content type")
            raise WorkFailed(f"{what}: Civitai answered with something that is not JSON "
                             f"({kind}); try again later") from None
        if not isinstance(doc, shape):
            raise unexpected(what)
        return doc


def refusal(response: httpx.Response, what: str, has_token: bool) -> Exception:
    status = response.status_code
    message = _error_text(response)
    if status == 401:
        if has_token:
            return CivitaiRefused(f"Civitai refused the API token for {what} (401); check "
                                  f"{CIVITAI_TOKEN_ENV} or civitai.token in the config file",
                                  status)
        return CivitaiRefused(f"Civitai wants an account for {what} (401); create an API token "
                              f"in your Civitai account settings and set {CIVITAI_TOKEN_ENV}",
                              status)
    if status == 403:
        doc = _json_or_empty(response)
        if "early access" in message.lower() or doc.get("deadline"):
            deadline = doc.get("deadline")
            until = f" until {deadline}" if deadline else ""
            return CivitaiRefused(f"{what} is in early access on Civitai{until}; download it "
                                  "after that, or with the token of an account that has "
                                  "access to it", status)
        return CivitaiRefused(f"Civitai refused {what} (403: {message or 'forbidden'}); check "
                              "that your account may download it", status)
    if status == 404:
        return CivitaiRefused(f"Civitai does not know {what} (404); check the id or hash",
                              status)
    if status == 410:
        return CivitaiRefused(f"{what} was archived on Civitai (410) and can no longer be "
                              "downloaded", status)
    if is_retryable(status):
        return WorkFailed(f"{what}: Civitai kept answering HTTP {status} "
                          f"({message or 'busy'}); try again later")
    detail = f": {message}" if message else ""
    return CivitaiRefused(f"Civitai answered {what} with HTTP {status}{detail}", status)


def _json_or_empty(response: httpx.Response) -> dict:
    try:
        response.read()
        doc = response.json()
    except (ValueError, httpx.HTTPError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _error_text(response: httpx.Response) -> str:
    error = _json_or_empty(response).get("error")
    if isinstance(error, str):
        return error.strip()[:200]
    return ""


def _unique_upper(hashes: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(h.upper() for h in hashes if h))


def unexpected(what: str) -> WorkFailed:
    """For JSON whose shape is not the API's (a list for an object, a version without an id):
    Civitai's trouble, not the user's."""
    return WorkFailed(f"Civitai answered {what} with something unexpected; try again later")


def mapping(value) -> dict:
    """A JSON object from Civitai, or {} where it sent something else."""
    return value if isinstance(value, dict) else {}


def sequence(value) -> list:
    """A JSON list from Civitai, or [] where it sent something else."""
    return value if isinstance(value, list) else []


def choose_file(version: dict, choice: FileChoice = FileChoice()) -> dict:
    """The version's file the selectors pick (the primary one among equals), as the download
    endpoint would; UserError naming what there is when none fits."""
    files = [f for f in sequence(version.get("files")) if isinstance(f, dict)]
    what = f"model version {version.get('id')}"
    if not files:
        model = mapping(version.get("model"))
        if model.get("mode") == "Archived":
            raise CivitaiRefused(f"{what} was archived on Civitai and can no longer be "
                                 "downloaded", 410)
        raise UserError(f"{what} has no files to download on Civitai")

    def fits(file: dict) -> bool:
        meta = mapping(file.get("metadata"))
        return all(wanted is None or str(have).lower() == wanted.lower() for wanted, have in (
            (choice.type, file.get("type")), (choice.format, meta.get("format")),
            (choice.size, meta.get("size")), (choice.fp, meta.get("fp"))))

    candidates = [f for f in files if fits(f)]
    if choice.type is None:  # the endpoint's default is the model itself, not its VAE or config
        candidates = [f for f in candidates if f.get("type") in ("Model", "Pruned Model", None)]
    if not candidates:
        have = "; ".join(describe_file(f) for f in files)
        raise UserError(f"{what} has no file that fits --type/--format/--size/--fp; it has: "
                        f"{have}")
    return next((f for f in candidates if f.get("primary")), candidates[0])


def describe_file(file: dict) -> str:
    meta = mapping(file.get("metadata"))
    bits = [str(v) for v in (file.get("type"), meta.get("format"), meta.get("size"),
                             meta.get("fp")) if v]
    return f"{file.get('name')} ({', '.join(bits)})"


def file_sha256(file: dict) -> str | None:
    value = mapping(file.get("hashes")).get("SHA256")
    return value.lower() if isinstance(value, str) and len(value) == 64 else None


def file_size(file: dict) -> int | None:
    """Bytes, as Civitai rounds them (sizeKB is a float of KiB)."""
    size_kb = file.get("sizeKB")
    return round(size_kb * 1024) if isinstance(size_kb, int | float) and size_kb > 0 else None
