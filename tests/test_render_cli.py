"""`mergekit-sd render` and `compare` as users run them: tiny SD1 and SDXL checkpoints, a recipe
sweep, offline; identical PNG bytes run after run; one sentence and exit 2 for bad input.

One run goes through a fresh process; the others call the same entry point in this process,
which spares each a few seconds of importing torch and diffusers."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from mergekit_sd.testing.checkpoints import write_checkpoint

Image = pytest.importorskip("PIL.Image")

RECIPE = """\
version: 1
models:
  base: sd1-a.safetensors
  other: sd1-b.safetensors
steps:
  - {name: mix, method: weighted_sum, inputs: [base, other], params: {alpha: [0.25, 0.75]}}
output: {path: merged/mix.safetensors}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-models")
    write_checkpoint(folder / "sd1-a.safetensors", "sd1", seed=11)
    write_checkpoint(folder / "sd1-b.safetensors", "sd1", seed=12)
    write_checkpoint(folder / "sdxl.safetensors", "sdxl", seed=13)
    (folder / "sweep.yaml").write_text(RECIPE)
    return folder


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network, an empty Hugging Face cache and a catalog of the test's own, for a child
    process (the returned environment) and for this one."""
    from huggingface_hub import constants

    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "MERGEKIT_SD_CATALOG": str(tmp_path / "catalog.sqlite")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return env


class Done:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def main(capsys, monkeypatch):
    """`mergekit-sd ARGS` through the console entry point, in this process."""
    import torch

    from mergekit_sd.cli import main as entry

    def run(*args) -> Done:
        monkeypatch.setattr(sys, "argv", ["mergekit-sd", *map(str, args)])
        threads = torch.get_num_threads()
        try:
            entry()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return Done(code, out, err)

    return run


def _render_args(models, out):
    return ("render", models / "sd1-a.safetensors", models / "sweep.yaml",
            models / "sdxl.safetensors", "--grid", "tiny", "--out", out, "--html")


def test_render_writes_images_sheet_manifest_and_page_the_same_bytes_every_run(
        cli, main, models, tmp_path, offline):
    first = cli(*_render_args(models, tmp_path / "one"), env=offline)
    assert first.returncode == 0, first.stderr
    assert "sd1: pipeline built from sd1-a" in first.stdout
    assert "mix@alpha=0.25: weights swapped in" in first.stdout
    assert "sdxl: pipeline built from sdxl" in first.stdout
    assert not (models / "merged").exists()

    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    labels = ["sd1-a", "mix@alpha=0.25", "mix@alpha=0.75", "sdxl"]
    assert [c["label"] for c in manifest["candidates"]] == labels
    assert len(manifest["images"]) == 4 * 3 * 2
    image = manifest["images"][0]
    assert {k: image[k] for k in ("candidate", "prompt_name", "seed", "preset", "scheduler",
                                  "steps", "guidance", "width", "height", "device")} == {
        "candidate": "sd1-a", "prompt_name": "face", "seed": 1, "preset": "standard",
        "scheduler": "euler_a", "steps": 4, "guidance": 5.0, "width": 64, "height": 64,
        "device": "cpu"}
    assert len(image["candidate_sha256"]) == 64 and image["seconds"] > 0

    with Image.open(tmp_path / "one" / image["file"]) as png:
        assert png.size == (64, 64)
        assert png.text["parameters"].startswith(
            "portrait photo of a woman\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, "
            f"CFG scale: 5.0, Seed: 1, Size: 64x64, Model hash: {image['candidate_sha256'][:10]}"
            ", Model: sd1-a")
    with Image.open(tmp_path / "one" / "contact-sheet.png") as sheet:
        assert sheet.width > 4 * 256 and sheet.height > 6 * 256
    page = (tmp_path / "one" / "index.html").read_text()
    assert page.count("<img") == 24 and "mix@alpha=0.75" in page

    second = main(*_render_args(models, tmp_path / "two"))
    assert second.returncode == 0, second.stderr
    for entry in manifest["images"]:
        assert ((tmp_path / "one" / entry["file"]).read_bytes()
                == (tmp_path / "two" / entry["file"]).read_bytes()), entry["file"]


def test_compare_lays_two_candidates_side_by_side_with_a_heat_map(main, models, tmp_path,
                                                                   offline):
    done = main("compare", models / "sd1-a.safetensors", models / "sd1-b.safetensors",
                "--grid", "tiny", "--steps", "2", "--out", tmp_path / "ab", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["sheets"]["ab_sheet"] == "ab-sheet.png" and summary["images"] == 12
    pairs = summary["sheets"]["ab"]
    assert [(p["prompt_name"], p["seed"]) for p in pairs][:2] == [("face", 1), ("face", 2)]
    assert all(p["mean_abs_difference"] > 0 for p in pairs)
    with Image.open(tmp_path / "ab" / pairs[0]["file"]) as sheet:
        assert sheet.width >= 3 * 192  # A, B and the heat map


def test_compare_without_heat_maps_still_records_every_pairs_mean_difference(main, models,
                                                                             tmp_path, offline):
    done = main("compare", models / "sd1-a.safetensors", models / "sd1-b.safetensors",
                "--grid", "tiny", "--steps", "1", "--out", tmp_path / "ab", "--no-heat",
                "--json")
    assert done.returncode == 0, done.stderr
    pairs = json.loads(done.stdout)["sheets"]["ab"]
    assert len(pairs) == 6 and all(p["mean_abs_difference"] > 0 for p in pairs)
    with Image.open(tmp_path / "ab" / pairs[0]["file"]) as sheet:
        assert sheet.width < 3 * 192  # A and B only


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "lcm"], "error: --lora hf://latent-consistency/lcm-lora-sdv1-5/"),
    # --offline refuses --pull, so the advice is what works offline
    (["--preset", "lcm", "--offline"], "error: --lora hf://latent-consistency/lcm-lora-sdv1-5/"
     "pytorch_lora_weights.safetensors: 'hf://latent-consistency/lcm-lora-sdv1-5/pytorch_lora"
     "_weights.safetensors' has no copy in the catalog yet, and --offline downloads nothing; "
     "pull it once online (`mergekit-sd pull hf://latent-consistency/lcm-lora-sdv1-5/pytorch_"
     "lora_weights.safetensors`); or give --lora PATH, or --lora none for candidates that "
     "have it merged in\n"),
    (["--grid", "nope.yaml"], "error: nope.yaml: does not exist; give a grid YAML file"),
    (["--preset", "lightning-4"], "error: --preset lightning-4 is for SDXL, not SD1.x"),
    (["--size", "100x64"], "error: --size '100x64': write WIDTHxHEIGHT in multiples of 64"),
    (["--size", "64"], "error: --size '64': write WIDTHxHEIGHT in multiples of 64"),
    (["--size", "64x"], "error: --size '64x': write WIDTHxHEIGHT in multiples of 64"),
    (["--size", "4160x64"], "error: --size '4160x64': write WIDTHxHEIGHT in multiples "
                               "of 64 up to 4096"),
    (["--guidance", "nan"], "error: --guidance nan: give a number from 0 to 30\n"),
    (["--guidance", "-3"], "error: --guidance -3: give a number from 0 to 30\n"),
    (["--guidance", "inf"], "error: --guidance inf: give a number from 0 to 30\n"),
    (["--lora-scale", "nan"], "error: --lora-scale nan: give a finite number"),
    (["--lora-scale", "0.5"], "error: --lora-scale 0.5: --preset standard fuses no LoRA here, "
                              "so there is nothing to scale; give --lora with a LoRA file"),
    (["--preset", "lcm", "--lora", "none", "--lora-scale", "0.5"],
     "error: --lora-scale 0.5: --lora none fuses no LoRA, so there is nothing to scale; "
     "leave one of the two out\n"),
    (["--device", "cuda:7"], "error: --device cuda:7: no CUDA device is available"),
    (["--config-dir", "/nonexistent"], "error: --config-dir /nonexistent does not exist; give "
                                       "a diffusers-format folder that has tokenizer/, or "
                                       "leave --config-dir out\n"),
    (["--set", "mix.alpha=0.4"], "error: --set 'mix.alpha=0.4': --set changes a recipe's "
                                 "parameters, and none of the candidates is a recipe\n"),
])
def test_bad_input_is_one_sentence_and_exit_code_2(main, models, tmp_path, offline, args,
                                                   message):
    done = main("render", models / "sd1-a.safetensors", "--grid", "tiny", "--out",
                tmp_path / "out", *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


def test_a_missing_tokenizer_offline_says_which_and_how_to_get_it(main, tmp_path, offline):
    flux = write_checkpoint(tmp_path / "flux.safetensors", "flux-schnell")
    done = main("render", flux, "--preset", "schnell", "--grid", "tiny", "--out",
                tmp_path / "out")
    assert done.returncode == 2
    assert done.stderr == (
        "error: FLUX.1 rendering needs the tokenizer_2 of black-forest-labs/FLUX.1-schnell, "
        "which is not in the Hugging Face cache; download it once with `hf download "
        "black-forest-labs/FLUX.1-schnell --include 'tokenizer_2/*'` (online), or pass "
        "--config-dir with a diffusers-format folder that has tokenizer_2/\n")
    assert not (tmp_path / "out").exists()  # refused while building: no folder left


def _second_architecture(kind: str, models, folder):
    """An SDXL or FLUX candidate that cannot be rendered, for reasons found without rendering."""
    if kind == "no tokenizer":
        return write_checkpoint(folder / "flux.safetensors", "flux-schnell")
    if kind == "unet only":
        return write_checkpoint(folder / "sdxl-unet.safetensors", "sdxl-unet")
    from safetensors.torch import load_file, save_file

    tensors = load_file(models / "sdxl.safetensors")
    save_file({k: t for k, t in tensors.items() if "input_blocks.4.1.proj_in" not in k},
              folder / "pruned.safetensors")
    return folder / "pruned.safetensors"


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("kind", "message"), [
    ("no tokenizer", "error: FLUX.1 rendering needs the tokenizer_2 of "),
    ("unet only", "error: sdxl-unet.safetensors has no text_encoder, text_encoder_2, vae; "),
    ("unfit config", "error: pruned.safetensors: its unet has no down_blocks.1.attentions.0."),
])
def test_a_second_architecture_is_checked_before_the_folder_is_touched(main, models, tmp_path,
                                                                       offline, kind, message):
    """The README's promise holds for every architecture of a run, not just the first: a
    refusal leaves no folder, and --overwrite keeps the previous render whole."""
    second = _second_architecture(kind, models, tmp_path)
    previous = tmp_path / "previous"
    assert main("render", models / "sd1-a.safetensors", "--grid", "tiny", "--out",
                previous).returncode == 0
    before = _files(previous)
    for out, extra in [(tmp_path / "new", ()), (previous, ("--overwrite",))]:
        done = main("render", models / "sd1-a.safetensors", second, "--grid", "tiny",
                    "--out", out, *extra)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "new").exists()
    assert _files(previous) == before


@pytest.mark.parametrize(("vocab", "message"), [
    # loads, but <|endoftext|>, CLIP's unknown and end token, is not in the vocabulary
    ({"a": 0}, "loads but cannot encode text as a CLIP tokenizer (Unk token "),
    # a bigger tokenizer than the tiny text encoder's: its end token has no embedding
    ("shifted", "gives token id 901 but the text encoder has 772 tokens, so it is not "),
])
def test_a_config_dir_tokenizer_that_cannot_encode_is_one_sentence(main, models, tmp_path,
                                                                   offline, vocab, message):
    from mergekit_sd.render.tiny_tokenizer import SPECIALS, TINY_CLIP

    folder = tmp_path / "configs" / "tokenizer"
    folder.mkdir(parents=True)
    merges = (TINY_CLIP / "merges.txt").read_text(encoding="utf-8")
    if vocab == "shifted":
        vocab = json.loads((TINY_CLIP / "vocab.json").read_text(encoding="utf-8"))
        vocab.update({token: 900 + i for i, token in enumerate(SPECIALS)})
    else:
        merges = "#version: 0.2\n"
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    done = main("render", models / "sd1-a.safetensors", "--grid", "tiny", "--out",
                tmp_path / "out", "--config-dir", tmp_path / "configs")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"error: {folder}: {message}"), done.stderr
    assert done.stderr.endswith("; give the tokenizer/ folder of a diffusers-format model\n")
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["render", "compare"])
def test_offline_never_downloads_a_missing_tokenizer(cli, tmp_path, command):
    # no HF_HUB_OFFLINE in the environment: --offline alone must keep the run from calling
    # out (the endpoint is a closed local port, so a download attempt fails fast)
    flux = write_checkpoint(tmp_path / "flux.safetensors", "flux-schnell")
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "MERGEKIT_SD_CATALOG": str(tmp_path / "c.db")}
    candidates = [flux] if command == "render" else [flux, flux]
    done = cli(command, *candidates, "--preset", "schnell", "--grid", "tiny", "--out",
               tmp_path / "out", "--offline", env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(
        "error: FLUX.1 rendering needs the tokenizer_2 of black-forest-labs/FLUX.1-schnell, "
        "which is not in the Hugging Face cache; download it once"), done.stderr
    assert done.stderr.count("\n") == 1
    both = cli(command, *candidates, "--out", tmp_path / "out", "--offline", "--pull", env=env)
    assert (both.returncode, both.stderr) == (
        2, "error: --pull downloads and --offline forbids it; choose one\n")


def test_render_and_compare_are_listed_without_importing_torch(cli):
    import subprocess

    from conftest import REPO

    done = cli("--help")
    assert done.returncode == 0
    assert "render" in done.stdout and "compare" in done.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom mergekit_sd.cli import main\n"
         "sys.argv = ['mergekit-sd', 'render', '--help']\n"
         "try:\n    main()\nexcept SystemExit:\n    pass\n"
         "print('torch loaded' if 'torch' in sys.modules else 'no torch')"],
        capture_output=True, text=True, cwd=REPO)
    assert "--preset" in probe.stdout and probe.stdout.rstrip().endswith("no torch")


@pytest.mark.parametrize("out", ["afile/sub", "a" * 300])
def test_an_unusable_output_folder_is_one_sentence_before_anything_is_built(main, models,
                                                                            tmp_path, out):
    (tmp_path / "afile").write_text("")
    done = main("render", models / "sd1-a.safetensors", "--grid", "tiny", "--out",
                tmp_path / out)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"error: --out {tmp_path / out}: ")
    assert done.stderr.endswith("; give --out a folder that can be created and written\n")
    assert "pipeline built" not in done.stdout


def test_a_full_disk_while_writing_outputs_is_a_failure_not_a_traceback(tmp_path):
    import errno

    from mergekit_sd.errors import UserError, WorkFailed
    from mergekit_sd.render.outputs import output_error

    full = output_error(tmp_path / "x.png", OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(full, WorkFailed)
    assert str(full) == f"{tmp_path / 'x.png'}: could not be written (No space left on device)"
    assert isinstance(output_error(tmp_path, OSError(errno.EROFS, "Read-only")), UserError)


@pytest.mark.parametrize(("lora", "message"), [
    ("kohya-sdxl", "l.safetensors: is a kohya LoRA for SDXL; the candidates are SD1.x\n"),
    ("lokr-sd1", "l.safetensors: is a LyCORIS LoKr, which diffusers cannot fuse; give a LoRA "
                 "or LoCon, or --lora none\n"),
    ("text", "l.safetensors: is not a safetensors file (it is text)\n"),
])
def test_a_lora_that_cannot_be_fused_is_one_sentence_before_building(main, models, tmp_path,
                                                                      offline, lora, message):
    from mergekit_sd.testing.loras import write_lora

    path = tmp_path / "l.safetensors"
    if lora == "text":
        path.write_text("not a model, just some text in a file\n")
    else:
        write_lora(path, lora)
    done = main("render", models / "sd1-a.safetensors", "--preset", "lcm", "--lora", path,
                "--grid", "tiny", "--out", tmp_path / "out")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"error: --lora {tmp_path}/{message}")
    assert done.stderr.count("\n") == 1 and done.stdout == ""


def test_the_summary_fits_80_columns(main, models, tmp_path, offline, monkeypatch):
    import shutil

    named = tmp_path / "a-candidate-with-a-rather-long-descriptive-name.safetensors"
    shutil.copyfile(models / "sd1-a.safetensors", named)
    monkeypatch.setenv("COLUMNS", "80")
    done = main("render", named, "--grid", "tiny", "--steps", "1", "--out", tmp_path / "o")
    assert done.returncode == 0, done.stderr
    summary = done.stdout[done.stdout.index("sd1: pipeline"):]
    assert max(map(len, summary.splitlines())) <= 80, summary
    assert "a-candidate-with-a-rather-long-descriptive-name: pipeline built" in summary


ESTIMATE = re.compile(r"first 4 images: [0-9.]+ s each on the CPU; the (\d+) left will take "
                      r"about [0-9.]+ (s|min|h)(\. Faster for a first try on the CPU: .*)?$")


def test_the_first_batch_says_on_stderr_how_long_the_rest_takes(main, models, tmp_path,
                                                                 offline, monkeypatch):
    """A threshold of 0 stands for a rest long enough to matter (a tiny grid takes a second);
    the line is the measured first batch's, on stderr only: stdout holds the summary."""
    from mergekit_sd.render import estimate

    monkeypatch.setattr(estimate, "WORTH_SAYING_S", 0.0)
    done = main("render", models / "sd1-a.safetensors", "--grid", "tiny", "--steps", "9",
                "--out", tmp_path / "o")
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stderr.splitlines() if ESTIMATE.match(line)]
    assert ESTIMATE.match(line)[1] == "2"  # the tiny grid's 6 images, a batch of 4 drawn
    # offline, and the LCM LoRA neither cached nor catalogued: --preset lcm would only fail
    assert line.endswith("Faster for a first try on the CPU: --steps 8 (README: Renders and "
                         "A/B grids)"), line
    assert "first 4 images" not in done.stdout and "wrote 6 images" in done.stdout


