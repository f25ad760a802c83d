"""Settings, environments and model bytes for tests that talk to the fake services."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

from catalog.config import NetworkSettings, RemoteSettings

# retries as the real defaults do them, only faster: a test waits milliseconds, not seconds
FAST_NETWORK = NetworkSettings(attempts=4, backoff=0.001, max_backoff=0.01, timeout=5.0)


def settings_for(civitai_url: str, token: str | None = None, **fields) -> RemoteSettings:
    network = fields.pop("network", FAST_NETWORK)
    return RemoteSettings(civitai_base_url=civitai_url, civitai_token=token, network=network,
                          **fields)


def write_config(path: Path, civitai_url: str, token: str | None = None,
                 nsfw_previews: bool = False) -> Path:
    """A config file as a user would write one, with the fast network settings."""
    lines = ["[civitai]", f'base_url = "{civitai_url}"',
             f"nsfw_previews = {'true' if nsfw_previews else 'false'}"]
    if token:
        lines.append(f'token = "{token}"')
    lines += ["", "[network]", f"attempts = {FAST_NETWORK.attempts}",
              f"backoff = {FAST_NETWORK.backoff}", f"max_backoff = {FAST_NETWORK.max_backoff}",
              f"timeout = {FAST_NETWORK.timeout}"]
    path.write_text("\n".join(lines) + "\n")
    return path


# what a developer's shell may have set that must not leak into a test's subprocess
_USER_VARS = ("CIVITAI_API_TOKEN", "CIVITAI_BASE_URL", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
              "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
              "MERGEKIT_SD_DOWNLOADS")


def cli_env(tmp: Path, civitai_url: str | None = None, hub_url: str | None = None,
            token: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a `mergekit-sd` subprocess that reaches only the fakes."""
    env = {k: v for k, v in os.environ.items() if k not in _USER_VARS}
    env["MERGEKIT_SD_CONFIG"] = str(write_config(tmp / "config.toml",
                                                 civitai_url or "http://127.0.0.1:9"))
    env["HF_HOME"] = str(tmp / "hf-home")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if hub_url:
        env["HF_ENDPOINT"] = hub_url
    if token:
        env["CIVITAI_API_TOKEN"] = token
    env.update(extra)
    return env


def big_safetensors(size_mib: int, seed: int = 0) -> bytes:
    """A valid safetensors file of about `size_mib` MiB: one F32 tensor of random bytes."""
    count = size_mib * 1024 * 1024 // 4
    header = json.dumps({"weight": {"dtype": "F32", "shape": [count],
                                    "data_offsets": [0, count * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + random.Random(seed).randbytes(count * 4)
