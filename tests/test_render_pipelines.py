"""Render pipelines built from tiny single-file checkpoints in the real ldm / sgm layouts, on the
CPU: building, rendering, swapping candidate weights in place, keeping a preset's LoRA fused."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mergekit_sd.errors import UserError  # noqa: E402
from mergekit_sd.io.header import read_header  # noqa: E402
from mergekit_sd.render.generate import Job, Settings, render_batch  # noqa: E402
from mergekit_sd.render.grids import Prompt  # noqa: E402
from mergekit_sd.render.layout import checkpoint_layout  # noqa: E402
from mergekit_sd.render.outputs import png_bytes  # noqa: E402
from mergekit_sd.render.pipelines import build_pipeline  # noqa: E402
from mergekit_sd.testing.checkpoints import write_checkpoint  # noqa: E402
from mergekit_sd.testing.loras import write_lora  # noqa: E402

PROMPTS = (Prompt("cat", "a photo of a cat", None), Prompt("house", "a red house", "blurry"))
SETTINGS = Settings(64, 64, 2, 5.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two candidates per architecture (different seeds, same layout) and a UNet-only file."""
    folder = tmp_path_factory.mktemp("render-models")
    made = {}
    for variant in ("sd1", "sdxl"):
        for seed in (1, 2):
            made[f"{variant}-{seed}"] = write_checkpoint(folder / f"{variant}-{seed}.safetensors",
                                                         variant, seed=seed)
    made["sd1-unet"] = write_checkpoint(folder / "sd1-unet.safetensors", "sd1-unet", seed=3)
    made["lora"] = write_lora(folder / "lora.safetensors", "kohya-sd1", seed=4)
    made["sd1-pruned"] = _without(made["sd1-2"], "input_blocks.1.1.proj_in",
                                  folder / "sd1-pruned.safetensors")
    return made


def _without(path, part: str, out):
    """A copy of the checkpoint at `path` without the keys containing `part`."""
    from safetensors.torch import load_file, save_file

    save_file({k: t for k, t in load_file(path).items() if part not in k}, out)
    return out


def _layout(path):
    return checkpoint_layout(read_header(path))


def _build(path, **kwargs):
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and deterministic
    return build_pipeline(_layout(path), path=path, **kwargs)


def _render(rp, seeds=(7, 8)) -> list[bytes]:
    jobs = [Job(p, s) for p in PROMPTS for s in seeds]
    return [png_bytes(image) for image in render_batch(rp, jobs, SETTINGS, {})]


def _weights(rp) -> dict:
    return {(component, name): param.detach().clone()
            for component, module in rp.modules.items()
            for name, param in module.named_parameters()}


def _same_weights(left: dict, right: dict) -> list:
    """Keys whose tensors differ (or exist on one side only)."""
    return [k for k in left.keys() | right.keys()
            if k not in left or k not in right or not torch.equal(left[k], right[k])]


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_a_tiny_checkpoint_in_its_release_layout_renders_on_the_cpu(files, variant):
    rp = _build(files[f"{variant}-1"])
    assert rp.family == variant
    assert set(rp.modules) >= {"unet", "text_encoder", "vae"}
    images = render_batch(rp, [Job(PROMPTS[0], 7), Job(PROMPTS[1], 8)], SETTINGS, {})
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    again = render_batch(rp, [Job(PROMPTS[0], 7), Job(PROMPTS[1], 8)], SETTINGS, {})
    assert [png_bytes(i) for i in images] == [png_bytes(i) for i in again]


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_swapping_a_candidate_gives_exactly_a_fresh_pipelines_weights_and_images(files,
                                                                                  variant):
    swapped = _build(files[f"{variant}-1"])
    first_images = _render(swapped)
    copied = swapped.load(_layout(files[f"{variant}-2"]), path=files[f"{variant}-2"])
    fresh = _build(files[f"{variant}-2"])
    assert copied == len(_layout(files[f"{variant}-2"]).key_shapes) - _unused_keys(fresh)
    assert _same_weights(_weights(swapped), _weights(fresh)) == []
    assert _render(swapped) == _render(fresh)
    assert _render(swapped) != first_images  # the candidates really differ


def _unused_keys(rp) -> int:
    """Checkpoint keys no parameter takes (CLIP's position ids buffer, the noise schedule)."""
    return len(rp.base.key_shapes) - len(rp.table_for(rp.base).by_key)


def test_every_candidate_starts_from_the_same_noise_whatever_its_batch(files):
    rp = _build(files["sd1-1"])
    together = _render(rp, seeds=(7, 8))
    alone = [png_bytes(i) for i in render_batch(rp, [Job(PROMPTS[1], 8)], SETTINGS, {})]
    assert alone[0] == together[3]