LCM_SD1 = "hf://latent-consistency/lcm-lora-sdv1-5/pytorch_lora_weights.safetensors"


def _cache_hf_file(ref: str, write) -> None:
    """`ref` as huggingface_hub keeps a downloaded file: a snapshot its refs/main names."""
    from huggingface_hub import constants

    org, repo, name = ref.removeprefix("hf://").split("/", 2)
    folder = Path(constants.HF_HUB_CACHE) / f"models--{org}--{repo}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    write(folder / "snapshots" / ("0" * 40) / name)


def test_the_estimate_suggests_a_few_step_preset_only_where_its_lora_can_be_had(
        tmp_path, offline, monkeypatch):
    """Offline without the LoRA: not at all (it would end in an error); online: with --pull;
    with the LoRA in the Hugging Face cache, or --pull given: plainly."""
    from huggingface_hub import constants

    from mergekit_sd.cli import _CatalogOnDemand
    from mergekit_sd.cli_render import few_step_option
    from mergekit_sd.testing.loras import write_lora

    resolver = _CatalogOnDemand(tmp_path / "catalog.sqlite")
    assert few_step_option("lcm", "sd1", resolver, False, True) is None
    assert few_step_option("lcm", "sd1", resolver, True, False) == "--preset lcm"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert few_step_option("lcm", "sd1", resolver, False, False) == "--preset lcm --pull"
    _cache_hf_file(LCM_SD1, lambda path: write_lora(path, "kohya-sd1"))
    assert few_step_option("lcm", "sd1", resolver, False, True) == "--preset lcm"


