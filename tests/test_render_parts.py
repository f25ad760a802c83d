"""Text encoders and VAEs given as separate files (--text-encoder, --vae): tiny transformers
models saved in the key formats they are published in, completing candidates that lack them
(a UNet alone, an SD3.5 release, BFL's FLUX.1 transformer) the way an all-in-one file would."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file, save_file, save_model  # noqa: E402

from mergekit_sd.errors import UserError  # noqa: E402
from mergekit_sd.io.header import read_header  # noqa: E402
from mergekit_sd.render.candidates import collect_candidates  # noqa: E402
from mergekit_sd.render.components import build_modules  # noqa: E402
from mergekit_sd.render.grids import parse_grid  # noqa: E402
from mergekit_sd.render.layout import checkpoint_layout  # noqa: E402
from mergekit_sd.render.manifest import read_manifest  # noqa: E402
from mergekit_sd.render.parts import parts_for, read_parts, with_parts  # noqa: E402
from mergekit_sd.render.presets import get_preset  # noqa: E402
from mergekit_sd.render.runner import RenderOptions, render_candidates  # noqa: E402
from mergekit_sd.render.weights import WeightTable  # noqa: E402
from mergekit_sd.testing.checkpoints import write_checkpoint  # noqa: E402

GRID = "prompts: [{name: cat, text: a photo of a cat}]\nseeds: [5, 6]\nsize: 64\nsteps: 2\n"


def _clip(path, layers: int, width: int, projection: bool, seed: int, published: bool = True):
    """A tiny CLIP text model from transformers, saved with `text_model.*` names as ComfyUI's
    clip_l.safetensors / clip_g.safetensors are (`published`), or as transformers 5 saves a
    CLIPTextModel, without them. The depth (12 for CLIP-L, 32 for CLIP-G) is what names the
    encoder at these widths."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=772, hidden_size=width, intermediate_size=3 * width,
                            num_hidden_layers=layers, num_attention_heads=1,
                            max_position_embeddings=16, projection_dim=width)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    state = model.state_dict()
    if published:
        state = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
                 for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def _t5(path):
    """A tiny T5 encoder as t5xxl_fp16.safetensors holds it (`encoder.block.N...`,
    `shared.weight`); 24 blocks name it T5-XXL."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=24,
                                    num_heads=2))
    save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parts")
    unet = write_checkpoint(folder / "unet.safetensors", "sd1-unet", seed=1)
    vae = write_checkpoint(folder / "vae.safetensors", "vae-sd", seed=2)  # ldm keys, no prefix
    other_vae = write_checkpoint(folder / "vae-b.safetensors", "vae-sd", seed=3)
    clip_l = _clip(folder / "clip_l.safetensors", 12, 16, False, seed=4)
    # the all-in-one SD1 file holding the same weights, in the ldm layout
    whole = {**{f"model.diffusion_model.{k}": v for k, v in load_file(unet).items()},
             **{f"cond_stage_model.transformer.{k}": v for k, v in load_file(clip_l).items()},
             **{f"first_stage_model.{k}": v for k, v in load_file(vae).items()}}
    save_file(whole, folder / "whole.safetensors")
    return {"unet": unet, "vae": vae, "vae-b": other_vae, "clip_l": clip_l,
            "whole": folder / "whole.safetensors",
            "clip_g": _clip(folder / "clip_g.safetensors", 32, 20, True, seed=5),
            "clip_l_v5": _clip(folder / "clip_l_v5.safetensors", 12, 16, False, seed=4,
                               published=False),
            "t5xxl": _t5(folder / "t5xxl.safetensors")}


def _render(candidates, out, **options):
    torch.set_num_threads(1)
    run = RenderOptions(parse_grid(GRID, "grid.yaml"), get_preset("standard"), out, **options)
    return render_candidates(collect_candidates([str(c) for c in candidates]), run)


def _pixels(result, label) -> list[bytes]:
    from PIL import Image

    images = []
    for seed in (5, 6):
        with Image.open(result.image_file(label, "cat", seed)) as image:
            images.append(image.tobytes())
    return images


def test_a_unet_with_separate_text_encoder_and_vae_files_renders_as_the_all_in_one_file(
        files, tmp_path):
    parts = _render([files["unet"]], tmp_path / "parts", text_encoders=[str(files["clip_l"])],
                    vae=str(files["vae"]))
    whole = _render([files["whole"]], tmp_path / "whole")
    assert _pixels(parts, "unet") == _pixels(whole, "whole")
    manifest = read_manifest(tmp_path / "parts")
    assert manifest["candidates"][0]["components"] == {
        "text_encoder": "clip_l.safetensors", "unet": "unet", "vae": "vae.safetensors"}
    supplied = manifest["pipelines"][0]["parts"]
    assert supplied["text_encoder"]["path"] == str(files["clip_l"].resolve())
    assert supplied["text_encoder"]["model"] == "CLIP-L"
    assert supplied["vae"]["option"] == "--vae"
    from mergekit_sd.io.hashing import file_sha256

    assert supplied["vae"]["sha256"] == file_sha256(files["vae"])


def test_component_files_serve_every_candidate_lacking_them_not_those_that_have_their_own(
        files, tmp_path):
    # the full checkpoint renders with its own VAE; the UNet after it with the --vae file,
    # never with the full checkpoint's it held just before
    mixed = _render([files["whole"], files["unet"]], tmp_path / "mixed",
                    text_encoders=[str(files["clip_l"])], vae=str(files["vae-b"]))
    alone = _render([files["unet"]], tmp_path / "alone", text_encoders=[str(files["clip_l"])],
                    vae=str(files["vae-b"]))
    whole = _render([files["whole"]], tmp_path / "whole")
    assert _pixels(mixed, "whole") == _pixels(whole, "whole")
    assert _pixels(mixed, "unet") == _pixels(alone, "unet")
    assert _pixels(mixed, "unet") != _pixels(mixed, "whole")  # the other VAE shows
    entries = read_manifest(tmp_path / "mixed")["candidates"]
    assert entries[0]["components"]["vae"] == "whole"
    assert entries[1]["components"]["vae"] == "vae-b.safetensors"


def test_published_encoder_files_are_told_apart_and_fill_each_familys_own_component(files):
    parts = read_parts([str(files["t5xxl"]), str(files["clip_g"]), str(files["clip_l"])], None)
    assert {p.model for p in parts} == {"CLIP-L", "CLIP-G", "T5-XXL"}
    assert {c: p.model for c, p in parts_for("sd3", parts).items()} == {
        "text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL"}
    assert {c: p.model for c, p in parts_for("flux", parts).items()} == {
        "text_encoder": "CLIP-L", "text_encoder_2": "T5-XXL"}
    assert {c: p.model for c, p in parts_for("sdxl", parts).items()} == {
        "text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G"}
    # transformers 5 saves a CLIPTextModel without `text_model.`: the same parameters
    saved_by_v5 = read_parts([str(files["clip_l_v5"])], None)[0]
    published = next(p for p in parts if p.model == "CLIP-L")
    assert sorted(saved_by_v5.source) == sorted(published.source)


@pytest.mark.parametrize(("candidate", "encoders", "vae"), [
    ("sd35-medium", ["clip-l", "clip-g", "t5xxl"], None),  # the release ships MMDiT + VAE
    ("flux-schnell-transformer", ["clip-l", "t5xxl"], "vae-flux"),  # BFL's file + ae
])
def test_release_files_without_encoders_take_every_weight_from_the_separate_files(
        tmp_path, candidate, encoders, vae):
    """At full size (sparse files: real shapes, no data), as the released files have them."""
    def made(variant):
        return write_checkpoint(tmp_path / f"{variant}.safetensors", variant, size="full",
                                fill="sparse")

    layout = checkpoint_layout(read_header(made(candidate)))
    parts = parts_for(layout.family, read_parts([str(made(v)) for v in encoders],
                                                vae and str(made(vae))))
    modules, _ = build_modules(with_parts(layout, parts))
    for layout_part in [layout, *(p.layout(layout.family) for p in parts.values())]:
        own = {c: modules[c] for c in layout_part.maps}
        table = WeightTable(own, layout_part.maps, layout_part.key_shapes)
        assert table.mismatched == [] and table.required_missing() == {}


@pytest.mark.parametrize(("encoders", "vae", "message"), [
    (["vae"], None, "--text-encoder {vae}: is VAE (4 latent channels), fits SD1.x, SD2.x and "
                    "SDXL, not a text encoder; give CLIP-L, CLIP-G, T5-XXL files"),
    ([], "clip_l", "--vae {clip_l}: is CLIP-L text encoder, not a VAE"),
    (["t5xxl"], None, "--text-encoder {t5xxl}: is T5-XXL text encoder, which the candidates "
                      "(SD1.x) do not use"),
    (["clip_l", "clip_l2"], None, "--text-encoder {clip_l} and {clip_l2} are both CLIP-L; "
                                  "give one"),
])
def test_a_file_of_the_wrong_kind_is_one_sentence_before_the_folder_is_made(
        files, tmp_path, encoders, vae, message):
    named = {**files, "clip_l2": tmp_path / "clip_l2.safetensors"}
    named["clip_l2"].write_bytes(files["clip_l"].read_bytes())
    with pytest.raises(UserError) as caught:
        _render([files["unet"]], tmp_path / "out", text_encoders=[str(named[e]) for e in encoders],
                vae=vae and str(named[vae]))
    assert str(caught.value).startswith(message.format(**{k: str(v) for k, v in named.items()}))
    assert not (tmp_path / "out").exists()


def test_a_candidate_lacking_components_is_told_of_the_options_that_give_them(files, cli,
                                                                               tmp_path):
    done = cli("render", files["unet"], "--text-encoder", files["clip_l"], "--grid", "tiny",
               "--out", tmp_path / "out", "--offline",
               env={"MERGEKIT_SD_CATALOG": str(tmp_path / "c.db")})
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: unet.safetensors has no vae; give them as separate files with --vae FILE, or "
        "put a full checkpoint of the same architecture before it (a pipeline is built from "
        "the first candidate of each architecture)\n")
    assert not (tmp_path / "out").exists()
