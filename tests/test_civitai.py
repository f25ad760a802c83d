"""The Civitai client, pulls and identification against a fake Civitai on 127.0.0.1 that answers
in the real JSON shapes: search with filters and cursors, look-ups by id and hash (one and in
bulk), back-off on 429/5xx only, each refusal as one sentence, the token only ever sent to
Civitai's own host, sidecars and previews (NSFW only when allowed), and `catalog identify` /
`catalog updates` in a handful of requests."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fakes.civitai import TOKEN, FakeCivitai, FakeFile
from fakes.env import settings_for
from fakes.files import FileHost
from fakes.loopback import LoopbackServer, Reply, json_reply

from catalog.civitai import CivitaiClient, CivitaiRefused, FileChoice
from catalog.config import load_settings
from catalog.download import BadDownload, Downloader, DownloadRequest
from catalog.edits import add_root
from catalog.entries import find_entry, get_entry
from catalog.hash_cache import hash_pending
from catalog.pull import Failed, Puller, PullOptions
from catalog.remote_http import GuardedClient, RetryPolicy
from catalog.remote_identify import find_updates, identify
from catalog.scan import scan
from catalog.store import Store
from mergekit_sd.errors import UserError, WorkFailed
from mergekit_sd.testing import write_lora

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("loras")
    return [write_lora(folder / f"l{i}.safetensors", "kohya-sd1", seed=20 + i).read_bytes()
            for i in range(4)]


@pytest.fixture
def fake(loras):
    """A storage host and a Civitai with one LoRA model (45) of one version (123)."""
    files = FileHost()
    civitai = FakeCivitai(files)
    files.put("img/sfw.png", PNG, "image/png")
    files.put("img/x.png", PNG + b"x", "image/png")
    civitai.add_model(45, "My Character", "LORA", tags=["character"])
    civitai.add_version(45, 123, "v1.0", "Pony", [FakeFile("mychar.safetensors", loras[0])],
                        trained_words=["mychar", "1girl"],
                        images=[{"url": f"{files.url}/files/img/x.png", "nsfwLevel": 8},
                                {"url": f"{files.url}/files/img/sfw.png", "nsfwLevel": 1}])
    yield SimpleNamespace(files=files, civitai=civitai, url=civitai.url)
    civitai.server.close()
    files.server.close()


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "c.sqlite") as opened:
        yield opened


def client_for(fake, token=None, sleep=None) -> CivitaiClient:
    retry = RetryPolicy(4, 0.001, 0.01, **({"sleep": sleep} if sleep else {}))
    return CivitaiClient(fake.url, token, retry, timeout=5.0)


def pull(store, fake, ref, token=None, **options):
    puller = Puller(store, settings_for(fake.url, token))
    try:
        return puller.pull([ref], PullOptions(**options))
    finally:
        puller.close()


def model_files(folder: Path) -> list[str]:
    """Everything under `folder` that a web UI or a scan could take for a model."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file()
                  and (".safetensors" in p.name or p.suffix in (".ckpt", ".pt")))


# --- settings ----------------------------------------------------------------------------------