def test_prompts_that_share_a_name_are_each_encoded_from_their_own_text(files):
    rp = _build(files["sd1-1"])
    cat, house = (Prompt("p02", p.text, p.negative) for p in PROMPTS)
    encoded: dict = {}
    render_batch(rp, [Job(cat, 7), Job(house, 8)], SETTINGS, encoded)
    embeds = [conditioning["prompt_embeds"] for conditioning in encoded.values()]
    assert len(embeds) == 2 and not torch.equal(*embeds)


def test_a_unet_only_file_swaps_the_unet_and_leaves_the_rest(files):
    rp = _build(files["sd1-1"])
    before = _weights(rp)
    rp.load(_layout(files["sd1-unet"]), path=files["sd1-unet"])
    after = _weights(rp)
    changed = {component for component, _ in _same_weights(before, after)}
    assert changed == {"unet"}
    assert all(not torch.equal(before[k], after[k]) for k in before if k[0] == "unet")


def test_a_preset_lora_stays_fused_across_swaps(files):
    swapped = _build(files["sd1-1"])
    swapped.fuse_lora(files["lora"], 1.0, "lora")
    swapped.load(_layout(files["sd1-2"]), path=files["sd1-2"])
    fresh = _build(files["sd1-2"])
    unfused = _weights(fresh)
    fresh.fuse_lora(files["lora"], 1.0, "lora")
    assert _same_weights(_weights(swapped), _weights(fresh)) == []
    assert _same_weights(unfused, _weights(fresh))  # the LoRA did change weights


def test_a_unet_only_swap_fuses_the_lora_again_into_the_unet_alone(files):
    swapped = _build(files["sd1-1"])
    swapped.fuse_lora(files["lora"], 1.0, "lora")
    swapped.load(_layout(files["sd1-unet"]), path=files["sd1-unet"])
    fresh = _build(files["sd1-1"])
    fresh.load(_layout(files["sd1-unet"]), path=files["sd1-unet"])
    fresh.fuse_lora(files["lora"], 1.0, "lora")
    # the text encoder's LoRA was fused once, not once per swap
    assert _same_weights(_weights(swapped), _weights(fresh)) == []


def test_candidates_of_another_architecture_are_refused(files):
    rp = _build(files["sd1-1"])
    with pytest.raises(UserError, match="SDXL but the pipeline is SD1.x"):
        rp.load(_layout(files["sdxl-1"]), path=files["sdxl-1"])


def test_a_candidate_lacking_weights_is_refused_not_blended_with_the_last_one(files):
    rp = _build(files["sd1-1"])
    with pytest.raises(UserError, match=r"sd1-pruned.safetensors: its unet lacks 2 weight\(s\) the "
                                        r"pipeline needs .*the file is incomplete"):
        rp.load(_layout(files["sd1-pruned"]), path=files["sd1-pruned"])


def test_a_pipeline_needs_a_full_checkpoint_first(files):
    with pytest.raises(UserError, match="put a full checkpoint"):
        _build(files["sd1-unet"])


def test_a_lora_is_not_a_candidate(files):
    with pytest.raises(UserError, match="not a checkpoint"):
        _layout(files["lora"])


def _mapped_from(path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `path` (Linux /proc)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                start, end = line.split()[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="Linux /proc")
def test_weights_in_the_render_dtype_share_the_files_pages_and_a_fused_lora_stays_private(
        tmp_path):
    """A candidate whose dtype is the pipeline's is not copied: its parameters use the file's
    mapped pages, at build and at every swap. Fusing a LoRA writes private copies of them (the
    file and a fresh pipeline from it keep the original weights), and once a LoRA is fused,
    swaps copy the weights it will be fused into again."""
    from safetensors.torch import load_file

    a = write_checkpoint(tmp_path / "a.safetensors", "sd1", seed=1, dtype="F32")
    b = write_checkpoint(tmp_path / "b.safetensors", "sd1", seed=2, dtype="F32")
    lora = write_lora(tmp_path / "lora.safetensors", "kohya-sd1", seed=4)
    before = a.read_bytes()
    rp = _build(a, dtype="fp32")
    weight = rp.modules["unet"].conv_in.weight

    def shared_with(path):
        return any(s <= weight.data_ptr() < e for s, e in _mapped_from(path))

    assert shared_with(a)
    rp.load(_layout(b), path=b)
    assert shared_with(b) and not shared_with(a)
    rp.load(_layout(a), path=a)
    plain_a = _weights(rp)
    rp.fuse_lora(lora, 1.0, "lora")
    assert a.read_bytes() == before
    assert _same_weights(plain_a, _weights(rp))  # the LoRA changed weights, privately
    rp.load(_layout(b), path=b)
    assert not shared_with(b)  # copied: the LoRA is fused into it again
    fresh = _build(b, dtype="fp32")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(_weights(fresh)[("unet", "conv_in.weight")], load_file(b)[key])
    fresh.fuse_lora(lora, 1.0, "lora")
    assert _same_weights(_weights(rp), _weights(fresh)) == []
    assert _same_weights(plain_a, _weights(_build(a, dtype="fp32"))) == []
