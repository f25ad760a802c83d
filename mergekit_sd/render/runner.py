"""Render a prompt grid for every candidate: one pipeline per architecture, candidate weights
swapped in place, PNGs with their parameters, a manifest and a contact sheet, written into an
output folder that only ever loses or has replaced files a render wrote (folder.py).

Candidates are grouped by architecture. Each group's pipeline is built from its first full
checkpoint (and the preset's LoRA fused once); every other candidate of the group is copied into
it. Sheets and the HTML page are drawn from the PNGs written, so images never pile up in memory.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sd import __version__
from mergekit_sd.errors import UserError
from mergekit_sd.io.hashing import file_sha256
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress
from mergekit_sd.recipe.refs import ResolvedModel, Resolver
from mergekit_sd.render.assets import scheduler_config
from mergekit_sd.render.candidates import RenderCandidate
from mergekit_sd.render.estimate import FirstBatch
from mergekit_sd.render.folder import (
    AB_SHEET,
    CONTACT_SHEET,
    PAGE_NAME,
    OutputFolder,
    ab_file,
    image_file,
)
from mergekit_sd.render.generate import Job, Settings, auto_batch, cut_prompts, render_batch
from mergekit_sd.render.grids import LoadedGrid
from mergekit_sd.render.layout import DIFFUSION_COMPONENT, required_components
from mergekit_sd.render.manifest import (
    MANIFEST_NAME,
    CandidateEntry,
    ImageEntry,
    Manifest,
    PipelineEntry,
)
from mergekit_sd.render.outputs import a1111_parameters, png_bytes
from mergekit_sd.render.parts import Part, check_used, parts_for, read_parts
from mergekit_sd.render.pipelines import (
    PipelineParts,
    RenderPipeline,
    build_pipeline,
    check_device,
    check_lora,
    prepare_pipeline,
)
from mergekit_sd.render.presets import Preset, Sampling, make_scheduler, resolve_sampling
from mergekit_sd.render.refs import resolve_file
from mergekit_sd.torch_threads import torch_threads

# Below this many diffusion-model parameters (tiny test models) one CPU thread is fastest:
# intra-op threads cost more to wake than tensors this small take to compute.
SMALL_MODEL_PARAMS = 20_000_000


@dataclass
class RenderOptions:
    grid: LoadedGrid
    preset: Preset
    out: Path
    device: str = "cpu"
    dtype: str = "auto"
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    lora: str | None = None  # a reference, "none", or None for the preset's own
    lora_scale: float | None = None
    size: tuple[int, int] | None = None
    batch: int | None = None  # None: as many as the device holds
    config_dir: Path | None = None
    command: str = "render"
    html: bool = False  # index.html will be written too (write_html, after the run)
    overwrite: bool = False  # a folder holding files may be rendered into (folder.py)
    # separate component files (render/parts.py) for candidates that lack them
    text_encoders: list[str] = field(default_factory=list)
    vae: str | None = None


@dataclass
class RenderResult:
    out: Path
    manifest: Manifest
    candidates: list[RenderCandidate]
    folder: OutputFolder

    def image_file(self, candidate: str, prompt: str, seed: int) -> Path:
        for entry in self.manifest.images:
            if (entry.candidate, entry.prompt_name, entry.seed) == (candidate, prompt, seed):
                return self.out / entry.file
        raise KeyError((candidate, prompt, seed))


class _Hashes:
    """SHA256 of candidate and LoRA files on a background thread (known ones reused), so
    hashing overlaps building and rendering; a PNG waits only for its own model's hash."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")
        self._futures: dict[Path, Future] = {}

    def start(self, path: Path, known: str | None = None) -> None:
        if path in self._futures:
            return
        if known:
            future: Future = Future()
            future.set_result(known.lower())
            self._futures[path] = future
        else:
            self._futures[path] = self._pool.submit(file_sha256, path)

    def get(self, path: Path | None) -> str | None:
        return None if path is None else self._futures[path].result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _threads_for(rp: RenderPipeline):
    """One torch thread for a tiny model on the CPU, where the threads' hand-overs cost more
    than they share; torch's own count otherwise."""
    params = sum(p.numel() for p in rp.modules[DIFFUSION_COMPONENT[rp.family]].parameters())
    if rp.device != "cpu" or params >= SMALL_MODEL_PARAMS:
        yield
        return
    with torch_threads(1):
        yield


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def render_candidates(candidates: list[RenderCandidate], options: RenderOptions,
                      resolver: Resolver | None = None,
                      progress: ProgressCallback = no_progress,
                      cancel: CancelToken | None = None,
                      on_first_batch: Callable[[FirstBatch], None] | None = None
                      ) -> RenderResult:
    """Render `options.grid` for every candidate into `options.out`. `on_first_batch` is
    told each pipeline's first batch as soon as it is drawn (the CLI's estimate of the rest)."""
    start = time.perf_counter()
    grid = options.grid
    families: dict[str, list[RenderCandidate]] = {}
    for cand in candidates:
        families.setdefault(cand.layout.family, []).append(cand)
    # every setting is checked before any pipeline is built: bad input fails at once
    check_device(options.device)
    samplings = {family: resolve_sampling(options.preset, family, grid.steps, grid.guidance,
                                          options.steps, options.guidance, options.scheduler,
                                          options.lora, options.lora_scale)
                 for family in families}
    _check_lora_scale(options, samplings)
    loras = {family: _preset_lora(sampling, resolver, family)
             for family, sampling in samplings.items()}
    parts = read_parts(options.text_encoders, options.vae, resolver)
    unused = check_used(parts, families)
    # refused now, nothing touched, when --out holds files and no --overwrite, or a file
    # the run would replace that a render did not write
    folder = OutputFolder.check(options.out, planned_outputs(candidates, options),
                                options.overwrite)
    # every architecture's tokenizers, configs and first candidate checked before the first
    # is rendered: a refusal for the second must not come after --out was made or emptied
    prepared: dict[str, tuple[PipelineParts, float, dict[str, Part]]] = {}
    for family, group in families.items():
        started = time.perf_counter()
        files = parts_for(family, parts)
        base = next((c for c in group if _complete(c, files)), group[0])
        prepared[family] = (prepare_pipeline(base.layout, options.config_dir, files),
                            time.perf_counter() - started, files)
    run = _Run(options, folder, len(candidates), progress, cancel or CancelToken(),
               len(families), on_first_batch)
    run.manifest.notes.extend(unused)
    try:
        for cand in candidates:
            if cand.path is not None:
                run.hashes.start(cand.path, cand.known_sha256)
            for path in cand.inputs.values():  # a recipe's: its manifest names them by hash
                run.hashes.start(path)
        for part in parts:
            run.hashes.start(part.path, part.known_sha256)
        for family, group in families.items():
            run.family(group, samplings[family], loras[family], *prepared.pop(family))
    finally:
        run.hashes.close()
    manifest = run.manifest
    order = [c.label for c in candidates]
    prompts = [p.name for p in grid.prompts]
    manifest.candidates.sort(key=lambda e: order.index(e.label))
    manifest.images.sort(key=lambda e: (order.index(e.candidate), prompts.index(e.prompt_name),
                                        grid.seeds.index(e.seed)))
    result = RenderResult(options.out, manifest, list(candidates), folder)
    manifest.sheets["contact"] = write_contact_sheet(result, grid)
    manifest.timings["total_s"] = round(time.perf_counter() - start, 3)
    folder.write_manifest(manifest)
    folder.sync()
    return result


