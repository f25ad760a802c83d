"""Hugging Face through the real huggingface_hub against a fake Hub on 127.0.0.1 (HF_ENDPOINT):
listings with sizes and LFS SHA256s, model info, search, single-file and pattern pulls through
huggingface_hub's cache, files already owned skipped by their LFS SHA256, gated repositories
and HF_TOKEN (never sent to the storage host), offline mode, a corrupted download refused, and
hf:// recipe references resolved to the catalog copy."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
from fakes.env import settings_for
from fakes.files import FileHost
from fakes.hub import TOKEN, FakeHub

from catalog.edits import add_root
from catalog.entries import get_entry
from catalog.hash_cache import hash_pending
from catalog.hub import HubClient
from catalog.pull import Failed, Puller, PullOptions
from catalog.resolver import CatalogResolver
from catalog.scan import scan
from catalog.store import Store
from mergekit_sd.errors import UserError
from mergekit_sd.testing import write_checkpoint, write_lora


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("hub-src")
    return {"checkpoint": write_checkpoint(folder / "c.safetensors", "sd1", seed=1).read_bytes(),
            "lora": write_lora(folder / "l.safetensors", "kohya-sd1", seed=7).read_bytes(),
            "lora2": write_lora(folder / "m.safetensors", "kohya-sd1", seed=8).read_bytes()}


@pytest.fixture
def fake(tmp_path, monkeypatch, blobs):
    """A fake Hub with a public repository and a gated one, and an environment that reaches
    only it: no token of the developer's, a cache under tmp_path."""
    files = FileHost()
    hub = FakeHub(files)
    hub.add_repo("org/models", {"sd15-tiny.safetensors": blobs["checkpoint"],
                                "loras/style.safetensors": blobs["lora"],
                                "loras/other.safetensors": blobs["lora2"],
                                "README.md": b"# tiny models\n"}, downloads=50)
    hub.add_repo("org/gated", {"secret.safetensors": blobs["lora2"]}, gated=True)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield SimpleNamespace(files=files, hub=hub)
    hub.server.close()
    files.server.close()


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "c.sqlite") as opened:
        yield opened


def pull(store, ref, **options):
    # Civitai is never asked here: its URL points nowhere
    puller = Puller(store, settings_for("http://127.0.0.1:9"))
    try:
        return puller.pull([ref], PullOptions(**options))
    finally:
        puller.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_listing_info_and_search(fake, blobs):
    hub = HubClient()
    listed = {f.path: (f.size, f.sha256) for f in hub.files("org/models")}
    assert listed == {
        "README.md": (14, None),
        "sd15-tiny.safetensors": (len(blobs["checkpoint"]), sha(blobs["checkpoint"])),
        "loras/style.safetensors": (len(blobs["lora"]), sha(blobs["lora"])),
        "loras/other.safetensors": (len(blobs["lora2"]), sha(blobs["lora2"]))}
    one = hub.file("org/models", "loras/style.safetensors")
    assert (one.size, one.sha256) == (len(blobs["lora"]), sha(blobs["lora"]))
    info = hub.info("org/models")
    assert {s.rfilename: s.lfs.sha256 if s.lfs else None for s in info.siblings}[
        "sd15-tiny.safetensors"] == sha(blobs["checkpoint"])
    assert [m.id for m in hub.search("org")] == ["org/models", "org/gated"]
    with pytest.raises(UserError, match="has no such file"):
        hub.file("org/models", "nope.safetensors")
    with pytest.raises(UserError, match="no such repository, or it is private"):
        hub.files("org/absent")


