"""Hugging Face through huggingface_hub: model search, file listings with sizes and LFS SHA256s,
model info, and downloads into huggingface_hub's own cache (which it resumes and shares with
diffusers and every other tool that uses it).

huggingface_hub reads HF_TOKEN itself, at each call, and sends it only to the Hub (never to the
storage host an LFS file redirects to). HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE / HF_HOME
it reads once, when imported; they are read here at each call and passed on, so a value set
after the import still counts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mergekit_sd.errors import Cancelled, UserError, WorkFailed
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress

_TRUE = ("1", "on", "yes", "true")


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: str | None  # LFS files only: the SHA256 of the content (the download's ETag)
    blob_id: str  # git's object id


@dataclass(frozen=True)
class CachedFile:
    path: Path  # in huggingface_hub's cache: snapshots/COMMIT/PATH, a link to the blob
    commit: str | None
    from_cache: bool  # it was there before this download


@dataclass(frozen=True)
class HubModel:
    id: str
    downloads: int | None
    likes: int | None
    last_modified: str | None
    tags: tuple[str, ...]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


class HubClient:
    def __init__(self, endpoint: str | None = None, offline: bool | None = None,
                 cache_dir: Path | None = None):
        from huggingface_hub import HfApi

        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
        self.offline = hub_offline() if offline is None else offline
        self.cache_dir = cache_dir or hub_cache_dir()
        self.api = HfApi(endpoint=self.endpoint)

    def search(self, query: str, limit: int = 20) -> list[HubModel]:
        self._online("searching Hugging Face")
        with _hub_errors(f"the search for {query!r}"):
            found = self.api.list_models(search=query, limit=limit, sort="downloads")
            return [HubModel(m.id, m.downloads, m.likes,
                             m.last_modified.isoformat() if m.last_modified else None,
                             tuple(m.tags or ())) for m in found]

    def files(self, repo: str, revision: str | None = None) -> list[HubFile]:
        """Every file of the repository with its size and, for LFS files, SHA256."""
        self._online(f"listing the files of {repo}")
        with _hub_errors(repo):
            return [_hub_file(item) for item in
                    self.api.list_repo_tree(repo, recursive=True, revision=revision)
                    if hasattr(item, "blob_id")]

    def file(self, repo: str, path: str, revision: str | None = None) -> HubFile:
        """One file's size and SHA256, without listing the repository."""
        self._online(f"looking up {path} in {repo}")
        with _hub_errors(repo):
            found = [item for item in self.api.get_paths_info(repo, [path], revision=revision)
                     if hasattr(item, "blob_id")]
        if not found:
            raise UserError(f"hf://{repo}/{path}: the repository has no such file; "
                            f"`mergekit-sd search hf {repo} --files` lists its files")
        return _hub_file(found[0])

    def info(self, repo: str, revision: str | None = None):
        """huggingface_hub's ModelInfo, with every file's size and LFS data."""
        self._online(f"reading the model info of {repo}")
        with _hub_errors(repo):
            return self.api.model_info(repo, revision=revision, files_metadata=True)

    def cached_file(self, repo: str, path: str, revision: str | None = None) -> HubFile | None:
        """What the cache holds of a file, without asking the Hub: its blob is named by the
        file's ETag, the SHA256 for an LFS file and the git blob id for a small one."""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, path, cache_dir=self.cache_dir, revision=revision)
        if not isinstance(found, str):
            return None
        blob = Path(os.path.realpath(found))
        lfs = re.fullmatch(r"[0-9a-f]{64}", blob.name) is not None
        return HubFile(path, blob.stat().st_size, blob.name if lfs else None,
                       "" if lfs else blob.name)

    def download(self, repo: str, path: str, revision: str | None = None,
                 progress: ProgressCallback = no_progress, cancel: CancelToken | None = None,
                 label: str | None = None, offline: bool | None = None) -> CachedFile:
        """The file in huggingface_hub's cache, downloaded (or resumed) when not there yet;
        offline, only what the cache holds."""
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        offline = self.offline if offline is None else offline
        cached_before = isinstance(try_to_load_from_cache(
            repo, path, cache_dir=self.cache_dir, revision=revision), str)
        with _hub_errors(f"hf://{repo}/{path}", offline):
            local = hf_hub_download(repo, path, revision=revision, endpoint=self.endpoint,
                                    cache_dir=self.cache_dir, local_files_only=offline,
                                    tqdm_class=_progress_bar(progress, label or path, cancel))
        local = Path(local)
        # the cache keeps files under snapshots/COMMIT/PATH
        parts = local.parts
        commit = parts[-len(Path(path).parts) - 1] if "snapshots" in parts else None
        return CachedFile(local, commit, cached_before)

    def _online(self, doing: str) -> None:
        if self.offline:
            raise UserError(f"{doing} needs the network, and Hugging Face is set offline "
                            "(HF_HUB_OFFLINE or --offline); run it online")