def test_settings_come_from_the_environment_then_the_file(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('[civitai]\ntoken = "from-file"\nbase_url = "http://mirror.test/"\n'
                      '[downloads]\nparallel = 5\nroot = "~/models"\n[network]\nattempts = 2\n')
    monkeypatch.setenv("MERGEKIT_SD_CONFIG", str(config))
    for name in ("CIVITAI_API_TOKEN", "CIVITAI_BASE_URL", "MERGEKIT_SD_DOWNLOADS"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert (settings.civitai_token, settings.civitai_base_url, settings.parallel,
            settings.network.attempts) == ("from-file", "http://mirror.test", 5, 2)
    assert settings.download_root == Path("~/models").expanduser()
    monkeypatch.setenv("CIVITAI_API_TOKEN", "from-env")
    assert load_settings().civitai_token == "from-env"
    assert "from-env" not in repr(load_settings())
    config.write_text("[network]\nattempts = true\n")
    with pytest.raises(UserError, match="attempts must be a whole number, not True"):
        load_settings()
    config.write_text("[civitai\n")
    with pytest.raises(UserError, match="config.toml: not valid TOML"):
        load_settings()


# --- search and look-ups ----------------------------------------------------------------------


def test_search_sends_the_filters_and_follows_cursors(fake, loras):
    for i in range(5):
        fake.civitai.add_model(100 + i, f"Style {i}", "LORA" if i % 2 else "Checkpoint",
                               nsfw=i == 3)
        fake.civitai.add_version(100 + i, 1000 + i, "v1", "Pony" if i < 4 else "SDXL 1.0",
                                 [FakeFile(f"s{i}.safetensors", loras[1])])
    with client_for(fake) as client:
        page = client.search_models("style", types=["LORA"], base_models=["Pony"], nsfw=False,
                                    sort="Most Downloaded", period="Month", limit=1)
        assert [m["name"] for m in page.items] == ["Style 1"] and page.next_cursor is None
        sent = fake.civitai.server.requests("/api/v1/models")[-1]
        assert sent.query == {"limit": ["1"], "query": ["style"], "types": ["LORA"],
                              "baseModels": ["Pony"], "sort": ["Most Downloaded"],
                              "period": ["Month"], "nsfw": ["false"]}
        before = len(fake.civitai.server.requests("/api/v1/models"))
        names = [m["name"] for m in client.iter_models(5, page_size=2, query="style")]
        assert names == [f"Style {i}" for i in range(5)]
        pages = fake.civitai.server.requests("/api/v1/models")[before:]
        assert [(p.param("cursor"), p.param("limit")) for p in pages] == [
            (None, "2"), ("2", "2"), ("4", "1")]
        with pytest.raises(UserError, match="--sort 'Best'.*Highest Rated"):
            client.search_models("x", sort="Best")
        with pytest.raises(UserError, match="--type 'Lora'.*LORA"):
            client.search_models("x", types=["Lora"])


def test_lookups_by_id_and_hash_in_real_shapes(fake, loras):
    sha = hashlib.sha256(loras[0]).hexdigest()
    with client_for(fake) as client:
        version = client.version(123)
        assert (version["modelId"], version["baseModel"], version["model"]["type"]) == (
            45, "Pony", "LORA")
        file = version["files"][0]
        assert file["hashes"]["SHA256"] == sha.upper() and file["primary"]
        assert file["metadata"] == {"format": "SafeTensor", "size": "pruned", "fp": "fp16"}
        assert client.model(45)["modelVersions"][0]["id"] == 123
        assert client.version_by_hash(sha)["id"] == 123
        assert client.version_by_hash(sha[:10])["id"] == 123  # AutoV2
        assert client.version_by_hash("0" * 64) is None
        with pytest.raises(CivitaiRefused, match=r"Civitai does not know model version 999 "
                                                 r"\(404\)"):
            client.version(999)


def test_bulk_lookups_batch_by_the_endpoints_limits(fake, loras):
    known = hashlib.sha256(loras[0]).hexdigest()
    hashes = [hashlib.sha256(b"%d" % i).hexdigest() for i in range(249)] + [known]
    with client_for(fake) as client:
        versions = client.versions_by_hashes(hashes)
        posts = fake.civitai.server.requests("/api/v1/model-versions/by-hash", "POST")
        assert [len(p.json()) for p in posts] == [100, 100, 50]
        assert [v["id"] for v in versions] == [123]
        ids = client.version_ids_by_hashes(hashes * 4)  # duplicates are sent once
        posts = fake.civitai.server.requests("/api/v1/model-versions/by-hash/ids")
        assert len(posts) == 1 and len(posts[0].json()) == 250
        assert ids == {known: 123}


# --- back-off and refusals --------------------------------------------------------------------


def test_backoff_on_429_and_5xx_only(fake):
    waits = []
    fake.civitai.fail("/api/v1/model-versions/123", 429, 503)
    with client_for(fake, sleep=waits.append) as client:
        assert client.version(123)["id"] == 123
        assert len(fake.civitai.server.requests("/api/v1/model-versions/123")) == 3
        assert waits[0] == 0.0  # the 429's Retry-After: 0
        assert 0 <= waits[1] <= 0.002  # full jitter under backoff * 2**1
        fake.civitai.fail("/api/v1/model-versions/123", 502, 503, 500, 504)
        with pytest.raises(WorkFailed, match=r"kept answering HTTP 504"):
            client.version(123)
        before = len(fake.civitai.server.log)
        with pytest.raises(CivitaiRefused):
            client.version(999)
        assert len(fake.civitai.server.log) == before + 1  # a 404 is not retried


def test_retry_delays_are_jittered_and_bounded():
    policy = RetryPolicy(5, 1.0, 8.0)
    delays = [policy.delay(3) for _ in range(200)]
    assert all(0 <= d <= 8.0 for d in delays) and len(set(delays)) > 150
    assert policy.delay(0, "120") == 8.0 and policy.delay(0, "2") == 2.0


def test_each_refusal_is_one_sentence_and_leaves_no_model(tmp_path, store, fake, loras):
    civitai = fake.civitai
    civitai.add_model(50, "Members Only", "LORA")
    civitai.add_version(50, 500, "v1", "SDXL 1.0", [FakeFile("members.safetensors", loras[1])],
                        needs_account=True)
    civitai.add_model(51, "Soon", "LORA")
    civitai.add_version(51, 510, "v1", "Pony", [FakeFile("soon.safetensors", loras[2])],
                        early_access_until="2031-01-01T00:00:00.000Z")
    civitai.add_model(52, "Old", "LORA", mode="Archived")
    civitai.add_version(52, 520, "v1", "SD 1.5", [FakeFile("old.safetensors", loras[3])])
    root = tmp_path / "root"
    expected = {
        ("civitai://500", None): r"Civitai wants an account for model version 500 \(401\); "
                                 r"create an API token .* set CIVITAI_API_TOKEN$",
        ("civitai://500", "wrong"): r"Civitai refused the API token for model version 500 "
                                    r"\(401\); check CIVITAI_API_TOKEN",
        ("civitai://510", None): r"model version 510 is in early access on Civitai until "
                                 r"2031-01-01T00:00:00.000Z; download it after that",
        ("civitai://999", None): r"Civitai does not know model version 999 \(404\)",
        ("civitai://520", None): r"model version 520 was archived on Civitai and can no longer "
                                 "be downloaded",
    }
    for (ref, token), sentence in expected.items():
        [outcome] = pull(store, fake, ref, token, to=root)
        assert isinstance(outcome, Failed) and isinstance(outcome.error, UserError), outcome
        message = str(outcome.error)
        assert re.search(sentence, message) and "\n" not in message, message
        assert model_files(tmp_path) == [] and not list(tmp_path.rglob("*.partial*"))
    # the download endpoint's own 410, as a client that skipped the version look-up meets it
    with client_for(fake) as client:
        request = DownloadRequest(client.download_url(520), root, "k", name="old.safetensors",
                                  refusal=lambda r: client.refusal(r, "model version 520"))
        with pytest.raises(CivitaiRefused, match=r"model version 520 was archived on Civitai "
                                                 r"\(410\) and can no longer be downloaded"):
            Downloader(client.http).fetch(request)
    assert model_files(tmp_path) == [] and not list(tmp_path.rglob("*.partial*"))


def test_a_login_page_never_becomes_a_model(tmp_path, fake, loras):
    """Without `Content-Type: application/json`, Civitai answers a download without an account
    with its HTML login page: the downloader refuses to keep it."""
    fake.civitai.add_model(50, "Members Only", "LORA")
    fake.civitai.add_version(50, 500, "v1", "SDXL 1.0",
                             [FakeFile("members.safetensors", loras[1])], needs_account=True)
    with GuardedClient(retry=RetryPolicy(2, 0.001, 0.01)) as bare:
        request = DownloadRequest(f"{fake.url}/api/download/models/500", tmp_path, "k",
                                  name="members.safetensors")
        with pytest.raises(BadDownload, match="sent a web page instead of the model file"):
            Downloader(bare).fetch(request)
    assert fake.civitai.server.requests("/login")[0].status == 200
    assert list(tmp_path.iterdir()) == []


# --- the token --------------------------------------------------------------------------------


def test_the_token_goes_to_civitai_only_and_is_never_logged(tmp_path, store, fake, caplog):
    caplog.set_level(logging.DEBUG)
    [pulled] = pull(store, fake, "civitai://123", TOKEN, to=tmp_path / "root")
    assert pulled.status == "downloaded" and pulled.verified
    api = fake.civitai.server.log
    assert api and all(s.headers.get("authorization") == f"Bearer {TOKEN}" for s in api)
    storage = fake.files.server.log
    assert {s.path for s in storage} == {"/files/model/123/9001", "/files/img/sfw.png"}
    assert all("authorization" not in s.headers for s in storage)
    assert TOKEN not in caplog.text and TOKEN not in repr(settings_for(fake.url, TOKEN))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


# --- pulls ------------------------------------------------------------------------------------


def test_pull_registers_the_file_with_its_sidecars_and_source(tmp_path, store, fake, loras):
    webui = tmp_path / "webui"
    (webui / "models" / "Lora").mkdir(parents=True)
    (webui / "models" / "Stable-diffusion").mkdir()
    [pulled] = pull(store, fake, "civitai://123", to=webui)
    lora_dir = webui / "models" / "Lora"
    assert pulled.path == lora_dir / "mychar.safetensors"  # a LoRA goes where LoRAs go
    assert sorted(p.name for p in lora_dir.iterdir()) == [
        "mychar.civitai.info", "mychar.preview.png", "mychar.safetensors"]
    assert (lora_dir / "mychar.preview.png").read_bytes() == PNG  # the PG image, not the X one
    assert json.loads((lora_dir / "mychar.civitai.info").read_text())["id"] == 123
    entry = get_entry(store, pulled.entry_id)
    assert (entry.base_model, entry.trigger_words, entry.source) == (
        "Pony", ["mychar", "1girl"], "civitai")
    assert entry.source_ids == {"civitai": {"model_id": 45, "version_id": 123,
                                            "file_id": 9001}}
    assert entry.sha256 == hashlib.sha256(loras[0]).hexdigest() and entry.autov3
    assert entry.details["sidecar"]["model_name"] == "My Character"
    assert store.db.execute("SELECT path FROM roots").fetchone()[0] == str(webui)

    downloads = len(fake.files.server.requests("/files/model/"))
    [again] = pull(store, fake, "civitai://model/45", to=webui)
    assert (again.status, again.entry_id) == ("already owned", pulled.entry_id)
    assert len(fake.files.server.requests("/files/model/")) == downloads


def test_a_pull_takes_nothing_from_a_cm_info_another_file_left_under_its_name(tmp_path, store,
                                                                             fake):
    """Stability Matrix's `.cm-info.json` of a file deleted before (its sidecars left): the
    pulled file, hashed as it arrives, is not that file."""
    (tmp_path / "mychar.cm-info.json").write_text(json.dumps({
        "ModelId": 7, "VersionId": 70, "ModelName": "Gone", "BaseModel": "Illustrious",
        "TrainedWords": ["gone"], "Hashes": {"SHA256": "CD" * 32}}))
    [pulled] = pull(store, fake, "civitai://123", to=tmp_path)
    entry = get_entry(store, pulled.entry_id)
    assert entry.source_ids["civitai"]["version_id"] == 123
    assert "mychar.cm-info.json" not in entry.details["sidecar"]["read"]
    assert "describes another file" in entry.details["sidecar"]["problems"][0]
    assert entry.trigger_words == ["mychar", "1girl"]


def test_a_file_already_owned_under_another_name_is_not_downloaded(tmp_path, store, fake,
                                                                    loras):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "renamed.safetensors").write_bytes(loras[0])
    add_root(store, mine)
    scan(store, jobs=1)
    hash_pending(store)
    [pulled] = pull(store, fake, "civitai://123", to=tmp_path / "elsewhere")
    assert pulled.status == "already owned" and pulled.path == mine / "renamed.safetensors"
    assert fake.files.server.requests("/files/model/") == []
    entry = find_entry(store, "renamed")
    assert entry.source_ids["civitai"]["version_id"] == 123
    assert (mine / "renamed.civitai.info").exists()
    assert entry.details["sidecar"]["model_name"] == "My Character"  # read at once


def test_a_file_replaced_under_a_pulled_name_is_not_that_version(tmp_path, store, fake, loras):
    """The `.civitai.info` of a pulled file stays when another file takes its name: the
    catalog must not answer "already have" for it, hashed or not."""
    [pulled] = pull(store, fake, "civitai://123", to=tmp_path)
    pulled.path.write_bytes(loras[1])  # a browser download under the same name
    # not hashed since: the pull hashes it before answering, and downloads the version
    [again] = pull(store, fake, "civitai://model/45", to=tmp_path)
    assert isinstance(again, Failed)
    assert "a different file already has this name" in str(again.error)
    entry = get_entry(store, pulled.entry_id)
    assert (entry.source, entry.source_ids, entry.sha256) == (
        "local", {}, hashlib.sha256(loras[1]).hexdigest())
    [offline] = pull(store, fake, "civitai://123", to=tmp_path, offline=True)
    assert "not in the catalog" in str(offline.error)
    # replaced and hashed by a scan: the same
    pulled.path.write_bytes(loras[2])
    scan(store, jobs=1)
    assert get_entry(store, pulled.entry_id).source == "civitai"  # trusted until hashed
    hash_pending(store)
    assert get_entry(store, pulled.entry_id).source_ids == {}
    [offline] = pull(store, fake, "civitai://123", to=tmp_path, offline=True)
    assert "not in the catalog" in str(offline.error)


def test_identify_looks_up_a_file_whose_civitai_info_describes_another(tmp_path, store, fake,
                                                                      loras):
    """A `.civitai.info` left by a file once under this name is no identification: `identify`
    looks the new file up without --refresh."""
    fake.civitai.add_model(80, "Second", "LORA")
    fake.civitai.add_version(80, 800, "v2", "Illustrious", [FakeFile("b.safetensors", loras[1])])
    [pulled] = pull(store, fake, "civitai://123", to=tmp_path)
    pulled.path.write_bytes(loras[1])
    scan(store, jobs=1)
    hash_pending(store)
    with client_for(fake) as client:
        report = identify(store, client)
    assert (report.skipped, report.looked_up) == (0, 1)
    entry = get_entry(store, pulled.entry_id)
    assert entry.source_ids["civitai"]["version_id"] == 800
    assert json.loads((tmp_path / "mychar.civitai.info").read_text())["id"] == 800


def test_a_file_owned_as_one_version_stays_it_when_pulled_as_another(tmp_path, store, fake,
                                                                     loras):
    """Civitai publishes the same bytes under several versions (re-uploads): an entry has one
    source, the version its `.civitai.info` names, whichever of them a later pull asks for."""
    fake.civitai.add_model(47, "Re-upload", "LORA")
    fake.civitai.add_version(47, 480, "v1", "SDXL 1.0", [FakeFile("reup.safetensors", loras[0])])
    [first] = pull(store, fake, "civitai://123", to=tmp_path)
    [second] = pull(store, fake, "civitai://480", to=tmp_path)
    assert (second.status, second.entry_id) == ("already owned", first.entry_id)
    assert second.notes == ["the same file as Civitai model 45 version 123, which the catalog "
                            "keeps as its source"]
    entry = get_entry(store, first.entry_id)
    assert entry.source_ids["civitai"] == {"model_id": 45, "version_id": 123, "file_id": 9001}
    assert (entry.base_model, entry.details["sidecar"]["model_name"]) == ("Pony", "My Character")
    assert json.loads((tmp_path / "mychar.civitai.info").read_text())["id"] == 123


def test_file_selectors_pick_the_file_and_name_it_to_the_endpoint(tmp_path, store, fake,
                                                                   loras):
    fake.civitai.add_model(60, "Two Files", "Checkpoint")
    fake.civitai.add_version(60, 600, "v1", "SD 1.5", [
        FakeFile("two-pruned.safetensors", loras[1]),
        FakeFile("two-full.safetensors", loras[2], size="full", fp="fp32", primary=False)])
    [pulled] = pull(store, fake, "civitai://600", to=tmp_path, choice=FileChoice(fp="fp32"))
    assert pulled.path.name == "two-full.safetensors" and pulled.verified
    asked = fake.civitai.server.requests("/api/download/models/600")[-1]
    assert asked.query["fp"] == ["fp32"] and asked.query["size"] == ["full"]
    [missing] = pull(store, fake, "civitai://600", to=tmp_path, choice=FileChoice(fp="bf16"))
    assert "has no file that fits" in str(missing.error)
    assert "two-pruned.safetensors (Model, SafeTensor, pruned, fp16)" in str(missing.error)


def test_previews_rated_above_pg13_only_when_allowed(tmp_path, store, fake, loras):
    fake.civitai.add_model(70, "Spicy", "LORA", nsfw=True)
    fake.civitai.add_version(70, 700, "v1", "Pony", [FakeFile("spicy.safetensors", loras[1])],
                             images=[{"url": f"{fake.files.url}/files/img/x.png",
                                      "nsfwLevel": 16}])
    [safe] = pull(store, fake, "civitai://700", to=tmp_path / "a")
    assert not (tmp_path / "a" / "spicy.preview.png").exists()
    assert get_entry(store, safe.entry_id).preview is None
    [allowed] = pull(store, fake, "civitai://700", to=tmp_path / "b", nsfw_previews=True)
    assert allowed.status == "already owned"  # the same bytes are owned already
    fake.civitai.add_model(71, "Spicy 2", "LORA", nsfw=True)
    fake.civitai.add_version(71, 710, "v1", "Pony", [FakeFile("spicy2.safetensors", loras[2])],
                             images=[{"url": f"{fake.files.url}/files/img/x.png",
                                      "nsfwLevel": 16}])
    [shown] = pull(store, fake, "civitai://710", to=tmp_path / "b", nsfw_previews=True)
    assert (tmp_path / "b" / "spicy2.preview.png").read_bytes() == PNG + b"x"
    assert get_entry(store, shown.entry_id).preview == str(tmp_path / "b" / "spicy2.preview.png")


def test_offline_pull_never_calls_out(tmp_path, store, fake):
    [failed] = pull(store, fake, "civitai://123", offline=True, to=tmp_path)
    assert "--offline forbids downloading it" in str(failed.error)
    assert fake.civitai.server.log == [] and fake.files.server.log == []


# --- identify and updates ---------------------------------------------------------------------


def test_identify_1000_hashes_in_a_handful_of_requests(tmp_path, store, fake, loras):
    fake.civitai.add_model(80, "Second", "LORA")
    fake.civitai.add_version(80, 800, "v2", "Illustrious", [FakeFile("b.safetensors", loras[1])],
                             trained_words=["second"])
    folder = tmp_path / "loras"
    folder.mkdir()
    for i, data in enumerate(loras):
        (folder / f"local-{i}.safetensors").write_bytes(data)
    add_root(store, folder)
    scan(store, jobs=1)
    hash_pending(store)
    now = time.time()
    with store.write() as db:  # 996 more hashed files Civitai does not know
        db.executemany(
            "INSERT INTO files (path, name, status, size, mtime_ns, sha256, first_seen, "
            "last_seen, updated_at) VALUES (?, ?, 'ok', 1, 0, ?, ?, ?, ?)",
            [(str(folder / f"other-{i}.safetensors"), f"other-{i}",
              hashlib.sha256(b"other %d" % i).hexdigest(), now, now, now) for i in range(996)])

    with client_for(fake) as client:
        report = identify(store, client)
    api = fake.civitai.api_requests()
    assert len(api) <= 3, [s.path for s in api]  # by-hash/ids once, by-hash once
    assert report.looked_up == 1000 and report.unknown == 998
    assert sorted(i.version_id for i in report.identified) == [123, 800]
    first = find_entry(store, "local-0")
    assert (first.base_model, first.trigger_words, first.source) == (
        "Pony", ["mychar", "1girl"], "civitai")
    assert first.details["sidecar"]["model_name"] == "My Character"
    assert first.preview == str(folder / "local-0.preview.png")
    assert find_entry(store, "local-1").base_model == "Illustrious"

    with client_for(fake) as client:
        again = identify(store, client)
    assert again.skipped == 2 and again.looked_up == 998
    assert [s.path for s in fake.civitai.api_requests()[len(api):]] == [
        "/api/v1/model-versions/by-hash/ids"]


def test_updates_name_newer_versions_of_owned_models(tmp_path, store, fake, loras):
    [pulled] = pull(store, fake, "civitai://123", to=tmp_path)
    with client_for(fake) as client:
        assert find_updates(store, client) == ([], 1)
    fake.civitai.add_version(45, 124, "v2.0", "Illustrious",
                             [FakeFile("mychar-v2.safetensors", loras[3])])
    before = len(fake.civitai.api_requests())
    with client_for(fake) as client:
        updates, checked = find_updates(store, client)
    assert checked == 1 and len(fake.civitai.api_requests()) == before + 1
    [update] = updates
    assert (update.model_id, update.model) == (45, "My Character")
    assert update.owned == [{"version_id": 123, "version": "v1.0", "path": str(pulled.path)}]
    assert [(v["version_id"], v["version"], v["base_model"]) for v in update.newer] == [
        (124, "v2.0", "Illustrious")]



def test_identify_and_pull_keep_a_preview_the_user_made(tmp_path, store, fake, loras):
    fake.civitai.add_model(81, "Other", "LORA")
    fake.civitai.add_version(81, 810, "v1", "Pony", [FakeFile("other.safetensors", loras[1])],
                             images=[{"url": f"{fake.files.url}/files/img/sfw.png",
                                      "nsfwLevel": 1}])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mine.safetensors").write_bytes(loras[0])
    (mine / "mine.preview.png").write_bytes(b"my own picture")
    add_root(store, mine)
    scan(store, jobs=1)
    hash_pending(store)
    with client_for(fake) as client:
        report = identify(store, client, nsfw_previews=True)
    assert [found.preview for found in report.identified] == [None]
    assert "mine.safetensors: kept its preview mine.preview.png" in report.problems
    assert (mine / "mine.preview.png").read_bytes() == b"my own picture"
    assert (mine / "mine.civitai.info").exists()

    (mine / "two.safetensors").write_bytes(loras[1])  # a file the pull finds owned
    (mine / "two.png").write_bytes(b"a picture a web UI shows too")
    scan(store, jobs=1)
    hash_pending(store)
    [pulled] = pull(store, fake, "civitai://810", to=tmp_path / "elsewhere")
    assert pulled.status == "already owned" and (mine / "two.civitai.info").exists()
    assert not (mine / "two.preview.png").exists()
    assert (mine / "two.png").read_bytes() == b"a picture a web UI shows too"
    assert fake.files.server.requests("/files/img/") == []  # no image fetched for nothing


def test_identify_refresh_replaces_the_preview_it_saved_and_only_that(tmp_path, store, fake,
                                                                      loras):
    """Civitai's preview for a file changes: --refresh follows it for the preview a pull or an
    identification saved, within the NSFW setting; a preview of the user's stays."""
    [pulled] = pull(store, fake, "civitai://123", to=tmp_path / "pulled")
    ours = pulled.path.with_name("mychar.preview.png")
    assert ours.read_bytes() == PNG
    fake.civitai.add_model(81, "Other", "LORA")
    fake.civitai.add_version(81, 810, "v1", "Pony", [FakeFile("other.safetensors", loras[1])],
                             images=[{"url": f"{fake.files.url}/files/img/sfw.png",
                                      "nsfwLevel": 1}])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "other.safetensors").write_bytes(loras[1])
    (mine / "other.preview.png").write_bytes(b"my own picture")
    add_root(store, mine)
    scan(store, jobs=1)
    hash_pending(store)

    def refresh(**options):
        with client_for(fake) as client:
            return identify(store, client, refresh=True, **options)

    refresh()
    assert ours.read_bytes() == PNG  # the same image as before: nothing fetched again
    assert fake.files.server.requests("/files/img/", "GET")[1:] == []
    fake.files.put("img/new.png", PNG + b"new", "image/png")
    for version in (123, 810):
        fake.civitai.versions[version].images = [
            {"url": f"{fake.files.url}/files/img/new.png", "nsfwLevel": 1}]
    with client_for(fake) as client:
        assert identify(store, client).skipped == 2  # without --refresh nothing changes
    assert ours.read_bytes() == PNG

    report = refresh()
    assert ours.read_bytes() == PNG + b"new"
    assert "mychar.safetensors: replaced its preview mychar.preview.png (Civitai shows another " \
           "image for it now)" in report.problems
    assert (mine / "other.preview.png").read_bytes() == b"my own picture"
    assert "other.safetensors: kept its preview other.preview.png" in report.problems
    assert sorted(p.name for p in ours.parent.iterdir()) == [
        "mychar.civitai.info", "mychar.preview.png", "mychar.safetensors"]  # no temporary left
    assert get_entry(store, pulled.entry_id).preview == str(ours)

    # only an X-rated image now: gone with the default setting, saved with --nsfw-previews
    fake.civitai.versions[123].images = [{"url": f"{fake.files.url}/files/img/x.png",
                                          "nsfwLevel": 8}]
    report = refresh()
    assert not ours.exists() and get_entry(store, pulled.entry_id).preview is None
    assert any("removed the preview saved with its earlier information" in p
               for p in report.problems)
    refresh(nsfw_previews=True)
    assert ours.read_bytes() == PNG + b"x"
    # the one identify saved follows too: to the first image allowed by the setting
    fake.civitai.versions[123].images.append({"url": f"{fake.files.url}/files/img/sfw.png",
                                              "nsfwLevel": 1})
    refresh()
    assert ours.read_bytes() == PNG

    # a preview the user changed is theirs from then on
    ours.write_bytes(b"edited by hand")
    fake.civitai.versions[123].images = [{"url": f"{fake.files.url}/files/img/new.png",
                                          "nsfwLevel": 1}]
    assert "mychar.safetensors: kept its preview mychar.preview.png" in refresh().problems
    ours.write_bytes(PNG)  # even once its bytes are those saved again: forgotten
    fake.civitai.versions[123].images[0]["url"] = f"{fake.files.url}/files/img/x.png"
    refresh()
    assert ours.read_bytes() == PNG


