"""Settings of the remote clients (Civitai, downloads, network): environment first, then a file.

The file is TOML, at `$MERGEKIT_SD_CONFIG` or `config.toml` in the user config folder:

    [civitai]
    token = "..."             # or $CIVITAI_API_TOKEN; sent only to the Civitai host below
    base_url = "..."          # or $CIVITAI_BASE_URL (a mirror); default: Civitai itself
    nsfw_previews = false     # save previews rated above PG-13 only when true

    [downloads]
    root = "~/stable-diffusion-webui"   # or $MERGEKIT_SD_DOWNLOADS: where pulls land without --to
    parallel = 3                        # files downloaded at once

    [network]
    attempts = 5              # tries per request on 429, 5xx and dropped connections
    backoff = 1.0             # seconds; the n-th retry waits a random time up to backoff * 2**n
    max_backoff = 60.0        # longest wait, also for a server's Retry-After
    timeout = 60.0            # seconds without a byte before a connection counts as dropped

Hugging Face settings stay huggingface_hub's own: HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sd.errors import UserError

CONFIG_ENV = "MERGEKIT_SD_CONFIG"
CIVITAI_TOKEN_ENV = "CIVITAI_API_TOKEN"
CIVITAI_BASE_ENV = "CIVITAI_BASE_URL"
DOWNLOADS_ENV = "MERGEKIT_SD_DOWNLOADS"
DEFAULT_CIVITAI_BASE = "https://civitai.com"


@dataclass(frozen=True)
class NetworkSettings:
    attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    timeout: float = 60.0


@dataclass(frozen=True)
class RemoteSettings:
    civitai_base_url: str = DEFAULT_CIVITAI_BASE
    # repr=False: settings get printed in debugging sessions; the token must never be
    civitai_token: str | None = field(default=None, repr=False)
    nsfw_previews: bool = False
    download_root: Path | None = None
    parallel: int = 3
    network: NetworkSettings = field(default_factory=NetworkSettings)
    config_file: Path | None = None  # the file these came from, to name it in messages


def config_path() -> Path:
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("mergekit-sd", appauthor=False)) / "config.toml"


def load_settings(path: Path | None = None) -> RemoteSettings:
    """The settings in force now: environment variables win over the file's values."""
    path = path or config_path()
    doc = _read(path)
    civitai = _section(doc, "civitai", path)
    downloads = _section(doc, "downloads", path)
    network = _section(doc, "network", path)
    root = os.environ.get(DOWNLOADS_ENV) or _get(downloads, "root", str, path)
    return RemoteSettings(
        civitai_base_url=(os.environ.get(CIVITAI_BASE_ENV)
                          or _get(civitai, "base_url", str, path)
                          or DEFAULT_CIVITAI_BASE).rstrip("/"),
        civitai_token=(os.environ.get(CIVITAI_TOKEN_ENV) or _get(civitai, "token", str, path)
                       or None),
        nsfw_previews=bool(_get(civitai, "nsfw_previews", bool, path)),
        download_root=Path(root).expanduser() if root else None,
        parallel=max(1, _get(downloads, "parallel", int, path) or 3),
        network=NetworkSettings(
            attempts=max(1, _get(network, "attempts", int, path) or 5),
            backoff=_number(network, "backoff", 1.0, path),
            max_backoff=_number(network, "max_backoff", 60.0, path),
            timeout=_number(network, "timeout", 60.0, path),
        ),
        config_file=path,
    )


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UserError(f"{path}: cannot read the config file ({exc.strerror}); fix its "
                        f"permissions or point {CONFIG_ENV} at another file") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc}); fix the file or move it away") from None


def _section(doc: dict, name: str, path: Path) -> dict:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise UserError(f"{path}: [{name}] must be a table of settings")
    return value


def _get(section: dict, key: str, kind: type, path: Path):
    value = section.get(key)
    if value is None:
        return None
    # bool is an int in Python; `parallel = true` is still a mistake worth naming
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = {int: "a whole number", str: "a quoted string", bool: "true or false"}[kind]
        raise UserError(f"{path}: {key} must be {what}, not {value!r}")
    return value


def _number(section: dict, key: str, default: float, path: Path) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UserError(f"{path}: {key} must be a number of seconds, not {value!r}")
    return float(value)