def _hub_file(item) -> HubFile:
    return HubFile(item.path, int(item.size or 0), item.lfs.sha256 if item.lfs else None,
                   item.blob_id)


@contextmanager
def _hub_errors(what: str, offline: bool = False) -> Iterator[None]:
    """huggingface_hub's exceptions as one sentence each."""
    import httpx2
    from huggingface_hub import errors

    try:
        yield
    except errors.HFValidationError:  # callers check repository ids first; belt and braces
        raise UserError(f"{what}: not a valid Hugging Face repository id or file name; write "
                        "hf://ORG/REPO/PATH") from None
    except errors.GatedRepoError:
        raise UserError(f"{what}: the repository is gated; accept its terms on its page, then "
                        "set HF_TOKEN to a token of that account") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{what}: Hugging Face has no such repository, or it is private and "
                        "HF_TOKEN is not set to a token that may read it") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{what}: the repository has no such revision (branch, tag or "
                        "commit)") from None
    except errors.RemoteEntryNotFoundError:
        raise UserError(f"{what}: the repository has no such file") from None
    except errors.LocalEntryNotFoundError:
        if offline:
            raise UserError(f"{what}: not in the Hugging Face cache, and offline (HF_HUB_OFFLINE "
                            "or --offline) it cannot be downloaded; run it online") from None
        # huggingface_hub says this too when the Hub could not be reached at all
        raise WorkFailed(f"{what}: Hugging Face could not be reached and the file is not in "
                         "its cache; check the connection (and HF_ENDPOINT) and try "
                         "again") from None
    except errors.OfflineModeIsEnabled:
        raise UserError(f"{what}: Hugging Face is set offline (HF_HUB_OFFLINE); run it "
                        "online") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise UserError(f"{what}: Hugging Face refused access ({status}); set HF_TOKEN to "
                            "a token that may read it") from None
        raise WorkFailed(f"{what}: Hugging Face answered HTTP {status}; try again "
                         "later") from None
    except httpx2.TransportError as exc:
        raise WorkFailed(f"{what}: Hugging Face could not be reached ({exc.__class__.__name__});"
                         " check the connection (and HF_ENDPOINT) and try again") from None
    except ValueError:  # JSON that does not parse: a captive portal, a wrong HF_ENDPOINT
        raise WorkFailed(f"{what}: Hugging Face answered with something that is not JSON (a "
                         "web page?); check HF_ENDPOINT and the connection, then try "
                         "again") from None
    except OSError as exc:  # huggingface_hub's consistency checks, disk errors
        reason = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0].rstrip(".")
        raise WorkFailed(f"{what}: the download failed ({reason}); run the same command "
                         "again") from None


def _progress_bar(progress: ProgressCallback, label: str, cancel: CancelToken | None):
    """A tqdm class that reports to our progress callback (and stops on cancel) instead of
    drawing: huggingface_hub takes a tqdm class for its progress."""
    from tqdm.auto import tqdm

    class ProgressReport(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.reported = kwargs.get("initial") or 0
            self.expected = kwargs.get("total") or 0

        def update(self, n=1):
            if cancel is not None and cancel.cancelled:
                raise Cancelled(f"download of {label} cancelled; run the same command again to "
                                "resume")
            self.reported += n or 0
            progress(label, self.reported, self.expected)
            return None

    return ProgressReport