def planned_outputs(candidates: list[RenderCandidate], options: RenderOptions) -> list[str]:
    """Every file the run writes, relative to --out: what it claims in its first manifest."""
    jobs = [(p.name, s) for p in options.grid.prompts for s in options.grid.seeds]
    names = [image_file(c.folder, prompt, seed) for c in candidates for prompt, seed in jobs]
    if options.command == "compare":
        names += [ab_file(prompt, seed) for prompt, seed in jobs] + [AB_SHEET]
    return [*names, CONTACT_SHEET, *([PAGE_NAME] if options.html else []), MANIFEST_NAME]


def _check_lora_scale(options: RenderOptions, samplings: dict[str, Sampling]) -> None:
    """A --lora-scale with no LoRA fused anywhere would change nothing, and the images (and
    their PNG info) would say nothing of it: refused, as --set without a recipe is. A preset
    that brings its own LoRA (lcm, lightning, hyper) takes the scale."""
    if options.lora_scale is None or any(s.lora_ref for s in samplings.values()):
        return
    scale = f"--lora-scale {options.lora_scale:g}"
    if options.lora == "none":
        raise UserError(f"{scale}: --lora none fuses no LoRA, so there is nothing to scale; "
                        "leave one of the two out")
    raise UserError(f"{scale}: --preset {options.preset.name} fuses no LoRA here, so there is "
                    "nothing to scale; give --lora with a LoRA file or catalog name, or a "
                    "preset that brings one (lcm, lightning-N, hyper-N)")


