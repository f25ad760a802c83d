"""Render candidates from the command line's references: labels that name distinct folders."""

from __future__ import annotations

import pytest

from mergekit_sd.render.candidates import collect_candidates, slug
from mergekit_sd.testing.checkpoints import write_checkpoint


def _labels(folder, names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            write_checkpoint(path, "sd1", seed=1)
    return [c.label for c in collect_candidates([str(folder / n) for n in names])]


@pytest.mark.parametrize(("names", "labels"), [
    (["sd1.safetensors", "sd1-2.safetensors", "x/sd1.safetensors"], ["sd1", "sd1-2", "sd1-3"]),
    (["my model.safetensors", "my_model.safetensors"], ["my model", "my_model-2"]),
    (["Mix.safetensors", "x/mix.safetensors"], ["Mix", "mix-2"]),
])
def test_candidate_labels_name_distinct_image_folders(tmp_path, names, labels):
    assert _labels(tmp_path, names) == labels
    assert len({slug(label).casefold() for label in labels}) == len(labels)


LONG = "a" * 119


@pytest.mark.parametrize("names", [
    [f"{LONG}-v1.safetensors", f"{LONG}-v2.safetensors"],  # alike in their first 120
    [f"{LONG}-v1.safetensors", f"x/{LONG}-v1.safetensors"],  # one name twice
    ["b" * 200 + ".safetensors", "x/" + "b" * 200 + ".safetensors",
     "y/" + "b" * 200 + ".safetensors"],
])
def test_long_names_give_distinct_labels_and_folders_at_once(tmp_path, names):
    import signal

    def stuck(*_):
        raise AssertionError("the labels were still being made unique after 10 s")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(10)
    try:
        labels = _labels(tmp_path, names)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(set(labels)) == len(labels)
    assert labels[0] == names[0].removesuffix(".safetensors")  # the name itself, uncut
    folders = [slug(label) for label in labels]
    assert len({f.casefold() for f in folders}) == len(labels)
    assert all(len(f) <= 120 for f in folders)
    assert folders[-1].endswith(labels[-1][-4:])  # the end that tells them apart is kept


@pytest.mark.parametrize("name", ["loop", "loop.yaml", "a" * 300, "a" * 300 + ".yaml"])
def test_a_candidate_path_that_cannot_be_opened_is_one_sentence(tmp_path, name):
    from mergekit_sd.errors import UserError

    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    with pytest.raises(UserError,
                       match=r"^candidate .*: (cannot be opened \(.*\)|does not exist)$"):
        collect_candidates([str(tmp_path / name)])
