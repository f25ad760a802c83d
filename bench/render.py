"""Benchmark of rendering: swapping candidate weights into a pipeline against building one again,
and (when a GPU is lent) SDXL-size few-step throughput.

Targets (from the issue), each measured against baselines in the same run:
  1. Swapping an SD1.5-size UNet's weights (random values, an fp16 UNet-only file) into a
     pipeline costs <= 0.2x building the pipeline again from the file. Two builds are measured:
       a. ours, `build_pipeline` from the full checkpoint: modules constructed empty, storage
          allocated, every weight read through the key map (what `render` does per
          architecture);
       b. diffusers' `StableDiffusionPipeline.from_single_file` on the same file, with a local
          diffusers-format config folder (the usual way to get a pipeline from a single file).
     Also, for information: swapping a full checkpoint (UNet, text encoder and VAE), and
     swapping the UNet with a rank-64 LoRA fused (unfuse, copy, fuse again).
     Measured in the CPU render dtype (fp32) and in fp16 (the file's own dtype, what a GPU
     renders in). In fp16, nothing is converted: diffusers maps the file and reads its pages on
     first use, and so do our build and our swap (parameters take the file's copy-on-write
     mapped pages), so all three times leave the reading out. In fp32 every weight is read and
     converted, by all three.
  2. On a GPU: SDXL-size (random weights) 1024x1024, 4-step images per second (Euler with
     trailing timesteps, guidance 0, as SDXL-Lightning), bf16, batched to fill the device; and
     the fraction of the device's dense bf16 peak those images' FLOPs represent (FLOPs counted
     with torch.utils.flop_counter on one image: text encoders, 4 UNet steps, VAE decode).

Everything runs in child processes (the parent imports nothing heavy); rounds are interleaved
(swap, swap, diffusers build, our build) so drift hits all alike; times are medians; the page
cache is warm (each file is read once right before it is measured) and one pipeline is alive at
a time. Peak RSS is each child's own (wait4).

Run from the repository root: .venv/bin/python bench/render.py  (about 4 minutes on 2 cores,
needs about 6 GB free in --workdir; --quick: 2 rounds, fp32 only). Writes
bench/results/render.json and exits 0 whatever the outcome. --gpu yes|no|auto (auto: when
torch sees CUDA) adds target 2 (about 3 minutes more on the GPU machine; 7 GB of disk).
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
# bench/inspect.py would shadow the standard library's `inspect` (torch imports it) if this
# folder stayed first on the path: move it to the end, and put the repository root first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH] + [str(_BENCH)]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _measure as m  # noqa: E402

TARGET_SWAP_VS_BUILD = 0.2
THIS = str(Path(__file__).resolve())
TINY_CLIP = m.REPO / "mergekit_sd" / "render" / "tiny" / "clip"
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s.
BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12}


# --- children ------------------------------------------------------------------------------------


def child_generate(path: str, variant: str, seed: int) -> None:
    from mergekit_sd.testing.checkpoints import write_checkpoint
    from mergekit_sd.testing.loras import write_lora

    start = time.perf_counter()
    if variant == "lora":
        write_lora(path, "kohya-sd1", rank=64, size="full", seed=seed)
    else:
        write_checkpoint(path, variant, size="full", fill="random", dtype="F16", seed=seed)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def warm(path: str) -> None:
    """Read a file once, so what follows finds it in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def _diffusers_folder(rp, folder: Path) -> None:
    """A diffusers-format SD1 folder with the same configs and tokenizer as our pipeline, for
    `from_single_file(config=...)` offline."""
    for component in ("unet", "vae", "text_encoder"):
        config = rp.modules[component].config
        save = getattr(config, "save_pretrained", None) or rp.modules[component].save_config
        save(folder / component)
    rp.pipe.scheduler.save_config(folder / "scheduler")
    shutil.copytree(TINY_CLIP, folder / "tokenizer", dirs_exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
        "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", type(rp.pipe.scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))


