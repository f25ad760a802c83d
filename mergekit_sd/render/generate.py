"""Render batches of (prompt, seed) jobs on a RenderPipeline, the same noise for every candidate.

Each job's initial latent is drawn on the CPU from a generator seeded with the job's seed (so it
is the same on every device and for every candidate, whatever the batch), and the same
generator then feeds the sampler's per-step noise (LCM, ancestral samplers). Prompts are encoded
one at a time and stacked, so a prompt's conditioning never depends on its batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergekit_sd.render.grids import Prompt
from mergekit_sd.render.pipelines import RenderPipeline, quiet_transformers
from mergekit_sd.render.tiny_fit import fit_width

# A rough allowance of activation memory per image and pixel (fp16/bf16, SDPA attention, the
# VAE decoding one image at a time) that `auto_batch` divides the device's free memory by; not
# measured here (no GPU was at hand), so it errs on the generous side.
_BYTES_PER_PIXEL = {"sd1": 1200, "sdxl": 1600, "sd3": 2400, "flux": 3200}
MAX_BATCH = 16
CPU_BATCH = 4  # beyond this a CPU gains nothing from batching and memory grows


@dataclass(frozen=True)
class Job:
    prompt: Prompt
    seed: int


@dataclass(frozen=True)
class Settings:
    width: int
    height: int
    steps: int
    guidance: float


def auto_batch(rp: RenderPipeline, settings: Settings, jobs: int) -> int:
    """As many images per batch as the device's free memory holds (at most MAX_BATCH)."""
    import torch

    if not rp.device.startswith("cuda"):
        return max(1, min(CPU_BATCH, jobs))
    free, _ = torch.cuda.mem_get_info(torch.device(rp.device))
    per_image = settings.width * settings.height * _BYTES_PER_PIXEL[rp.family]
    return max(1, min(MAX_BATCH, jobs, int(0.8 * free // per_image)))


def initial_noise(rp: RenderPipeline, seed: int, settings: Settings):
    """(latent, generator): the latent drawn first, the generator left for the sampler."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    scale = rp.pipe.vae_scale_factor
    channels = rp.modules["vae"].config.latent_channels
    height, width = settings.height // scale, settings.width // scale
    latent = torch.randn((1, channels, height, width), generator=generator,
                         dtype=torch.float32)
    if rp.family == "flux":  # FLUX takes 2x2 patches of the latent as a token sequence
        latent = rp.pipe._pack_latents(latent, 1, channels, height, width)
    return latent.to(rp.device, rp.dtype), generator


def _uses_cfg(rp: RenderPipeline, guidance: float) -> bool:
    """Classifier-free guidance (a negative pass): SD1/SDXL unless LCM-distilled, and SD3.
    FLUX.1 is guidance-distilled: its guidance is an input of the model, not a second pass."""
    if rp.family in ("sd1", "sdxl"):
        return guidance > 1 and rp.modules["unet"].config.time_cond_proj_dim is None
    return guidance > 1 and rp.family == "sd3"


def _encode_sd1(rp: RenderPipeline, prompt: Prompt, cfg: bool) -> dict:
    embeds, negative = rp.pipe.encode_prompt(prompt.text, rp.device, 1, cfg,
                                             negative_prompt=prompt.negative)
    return {"prompt_embeds": embeds, **({"negative_prompt_embeds": negative} if cfg else {})}


def _encode_sdxl(rp: RenderPipeline, prompt: Prompt, cfg: bool) -> dict:
    embeds, negative, pooled, negative_pooled = rp.pipe.encode_prompt(
        prompt=prompt.text, device=rp.device, num_images_per_prompt=1,
        do_classifier_free_guidance=cfg, negative_prompt=prompt.negative)
    out = {"prompt_embeds": fit_width(embeds, rp.context_width),
           "pooled_prompt_embeds": pooled}
    if cfg:
        out["negative_prompt_embeds"] = fit_width(negative, rp.context_width)
        out["negative_pooled_prompt_embeds"] = negative_pooled
    return out


def _encode_sd3(rp: RenderPipeline, prompt: Prompt, cfg: bool) -> dict:
    embeds, negative, pooled, negative_pooled = rp.pipe.encode_prompt(
        prompt=prompt.text, prompt_2=None, prompt_3=None, device=rp.device,
        num_images_per_prompt=1, do_classifier_free_guidance=cfg,
        negative_prompt=prompt.negative)
    out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if cfg:
        out.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    return out


def _encode_flux(rp: RenderPipeline, prompt: Prompt, cfg: bool) -> dict:
    # schnell was distilled with 256 T5 tokens, dev with 512
    length = 256 if rp.variant == "flux-schnell" else 512
    embeds, pooled, _ = rp.pipe.encode_prompt(prompt=prompt.text, prompt_2=None,
                                              device=rp.device, num_images_per_prompt=1,
                                              max_sequence_length=length)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


_ENCODERS = {"sd1": _encode_sd1, "sdxl": _encode_sdxl, "sd3": _encode_sd3,
             "flux": _encode_flux}


def encode(rp: RenderPipeline, prompt: Prompt, cfg: bool) -> dict:
    """The pipeline's conditioning keyword arguments for one prompt (batch of one). Quiet:
    the tokenizer warns of "indexing errors" for a long prompt it then truncates safely
    (`cut_prompts` says so in one line instead)."""
    with quiet_transformers():
        return _ENCODERS[rp.family](rp, prompt, cfg)


def cut_prompts(rp: RenderPipeline, prompts) -> list[str]:
    """A note for every prompt (or negative) longer than the first text encoder reads: it is
    cut, where AUTOMATIC1111 would encode it in chunks."""
    tokenizer = rp.pipe.tokenizer
    limit = tokenizer.model_max_length
    notes = []
    for prompt in prompts:
        for what, text in (("prompt", prompt.text), ("negative", prompt.negative)):
            if not text:
                continue
            with quiet_transformers():
                count = len(tokenizer(text).input_ids)
            if count > limit:
                notes.append(f"{what} {prompt.name}: {count} tokens, cut to the "
                             f"{limit} the text encoder reads")
    return notes


def render_batch(rp: RenderPipeline, jobs: list[Job], settings: Settings,
                 encoded: dict[Prompt, dict]) -> list:
    """PIL images for `jobs`, in order. `encoded` caches each prompt's conditioning for this
    candidate (callers clear it when the weights change); it is keyed by the whole prompt, not
    its name, so that prompts sharing a name can never share conditioning."""
    import torch

    cfg = _uses_cfg(rp, settings.guidance)
    for job in jobs:
        if job.prompt not in encoded:
            encoded[job.prompt] = encode(rp, job.prompt, cfg)
    conditioning = {name: torch.cat([encoded[j.prompt][name] for j in jobs])
                    for name in encoded[jobs[0].prompt]}
    latents, generators = zip(*(initial_noise(rp, j.seed, settings) for j in jobs),
                              strict=True)
    extra = {"guidance_scale": settings.guidance}
    result = rp.pipe(**conditioning, **extra, num_inference_steps=settings.steps,
                     height=settings.height, width=settings.width,
                     latents=torch.cat(latents), generator=list(generators),
                     output_type="pil")
    return list(result.images)