def test_a_preview_address_that_does_not_parse_is_a_note_and_the_model_is_catalogued(
        tmp_path, store, fake, loras):
    fake.civitai.add_model(50, "Odd", "LORA")
    fake.civitai.add_version(50, 500, "v1", "Pony", [FakeFile("odd.safetensors", loras[2])],
                             images=[{"url": "http://[::1/bad.png?token=x", "nsfwLevel": 1}])
    puller = Puller(store, settings_for(fake.url))
    try:
        odd, other = puller.pull(["civitai://500", "civitai://123"],
                                 PullOptions(to=tmp_path / "m"))
    finally:
        puller.close()
    assert odd.entry_id is not None and get_entry(store, odd.entry_id).path == str(odd.path)
    assert odd.notes == ["odd.safetensors: no preview (the preview http://[::1/bad.png: the "
                         "address (or one it redirected to) is not a valid http(s) URL; check "
                         "the link)"]
    assert other.status == "downloaded"


def test_identify_refuses_versions_without_an_id_before_writing_anything(tmp_path, store, fake,
                                                                         loras):
    def without_ids(seen):  # Civitai, but the full versions by hash have lost their ids
        reply = fake.civitai.handle(seen)
        if seen.path == "/api/v1/model-versions/by-hash":
            versions = json.loads(reply.body)
            for version in versions:
                del version["id"]
            return json_reply(versions)
        return reply

    proxy = LoopbackServer(without_ids)
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "mine.safetensors").write_bytes(loras[0])
    add_root(store, folder)
    scan(store, jobs=1)
    hash_pending(store)
    try:
        with CivitaiClient(proxy.url, None, RetryPolicy(4, 0.001, 0.01), 5.0) as client, \
                pytest.raises(WorkFailed, match="answered the look-up of 1 file hashes with "
                              "something unexpected"):
            identify(store, client)
    finally:
        proxy.close()
    assert sorted(p.name for p in folder.iterdir()) == ["mine.safetensors"]
    assert find_entry(store, "mine").source_ids == {}