def _preset_lora(sampling: Sampling, resolver: Resolver | None, family: str
                 ) -> ResolvedModel | None:
    if sampling.lora_ref is None:
        return None
    advice = "; or give --lora PATH, or --lora none for candidates that have it merged in"
    found = resolve_file(sampling.lora_ref, resolver, "--lora", advice)
    check_lora(Path(found.path), family)
    return found


class _Run:
    """One render: the options, the file hashes, the manifest being filled, progress."""

    def __init__(self, options: RenderOptions, folder: OutputFolder, candidates: int,
                 progress: ProgressCallback, cancel: CancelToken, families: int = 1,
                 on_first_batch: Callable[[FirstBatch], None] | None = None):
        grid = options.grid
        self.options = options
        self.folder = folder
        self.hashes = _Hashes()
        self.manifest = Manifest(f"mergekit-sd {__version__}", options.command, {
            "name": grid.name, "path": str(grid.path), "seeds": list(grid.seeds),
            "prompts": [{"name": p.name, "text": p.text, "negative": p.negative}
                        for p in grid.prompts]}, options.device)
        self.jobs = [Job(p, s) for p in grid.prompts for s in grid.seeds]
        self.total = candidates * len(self.jobs)
        self.done = 0
        self.progress = progress
        self.cancel = cancel
        self.families = families
        self.on_first_batch = on_first_batch
        self.family_left = 0  # images the current pipeline still draws
        self.measured = False  # its first batch has been told

    def family(self, group: list[RenderCandidate], sampling: Sampling,
               lora_file: ResolvedModel | None, prepared: PipelineParts,
               prepare_s: float, parts: dict[str, Part]) -> None:
        """Build the architecture's pipeline from the candidate `prepared` was checked for
        (its first that is complete with the separate component files `parts`), then render
        every candidate of the group through it."""
        options = self.options
        base = next(c for c in group if c.layout is prepared.layout)
        started = time.perf_counter()
        rp = build_pipeline(base.layout, path=base.path,
                            tensors=None if base.path else base.tensors(options.device),
                            device=options.device, dtype=options.dtype,
                            config_dir=options.config_dir, files=prepared.files,
                            prepared=prepared)
        lora = None
        if lora_file is not None:
            self.hashes.start(lora_file.path, lora_file.sha256)
            rp.fuse_lora(lora_file.path, sampling.lora_scale, Path(lora_file.path).stem)
            lora = {"ref": sampling.lora_ref, "path": str(lora_file.path),
                    "sha256": self.hashes.get(lora_file.path), "scale": sampling.lora_scale}
        rp.pipe.scheduler = make_scheduler(sampling.scheduler,
                                           scheduler_config(rp.family, rp.variant))
        _sync(options.device)
        build_s = prepare_s + time.perf_counter() - started
        # --out is created (and a previous run's files removed) only now: reading the first
        # candidate's weights into the first pipeline is the last refusal
        self.folder.open(self.manifest)
        self.manifest.notes.extend(n for n in cut_prompts(rp, options.grid.prompts)
                                   if n not in self.manifest.notes)
        width, height = options.size or options.grid.size_for(rp.family)
        settings = Settings(width, height, sampling.steps, sampling.guidance)
        batch = options.batch or auto_batch(rp, settings, len(self.jobs))
        self.family_left, self.measured = len(group) * len(self.jobs), False
        # a component file serves every candidate lacking that component, the base included
        used = {c: p for c, p in parts.items() if any(c not in g.layout.maps for g in group)}
        entry = PipelineEntry(
            rp.family, base.label, round(build_s, 3), str(rp.dtype).removeprefix("torch."),
            sampling.preset, sampling.scheduler, sampling.steps, sampling.guidance, lora, batch,
            {c: {"option": p.option, "ref": p.ref, "path": str(p.path.resolve()),
                 "model": p.model, "sha256": None} for c, p in used.items()})
        self.manifest.pipelines.append(entry)
        with _threads_for(rp):
            defaults = {**dict.fromkeys(base.layout.maps, base), **used}
            held = {**defaults, **dict.fromkeys(base.layout.maps, base)}
            for cand in _render_order(base, group):
                self.cancel.raise_if_cancelled()
                load_s = build_s
                if cand is not base:
                    started = time.perf_counter()
                    self._swap_in(rp, base, cand, held, defaults)
                    _sync(options.device)
                    load_s = time.perf_counter() - started
                started = time.perf_counter()
                images = self.grid(rp, cand, settings, batch, sampling, lora)
                if cand.recipe is not None:
                    cand.recipe["input_sha256"] = {name: self.hashes.get(path)
                                                   for name, path in cand.inputs.items()}
                self.manifest.candidates.append(CandidateEntry(
                    cand.label, cand.ref, rp.family, str(cand.path) if cand.path else None,
                    self.hashes.get(cand.path), cand.recipe, round(load_s, 3),
                    round(time.perf_counter() - started, 3), images,
                    {component: held[component].label for component in sorted(held)}))
        for part in used.values():  # hashed alongside rendering; waited for only now
            entry.parts[part.component(rp.family)]["sha256"] = self.hashes.get(part.path)

    def _swap_in(self, rp: RenderPipeline, base: RenderCandidate, cand: RenderCandidate,
                 held: dict[str, RenderCandidate | Part],
                 defaults: dict[str, RenderCandidate | Part]) -> None:
        """Copy `cand` in. A candidate lacking components (a UNet alone) renders with those
        of the component files given, else the base checkpoint's, never with those of
        whichever candidate came before it: they are copied back first when another
        candidate replaced them."""
        device = self.options.device
        stale = [c for c in held if c not in cand.layout.maps and held[c] is not defaults[c]]
        if any(defaults[c] is base for c in stale):
            rp.load(base.layout, path=base.path,
                    tensors=None if base.path else base.tensors(device))
            held.update(dict.fromkeys(base.layout.maps, base))
        for c in held:
            part = defaults[c]
            if c not in cand.layout.maps and held[c] is not part and isinstance(part, Part):
                rp.load(part.layout(rp.family), path=part.path)
                held[c] = part
        rp.load(cand.layout, path=cand.path,
                tensors=None if cand.path else cand.tensors(device))
        held.update(dict.fromkeys(cand.layout.maps, cand))

    def grid(self, rp: RenderPipeline, cand: RenderCandidate, settings: Settings, batch: int,
             sampling: Sampling, lora: dict | None) -> int:
        """Every (prompt, seed) of the grid for the candidate now in the pipeline."""
        encoded: dict = {}
        for first in range(0, len(self.jobs), batch):
            self.cancel.raise_if_cancelled()
            chunk = self.jobs[first:first + batch]
            started = time.perf_counter()
            images = render_batch(rp, chunk, settings, encoded)
            seconds = (time.perf_counter() - started) / len(chunk)
            sha256 = self.hashes.get(cand.path)
            for job, image in zip(chunk, images, strict=True):
                file = image_file(cand.folder, job.prompt.name, job.seed)
                text = _infotext(job, cand.label, sha256, settings, sampling, lora)
                self.folder.write(file, png_bytes(image, text))
                self.manifest.images.append(ImageEntry(
                    file, cand.label, cand.ref, sha256, cand.recipe,
                    job.prompt.name, job.prompt.text, job.prompt.negative, job.seed,
                    sampling.preset, sampling.scheduler, settings.steps, settings.guidance,
                    settings.width, settings.height, self.options.device,
                    lora["ref"] if lora else None, round(seconds, 4)))
                self.done += 1
                self.progress("rendering", self.done, self.total)
            # the batch's images made durable, then listed: a run stopped later leaves a
            # manifest naming every complete image it wrote
            self.folder.sync(str(Path(file).parent))
            self.folder.write_manifest(self.manifest)
            self.family_left -= len(chunk)
            if not self.measured:
                self.measured = True
                self._first_batch(rp.family, settings, sampling, len(chunk), seconds)
        return len(self.jobs)

    def _first_batch(self, family: str, settings: Settings, sampling: Sampling, images: int,
                     seconds: float) -> None:
        """The pipeline's first batch is drawn: what it took, and what is left after it."""
        if self.on_first_batch is None:
            return
        self.on_first_batch(FirstBatch(
            family, self.options.device, images, seconds, self.family_left,
            self.total - self.done - self.family_left, self.families, self.options.grid.name,
            settings.width, settings.height, settings.steps, sampling.preset))


