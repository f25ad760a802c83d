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


@pytest.mark.parametrize("name", ["loop", "loop.yaml", "a" * 300, "a" * 300 + ".yaml"])
def test_a_candidate_path_that_cannot_be_opened_is_one_sentence(tmp_path, name):
    from mergekit_sd.errors import UserError

    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    with pytest.raises(UserError, match=r"^candidate .*: (cannot be opened \(.*\)|no such file)$"):
        collect_candidates([str(tmp_path / name)])
