"""The output folder of render and compare: only files a render wrote are ever removed or
replaced, a folder holding files needs --overwrite, and nothing is created before the run
writes (no rendering here: the folder logic alone)."""

from __future__ import annotations

import json

import pytest

from mergekit_sd.errors import UserError
from mergekit_sd.render.folder import OutputFolder, check_usable
from mergekit_sd.render.manifest import Manifest, read_manifest

PLANNED = ["images/new/face-1.png", "contact-sheet.png", "manifest.json"]


def _tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else b"/"
            for p in sorted(folder.rglob("*"))}


def _previous_render(out, files=("images/old/face-1.png", "images/new/face-1.png",
                                 "ab/face-1.png", "contact-sheet.png", "ab-sheet.png",
                                 "index.html"), **extra):
    """A folder as an earlier render left it, with a manifest of ours listing `files`."""
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"old " + name.encode())
    manifest = {"tool": "mergekit-sd 0.1.0", "command": "compare", "outputs": [*files],
                "images": [], "sheets": {}, **extra}
    (out / "manifest.json").write_text(json.dumps(manifest))


def _manifest() -> Manifest:
    return Manifest("mergekit-sd 0.1.0", "render", {}, "cpu")


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(("name", "planned"), [
    ("manifest.json", PLANNED),
    ("index.html", [*PLANNED, "index.html"]),  # --html
    ("contact-sheet.png", PLANNED),
    ("images/new/face-1.png", PLANNED),
])
def test_a_file_a_render_did_not_write_is_never_replaced(tmp_path, name, planned, overwrite):
    out = tmp_path / "gallery"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_text('{"my": "own"}' if name == "manifest.json" else "<h1>mine</h1>")
    before = _tree(out)
    with pytest.raises(UserError) as caught:
        OutputFolder.check(out, planned, overwrite)
    assert str(caught.value) == (f"--out {out}: {name} was not written by mergekit-sd, and "
                                 "this run would replace it; move it away or give another "
                                 "--out")
    assert _tree(out) == before


def test_a_foreign_index_html_a_run_does_not_write_stays(tmp_path):
    out = tmp_path / "gallery"
    out.mkdir()
    (out / "index.html").write_text("<h1>mine</h1>")
    folder = OutputFolder.check(out, PLANNED, overwrite=True)  # no --html: not in its way
    folder.open(_manifest())
    assert (out / "index.html").read_text() == "<h1>mine</h1>"


def test_a_manifest_of_another_tool_is_not_ours(tmp_path):
    out = tmp_path / "o"
    _previous_render(out)
    data = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**data, "tool": "sd-webui 1.9"}))
    with pytest.raises(UserError, match="manifest.json was not written by mergekit-sd"):
        OutputFolder.check(out, PLANNED, overwrite=True)


def test_a_previous_render_needs_overwrite(tmp_path):
    out = tmp_path / "o"
    _previous_render(out)
    before = _tree(out)
    with pytest.raises(UserError) as caught:
        OutputFolder.check(out, PLANNED, overwrite=False)
    assert str(caught.value) == (f"--out {out}: holds a previous render; pass --overwrite to "
                                 "replace it (only the files its manifest.json lists), or give "
                                 "another --out")
    assert _tree(out) == before


def test_a_folder_holding_other_files_needs_overwrite_and_keeps_them(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"^--out .*: is not empty; give a new or empty folder, "
                                        r"or pass --overwrite to render into it"):
        OutputFolder.check(out, PLANNED, overwrite=False)
    OutputFolder.check(out, PLANNED, overwrite=True).open(_manifest())
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_removes_every_file_of_the_previous_render_and_nothing_else(tmp_path):
    out = tmp_path / "o"
    _previous_render(out)
    (out / "notes.txt").write_text("mine")
    (out / "images" / "old" / "keep.png").write_text("mine")  # not in its manifest
    folder = OutputFolder.check(out, PLANNED, overwrite=True)
    manifest = _manifest()
    folder.open(manifest)
    assert set(_tree(out)) == {"images", "images/old", "images/old/keep.png", "manifest.json",
                               "notes.txt"}
    written = read_manifest(out)
    assert written["complete"] is False and written["outputs"] == PLANNED

    for name in PLANNED[:-1]:
        folder.write(name, b"new")
    folder.write_manifest(manifest)
    assert read_manifest(out)["complete"] is True


def test_a_manifest_written_before_outputs_were_listed_still_names_its_files(tmp_path):
    out = tmp_path / "o"
    _previous_render(out, files=("images/old/face-1.png", "contact-sheet.png", "ab/f-1.png"),
                     outputs=None, images=[{"file": "images/old/face-1.png"}],
                     sheets={"contact": "contact-sheet.png", "ab": [{"file": "ab/f-1.png"}]})
    OutputFolder.check(out, PLANNED, overwrite=True).open(_manifest())
    assert set(_tree(out)) == {"manifest.json"}


@pytest.mark.parametrize("name", ["../outside.txt", "{out}/../outside.txt", "/{tmp}/outside.txt",
                                  "link/outside.txt"])
def test_a_manifest_never_makes_a_run_remove_a_file_outside_the_folder(tmp_path, name):
    out = tmp_path / "o"
    out.mkdir()
    (tmp_path / "outside.txt").write_text("precious")
    (out / "link").symlink_to(tmp_path)
    _previous_render(out, files=(), outputs=[name.format(out=out, tmp=tmp_path)])
    OutputFolder.check(out, PLANNED, overwrite=True).open(_manifest())
    assert (tmp_path / "outside.txt").read_text() == "precious"


@pytest.mark.parametrize("outputs", ["contact-sheet.png", {"a": 1}, 3, None])
def test_a_manifest_edited_into_nonsense_removes_nothing_it_does_not_list(tmp_path, outputs):
    out = tmp_path / "o"
    out.mkdir()
    for name in ("c", "o", "n", "notes.txt"):
        (out / name).write_text("mine")
    _previous_render(out, files=(), outputs=outputs, images="x", sheets=[1])
    OutputFolder.check(out, PLANNED, overwrite=True).open(_manifest())
    assert set(_tree(out)) == {"c", "o", "n", "notes.txt", "manifest.json"}


@pytest.mark.parametrize("out", ["new", "new/a/b"])
def test_checking_an_output_folder_creates_nothing(tmp_path, out):
    check_usable(tmp_path / out)
    OutputFolder.check(tmp_path / out, PLANNED, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_the_run_writes_a_folder_is_one_sentence(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "images").write_text("mine")
    with pytest.raises(UserError, match="images is a file where this run writes a folder"):
        OutputFolder.check(out, PLANNED, overwrite=True)
