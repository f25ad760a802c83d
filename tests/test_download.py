"""The downloader against a real storage host on 127.0.0.1: resumes across runs (even after
kill -9) with Range + If-Range, starts over when the server's file changed, verifies the SHA256,
refuses error pages and bad headers, never leaves anything under the final name that is not the
verified file, keeps server names inside the target folder, checks disk space first, runs a
limited number of downloads at once and stops on cancel."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, raw_safetensors
from fakes.civitai import FakeCivitai, FakeFile
from fakes.env import big_safetensors, cli_env, settings_for
from fakes.files import FileHost
from fakes.loopback import LoopbackServer, Reply

from catalog import download as download_module
from catalog.download import BadDownload, Downloader, DownloadRequest
from catalog.pull import Puller, PullOptions
from catalog.remote_http import GuardedClient, RetryPolicy
from catalog.safe_names import name_from_disposition, safe_file_name
from catalog.store import Store
from mergekit_sd.errors import Cancelled, UserError, WorkFailed
from mergekit_sd.progress import CancelToken
from mergekit_sd.testing import write_lora


@pytest.fixture
def host():
    files = FileHost()
    yield files
    files.server.close()


@pytest.fixture
def http():
    client = GuardedClient(retry=RetryPolicy(4, 0.001, 0.01), timeout=5.0, service="the host")
    yield client
    client.close()


@pytest.fixture(scope="module")
def lora_bytes(tmp_path_factory) -> bytes:
    return write_lora(tmp_path_factory.mktemp("src") / "l.safetensors", "kohya-sd1",
                      seed=5).read_bytes()


def request_for(host: FileHost, name: str, folder: Path, data: bytes | None = None,
                **fields) -> DownloadRequest:
    sha = hashlib.sha256(data).hexdigest() if data is not None else None
    return DownloadRequest(url=f"{host.url}/files/{name}", folder=folder, key=f"test:{name}",
                           **{"sha256": sha, **fields})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def cancel_at_half(cancel: CancelToken):
    def progress(stage, done, total):
        if total and done >= total // 2:
            cancel.cancel()
    return progress


# --- resuming -------------------------------------------------------------------------------


def test_killed_download_resumes_and_verifies(tmp_path):
    """kill -9 a `mergekit-sd pull` at about half; the next run asks only for the rest."""
    files = FileHost()
    civitai = FakeCivitai(files)
    try:
        data = big_safetensors(24, seed=1)
        civitai.add_model(7, "Big Model", "Checkpoint")
        civitai.add_version(7, 70, "v1", "SDXL 1.0", [FakeFile("big.safetensors", data)])
        name = civitai.storage_name(70, civitai.versions[70].files[0])
        files.slow[name] = 0.002  # 64 KiB every 2 ms: time to catch it half way
        root = tmp_path / "models"
        env = cli_env(tmp_path, civitai.url)
        args = [sys.executable, "-m", "mergekit_sd.cli", "pull", "civitai://70", "--to",
                str(root), "--catalog", str(tmp_path / "c.sqlite")]
        env["PYTHONPATH"] = str(REPO)
        first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        partial = root / "big.safetensors.partial"
        while not (partial.exists() and partial.stat().st_size >= len(data) // 2):
            assert first.poll() is None, first.communicate()
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        kept = partial.stat().st_size
        assert 0 < kept < len(data) and not (root / "big.safetensors").exists()
        while files.server.in_flight:  # the server notices the dead client on its next write
            time.sleep(0.005)
        sent_before = files.sent(name)

        files.slow.pop(name)
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert "resumed" in second.stdout and "SHA256 verified" in second.stdout
        final = root / "big.safetensors"
        assert hashlib.sha256(final.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert leftovers(root) == ["big.civitai.info", "big.safetensors"]
        resumed = files.server.requests(f"/files/{name}", "GET")[-1]
        assert resumed.headers["range"] == f"bytes={kept}-" and resumed.status == 206
        assert resumed.headers["if-range"] == files.blobs[name].etag
        # the second run asked exactly for what the partial file lacked; bytes served twice
        # are only those the killed run had received but not yet written
        assert files.sent(name) - sent_before == len(data) - kept
        refetched = files.sent(name) - len(data)
        assert refetched < 0.05 * len(data), (sent_before, kept)
    finally:
        civitai.server.close()
        files.server.close()


def test_changed_file_on_the_server_restarts_cleanly(tmp_path, host, http, lora_bytes):
    """If-Range carries the old ETag; the server's new file comes whole and replaces the
    partial one."""
    old = big_safetensors(2, seed=2)
    host.put("m.safetensors", old)
    host.slow["m.safetensors"] = 0.001
    cancel = CancelToken()
    folder = tmp_path / "dl"
    with pytest.raises(Cancelled, match="run the same command again to resume"):
        Downloader(http, cancel_at_half(cancel), cancel).fetch(
            request_for(host, "m.safetensors", folder))
    assert leftovers(folder) == ["m.safetensors.partial", "m.safetensors.partial.json"]

    new = big_safetensors(2, seed=3)
    host.put("m.safetensors", new)  # a new ETag
    done = Downloader(http).fetch(request_for(host, "m.safetensors", folder))
    last = host.server.requests("/files/m.safetensors")[-1]
    assert last.headers["if-range"] != host.blobs["m.safetensors"].etag and last.status == 200
    assert done.restarted and done.path.read_bytes() == new
    assert leftovers(folder) == ["m.safetensors"]


def test_dropped_connection_and_stall_resume_within_the_run(tmp_path, host, lora_bytes):
    data = big_safetensors(1, seed=4)
    host.put("drop.safetensors", data)
    host.put("stall.safetensors", data)
    host.next_get["drop.safetensors"] = {"drop_after": len(data) // 3}
    host.next_get["stall.safetensors"] = {"stall": (len(data) // 2, 1.5)}
    client = GuardedClient(retry=RetryPolicy(4, 0.001, 0.01), timeout=0.3)
    try:
        for name in ("drop.safetensors", "stall.safetensors"):
            done = Downloader(client).fetch(request_for(host, name, tmp_path, data))
            assert done.verified and done.path.read_bytes() == data
            gets = host.server.requests(f"/files/{name}", "GET")
            # one resume (a loaded machine may time out once more: each asks for the rest)
            assert len(gets) >= 2 and all(g.status == 206 for g in gets[1:])
            # the drop loses nothing; a stalled connection may lose what was in flight
            assert host.sent(name) - len(data) <= 256 * 1024
    finally:
        client.close()


# --- what is never kept -----------------------------------------------------------------------


def test_wrong_sha256_leaves_nothing_under_the_final_name(tmp_path, host, http, lora_bytes):
    host.put("m.safetensors", lora_bytes)
    request = request_for(host, "m.safetensors", tmp_path / "dl", sha256="0" * 64)
    with pytest.raises(BadDownload, match="does not match its SHA256"):
        Downloader(http).fetch(request)
    assert leftovers(tmp_path / "dl") == []


@pytest.mark.parametrize("content_type, body", [
    ("text/html; charset=utf-8", b"<!DOCTYPE html><html>Sign in</html>" * 10),
    ("application/json", b'{"error": "Unauthorized"}' * 10),
    ("application/octet-stream", b"<!doctype html><html><body>expired link</body></html>" * 5),
    ("application/octet-stream", b"\x00" * 7 + b"not a safetensors header" * 20),
])
def test_error_bodies_are_never_kept_as_models(tmp_path, host, http, content_type, body):
    host.put("m.safetensors", body, content_type)
    with pytest.raises(BadDownload, match="nothing was kept"):
        Downloader(http).fetch(request_for(host, "m.safetensors", tmp_path / "dl"))
    assert leftovers(tmp_path / "dl") == []


@pytest.mark.parametrize("entries, data, said", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
     "the download is not a valid safetensors file: tensor 'b' overlaps the tensor before it"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8,
     "the download is truncated: "),
])
def test_a_download_with_a_bad_header_is_said_whole(tmp_path, host, http, entries, data, said):
    host.put("m.safetensors", raw_safetensors(entries, data))
    with pytest.raises(BadDownload) as refused:
        Downloader(http).fetch(request_for(host, "m.safetensors", tmp_path / "dl"))
    assert str(refused.value).startswith(f"m.safetensors: {said}"), str(refused.value)
    assert str(refused.value).endswith("; nothing was kept")
    assert leftovers(tmp_path / "dl") == []


def test_a_size_far_from_the_announced_one_is_refused(tmp_path, host, http, lora_bytes):
    host.put("m.safetensors", lora_bytes)
    request = request_for(host, "m.safetensors", tmp_path, size=len(lora_bytes) * 3)
    with pytest.raises(BadDownload, match="were announced"):
        Downloader(http).fetch(request)
    assert leftovers(tmp_path) == []


def test_refusals_leave_no_partial_file(tmp_path, host, http):
    with pytest.raises(UserError, match=r"has no such file \(HTTP 404\)"):
        Downloader(http).fetch(request_for(host, "absent.safetensors", tmp_path))
    assert leftovers(tmp_path) == []


def test_disk_space_is_checked_before_anything_is_fetched(tmp_path, host, http, lora_bytes,
                                                           monkeypatch):
    host.put("m.safetensors", lora_bytes)
    real = download_module.shutil.disk_usage

    def nearly_full(path):
        return real(path)._replace(free=1000)

    monkeypatch.setattr(download_module.shutil, "disk_usage", nearly_full)
    with pytest.raises(UserError, match=r"needs .* but only .* are free"):
        Downloader(http).fetch(request_for(host, "m.safetensors", tmp_path,
                                           size=len(lora_bytes)))
    assert host.server.requests("/files/") == [] and leftovers(tmp_path) == []


# --- names ------------------------------------------------------------------------------------


def test_server_names_land_inside_the_folder_as_visible_model_files(tmp_path, host, http,
                                                                    lora_bytes):
    host.put("x", lora_bytes, disposition_name="../../.bashrc")
    folder = tmp_path / "root" / "models"
    done = Downloader(http).fetch(DownloadRequest(f"{host.url}/files/x", folder, "url:x"))
    assert done.path == folder / "bashrc.safetensors"
    assert leftovers(folder) == ["bashrc.safetensors"]
    assert not (tmp_path / ".bashrc").exists() and leftovers(tmp_path) == ["root"]


@pytest.mark.parametrize("given, safe", [
    ("../../.bashrc", "bashrc"), ("..\\..\\evil.safetensors", "evil.safetensors"),
    ("/etc/passwd", "passwd"), ("a\x00b\nc.safetensors", "a_b_c.safetensors"),
    ("...", "download"), ("", "download"), ("CON.safetensors", "download-CON.safetensors"),
    ('my "model": v2?.safetensors', "my _model__ v2_.safetensors"),
    ("é" * 300 + ".safetensors", "é" * 94 + ".safetensors"),
])
def test_safe_file_names(given, safe):
    assert safe_file_name(given) == safe


def test_disposition_names_follow_rfc_6266():
    assert name_from_disposition("attachment; filename*=UTF-8''caf%C3%A9.safetensors; "
                                 'filename="cafe.safetensors"') == "café.safetensors"
    assert name_from_disposition('attachment; filename="a b.safetensors"') == "a b.safetensors"
    assert name_from_disposition(None) is None


def test_an_existing_target_is_reused_only_when_it_is_the_same_file(tmp_path, host, http,
                                                                     lora_bytes):
    host.put("m.safetensors", lora_bytes)
    (tmp_path / "m.safetensors").write_bytes(lora_bytes)
    done = Downloader(http).fetch(request_for(host, "m.safetensors", tmp_path, lora_bytes))
    assert done.already_there and host.server.requests("/files/") == []
    (tmp_path / "m.safetensors").write_bytes(b"something else")
    with pytest.raises(UserError, match="a different file already has this name"):
        Downloader(http).fetch(request_for(host, "m.safetensors", tmp_path, lora_bytes))


# --- concurrency, progress, cancel -------------------------------------------------------------


def test_pulls_run_concurrently_up_to_the_limit(tmp_path):
    files = FileHost()
    civitai = FakeCivitai(files)
    try:
        civitai.add_model(1, "Many", "Checkpoint")
        for i in range(5):
            civitai.add_version(1, 10 + i, f"v{i}", "SD 1.5",
                                [FakeFile(f"m{i}.safetensors", big_safetensors(1, seed=10 + i))])
            files.slow[civitai.storage_name(10 + i, civitai.versions[10 + i].files[0])] = 0.005
        seen: dict[str, int] = {}

        def progress(stage, done, total):
            seen[stage] = done

        with Store.open(tmp_path / "c.sqlite") as store:
            puller = Puller(store, settings_for(civitai.url), progress)
            outcomes = puller.pull([f"civitai://{10 + i}" for i in range(5)],
                                   PullOptions(to=tmp_path / "models", parallel=2))
            puller.close()
        assert [o.status for o in outcomes] == ["downloaded"] * 5
        assert files.server.max_in_flight == 2
        assert seen == {f"m{i}.safetensors": len(civitai.versions[10 + i].files[0].data)
                        for i in range(5)}
    finally:
        civitai.server.close()
        files.server.close()


def test_cancel_keeps_the_partial_for_a_resume(tmp_path, host, http):
    data = big_safetensors(2, seed=5)
    host.put("m.safetensors", data)
    host.slow["m.safetensors"] = 0.001
    cancel = CancelToken()
    with pytest.raises(Cancelled):
        Downloader(http, cancel_at_half(cancel), cancel).fetch(
            request_for(host, "m.safetensors", tmp_path, data))
    kept = (tmp_path / "m.safetensors.partial").stat().st_size
    assert not (tmp_path / "m.safetensors").exists() and kept >= len(data) // 2
    done = Downloader(http).fetch(request_for(host, "m.safetensors", tmp_path, data))
    assert done.resumed_from == kept and done.fetched == len(data) - kept and done.verified


def test_a_second_download_of_the_same_file_waits_its_turn(tmp_path, host, http, lora_bytes):
    import fcntl

    host.put("m.safetensors", lora_bytes)
    with open(tmp_path / "m.safetensors.partial", "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another download of this file is running"):
            Downloader(http).fetch(request_for(host, "m.safetensors", tmp_path, lora_bytes))


def test_a_redirect_to_an_address_that_cannot_work_fails_at_once():
    server = LoopbackServer(lambda seen: Reply(302, {"Location": "ftp://127.0.0.1/x"}))
    retry = RetryPolicy(4, 0.001, 0.01)
    try:
        with GuardedClient(retry=retry, timeout=5.0) as client, pytest.raises(WorkFailed) as err:
            client.request("GET", f"{server.url}/x", what="the download of x")
        assert "not a valid http(s) URL" in str(err.value)
        assert len(server.log) == 1  # not retried
    finally:
        server.close()


@pytest.mark.parametrize("with_sha256", [True, False])
def test_a_partial_file_that_is_already_complete_is_not_fetched_again(tmp_path, host, http,
                                                                      lora_bytes, with_sha256):
    """A kill -9 between the last byte and the rename leaves every byte in NAME.partial."""
    host.put("big.safetensors", lora_bytes)
    folder = tmp_path / "m"
    folder.mkdir()
    request = request_for(host, "big.safetensors", folder, lora_bytes if with_sha256 else None)
    (folder / "big.safetensors.partial").write_bytes(lora_bytes)
    download_module._Resume(download_module._digest(request.key),
                            host.blobs["big.safetensors"].etag, len(lora_bytes),
                            request.sha256, "big.safetensors").save(
        folder / "big.safetensors.partial.json")
    done = Downloader(http).fetch(request)
    assert (done.path.read_bytes(), done.fetched, done.restarted) == (lora_bytes, 0, False)
    assert done.resumed_from == len(lora_bytes) and done.verified == with_sha256
    assert host.sent("big.safetensors") == 0
    # known SHA256: not even asked; else one Range request, answered 416 `bytes */TOTAL`
    statuses = [s.status for s in host.server.requests("/files/big.safetensors")]
    assert statuses == ([] if with_sha256 else [416])
    assert leftovers(folder) == ["big.safetensors"]  # no .partial, no .partial.json