def test_pull_goes_through_the_hub_cache_and_registers_the_source(tmp_path, fake, store,
                                                                   blobs):
    webui = tmp_path / "webui"
    (webui / "models" / "Lora").mkdir(parents=True)
    (webui / "models" / "Stable-diffusion").mkdir()
    [pulled] = pull(store, "hf://org/models/sd15-tiny.safetensors", to=webui)
    target = webui / "models" / "Stable-diffusion" / "sd15-tiny.safetensors"
    assert (pulled.path, pulled.status, pulled.verified) == (target, "downloaded", True)
    assert target.read_bytes() == blobs["checkpoint"]
    cached = list((tmp_path / "hf-cache").rglob("blobs/*"))
    assert [c.stat().st_ino for c in cached] == [target.stat().st_ino]  # a link, no 2nd copy
    entry = get_entry(store, pulled.entry_id)
    commit = fake.hub.repos["org/models"].commit
    assert entry.source == "hf" and entry.source_ids == {"hf": {
        "repo": "org/models", "path": "sd15-tiny.safetensors", "commit": commit}}
    assert entry.sha256 == sha(blobs["checkpoint"]) and entry.architecture == "sd1"

    storage = len(fake.files.server.log)
    [again] = pull(store, "hf://org/models/sd15-tiny.safetensors", to=webui)
    assert again.status == "already owned" and len(fake.files.server.log) == storage
    resolved = CatalogResolver(store)("hf://org/models/sd15-tiny.safetensors")
    assert (resolved.path, resolved.sha256) == (target, sha(blobs["checkpoint"]))
    pinned = CatalogResolver(store)(f"hf://org/models@{commit}/sd15-tiny.safetensors")
    assert pinned.path == target


def test_pattern_pull_skips_files_owned_by_their_lfs_sha256(tmp_path, fake, store, blobs):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "my-copy.safetensors").write_bytes(blobs["lora"])
    add_root(store, mine)
    scan(store, jobs=1)
    hash_pending(store)
    outcomes = pull(store, "hf://org/models/loras/*.safetensors", to=tmp_path / "loras")
    by_ref = {o.ref: o for o in outcomes}
    style = by_ref["hf://org/models/loras/style.safetensors"]
    other = by_ref["hf://org/models/loras/other.safetensors"]
    assert (style.status, style.path) == ("already owned", mine / "my-copy.safetensors")
    assert other.status == "downloaded" and other.path == tmp_path / "loras" / "other.safetensors"
    lfs = fake.files.server.requests("/files/lfs/")
    assert [s.path for s in lfs] == [f"/files/lfs/{sha(blobs['lora2'])}"]
    assert get_entry(store, style.entry_id).source_ids["hf"]["path"] == "loras/style.safetensors"


def test_gated_repository_wants_hf_token_which_never_reaches_storage(tmp_path, fake, store,
                                                                     monkeypatch, blobs):
    [refused] = pull(store, "hf://org/gated/secret.safetensors", to=tmp_path)
    assert isinstance(refused, Failed)
    assert "gated; accept its terms on its page, then set HF_TOKEN" in str(refused.error)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    [pulled] = pull(store, "hf://org/gated/secret.safetensors", to=tmp_path)
    assert pulled.status == "downloaded" and pulled.path.read_bytes() == blobs["lora2"]
    hub_requests = fake.hub.server.requests("/org/gated/") + fake.hub.server.requests(
        "/api/models/org/gated")
    assert hub_requests[-1].headers["authorization"] == f"Bearer {TOKEN}"
    assert fake.files.server.log and all(
        "authorization" not in s.headers for s in fake.files.server.log)


def test_offline_uses_only_the_cache(tmp_path, fake, store, monkeypatch, blobs):
    hub = HubClient()
    hub.download("org/models", "loras/style.safetensors")  # now in the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(fake.hub.server.log) + len(fake.files.server.log)
    offline = HubClient()
    found = offline.download("org/models", "loras/style.safetensors")
    assert found.from_cache and found.path.read_bytes() == blobs["lora"]
    with pytest.raises(UserError, match="not in the Hugging Face cache, and offline"):
        offline.download("org/models", "loras/other.safetensors")
    with pytest.raises(UserError, match="Hugging Face is set offline"):
        offline.files("org/models")
    [placed] = pull(store, "hf://org/models/loras/style.safetensors", to=tmp_path / "root")
    assert (placed.status, placed.fetched, placed.verified) == ("from cache", 0, True)
    assert get_entry(store, placed.entry_id).sha256 == sha(blobs["lora"])
    [refused] = pull(store, "hf://org/models/loras/other.safetensors", to=tmp_path / "root")
    assert "nor in the Hugging Face cache, and offline" in str(refused.error)
    assert len(fake.hub.server.log) + len(fake.files.server.log) == before