def _complete(cand: RenderCandidate, parts: dict[str, Part]) -> bool:
    """Whether a pipeline can be built from the candidate plus the component files."""
    return all(c in cand.layout.maps or c in parts
               for c in required_components(cand.layout.family))


def _infotext(job: Job, label: str, sha256: str | None, settings: Settings,
              sampling: Sampling, lora: dict | None) -> str:
    """The PNG's `parameters` text, as AUTOMATIC1111 writes it for the same settings.

    A fused LoRA is written the way A1111 records one: `<lora:NAME:SCALE>` in the prompt and
    its hash under `Lora hashes`. A1111 takes a LoRA's weight only from that prompt tag (a
    field of our own would be shown and ignored), and its "Send to txt2img" turns the tag
    back into the same LoRA at the same weight, on the UNet and the text encoders as our fuse
    does; the tag is never encoded, A1111 removes it from the prompt too. Trailing timesteps
    are A1111's `Schedule type: SGM Uniform` (1.9+), so `euler_trailing` is not read back as
    plain Euler. Nothing in the text varies between runs: the same settings, the same bytes."""
    prompt = job.prompt.text
    name = None
    if lora:
        name = Path(lora["path"]).stem
        prompt = f"{prompt} <lora:{name}:{lora['scale']:g}>"
    return a1111_parameters(prompt, job.prompt.negative, {
        "Steps": settings.steps, "Sampler": sampling.sampler_label,
        "Schedule type": sampling.schedule_type, "CFG scale": settings.guidance,
        "Seed": job.seed, "Size": f"{settings.width}x{settings.height}",
        "Model hash": sha256[:10] if sha256 else None, "Model": label,
        "Lora hashes": f"{name}: {lora['sha256'][:12]}" if lora else None,
        "Preset": sampling.preset, "Version": f"mergekit-sd {__version__}"})