def test_compare_json_keeps_the_estimate_out_of_its_document(main, models, tmp_path, offline,
                                                             monkeypatch):
    from mergekit_sd.render import estimate

    monkeypatch.setattr(estimate, "WORTH_SAYING_S", 0.0)
    done = main("compare", models / "sd1-a.safetensors", models / "sd1-b.safetensors",
                "--grid", "tiny", "--steps", "2", "--out", tmp_path / "ab", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"] == 12 and "first" not in done.stdout
    [line] = [line for line in done.stderr.splitlines() if ESTIMATE.match(line)]
    assert ESTIMATE.match(line)[1] == "8"  # both candidates: the same pipeline and settings
    assert "Faster" not in line  # 64x64, 2 steps, the tiny grid: nothing faster to name


def test_on_a_terminal_the_estimate_is_a_line_of_its_own_above_the_progress_bar(models,
                                                                               tmp_path, offline):
    """Where rich draws the bar, the line clears the bar's line and the bar comes back under it,
    never after the bar's text on the same line."""
    import os
    from pathlib import Path

    from terminal import run_on_terminal

    tests = Path(__file__).parent
    env = {**os.environ, **offline, "PYTHONPATH": f"{tests.parent}{os.pathsep}{tests}",
           "COLUMNS": "300", "TERM": "xterm"}
    code, stdout, shown = run_on_terminal(
        ["render", models / "sd1-a.safetensors", "--grid", "tiny", "--batch", "2", "--out",
         tmp_path / "o"], env, stream="stderr", timeout=120, module="estimate_always")
    assert code == 0, shown
    before, line = shown.split("first 2 images: ")
    assert before.endswith(("\x1b[2K", "\n")), repr(before[-80:])
    assert "the 4 left will take about" in line.splitlines()[0]
    assert "rendering" in line and "first" not in stdout


def test_one_step_and_one_image_are_said_in_the_singular(main, models, tmp_path, offline):
    grid = tmp_path / "one.yaml"
    grid.write_text("prompts: [{name: cat, text: a cat}]\nseeds: [1]\nsize: 64\n")
    done = main("render", models / "sd1-a.safetensors", "--grid", grid, "--steps", "1",
                "--out", tmp_path / "o")
    assert done.returncode == 0, done.stderr
    assert "(standard, euler_a, 1 step, guidance" in done.stdout
    assert "sd1-a: pipeline built" in done.stdout and ", 1 image " in done.stdout
    assert "wrote 1 image, contact-sheet.png" in done.stdout


def test_png_info_records_the_lora_weight_and_trailing_timesteps_as_automatic1111_does(
        main, models, tmp_path, offline):
    """`<lora:NAME:SCALE>` in the prompt (what A1111 reads a LoRA's weight from), its hash
    under `Lora hashes`, `Schedule type: SGM Uniform` for trailing timesteps; the same
    settings give the same bytes, another weight another text."""
    from mergekit_sd.testing.loras import write_lora

    lora = write_lora(tmp_path / "mychar.safetensors", "kohya-sd1", seed=4)
    grid = tmp_path / "one.yaml"
    grid.write_text("prompts: [{name: cat, text: a cat, negative: blurry}]\nseeds: [1]\n"
                    "size: 64\n")

    def render(out, scale):
        done = main("render", models / "sd1-a.safetensors", "--grid", grid, "--steps", "1",
                    "--lora", lora, "--lora-scale", scale, "--scheduler", "euler_trailing",
                    "--out", tmp_path / out)
        assert done.returncode == 0, done.stderr
        return (tmp_path / out / "images" / "sd1-a" / "cat-1.png").read_bytes()

    half = render("half", "0.5")
    with Image.open(tmp_path / "half" / "images" / "sd1-a" / "cat-1.png") as png:
        text = png.text["parameters"]
    assert text.startswith("a cat <lora:mychar:0.5>\nNegative prompt: blurry\nSteps: 1, "
                           "Sampler: Euler, Schedule type: SGM Uniform, CFG scale: "), text
    assert re.search(r', Lora hashes: "mychar: [0-9a-f]{12}", Preset: standard,', text), text
    assert render("again", "0.5") == half
    render("full", "1")
    with Image.open(tmp_path / "full" / "images" / "sd1-a" / "cat-1.png") as png:
        assert png.text["parameters"].startswith("a cat <lora:mychar:1>\n")


def test_a_recipe_without_output_renders_as_merge_out_would_merge_it(main, models, tmp_path,
                                                                     offline):
    """render merges in memory and never writes output.path, so a recipe need not name one
    (plan and merge take it from --out FILE); nothing is written beside the recipe."""
    from mergekit_sd.render.candidates import collect_candidates

    recipe = tmp_path / "noout.yaml"
    recipe.write_text(RECIPE.replace("output: {path: merged/mix.safetensors}\n", "")
                      .replace("sd1-", f"{models}/sd1-"))
    assert [c.label for c in collect_candidates([str(recipe)])] == ["mix@alpha=0.25",
                                                                    "mix@alpha=0.75"]
    done = main("compare", recipe, models / "sd1-a.safetensors", "--set", "mix.alpha=0.5",
                "--grid", "tiny", "--steps", "1", "--out", tmp_path / "o")
    assert done.returncode == 0, done.stderr
    assert "mix@alpha=0.5: pipeline built" in done.stdout
    assert not list(tmp_path.glob("*.safetensors"))


def _tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else b"/"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("args", [[], ["--overwrite"], ["--html", "--overwrite"]])
def test_a_gallery_mergekit_sd_did_not_write_is_left_untouched(main, models, tmp_path,
                                                                offline, args):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    (gallery / "index.html").write_text("<h1>my hand-written gallery</h1>")
    (gallery / "manifest.json").write_text('{"my": "own manifest"}')
    before = _tree(gallery)
    done = main("render", models / "sd1-a.safetensors", "--grid", "tiny", "--out", gallery,
                *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (f"error: --out {gallery}: manifest.json was not written by "
                           "mergekit-sd, and this run would replace it; move it away or give "
                           "another --out\n")
    assert _tree(gallery) == before


def test_rendering_again_into_a_folder_needs_overwrite_and_leaves_no_stale_files(
        main, models, tmp_path, offline):
    out = tmp_path / "ab"
    first = main("compare", models / "sd1-a.safetensors", models / "sd1-b.safetensors",
                 "--grid", "tiny", "--steps", "1", "--out", out, "--html")
    assert first.returncode == 0, first.stderr
    (out / "my-notes.txt").write_text("mine")
    before = _tree(out)

    again = main("compare", models / "sd1-b.safetensors", models / "sd1-a.safetensors",
                 "--grid", "tiny", "--steps", "1", "--out", out)
    assert again.returncode == 2 and _tree(out) == before
    assert again.stderr == (f"error: --out {out}: holds a previous render; pass --overwrite "
                            "to replace it (only the files its manifest.json lists), or give "
                            "another --out\n")

    grid = tmp_path / "other.yaml"
    grid.write_text("prompts: [{name: cat, text: a cat}]\nseeds: [7]\nsize: 64\nsteps: 1\n")
    third = main("compare", models / "sd1-b.safetensors", models / "sd1-a.safetensors",
                 "--grid", grid, "--out", out, "--overwrite")
    assert third.returncode == 0, third.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "ab-sheet.png", "ab/cat-7.png", "contact-sheet.png", "images/sd1-a/cat-7.png",
        "images/sd1-b/cat-7.png", "manifest.json", "my-notes.txt"]
    assert sorted(manifest["outputs"]) == sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*.*") if p.name != "my-notes.txt")


@pytest.mark.parametrize(("candidate", "args"), [
    ("nope.safetensors", []),
    ("sd1-a.safetensors", ["--preset", "turbo"]),
    ("sd1-a.safetensors", ["--set", "mix.alpha=0.4"]),
    ("sd1-a.safetensors", ["--preset", "lcm"]),  # its LoRA is not here offline
])
def test_a_refused_run_leaves_no_output_folder(main, models, tmp_path, offline, candidate,
                                               args):
    done = main("render", models / candidate, "--grid", "tiny", "--out", tmp_path / "new/a/b",
                *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert not (tmp_path / "new").exists()


def test_size_takes_width_x_height_in_either_case_and_its_help_says_the_rule(main):
    from mergekit_sd.cli_render import _size

    assert _size("64X128") == _size("64x128") == (64, 128)
    done = main("render", "--help")
    assert "multiples of 64" in " ".join(done.stdout.split())