def child_swap(full_a: str, full_b: str, unet: str, lora: str, dtype: str, rounds: int,
               workdir: str) -> None:
    import gc

    import torch

    from mergekit_sd.io.header import read_header
    from mergekit_sd.render.layout import checkpoint_layout
    from mergekit_sd.render.pipelines import build_pipeline, quiet_transformers

    with quiet_transformers():
        from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    config_dir = Path(workdir) / "tokenizers"
    shutil.copytree(TINY_CLIP, config_dir / "tokenizer", dirs_exist_ok=True)
    layouts = {p: checkpoint_layout(read_header(p)) for p in (full_a, full_b, unet)}
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]

    def build():
        return build_pipeline(layouts[full_a], path=Path(full_a), dtype=dtype,
                              config_dir=config_dir)

    start = time.perf_counter()
    rp = build()  # warm-up: imports, the key maps, the page cache
    first_build = time.perf_counter() - start
    folder = Path(workdir) / f"diffusers-sd1-{dtype}"
    _diffusers_folder(rp, folder)
    times: dict[str, list[float]] = {"swap_unet": [], "swap_full": [], "build": [],
                                     "from_single_file": [], "swap_unet_lora": []}

    def timed(name: str, fn):
        begin = time.perf_counter()
        result = fn()
        times[name].append(time.perf_counter() - begin)
        return result

    # One pipeline alive at a time, and every file read once just before it is measured:
    # on a machine this size, two pipelines plus the files would push the files out of the
    # page cache and time the disk instead.
    for _ in range(rounds):
        warm(unet)
        timed("swap_unet", lambda rp=rp: rp.load(layouts[unet], path=Path(unet)))
        warm(full_b)
        timed("swap_full", lambda rp=rp: rp.load(layouts[full_b], path=Path(full_b)))
        del rp
        gc.collect()
        warm(full_a)
        pipe = timed("from_single_file", lambda: StableDiffusionPipeline.from_single_file(
            full_a, config=str(folder), local_files_only=True, torch_dtype=torch_dtype,
            safety_checker=None, requires_safety_checker=False))
        del pipe
        gc.collect()
        warm(full_a)
        rp = timed("build", build)
    rp.fuse_lora(Path(lora), 1.0, "lora")
    for _ in range(rounds):
        warm(unet)
        timed("swap_unet_lora", lambda rp=rp: rp.load(layouts[unet], path=Path(unet)))
    unet_bytes = sum(read_header(unet).tensors[k].nbytes for k in read_header(unet).tensors)
    print(json.dumps({"times": times, "first_build_s": first_build, "unet_bytes": unet_bytes,
                      "threads": torch.get_num_threads()}))