def test_a_corrupted_download_is_refused_and_dropped_from_the_cache(tmp_path, fake, store,
                                                                     blobs):
    lfs_name = f"lfs/{sha(blobs['checkpoint'])}"
    corrupted = bytearray(blobs["checkpoint"])
    corrupted[-100:] = bytes(100)  # the storage host serves other bytes of the same size
    fake.files.put(lfs_name, bytes(corrupted))
    [failed] = pull(store, "hf://org/models/sd15-tiny.safetensors", to=tmp_path / "root")
    assert "does not match the hash the Hub announced" in str(failed.error)
    assert not (tmp_path / "root" / "sd15-tiny.safetensors").exists()
    assert list((tmp_path / "hf-cache").rglob("blobs/*")) == []
    fake.files.put(lfs_name, blobs["checkpoint"])
    [pulled] = pull(store, "hf://org/models/sd15-tiny.safetensors", to=tmp_path / "root")
    assert pulled.status == "downloaded" and pulled.verified


def test_recipe_references_before_and_after_a_pull(tmp_path, fake, store):
    resolver = CatalogResolver(store)
    with pytest.raises(LookupError, match=r"run `mergekit-sd pull hf://org/models/"
                                          r"sd15-tiny.safetensors`, or pass --pull"):
        resolver("hf://org/models/sd15-tiny.safetensors")
    pulled_refs = []

    def fetch(ref):
        pulled_refs.append(ref)
        pull(store, ref, to=tmp_path / "root")

    resolved = CatalogResolver(store, fetch)("hf://org/models/sd15-tiny.safetensors")
    assert pulled_refs == ["hf://org/models/sd15-tiny.safetensors"]
    assert resolved.path == tmp_path / "root" / "sd15-tiny.safetensors"
    with pytest.raises(LookupError, match="write hf://ORG/REPO/PATH"):
        resolver("hf://just-a-name")


def test_patterns_stay_within_a_folder_and_refuse_files_that_share_a_name(tmp_path, fake,
                                                                          store, blobs):
    fake.hub.add_repo("org/diff", {"unet/diffusion_pytorch_model.safetensors": blobs["lora"],
                                   "vae/diffusion_pytorch_model.safetensors": blobs["lora2"],
                                   "top.safetensors": blobs["checkpoint"]})
    [top] = pull(store, "hf://org/diff/*.safetensors", to=tmp_path / "m")
    assert top.ref == "hf://org/diff/top.safetensors"  # `*` did not reach into unet/, vae/
    for pattern in ("*/diffusion_pytorch_model.safetensors", "**/*.safetensors"):
        [refused] = pull(store, f"hf://org/diff/{pattern}", to=tmp_path / "m")
        assert str(refused.error) == (
            f"hf://org/diff/{pattern}: unet/diffusion_pytorch_model.safetensors and "
            "vae/diffusion_pytorch_model.safetensors would land under the same file name; pull "
            "them one at a time, each with its own `--to FOLDER`, or narrow the pattern")
    [unet] = pull(store, "hf://org/diff/unet/*.safetensors", to=tmp_path / "unet")
    assert unet.path == tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["top.safetensors"]
    assert len(fake.files.server.requests("/files/lfs/")) == 2  # top and unet: nothing else


def test_an_offline_pattern_says_it_needs_the_listing(tmp_path, fake, store, monkeypatch):
    HubClient().download("org/models", "loras/style.safetensors")  # in the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    [refused] = pull(store, "hf://org/models/loras/*.safetensors", to=tmp_path / "root")
    assert str(refused.error).startswith(
        "hf://org/models/loras/*.safetensors: a pattern needs the repository's file list, which "
        "needs the network")


def test_a_pattern_in_a_recipe_is_refused_before_any_download(tmp_path, fake, store):
    def fetch(ref):
        raise AssertionError(f"{ref} was pulled")

    with pytest.raises(LookupError, match="is a pattern, and a recipe input must name one file"):
        CatalogResolver(store, fetch)("hf://org/models/loras/*.safetensors")
    assert fake.hub.server.log == []
