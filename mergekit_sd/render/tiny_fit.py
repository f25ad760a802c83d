"""Make a diffusers UNet fit the shapes of a tiny test checkpoint.

Tiny checkpoints (mergekit_sd.testing.checkpoints, size="tiny") shrink every width by one rule,
d -> max(16, d // 64). Widths that real models get by adding others up therefore do not add up
in them: a skip connection joins 1280 + 640 channels into a layer taking 1920 (in a tiny file
20 + 16 channels into a layer taking 30), SDXL joins 768 + 1280 text features into a 2048-wide
context (16 + 20 into 32), and feed-forwards are not 4x their width (1280 -> 5120 becomes
20 -> 80, but 320 -> 1280 becomes 16 -> 20). Such models cannot be built from a config, so the
few modules whose shapes differ are rebuilt with the file's shapes, and inputs that are too wide
keep their first channels (too narrow: padded with zeros). Real checkpoints always add up and
never reach this code; the tiny ones render through the same pipeline code as they do.
"""

from __future__ import annotations

import math

from mergekit_sd.render.layout import CheckpointLayout


def fit_width(tensor, width: int):
    """`tensor` with its last dimension cut or zero-padded to `width`."""
    import torch

    have = tensor.shape[-1]
    if have == width:
        return tensor
    if have > width:
        return tensor[..., :width]
    pad = torch.zeros(*tensor.shape[:-1], width - have, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=-1)


def _fit_channels(module, args, kwargs):
    import torch

    x, *rest = args
    have, want = x.shape[1], module.in_channels
    if have > want:
        x = x[:, :want]
    elif have < want:
        pad = torch.zeros(x.shape[0], want - have, *x.shape[2:], dtype=x.dtype, device=x.device)
        x = torch.cat([x, pad], dim=1)
    return (x, *rest), kwargs


def fit_unet(unet, layout: CheckpointLayout) -> int:
    """Rebuild the UNet's modules whose shapes the file contradicts (under the caller's
    `empty_parameters`); returns how many were rebuilt."""
    from diffusers.models.attention import BasicTransformerBlock, FeedForward
    from diffusers.models.resnet import ResnetBlock2D

    rebuilt = 0
    for name, module in list(unet.named_modules()):
        if isinstance(module, ResnetBlock2D):
            file_in = layout.shape("unet", f"{name}.conv1.weight")[1]
            shortcut = layout.shape("unet", f"{name}.conv_shortcut.weight") is not None
            if file_in != module.in_channels or shortcut != (module.conv_shortcut is not None):
                _replace(unet, name, _resnet(module, file_in, shortcut))
                rebuilt += 1
        elif isinstance(module, BasicTransformerBlock):
            width, inner = layout.shape("unet", f"{name}.ff.net.2.weight")[:2]
            if inner != module.ff.net[-1].in_features:
                module.ff = FeedForward(width, inner_dim=inner, activation_fn="geglu")
                rebuilt += 1
    return rebuilt


def _resnet(old, in_channels: int, shortcut: bool):
    from diffusers.models.resnet import ResnetBlock2D

    new = ResnetBlock2D(in_channels=in_channels, out_channels=old.out_channels,
                        temb_channels=old.time_emb_proj.in_features,
                        groups=math.gcd(old.norm1.num_groups, in_channels),
                        groups_out=old.norm2.num_groups, eps=old.norm1.eps,
                        use_in_shortcut=shortcut)
    new.register_forward_pre_hook(_fit_channels, with_kwargs=True)
    return new


def _replace(root, name: str, module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