def child_gpu(sdxl: str, workdir: str, seconds: float) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mergekit_sd.io.header import read_header
    from mergekit_sd.render.assets import scheduler_config
    from mergekit_sd.render.generate import Job, Settings, auto_batch, render_batch
    from mergekit_sd.render.grids import load_grid
    from mergekit_sd.render.layout import checkpoint_layout
    from mergekit_sd.render.pipelines import build_pipeline
    from mergekit_sd.render.presets import make_scheduler

    config_dir = Path(workdir) / "tokenizers"
    for folder in ("tokenizer", "tokenizer_2"):
        shutil.copytree(TINY_CLIP, config_dir / folder, dirs_exist_ok=True)
    layout = checkpoint_layout(read_header(sdxl))
    start = time.perf_counter()
    rp = build_pipeline(layout, path=Path(sdxl), device="cuda", dtype="bf16",
                        config_dir=config_dir)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    rp.load(layout, path=Path(sdxl))
    torch.cuda.synchronize()
    swap_s = time.perf_counter() - start
    rp.pipe.scheduler = make_scheduler("euler_trailing", scheduler_config("sdxl"))
    settings = Settings(1024, 1024, 4, 0.0)
    prompts = load_grid(None).prompts
    batch = auto_batch(rp, settings, 64)
    jobs = [Job(prompts[i % len(prompts)], 1000 + i) for i in range(batch)]
    encoded: dict = {}
    render_batch(rp, jobs, settings, encoded)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoded.clear()  # each batch encodes its prompts, as a new candidate's would
        render_batch(rp, jobs, settings, encoded)
        images += len(jobs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    counter = FlopCounterMode(display=False)
    with counter:
        render_batch(rp, jobs[:1], settings, {})
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    flops = counter.get_total_flops()
    rate = images / elapsed
    print(json.dumps({"device": name, "batch": batch, "images": images, "seconds": elapsed,
                      "images_per_s": rate, "flops_per_image": flops, "bf16_peak": peak,
                      "fraction_of_peak": rate * flops / peak if peak else None,
                      "build_s": build_s, "swap_same_file_s": swap_s,
                      "max_memory_allocated": torch.cuda.max_memory_allocated()}))


def child_has_cuda() -> None:
    import torch

    print(json.dumps({"cuda": torch.cuda.is_available()}))


# --- the parent ----------------------------------------------------------------------------------


def python_child(*args: str) -> m.ChildResult:
    done = m.run_child([sys.executable, THIS, "--child", *args])
    if done.returncode != 0:
        raise RuntimeError(f"child {args[0]} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def generate(files: dict[str, tuple[str, int]], workdir: Path) -> dict[str, Path]:
    """Write the synthetic inputs, two at a time; returns name -> path."""
    paths = {name: workdir / f"{name}.safetensors" for name in files}
    running = []
    for name, (variant, seed) in files.items():
        argv = [sys.executable, THIS, "--child", "generate", "--path", str(paths[name]),
                "--variant", variant, "--seed", str(seed)]
        running.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        env=m.child_env(), cwd=m.REPO))
        if len(running) == 2:
            _wait(running.pop(0))
    for proc in running:
        _wait(proc)
    return paths


def _wait(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"generating failed:\n{err.decode()[-3000:]}")


def swap_case(paths: dict[str, Path], dtype: str, rounds: int, workdir: Path) -> dict:
    done = python_child("swap", "--inputs", str(paths["a"]), str(paths["b"]),
                        str(paths["unet"]), str(paths["lora"]), "--dtype", dtype,
                        "--rounds", str(rounds), "--workdir", str(workdir))
    data = done.json_line()
    med = {name: m.median(values) for name, values in data["times"].items()}
    per_round = [s / b for s, b in zip(data["times"]["swap_unet"], data["times"]["build"],
                                       strict=True)]
    return {"dtype": dtype, "medians_s": med, "times_s": data["times"],
            "first_build_s": data["first_build_s"], "unet_bytes": data["unet_bytes"],
            "threads": data["threads"], "peak_rss": done.peak_rss,
            "swap_unet_vs_build": med["swap_unet"] / med["build"],
            "swap_unet_vs_build_per_round": per_round,
            "swap_unet_vs_from_single_file": med["swap_unet"] / med["from_single_file"],
            "swap_full_vs_build": med["swap_full"] / med["build"],
            "lora_refuse_extra_s": med["swap_unet_lora"] - med["swap_unet"]}


