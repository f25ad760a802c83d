"""`mergekit-sd search`, `pull`, `catalog identify`, `catalog updates` and `plan --pull` as a
user runs them: real subprocesses whose environment reaches only the fake Civitai and Hub on
127.0.0.1. Refusals are one line and exit code 2; the token shows up in no output."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO
from fakes.civitai import TOKEN, FakeCivitai, FakeFile
from fakes.env import cli_env
from fakes.files import FileHost
from fakes.hub import FakeHub
from fakes.loopback import LoopbackServer, json_reply
from terminal import run_on_terminal

from mergekit_sd.testing import write_checkpoint, write_lora


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("cli-src")
    return {"lora": write_lora(folder / "l.safetensors", "kohya-sd1", seed=30).read_bytes(),
            "lora2": write_lora(folder / "m.safetensors", "kohya-sd1", seed=31).read_bytes(),
            "lora3": write_lora(folder / "n.safetensors", "kohya-sd1", seed=34).read_bytes(),
            "sd15a": write_checkpoint(folder / "a.safetensors", "sd1", seed=32).read_bytes(),
            "sd15b": write_checkpoint(folder / "b.safetensors", "sd1", seed=33).read_bytes()}


@pytest.fixture
def fake(blobs):
    files = FileHost()
    civitai = FakeCivitai(files)
    hub = FakeHub(files)
    files.put("img/sfw.png", b"\x89PNG\r\n\x1a\n" + bytes(32), "image/png")
    civitai.add_model(45, "My Character", "LORA")
    civitai.add_version(45, 123, "v1.0", "Pony", [FakeFile("mychar.safetensors", blobs["lora"])],
                        trained_words=["mychar"],
                        images=[{"url": f"{files.url}/files/img/sfw.png", "nsfwLevel": 1}])
    civitai.add_model(46, "Photo Mix", "Checkpoint")
    civitai.add_version(46, 300, "v3", "SD 1.5", [FakeFile("photomix.safetensors",
                                                            blobs["sd15a"])])
    civitai.add_model(47, "Members Only", "LORA")
    civitai.add_version(47, 470, "v1", "SDXL 1.0", [FakeFile("members.safetensors",
                                                             blobs["lora2"])],
                        needs_account=True)
    hub.add_repo("org/models", {"sd15-tiny.safetensors": blobs["sd15b"]}, downloads=9)
    yield SimpleNamespace(files=files, civitai=civitai, hub=hub)
    for server in (civitai.server, hub.server, files.server):
        server.close()


def mergekit(tmp_path: Path, fake, *args, token: str | None = None,
             **env) -> subprocess.CompletedProcess:
    full_env = cli_env(tmp_path, fake.civitai.url, fake.hub.url, token, **env)
    full_env.update(PYTHONPATH=str(REPO), COLUMNS="200",
                    MERGEKIT_SD_CATALOG=str(tmp_path / "c.sqlite"))
    return subprocess.run([sys.executable, "-m", "mergekit_sd.cli", *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=120)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_search_civitai_and_hf(tmp_path, fake):
    table = mergekit(tmp_path, fake, "search", "civitai", "mix", "--type", "Checkpoint")
    assert table.returncode == 0, table.stderr
    assert "Photo Mix" in table.stdout and "civitai://300" in table.stdout
    assert "My Character" not in table.stdout
    as_json = json.loads(mergekit(tmp_path, fake, "search", "civitai", "--base", "Pony",
                                  "--json").stdout)
    assert [m["id"] for m in as_json["items"]] == [45]
    assert "--type 'lora'" in one_error_line(
        mergekit(tmp_path, fake, "search", "civitai", "x", "--type", "lora"))

    found = mergekit(tmp_path, fake, "search", "hf", "org")
    assert found.returncode == 0 and "org/models" in found.stdout
    listed = mergekit(tmp_path, fake, "search", "hf", "org/models", "--files")
    assert "hf://org/models/sd15-tiny.safetensors" in listed.stdout
    assert "needs the network" in one_error_line(
        mergekit(tmp_path, fake, "search", "hf", "org", "--offline"))


def test_pull_then_show_and_pull_again_offline(tmp_path, fake, blobs):
    root = tmp_path / "models"
    pulled = mergekit(tmp_path, fake, "pull", "civitai://123", "--to", root, token=TOKEN)
    assert pulled.returncode == 0, pulled.stderr
    target = root / "mychar.safetensors"
    assert f"pulled civitai://123 -> {target} (#1, " in pulled.stdout
    assert "SHA256 verified" in pulled.stdout
    assert TOKEN not in pulled.stdout + pulled.stderr
    assert all("authorization" not in s.headers for s in fake.files.server.log)
    assert all(s.headers["authorization"] == f"Bearer {TOKEN}" for s in fake.civitai.server.log)

    shown = json.loads(mergekit(tmp_path, fake, "catalog", "show", "mychar", "--json").stdout)
    assert (shown["base_model"], shown["trigger_words"], shown["source"]) == (
        "Pony", ["mychar"], "civitai")
    assert shown["source_ids"]["civitai"]["version_id"] == 123
    assert shown["preview"] == str(root / "mychar.preview.png")

    before = len(fake.civitai.server.log)
    again = mergekit(tmp_path, fake, "pull", "civitai://123", "--offline")
    assert again.returncode == 0 and f"already have civitai://123: #1 {target}" in again.stdout
    assert len(fake.civitai.server.log) == before
    assert "--offline forbids downloading it" in one_error_line(
        mergekit(tmp_path, fake, "pull", "civitai://300", "--offline"))


def test_refusals_are_one_line_and_leave_no_model(tmp_path, fake):
    root = tmp_path / "models"
    line = one_error_line(mergekit(tmp_path, fake, "pull", "civitai://470", "--to", root))
    assert "Civitai wants an account for model version 470 (401)" in line
    line = one_error_line(mergekit(tmp_path, fake, "pull", "civitai://470", "--to", root,
                                   token="not-the-token"))
    assert "Civitai refused the API token" in line and "not-the-token" not in line
    assert "civitai://VERSION_ID" in one_error_line(
        mergekit(tmp_path, fake, "pull", "civitai://abc"))
    assert not root.exists() or [p.name for p in root.iterdir()] == []

    both = mergekit(tmp_path, fake, "pull", "civitai://999", "civitai://123", "--to", root)
    assert both.returncode == 2 and "Civitai does not know model version 999 (404)" in both.stderr
    assert "pulled civitai://123" in both.stdout


def json_outcomes(result: subprocess.CompletedProcess, code: int) -> list[dict]:
    """stdout of a `pull --json` that failed: one JSON document, whatever went wrong."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def test_a_pull_with_json_says_what_failed_on_stdout(tmp_path, fake):
    root = tmp_path / "models"
    # refused before any reference is tried: every reference carries the one sentence
    url = f"{fake.files.url}/files/direct/x.safetensors"
    refused = mergekit(tmp_path, fake, "pull", url, "civitai://123", "--sha256", "abc", "--to",
                       root, "--json")
    sentence = "--sha256 'abc': give all 64 hex digits of the file's SHA256"
    assert json_outcomes(refused, 2) == [
        {"ref": url, "error": sentence, "kind": "refused"},
        {"ref": "civitai://123", "error": sentence, "kind": "refused"}]
    assert refused.stderr.strip().splitlines() == [f"error: {sentence}"]
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[civitai\n")
    [outcome] = json_outcomes(mergekit(tmp_path, fake, "pull", "civitai://123", "--json",
                                       MERGEKIT_SD_CONFIG=str(bad_config)), 2)
    assert outcome["kind"] == "refused" and "bad.toml: not valid TOML" in outcome["error"]
    [outcome] = json_outcomes(mergekit(tmp_path, fake, "pull", "civitai://123", "--json",
                                       "--catalog", tmp_path), 2)
    assert "cannot open the catalog" in outcome["error"]
    assert not root.exists()

    # per reference: a bad one and one Civitai does not know beside one pulled (exit code 2),
    # then a service that keeps failing (exit code 1); stderr says the same in lines
    mixed = mergekit(tmp_path, fake, "pull", "civitai://abc", "civitai://999", "civitai://123",
                     "--to", root, "--json")
    bad, unknown, pulled = json_outcomes(mixed, 2)
    assert (bad["ref"], bad["kind"]) == ("civitai://abc", "refused")
    assert "civitai://VERSION_ID" in bad["error"]
    assert unknown == {"ref": "civitai://999", "kind": "refused", "error": "Civitai does not "
                       "know model version 999 (404); check the id or hash"}
    assert pulled["status"] == "downloaded"
    assert mixed.stderr.strip().splitlines() == [f"error: {bad['error']}",
                                                 f"error: {unknown['error']}"]
    fake.civitai.fail("/api/v1/model-versions/300", 503, 503, 503, 503)
    busy = mergekit(tmp_path, fake, "pull", "civitai://300", "--to", root, "--json")
    [outcome] = json_outcomes(busy, 1)
    assert outcome["kind"] == "failed" and outcome["ref"] == "civitai://300"
    assert busy.stderr.strip().splitlines() == [f"failed: {outcome['error']}"]


def test_busy_civitai_is_retried(tmp_path, fake):
    fake.civitai.fail("/api/v1/model-versions/300", 429, 503)
    result = mergekit(tmp_path, fake, "pull", "civitai://300", "--to", tmp_path / "m")
    assert result.returncode == 0, result.stderr
    statuses = [s.status for s in fake.civitai.server.requests("/api/v1/model-versions/300")]
    assert statuses == [429, 503, 200]


def test_pull_from_the_hub_and_a_plain_url(tmp_path, fake, blobs):
    root = tmp_path / "models"
    hub = mergekit(tmp_path, fake, "pull", "hf://org/models/sd15-tiny.safetensors", "--to",
                   root)
    assert hub.returncode == 0, hub.stderr
    assert f"-> {root / 'sd15-tiny.safetensors'}" in hub.stdout
    fake.files.put("direct/extra.safetensors", blobs["lora2"])
    url = f"{fake.files.url}/files/direct/extra.safetensors"
    sha = hashlib.sha256(blobs["lora2"]).hexdigest()
    plain = mergekit(tmp_path, fake, "pull", url, "--sha256", sha, "--to", root, "--json")
    [outcome] = json.loads(plain.stdout)
    assert (outcome["status"], outcome["verified"], outcome["sha256"]) == (
        "downloaded", True, sha)


def test_a_small_hub_file_outside_lfs_is_said_verified_by_its_git_blob_id(tmp_path, fake):
    fake.hub.add_repo("org/docs", {"README.md": b"# tiny\n"})
    listed = mergekit(tmp_path, fake, "search", "hf", "org/docs", "--files")
    assert "(not LFS)" in listed.stdout, listed.stdout
    pulled = mergekit(tmp_path, fake, "pull", "hf://org/docs/README.md", "--to", tmp_path / "m")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.splitlines()[0] == (
        f"pulled hf://org/docs/README.md -> {tmp_path / 'm' / 'README.md'} (not catalogued, "
        "7 B, git blob id verified)")
    [outcome] = json.loads(mergekit(tmp_path, fake, "pull", "hf://org/docs/README.md", "--to",
                                    tmp_path / "m", "--json").stdout)
    assert (outcome["verified"], outcome["verified_by"]) == (True, "git blob id")


def test_a_token_in_a_url_is_never_printed(tmp_path, fake, blobs):
    fake.files.put("direct/extra.safetensors", blobs["lora2"])
    secret = "SUPERSECRET123"
    host = fake.files.url.removeprefix("http://")
    tokened = [f"{fake.files.url}/files/direct/extra.safetensors?token={secret}",
               f"http://user:{secret}@{host}/files/direct/extra.safetensors",
               f"{fake.files.url}/files/direct/absent.safetensors?token={secret}"]
    root = tmp_path / "models"
    for url in tokened:
        for extra in ([], ["--json"]):
            result = mergekit(tmp_path, fake, "pull", url, "--to", root, *extra)
            assert result.returncode in (0, 2), result.stderr
            assert secret not in result.stdout + result.stderr
            assert "/files/direct/" in result.stdout + result.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not [p for p in written if secret.encode() in p.read_bytes()]


def test_invalid_repository_ids_are_one_sentence_before_any_request(tmp_path, fake):
    root = tmp_path / "models"
    for args in (["pull", "hf://org/../x.safetensors", "--to", root],
                 ["pull", "hf://-bad/repo/x.safetensors", "--to", root],
                 ["pull", "hf://org/repo..x/x.safetensors", "--to", root],
                 ["search", "hf", "org/..", "--files"]):
        assert "not a valid repository id" in one_error_line(mergekit(tmp_path, fake, *args))
    recipe = tmp_path / "mix.yaml"
    recipe.write_text("version: 1\nmodels: {a: 'hf://org/repo--x/m.safetensors', "
                      "b: 'hf://org/repo--x/m.safetensors'}\n"
                      "steps: [{name: mix, method: weighted_sum, inputs: [a, b]}]\n"
                      "output: {path: out.safetensors}\n")
    line = one_error_line(mergekit(tmp_path, fake, "plan", recipe, "--pull"))
    assert "models.a" in line and "not a valid repository id" in line
    assert fake.hub.server.log == []


# what an API answers when its JSON is not the shape documented: the pull says "unexpected"
ODD_ANSWERS = {
    "/api/v1/model-versions/900": [1, 2, 3],
    "/api/v1/model-versions/901": {"id": 901, "model": "str", "files": [
        {"name": "x.safetensors", "metadata": [1], "type": "Model", "primary": True,
         "hashes": {"SHA256": "a" * 64}, "sizeKB": 1}]},
    "/api/v1/models/903": {"id": 903, "modelVersions": [{"name": "no id"}]},
    "/api/v1/models/904": {"id": 904, "modelVersions": [{"id": "abc"}]},
    "/api/v1/models/905": "just a string",
    "/api/v1/models/906": {"id": 906, "modelVersions": "bad"},
}


def test_odd_json_from_civitai_is_a_failure_in_one_sentence(tmp_path, fake):
    def answer(seen):
        return json_reply(ODD_ANSWERS.get(seen.path.rstrip("/"), {"error": "Not found"}))

    odd = LoopbackServer(answer)
    try:
        for ref in ("civitai://900", "civitai://model/903", "civitai://model/904",
                    "civitai://model/905", "civitai://model/906"):
            result = mergekit(tmp_path, SimpleNamespace(civitai=odd, hub=fake.hub), "pull", ref,
                              "--to", tmp_path / "models")
            assert result.returncode == 1, result.stderr
            assert result.stderr.strip().splitlines() == [
                f"failed: Civitai answered {'model' if '/model/' in ref else 'model version'} "
                f"{ref.rsplit('/', 1)[1]} with something unexpected; try again later"]
        # odd inner fields are treated as absent: the download is tried (and refused here)
        result = mergekit(tmp_path, SimpleNamespace(civitai=odd, hub=fake.hub), "pull",
                          "civitai://901", "--to", tmp_path / "models")
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    finally:
        odd.close()


def test_a_sha256_that_is_not_64_hex_digits_is_refused_before_downloading(tmp_path, fake, blobs):
    fake.files.put("direct/extra.safetensors", blobs["lora2"])
    url = f"{fake.files.url}/files/direct/extra.safetensors"
    prefix = hashlib.sha256(blobs["lora2"]).hexdigest()[:12]
    line = one_error_line(mergekit(tmp_path, fake, "pull", url, "--sha256", prefix, "--to",
                                   tmp_path / "models"))
    assert f"--sha256 '{prefix}': give all 64 hex digits" in line
    assert fake.files.sent("direct/extra.safetensors") == 0


def test_ctrl_c_says_interrupted_and_exits_130(tmp_path, fake, blobs):
    fake.files.put("direct/slow.safetensors", blobs["sd15a"])
    fake.files.slow["direct/slow.safetensors"] = 1.0  # a chunk a second: caught mid-download
    env = cli_env(tmp_path, fake.civitai.url, fake.hub.url, None)
    env.update(PYTHONPATH=str(REPO), MERGEKIT_SD_CATALOG=str(tmp_path / "c.sqlite"))
    # SIGINT as a terminal leaves it: a background job of a shell may have it ignored
    pulling = subprocess.Popen(
        [sys.executable, "-m", "mergekit_sd.cli", "pull",
         f"{fake.files.url}/files/direct/slow.safetensors", "--to", str(tmp_path / "m")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = tmp_path / "m" / "slow.safetensors.partial"
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size):  # caught with bytes to keep
            assert time.monotonic() < deadline and pulling.poll() is None
            time.sleep(0.05)
        pulling.send_signal(signal.SIGINT)
        _, err = pulling.communicate(timeout=60)
    finally:
        pulling.kill()
    assert pulling.returncode == 130
    assert err.strip().splitlines()[-1:] == [
        "interrupted: what was downloaded so far is kept (as FILE.partial beside the file, or in "
        "the Hugging Face cache); run the same pull again to resume"]
    # as it says: the partial file is there, and the same pull resumes it
    kept = partial.stat().st_size
    assert 0 < kept < len(blobs["sd15a"])
    del fake.files.slow["direct/slow.safetensors"]
    again = mergekit(tmp_path, fake, "pull", f"{fake.files.url}/files/direct/slow.safetensors",
                     "--to", tmp_path / "m")
    assert again.returncode == 0, again.stderr
    assert "resumed, fetched" in again.stdout and not partial.exists()
    assert (tmp_path / "m" / "slow.safetensors").read_bytes() == blobs["sd15a"]


@pytest.mark.parametrize(("flags", "next_run", "identified"), [
    ((), "look up the rest", "1 file(s) identified, 0 unknown to Civitai, 1 identified before"),
    (("--refresh",), "finish (--refresh looks up every file again)",
     "2 file(s) identified, 0 unknown to Civitai, 0 identified before"),
])
def test_ctrl_c_on_identify_says_what_is_kept_and_the_same_identify_goes_on(
        tmp_path, fake, blobs, flags, next_run, identified):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(blobs["lora"])  # My Character, a quick preview
    (folder / "b.safetensors").write_bytes(blobs["lora3"])
    fake.files.put("img/slow.png", b"\x89PNG\r\n\x1a\n" + bytes(64 * 1024 * 60), "image/png")
    fake.files.slow["img/slow.png"] = 1.0  # a chunk a second: caught fetching b's preview
    fake.civitai.add_model(48, "Slow Style", "LORA")
    fake.civitai.add_version(48, 481, "v1", "SD 1.5", [FakeFile("b.safetensors", blobs["lora3"])],
                             images=[{"url": f"{fake.files.url}/files/img/slow.png",
                                      "nsfwLevel": 1}])
    assert mergekit(tmp_path, fake, "catalog", "add-root", folder, "--scan").returncode == 0
    assert mergekit(tmp_path, fake, "catalog", "scan", "--hash").returncode == 0
    env = cli_env(tmp_path, fake.civitai.url, fake.hub.url, None)
    env.update(PYTHONPATH=str(REPO), MERGEKIT_SD_CATALOG=str(tmp_path / "c.sqlite"))
    # SIGINT as a terminal leaves it: a background job of a shell may have it ignored
    identifying = subprocess.Popen(
        [sys.executable, "-m", "mergekit_sd.cli", "catalog", "identify", *flags], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    written = [folder / name for name in ("a.civitai.info", "a.preview.png", "b.civitai.info")]
    try:
        deadline = time.monotonic() + 60
        while not all(path.exists() for path in written):  # a done, b's preview on its way
            assert time.monotonic() < deadline and identifying.poll() is None
            time.sleep(0.05)
        identifying.send_signal(signal.SIGINT)
        _, err = identifying.communicate(timeout=60)
    finally:
        identifying.kill()
    assert identifying.returncode == 130
    assert err.strip().splitlines()[-1:] == [
        "interrupted: the files identified so far keep their .civitai.info, preview and catalog "
        f"details; run the same identify again to {next_run}"]
    # as it says: a keeps what was found, and the same identify looks b up (a only again
    # with --refresh)
    listed = json.loads(mergekit(tmp_path, fake, "catalog", "list", "--json").stdout)
    assert {e["name"]: e["base_model"] for e in listed}["a"] == "Pony"
    assert not (folder / "b.preview.png").exists()
    del fake.files.slow["img/slow.png"]
    again = mergekit(tmp_path, fake, "catalog", "identify", *flags)
    assert again.returncode == 0, again.stderr
    assert identified in again.stdout
    assert "b.safetensors: Slow Style / v1 [SD 1.5], preview saved" in again.stdout


def test_identify_and_updates(tmp_path, fake, blobs):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "found.safetensors").write_bytes(blobs["lora"])
    (folder / "unknown.safetensors").write_bytes(blobs["lora3"])
    assert mergekit(tmp_path, fake, "catalog", "add-root", folder, "--scan").returncode == 0
    assert mergekit(tmp_path, fake, "catalog", "scan", "--hash").returncode == 0
    found = mergekit(tmp_path, fake, "catalog", "identify")
    assert found.returncode == 0, found.stderr
    assert ("looked up 2 hash(es) in 3 request(s): 1 file(s) identified, 1 unknown to "
            "Civitai") in found.stdout
    assert "found.safetensors: My Character / v1.0 [Pony], preview saved" in found.stdout
    assert (folder / "found.civitai.info").exists() and (folder / "found.preview.png").exists()

    fake.civitai.add_version(45, 124, "v2.0", "Illustrious",
                             [FakeFile("mychar2.safetensors", blobs["lora2"])])
    updates = mergekit(tmp_path, fake, "catalog", "updates")
    assert updates.returncode == 0, updates.stderr
    assert "checked 1 model(s): 1 with a newer version" in updates.stdout
    assert ("My Character (model 45): you have v1.0; newer: v2.0 (Illustrious); pull "
            "civitai://124") in updates.stdout


def test_recipe_download_references_resolve_or_are_pulled(tmp_path, fake):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(textwrap.dedent("""\
        version: 1
        models:
          photo: civitai://300
          tiny: hf://org/models/sd15-tiny.safetensors
        steps:
          - name: mix
            method: weighted_sum
            inputs: [photo, tiny]
            params: {alpha: 0.5}
        output:
          path: out/mix.safetensors
        """))
    line = one_error_line(mergekit(tmp_path, fake, "plan", recipe))
    assert "mix.yaml" in line and "models.photo" in line
    # render and compare resolve references too, so the advice names no one command
    assert line.endswith("run `mergekit-sd pull civitai://300`, or pass --pull")
    assert "choose one" in one_error_line(
        mergekit(tmp_path, fake, "plan", recipe, "--pull", "--offline"))
    # --offline refuses --pull, so its advice is what works offline
    assert one_error_line(mergekit(tmp_path, fake, "plan", recipe, "--offline")).endswith(
        "'civitai://300' has no copy in the catalog yet, and --offline downloads nothing; "
        "pull it once online (`mergekit-sd pull civitai://300`)")
    downloads = tmp_path / "downloads"
    planned = mergekit(tmp_path, fake, "plan", recipe, "--pull", "--json",
                       MERGEKIT_SD_DOWNLOADS=str(downloads))
    assert planned.returncode == 0, planned.stderr
    doc = json.loads(planned.stdout)
    assert {Path(i["path"]).name for i in doc["inputs"]} == {"photomix.safetensors",
                                                              "sd15-tiny.safetensors"}
    assert "pulled civitai://300" in planned.stderr
    offline = mergekit(tmp_path, fake, "plan", recipe, "--offline")
    assert offline.returncode == 0, offline.stderr
    assert os.path.exists(downloads / "photomix.civitai.info")


def test_url_schemes_ignore_case_and_bad_addresses_are_one_sentence(tmp_path, fake, blobs):
    fake.files.put("direct/extra.safetensors", blobs["lora2"])
    secret = "SUPERSECRET123"
    host = fake.files.url.removeprefix("http://")
    root = tmp_path / "models"
    for url in (f"HTTP://{host}/files/direct/extra.safetensors?token={secret}",
                f"Http://user:{secret}@{host}/files/direct/extra.safetensors"):
        result = mergekit(tmp_path, fake, "pull", url, "--to", root)
        assert result.returncode == 0, result.stderr
        # the second is the same file: "already have"; both shown bare, scheme in lower case
        assert f"{fake.files.url}/files/direct/extra.safetensors" in result.stdout
        assert secret not in result.stdout + result.stderr
    before = len(fake.files.server.log)
    for url in ("http://", f"http://127.0.0.1:abc/x.safetensors?token={secret}",
                f"https://[::1/x.safetensors?token={secret}",
                f"ftp://user:{secret}@{host}/x.safetensors"):
        line = one_error_line(mergekit(tmp_path, fake, "pull", url, "--to", root))
        assert "not a valid URL" in line or "not a download reference" in line
        assert secret not in line
    assert len(fake.files.server.log) == before  # refused before any request


def test_civitai_ids_past_sqlite_integers_are_refused_in_pulls_and_recipes(tmp_path, fake):
    huge = "civitai://99999999999999999999999"
    for ref in (huge, "civitai://model/99999999999999999999999", "civitai://\u00b2"):
        assert "write civitai://VERSION_ID" in one_error_line(
            mergekit(tmp_path, fake, "pull", ref, "--to", tmp_path / "m"))
    recipe = tmp_path / "big.yaml"
    recipe.write_text(f"version: 1\nmodels: {{a: '{huge}', b: '{huge}'}}\n"
                      "steps: [{name: mix, method: weighted_sum, inputs: [a, b]}]\n"
                      "output: {path: out.safetensors}\n")
    line = one_error_line(mergekit(tmp_path, fake, "plan", recipe))
    assert "models.a" in line and "write civitai://VERSION_ID" in line
    assert fake.civitai.server.log == []


def _run_with_terminal_stderr(tmp_path, fake, *args) -> tuple[int, str, str]:
    """The CLI with stdout a pipe and stderr a terminal, as in `mergekit-sd pull > out.txt`."""
    env = cli_env(tmp_path, fake.civitai.url, fake.hub.url, None)
    env.update(PYTHONPATH=str(REPO), COLUMNS="120", TERM="xterm",
               MERGEKIT_SD_CATALOG=str(tmp_path / "c.sqlite"))
    return run_on_terminal(args, env, stream="stderr", timeout=60)


def test_progress_bars_never_reach_a_redirected_stdout(tmp_path, fake):
    piped = mergekit(tmp_path, fake, "pull", "civitai://123", "--to", tmp_path / "m")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("pulled civitai://123 -> ")
    assert "\u2501" not in piped.stdout + piped.stderr  # no bar in a pipe, nor in a log
    code, out, terminal = _run_with_terminal_stderr(tmp_path, fake, "pull", "civitai://300",
                                                    "--to", tmp_path / "m")
    assert code == 0, terminal
    assert out.startswith("pulled civitai://300 -> ") and "\u2501" not in out
    assert "photomix.safetensors" in terminal and "\u2501" in terminal  # the bar, on stderr


def _run_with_terminal_stdout(tmp_path, fake, columns: int, *args) -> str:
    """What the CLI prints to a terminal `columns` wide."""
    env = cli_env(tmp_path, fake.civitai.url, fake.hub.url, None)
    env.update(PYTHONPATH=str(REPO), COLUMNS=str(columns), TERM="xterm",
               MERGEKIT_SD_CATALOG=str(tmp_path / "c.sqlite"))
    code, _, shown = run_on_terminal(args, env, timeout=60)
    assert code == 0, shown
    return shown


def test_refs_stay_whole_in_a_pipe_and_in_a_narrow_terminal(tmp_path, fake, blobs):
    deep = "a-folder-of-a-long-named-series/" * 2 + "sd15-tiny-with-a-long-name.safetensors"
    fake.hub.add_repo("org/long-names", {deep: blobs["sd15b"]})
    # a pipe, no COLUMNS, no terminal on any stream: no width to wrap at
    env = cli_env(tmp_path, fake.civitai.url, fake.hub.url, None)
    env.update(PYTHONPATH=str(REPO), MERGEKIT_SD_CATALOG=str(tmp_path / "c.sqlite"))
    env.pop("COLUMNS", None)
    piped = subprocess.run([sys.executable, "-m", "mergekit_sd.cli", "search", "hf",
                            "org/long-names", "--files"], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.splitlines()[1].split() == [
        deep, "2.02", "MB", hashlib.sha256(blobs["sd15b"]).hexdigest()[:12],
        f"hf://org/long-names/{deep}"]
    # 60 columns: the other columns give way to the ref
    narrow = _run_with_terminal_stdout(tmp_path, fake, 60, "search", "hf", "org/models",
                                       "--files")
    assert "hf://org/models/sd15-tiny.safetensors" in narrow, narrow
    assert max(len(line) for line in narrow.splitlines()) <= 60, narrow


def search_answered(tmp_path, fake, answer: dict):
    """`search civitai x` against a Civitai that answers `answer` to everything."""
    odd = LoopbackServer(lambda seen: json_reply(answer))
    try:
        return mergekit(tmp_path, SimpleNamespace(civitai=odd, hub=fake.hub), "search",
                        "civitai", "x")
    finally:
        odd.close()


@pytest.mark.parametrize("answer", [{"items": [1, 2]}, {"items": "abc"}])
def test_a_search_answer_whose_items_are_not_models_is_one_sentence(tmp_path, fake, answer):
    result = search_answered(tmp_path, fake, answer)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "failed: Civitai answered the model search with something unexpected; try again later"]


def test_search_shows_models_whose_inner_fields_are_odd(tmp_path, fake):
    result = search_answered(tmp_path, fake, {"items": [
        {"id": 7, "name": "Odd", "stats": "x", "modelVersions": "y"}]})
    assert result.returncode == 0, result.stderr
    assert "Odd" in result.stdout


def test_a_hub_endpoint_that_answers_web_pages_is_one_sentence(tmp_path, fake):
    from fakes.loopback import Reply

    portal = LoopbackServer(lambda seen: Reply(200, {"Content-Type": "text/html"},
                                               b"<!DOCTYPE html><html>Sign in to Wi-Fi</html>"))
    try:
        for args in (["search", "hf", "tiny"], ["search", "hf", "org/models", "--files"],
                     ["pull", "hf://org/models/sd15-tiny.safetensors", "--to", tmp_path / "m"],
                     ["pull", "hf://org/models/*.safetensors", "--to", tmp_path / "m"]):
            result = mergekit(tmp_path, SimpleNamespace(civitai=fake.civitai, hub=portal), *args)
            assert result.returncode == 1, (args, result.stderr)
            [line] = result.stderr.strip().splitlines()
            assert line.startswith("failed: ") and "check HF_ENDPOINT" in line, line
    finally:
        portal.close()