def _render_order(base: RenderCandidate, group: list[RenderCandidate]) -> list[RenderCandidate]:
    """The base first, then candidates lacking components (which keep the base's), then the
    other full ones: partial candidates then never need the base's weights copied back."""
    others = [c for c in group if c is not base]
    return [base, *(c for c in others if not c.layout.is_full),
            *(c for c in others if c.layout.is_full)]


def write_contact_sheet(result: RenderResult, grid: LoadedGrid) -> str:
    """Rows: prompt and seed; columns: candidates. Returns the file name."""
    from PIL import Image

    from mergekit_sd.render.sheets import CELL, grid_sheet

    rows, cells = [], {}
    labels = [c.label for c in result.candidates]
    for prompt in grid.prompts:
        for seed in grid.seeds:
            rows.append(f"{prompt.name}\nseed {seed}")
            for column, label in enumerate(labels):
                with Image.open(result.image_file(label, prompt.name, seed)) as image:
                    thumb = image.convert("RGB")
                thumb.thumbnail((CELL, CELL))
                cells[(len(rows) - 1, column)] = thumb
    title = (f"{grid.name}: {len(grid.prompts)} prompts x {len(grid.seeds)} seeds, "
             f"{len(labels)} candidates")
    sheet = grid_sheet(title, rows, labels, cells)
    result.folder.write(CONTACT_SHEET, png_bytes(sheet))
    return CONTACT_SHEET