def report_swap(case: dict) -> list[str]:
    med = case["medians_s"]
    gbps = case["unet_bytes"] / med["swap_unet"] / 1e9
    rate = f"{gbps:.2f} GB/s" if case["dtype"] == "fp32" else "pages shared, not copied"
    print(f"\n1. swap vs build, SD1.5 size, {case['dtype']} pipeline on the CPU "
          f"({case['threads']} threads), medians of {len(case['times_s']['build'])} rounds")
    m.print_table(["", "seconds", "ratio to our build", "ratio to from_single_file"], [
        [f"swap the UNet (UNet-only file, {case['unet_bytes'] / 1e9:.2f} GB, {rate})",
         f"{med['swap_unet']:.3f}", f"{case['swap_unet_vs_build']:.3f}",
         f"{case['swap_unet_vs_from_single_file']:.3f}"],
        ["swap a full checkpoint (UNet + CLIP + VAE)", f"{med['swap_full']:.3f}",
         f"{case['swap_full_vs_build']:.3f}", f"{med['swap_full'] / med['from_single_file']:.3f}"],
        ["swap the UNet with a rank-64 LoRA fused", f"{med['swap_unet_lora']:.3f}",
         f"{med['swap_unet_lora'] / med['build']:.3f}", ""],
        ["build the pipeline again (ours)", f"{med['build']:.3f}", "1", ""],
        ["diffusers from_single_file", f"{med['from_single_file']:.3f}", "", "1"],
    ])
    rounds = ", ".join(f"{r:.3f}" for r in case["swap_unet_vs_build_per_round"])
    print(f"per-round swap/build: {rounds}; child peak RSS {m.human_bytes(case['peak_rss'])}")
    verdicts = [m.verdict(f"{case['dtype']}: UNet swap <= {TARGET_SWAP_VS_BUILD}x our build",
                          case["swap_unet_vs_build"] <= TARGET_SWAP_VS_BUILD,
                          f"{case['swap_unet_vs_build']:.3f}x")]
    if case["dtype"] == "fp16":
        print("(fp16: our build, our swap and from_single_file all map the file and read its "
              "pages on first use; none of the three times includes the reading)")
    return verdicts + [m.verdict(
        f"{case['dtype']}: UNet swap <= {TARGET_SWAP_VS_BUILD}x diffusers' from_single_file",
        case["swap_unet_vs_from_single_file"] <= TARGET_SWAP_VS_BUILD,
        f"{case['swap_unet_vs_from_single_file']:.3f}x")]


def has_cuda() -> bool:
    return python_child("has-cuda").json_line()["cuda"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,fp16")
    parser.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--gpu-seconds", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="2 rounds, fp32 only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("--path", "--variant", "--dtype"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "generate":
        return child_generate(args.path, args.variant, args.seed)
    if args.child == "swap":
        return child_swap(*args.inputs, args.dtype, args.rounds, str(args.workdir))
    if args.child == "gpu":
        return child_gpu(args.path, str(args.workdir), args.gpu_seconds)
    if args.child == "has-cuda":
        return child_has_cuda()

    if args.quick:
        args.rounds, args.dtypes = 2, "fp32"
    m.compile_bytecode()
    results: dict = {"loadavg_start": list(os.getloadavg()), "rounds": args.rounds}
    verdicts = []
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-render-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        paths = generate({"a": ("sd1", 1), "b": ("sd1", 2), "unet": ("sd1-unet", 3),
                          "lora": ("lora", 4)}, workdir)
        results["generate_s"] = time.perf_counter() - started
        os.sync()  # the new files' writeback must not run during the measurements
        results["swap"] = []
        for dtype in args.dtypes.split(","):
            case = swap_case(paths, dtype, args.rounds, workdir)
            results["swap"].append(case)
            verdicts += report_swap(case)
        for path in paths.values():
            path.unlink()
        if args.gpu == "yes" or (args.gpu == "auto" and has_cuda()):
            sdxl = generate({"sdxl": ("sdxl", 5)}, workdir)["sdxl"]
            data = python_child("gpu", "--path", str(sdxl), "--workdir",
                                str(workdir)).json_line()
            results["gpu"] = data
            print(f"\n2. SDXL size, 1024x1024, 4 steps, bf16 on {data['device']}, batch "
                  f"{data['batch']}: {data['images_per_s']:.2f} images/s "
                  f"({data['flops_per_image'] / 1e12:.1f} TFLOP per image)")
            if data["fraction_of_peak"] is not None:
                print(f"   {data['fraction_of_peak']:.1%} of the {data['bf16_peak'] / 1e12:.0f}"
                      " TFLOP/s dense bf16 peak")
            print(f"   pipeline built in {data['build_s']:.2f} s, weights swapped in "
                  f"{data['swap_same_file_s']:.2f} s (the same file again)")
        else:
            print("\n2. no GPU here: SDXL throughput not measured")
    results["loadavg_end"] = list(os.getloadavg())
    results["verdicts"] = verdicts
    path = m.write_results("render", results)
    print(f"\nresults in {path.relative_to(m.REPO)}")


if __name__ == "__main__":
    main()
