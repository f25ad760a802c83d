"""`pull`: fetch what a remote reference names into a model folder and catalog it.

For each reference: a file the catalog already has (by source id, or by the SHA256 Civitai or
the Hub announce) is not downloaded again; the rest are downloaded at most `parallel` at once,
verified, given their sidecars (`.civitai.info`, preview) and registered with their source ids.
Files land in `--to ROOT`, else `downloads.root`, else a catalog root: in the folder of that
root's web UI layout that holds their kind (LoRAs in `models/Lora` ...).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from catalog.civitai import (
    CivitaiClient,
    FileChoice,
    choose_file,
    file_sha256,
    file_size,
    mapping,
    sequence,
    unexpected,
)
from catalog.civitai_sidecars import SidecarsWritten, write_version_sidecars
from catalog.config import RemoteSettings
from catalog.download import BadDownload, Downloaded, Downloader, DownloadRequest
from catalog.entries import Entry
from catalog.hash_cache import cached_hashes, hash_now
from catalog.hashes import FileHashes, hash_file
from catalog.identity import examine
from catalog.layouts import detect_layout
from catalog.register import record_source, register_download, remember_preview
from catalog.remote_http import GuardedClient, RetryPolicy
from catalog.remote_refs import (
    CivitaiModelRef,
    CivitaiVersionRef,
    HubRef,
    RemoteRef,
    UrlRef,
    owned_by_sha256,
    owned_entry,
    parse_remote_ref,
    path_matches,
)
from catalog.safe_names import bare_url, printable_ref, safe_file_name
from catalog.scan import refresh_sidecars_of
from catalog.sidecars import CIVITAI_INFO
from catalog.store import Store
from catalog.walk import MODEL_SUFFIXES
from mergekit_sd.errors import UserError, WorkFailed
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress

# Civitai's model types -> the folder kinds of the web UI layouts
CIVITAI_KINDS = {"Checkpoint": "checkpoint", "LORA": "lora", "LoCon": "lora", "DoRA": "lora",
                 "VAE": "vae", "TextualInversion": "embedding"}


@dataclass
class PullOptions:
    to: Path | None = None
    choice: FileChoice = field(default_factory=FileChoice)
    sha256: str | None = None  # for plain URLs: the hash to verify against
    offline: bool = False
    nsfw_previews: bool | None = None  # None: the config's civitai.nsfw_previews
    parallel: int | None = None  # None: the config's downloads.parallel


@dataclass
class Pulled:
    ref: str  # as output may show it: a URL without its query and user part (printable_ref)
    entry_id: int | None  # None for a file that is not a model (a README pulled by a pattern)
    path: Path
    size: int
    # downloaded, resumed, restarted, already owned, already there (the target held it),
    # from cache (huggingface_hub's cache held it)
    status: str
    fetched: int = 0  # bytes received in this run
    verified: bool = False  # matched the hash its source announced
    sha256: str | None = None
    notes: list[str] = field(default_factory=list)
    # what `verified` compared: "SHA256", or "git blob id" (the SHA-1 the Hub gives for a
    # small file it keeps out of LFS, which has no SHA256 there)
    verified_by: str | None = None

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


@dataclass
class Failed:
    ref: str  # printable_ref, as Pulled's
    error: UserError | WorkFailed


Outcome = Pulled | Failed


@dataclass(eq=False)
class _Job:
    """One file to fetch: `fetch` runs on a worker thread, `register` after it on the caller's
    (the catalog connection stays on one thread). `key` names the file fetched: two references
    to one file (`civitai://model/45` and its newest version) make one job."""
    ref: str
    key: str
    fetch: Callable[[], object]
    register: Callable[[object], Pulled]


class Puller:
    def __init__(self, store: Store, settings: RemoteSettings,
                 progress: ProgressCallback = no_progress, cancel: CancelToken | None = None,
                 civitai: CivitaiClient | None = None, hub=None):
        self.store = store
        self.settings = settings
        self.progress = progress
        self.cancel = cancel or CancelToken()
        self._civitai = civitai
        self._hub = hub

    @property
    def civitai(self) -> CivitaiClient:
        if self._civitai is None:
            self._civitai = CivitaiClient.from_settings(self.settings)
        return self._civitai

    @property
    def hub(self):
        if self._hub is None:
            from catalog.hub import HubClient

            self._hub = HubClient()
        return self._hub

    def close(self) -> None:
        if self._civitai is not None:
            self._civitai.close()

    def pull(self, refs: list[str], options: PullOptions | None = None) -> list[Outcome]:
        """What became of each reference, in order (a pattern gives one outcome per file):
        the file pulled or found, or the error that stopped it."""
        options = options or PullOptions()
        _check_sha256(options.sha256)
        outcomes: list[list[Outcome]] = [[] for _ in refs]
        jobs: list[tuple[int, _Job]] = []
        first: dict[str, _Job] = {}  # key -> the job that fetches it
        again: list[tuple[int, _Job]] = []  # a file another reference already fetches
        for index, ref in enumerate(refs):
            try:
                planned = self._plan(ref, options)
            except (UserError, WorkFailed) as exc:
                outcomes[index].append(Failed(printable_ref(ref), exc))
                continue
            for item in planned:
                if isinstance(item, Pulled):
                    outcomes[index].append(item)
                elif item.key in first:  # two downloads of one file would race for it
                    again.append((index, item))
                else:
                    first[item.key] = item
                    jobs.append((index, item))
        done = self._run(jobs, outcomes, options)
        for index, job in again:
            outcomes[index].append(_same_as(job.ref, done[first[job.key]]))
        return [outcome for per_ref in outcomes for outcome in per_ref]

    def _run(self, jobs: list[tuple[int, _Job]], outcomes: list[list[Outcome]],
             options: PullOptions) -> dict[_Job, Outcome]:
        parallel = options.parallel or self.settings.parallel
        done: dict[_Job, Outcome] = {}
        with ThreadPoolExecutor(max(1, parallel)) as pool:
            futures = [(index, job, pool.submit(job.fetch)) for index, job in jobs]
            try:
                for index, job, future in futures:
                    try:
                        done[job] = job.register(future.result())
                    except (UserError, WorkFailed) as exc:
                        done[job] = Failed(job.ref, exc)
                    outcomes[index].append(done[job])
            except BaseException:
                self.cancel.cancel()  # Ctrl-C: the workers stop at their next chunk
                raise
        return done

    # --- planning ----------------------------------------------------------------------------

    def _plan(self, text: str, options: PullOptions) -> list[Pulled | _Job]:
        ref = parse_remote_ref(text)
        text = printable_ref(text)  # what outcomes and messages show: never a URL's token
        # online, civitai://model/ID means its newest version, which may not be the one owned;
        # file selectors may ask for another file of a version owned (checked by its SHA256)
        chosen = isinstance(ref, CivitaiVersionRef) and options.choice != FileChoice()
        if not (isinstance(ref, CivitaiModelRef) or chosen) or options.offline:
            owned = self._owned(ref)
            if owned is not None:
                return [_already(text, owned)]
        if options.offline and not isinstance(ref, HubRef):
            raise UserError(f"{text}: not in the catalog, and --offline forbids downloading it; "
                            "run the pull online")
        self._destination(options.to, None)  # no folder to land in: say so before any download
        if isinstance(ref, CivitaiModelRef | CivitaiVersionRef):
            return self._plan_civitai(text, ref, options)
        if isinstance(ref, HubRef):
            return self._plan_hub(text, ref, options)
        return self._plan_url(text, ref, options)

    def _plan_civitai(self, text: str, ref: CivitaiModelRef | CivitaiVersionRef,
                      options: PullOptions) -> list[Pulled | _Job]:
        if isinstance(ref, CivitaiModelRef):
            model = self.civitai.model(ref.model_id)
            versions = model.get("modelVersions")
            if not versions:
                raise UserError(f"{text}: the model has no published version on Civitai")
            # Civitai lists the newest first
            version_id = _civitai_id(sequence(versions)[:1], f"model {ref.model_id}")
            listed = [sha for f in sequence(mapping(sequence(versions)[0]).get("files"))
                      if (sha := file_sha256(mapping(f)))]
            owned = (self._owned(CivitaiVersionRef(version_id), listed)
                     if options.choice == FileChoice() else None)
            if owned is not None:
                return [_already(text, owned)]
        else:
            version_id = ref.version_id
        version = self.civitai.version(version_id)
        file = choose_file(version, options.choice)
        sha256 = file_sha256(file)
        ids = {"civitai": {"model_id": version.get("modelId"), "version_id": version_id,
                           "file_id": file.get("id")}}
        if sha256 and (owned := owned_by_sha256(self.store, sha256)) is not None:
            held = owned.source_ids.get("civitai") or {}
            if held.get("version_id") not in (None, version_id):
                # Civitai publishes the same bytes under several versions (re-uploads); an
                # entry has one source, which its `.civitai.info` names: it stays that version
                return [_already(text, owned, [
                    f"the same file as Civitai model {held.get('model_id')} version "
                    f"{held['version_id']}, which the catalog keeps as its source"])]
            record_source(self.store, owned.id, "civitai", ids)
            taken = owned.details.get("sidecar", {}).get("read", [])
            if _stem(Path(owned.path)) + CIVITAI_INFO not in taken:
                # none, or one the catalog does not take (another file's, unreadable)
                self._sidecars(Path(owned.path), version, options, owned.id)
                refresh_sidecars_of(self.store, owned.id, Path(owned.path))
            return [_already(text, owned)]
        kind = CIVITAI_KINDS.get(mapping(version.get("model")).get("type"))
        folder, root = self._destination(options.to, kind)
        meta = mapping(file.get("metadata"))
        # name the file chosen: the endpoint's own default could be another of the version's
        choice = FileChoice(file.get("type"), meta.get("format"), meta.get("size"),
                            meta.get("fp"))
        key = f"civitai:{version_id}:{file.get('id')}"
        request = DownloadRequest(
            url=self.civitai.download_url(version_id, choice), folder=folder, key=key,
            name=file.get("name"), sha256=sha256,
            size=file_size(file), label=safe_file_name(file.get("name")),
            refusal=lambda response: self.civitai.refusal(
                response, f"model version {version_id}"))
        downloader = Downloader(self.civitai.http, self.progress, self.cancel)

        def register(done: Downloaded) -> Pulled:
            # "Every download is verified": where Civitai gives nothing to verify against, say so
            notes = [] if sha256 else ["not verified: Civitai lists no SHA256 for this file"]
            written = self._write_sidecars(done.path, version, options)
            notes += written.problems
            entry_id = register_download(self.store, done.path, done.hashes, root, "civitai",
                                         ids)
            if written.record is not None:  # once the scan of the file made its entry
                remember_preview(self.store, entry_id, written.record)
            return _pulled(text, entry_id, done, notes)

        return [_Job(text, key, lambda: downloader.fetch(request), register)]

    def _plan_url(self, text: str, ref: UrlRef, options: PullOptions) -> list[Pulled | _Job]:
        sha256 = options.sha256.lower() if options.sha256 else None
        if sha256 and (owned := owned_by_sha256(self.store, sha256)) is not None:
            return [_already(text, owned)]
        folder, root = self._destination(options.to, None)
        http = GuardedClient(retry=RetryPolicy.from_settings(self.settings.network),
                             timeout=self.settings.network.timeout, service=bare_url(ref.url))
        request = DownloadRequest(url=ref.url, folder=folder, key=f"url:{ref.url}",
                                  sha256=sha256)
        downloader = Downloader(http, self.progress, self.cancel)

        def fetch() -> Downloaded:
            try:
                return downloader.fetch(request)
            finally:
                http.close()

        def register(done: Downloaded) -> Pulled:
            notes = [] if sha256 else ["not verified: no --sha256 was given"]
            if done.path.name.lower().endswith(MODEL_SUFFIXES):
                # without its query: a signed or tokened link is not the file's name
                entry_id = register_download(self.store, done.path, done.hashes, root, "url",
                                             {"url": bare_url(ref.url)})
            else:
                entry_id = None
                notes.append("not a model file: kept, not catalogued")
            return _pulled(text, entry_id, done, notes)

        return [_Job(text, request.key, fetch, register)]

    def _plan_hub(self, text: str, ref: HubRef, options: PullOptions) -> list[Pulled | _Job]:
        offline = options.offline or self.hub.offline
        if offline and ref.is_pattern:
            raise UserError(f"{text}: a pattern needs the repository's file list, which needs "
                            "the network; offline (--offline or HF_HUB_OFFLINE), name the file "
                            f"(hf://{ref.repo}/PATH) or run the pull online")
        if offline:  # huggingface_hub's cache may have it: that needs no network
            cached = self.hub.cached_file(ref.repo, ref.path, ref.revision)
            if cached is None:
                raise UserError(f"{text}: not in the catalog nor in the Hugging Face cache, and "
                                "offline (--offline or HF_HUB_OFFLINE) it cannot be downloaded; "
                                "run the pull online")
            files = [cached]
        elif ref.is_pattern:
            files = [f for f in self.hub.files(ref.repo, ref.revision)
                     if path_matches(ref.path, f.path)]
            if not files:
                raise UserError(f"{text}: no file of {ref.repo} matches {ref.path!r} (`*` stays "
                                "within one folder, `**/` spans folders); `mergekit-sd search "
                                f"hf {ref.repo} --files` lists them")
            _check_distinct_names(text, files)
        else:
            files = [self.hub.file(ref.repo, ref.path, ref.revision)]
        planned: list[Pulled | _Job] = []
        for hub_file in files:
            file_ref = HubRef(ref.repo, hub_file.path, ref.revision)
            ids = {"hf": {"repo": ref.repo, "path": hub_file.path}}
            if ref.revision:
                ids["hf"]["revision"] = ref.revision
            owned = owned_entry(self.store, file_ref) or (
                owned_by_sha256(self.store, hub_file.sha256) if hub_file.sha256 else None)
            if owned is not None:  # compared by the LFS SHA256: nothing to download
                record_source(self.store, owned.id, "hf", ids)
                planned.append(_already(str(file_ref), owned))
            else:
                planned.append(self._hub_job(str(file_ref), file_ref, hub_file, ids, options))
        return planned

    def _hub_job(self, text: str, ref: HubRef, hub_file, ids: dict,
                 options: PullOptions) -> _Job:
        name = safe_file_name(PurePosixPath(hub_file.path).name)

        def fetch():
            found = self.hub.download(ref.repo, hub_file.path, ref.revision, self.progress,
                                      self.cancel, label=name, offline=options.offline or None)
            hashes = hash_file(found.path)
            _verify_hub_file(found.path, hub_file, hashes)
            return found, hashes

        def register(fetched) -> Pulled:
            found, hashes = fetched
            kind = examine(str(found.path)).kind
            folder, root = self._destination(options.to, kind)
            target, how = _place(found.path, folder / name, hashes)
            ids["hf"]["commit"] = found.commit
            notes = [how] if how else []
            if target.name.lower().endswith(MODEL_SUFFIXES):
                entry_id = register_download(self.store, target, hashes, root, "hf", ids)
            else:
                entry_id = None
                notes.append("not a model file: kept, not catalogued")
            fetched_bytes = 0 if found.from_cache else hub_file.size
            # verified either way: against the LFS SHA256, or a small file's git blob id
            done = Downloaded(target, hashes, hub_file.size, fetched_bytes, verified=True)
            pulled = _pulled(text, entry_id, done, notes)
            if not hub_file.sha256:
                pulled.verified_by = "git blob id"
            if found.from_cache:
                pulled.status = "from cache"
            return pulled

        key = f"hf:{ref.repo}@{ref.revision or ''}:{hub_file.path}"
        return _Job(text, key, fetch, register)

    # --- helpers -------------------------------------------------------------------------------

    def _owned(self, ref: RemoteRef, listed: list[str] | None = None) -> Entry | None:
        """owned_entry, but a Civitai entry whose file changed since it was hashed is hashed
        first where its sidecar (or `listed`, Civitai's answer) says which SHA256s to expect:
        "already owned" is never said of another file that took the name."""
        hashed: set[int] = set()
        while (owned := owned_entry(self.store, ref, listed or ())) is not None:
            path = Path(owned.path)
            expected = listed or owned.details.get("sidecar", {}).get("file_sha256s")
            if (not isinstance(ref, CivitaiVersionRef | CivitaiModelRef) or not expected
                    or owned.id in hashed or cached_hashes(self.store, path) is not None):
                return owned
            hashed.add(owned.id)
            try:
                hash_now(self.store, owned.id, path, self.progress, self.cancel)
            except OSError:  # unreadable now: what the catalog knows stands
                return owned
        return None

    def _destination(self, to: Path | None, kind: str | None) -> tuple[Path, Path]:
        """(the folder a file of `kind` goes to, the root it belongs to)."""
        base = to or self.settings.download_root
        if base is None:
            base = self._root_for(kind)
        if base is None:
            # render and plan pull too, and have no --to: say where `pull` takes one
            raise UserError("there is no folder to download into; set downloads.root in the "
                            "config, add a root with `mergekit-sd catalog add-root`, or pull "
                            "with `mergekit-sd pull --to FOLDER`")
        base = Path(os.path.abspath(base.expanduser()))
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{base}: cannot create the folder ({exc.strerror}); choose another "
                            "(`mergekit-sd pull --to FOLDER`)") from None
        for folder in detect_layout(base).folders:
            if kind is not None and folder.kind == kind and folder.path != base:
                return folder.path, base
        return base, base

    def _root_for(self, kind: str | None) -> Path | None:
        roots = [Path(r["path"]) for r in self.store.db.execute(
            "SELECT path FROM roots ORDER BY id")]
        roots = [r for r in roots if r.is_dir()]
        for root in roots:
            if any(f.kind == kind for f in detect_layout(root).folders):
                return root
        return roots[0] if roots else None

    def _sidecars(self, model: Path, version: dict, options: PullOptions,
                  entry_id: int) -> None:
        """The sidecars of a file the catalog already has."""
        written = self._write_sidecars(model, version, options)
        if written.record is not None:
            remember_preview(self.store, entry_id, written.record)

    def _write_sidecars(self, model: Path, version: dict,
                        options: PullOptions) -> SidecarsWritten:
        """`.civitai.info` and a preview; a preview already there is kept (only `catalog
        identify --refresh` replaces one)."""
        allow = (self.settings.nsfw_previews if options.nsfw_previews is None
                 else options.nsfw_previews)
        try:
            return write_version_sidecars(model, version, self.civitai.http, allow)
        except OSError as exc:  # the model is verified and in place: catalogued all the same
            return SidecarsWritten(problems=[
                f"{model.name}: its sidecars could not be written ({exc.strerror})"])


def _check_sha256(sha256: str | None) -> None:
    """Before any download: a prefix or a typo could only fail once the whole file is in."""
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise UserError(f"--sha256 {sha256!r}: give all 64 hex digits of the file's SHA256")


def _civitai_id(listed: list, what: str) -> int:
    """The id of the one version in `listed`; WorkFailed where Civitai's JSON has none."""
    version = mapping(listed[0]) if listed else {}
    version_id = version.get("id")
    if not isinstance(version_id, int) or isinstance(version_id, bool) or version_id <= 0:
        raise unexpected(what)
    return version_id


def _check_distinct_names(text: str, files: list) -> None:
    """Files of a pattern land in one folder under their own names: two that share a name
    (`unet/diffusion_pytorch_model.safetensors`, `vae/...`) are refused before any download,
    rather than one failing half way or overwriting the other."""
    by_name: dict[str, list[str]] = {}
    for hub_file in files:
        by_name.setdefault(safe_file_name(PurePosixPath(hub_file.path).name), []).append(
            hub_file.path)
    clashes = [paths for paths in by_name.values() if len(paths) > 1]
    if clashes:
        named = "; ".join(" and ".join(paths) for paths in clashes)
        raise UserError(f"{text}: {named} would land under the same file name; pull them one "
                        "at a time, each with its own `--to FOLDER`, or narrow the pattern")


def _same_as(ref: str, outcome: Outcome) -> Outcome:
    """The outcome of a reference to a file another reference of the same pull fetched."""
    if isinstance(outcome, Failed):
        return Failed(ref, outcome.error)
    return Pulled(ref, outcome.entry_id, outcome.path, outcome.size, "already owned",
                  sha256=outcome.sha256)


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def _already(ref: str, entry: Entry, notes: list[str] | None = None) -> Pulled:
    return Pulled(ref, entry.id, Path(entry.path), entry.size, "already owned",
                  sha256=entry.sha256, notes=notes or [])


def _pulled(ref: str, entry_id: int, done: Downloaded, notes: list[str]) -> Pulled:
    if done.already_there:
        status = "already there"
    elif done.restarted:
        status = "restarted"
    elif done.resumed_from:
        status = "resumed"
    else:
        status = "downloaded"
    return Pulled(ref, entry_id, done.path, done.size, status, done.fetched, done.verified,
                  done.hashes.sha256, notes, "SHA256" if done.verified else None)


def _verify_hub_file(cached: Path, hub_file, hashes: FileHashes) -> None:
    """The Hub announces an LFS file's SHA256 and a small file's git blob id: the cached file
    must have them (a bad one is dropped from the cache, so the next run fetches it again)."""
    if hub_file.sha256:
        ok = hashes.sha256 == hub_file.sha256
    else:
        ok = _git_blob_id(cached) == hub_file.blob_id
    if not ok:
        blob = Path(os.path.realpath(cached))
        for path in (cached, blob):
            path.unlink(missing_ok=True)
        raise BadDownload(f"{hub_file.path}: the download does not match the hash the Hub "
                          "announced; it was removed from the cache; run the pull again")


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _place(cached: Path, target: Path, hashes: FileHashes) -> tuple[Path, str | None]:
    """Put the cached file at `target`: a hard link to the cache's copy where the disk allows
    (no second copy of the bytes), else a copy; both through `target.partial`, so the final
    name appears only complete."""
    if target.exists():
        if hash_file(target).sha256 == hashes.sha256:
            return target, None
        raise UserError(f"{target}: a different file already has this name; move it away or "
                        "pull into another folder (`mergekit-sd pull --to FOLDER`)")
    blob = Path(os.path.realpath(cached))
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(blob, partial)
        how = None
    except OSError:  # another disk, or a file system without hard links
        with open(blob, "rb") as source, open(partial, "wb") as copy:
            shutil.copyfileobj(source, copy, 8 * 1024 * 1024)
            copy.flush()
            os.fsync(copy.fileno())
        how = "copied from the Hugging Face cache (another disk)"
    os.replace(partial, target)
    return target, how