@pytest.mark.parametrize("refs", [["civitai://123", "civitai://model/45"],
                                  ["civitai://123", "civitai://123"]])
def test_one_version_named_twice_in_a_pull_is_fetched_once(tmp_path, store, fake, refs):
    puller = Puller(store, settings_for(fake.url))
    try:
        first, second = puller.pull(refs, PullOptions(to=tmp_path / "m"))
    finally:
        puller.close()
    assert first.status == "downloaded" and first.ref == refs[0]
    assert (second.ref, second.status, second.entry_id, second.path) == (
        refs[1], "already owned", first.entry_id, first.path)
    assert len(fake.files.server.requests("/files/model/")) == 1


def test_a_file_civitai_lists_without_a_sha256_is_pulled_with_a_note(tmp_path, store, fake,
                                                                     loras):
    fake.civitai.add_model(60, "No Hash", "LORA")
    fake.civitai.add_version(60, 600, "v1", "Pony",
                             [FakeFile("nohash.safetensors", loras[3], sha256="x")])
    [pulled] = pull(store, fake, "civitai://600", to=tmp_path / "m")
    assert (pulled.status, pulled.verified) == ("downloaded", False)
    assert pulled.notes == ["not verified: Civitai lists no SHA256 for this file"]


@pytest.mark.parametrize("status", [403, 404, 410])
def test_a_storage_host_refusal_is_not_blamed_on_civitai(tmp_path, store, fake, status):
    fake.files.server.app = lambda seen: Reply(
        status, {"Content-Type": "application/xml"},
        b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>")
    [failed] = pull(store, fake, "civitai://123", to=tmp_path / "m")
    assert isinstance(failed, Failed) and isinstance(failed.error, WorkFailed)
    assert str(failed.error) == (
        f"mychar.safetensors: the storage host 127.0.0.1 refused the download link (HTTP "
        f"{status}); such links expire or move: run the same command again for a fresh one")


def test_the_preview_record_follows_its_file_when_it_moves(tmp_path, store, fake, loras):
    """A file pulled with its preview, then renamed with its sidecars, carried by copy to
    another root (found there by its SHA256), and unplugged and back: each time, --refresh
    still knows the preview beside it as the one it saved, and follows Civitai's."""
    [pulled] = pull(store, fake, "civitai://123", to=tmp_path / "pulled")
    version = fake.civitai.versions[123]

    def new_image(name: str) -> bytes:
        fake.files.put(f"img/{name}.png", PNG + name.encode(), "image/png")
        version.images = [{"url": f"{fake.files.url}/files/img/{name}.png", "nsfwLevel": 1}]
        return PNG + name.encode()

    def refreshed(model: Path, image: bytes) -> None:
        with client_for(fake) as client:
            report = identify(store, client, refresh=True)
        preview = model.with_name(model.stem + ".preview.png")
        assert f"{model.name}: replaced its preview {preview.name} (Civitai shows another " \
               "image for it now)" in report.problems
        assert preview.read_bytes() == image

    def move(model: Path, to: Path, copy: bool) -> Path:
        """The model and its sidecars, `X.*` -> `to.*`; `copy`: new files (another disk)."""
        to.parent.mkdir(parents=True, exist_ok=True)
        for path in list(model.parent.glob(model.stem + ".*")):
            target = to.with_name(to.stem + path.name[len(model.stem):])
            if copy:
                target.write_bytes(path.read_bytes())
                path.unlink()
            else:
                path.rename(target)
        return to

    # renamed in place, the preview with it (the same inode: a scan sees the move)
    model = move(pulled.path, tmp_path / "pulled" / "hero.safetensors", copy=False)
    assert scan(store, jobs=1).moved == [(str(pulled.path), str(model))]
    refreshed(model, new_image("one"))

    # copied to another root and deleted here: the same file by its SHA256 once hashed
    other = tmp_path / "other"
    moved = move(model, other / "hero.safetensors", copy=True)
    add_root(store, other)
    scan(store, jobs=1)
    assert hash_pending(store).moved == [(str(model), str(moved))]
    refreshed(moved, new_image("two"))

    # the root unplugged (the file missing), then back: read again, still the same file
    hidden = other.rename(tmp_path / "unplugged")
    scan(store, jobs=1)
    assert find_entry(store, "hero").status == "missing"
    hidden.rename(other)
    scan(store, jobs=1)
    assert find_entry(store, "hero").status == "ok"
    refreshed(moved, new_image("three"))
