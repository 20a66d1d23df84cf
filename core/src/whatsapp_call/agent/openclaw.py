"""OpenClaw integration: our block in OpenClaw's config and the MCP server entry that gives
OpenClaw's agents the `whatsapp_call` tool.

OpenClaw keeps its settings in `~/.openclaw/openclaw.json` (JSON5). We own two places in it:
`channels.whatsappcall` (our options, the keys OpenClaw's own whatsapp-call plugin used) and
`mcp.servers.whatsapp-call`, an OpenClaw-managed stdio MCP server (`command` + `args` +
optional `env`, the shape `openclaw mcp set` writes) that runs `whatsapp-call mcp` with this
same config file. Everything else in the file is kept as it is; the file is rewritten as
plain JSON (valid JSON5), so comments survive only in the timestamped backup written first.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import json5

from ..config import CHANNEL_KEYS, OPENCLAW_CONFIG
from ..errors import ConfigError

MCP_SERVER_NAME = "whatsapp-call"
CHANNEL_KEY = CHANNEL_KEYS[0]  # "whatsappcall"


def default_path() -> Path:
    return Path(os.path.expanduser(str(OPENCLAW_CONFIG)))


def read_openclaw_config(path: Path) -> dict[str, Any]:
    """The whole OpenClaw config ({} when the file does not exist yet). A file that is not
    valid JSON5 is reported, never replaced: it holds the user's other settings."""
    if not path.exists():
        return {}
    try:
        data = json5.loads(path.read_text(encoding="utf-8") or "{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{path} is not valid JSON5 ({exc}); nothing was written.",
            "Fix the file (openclaw doctor shows the problem) or move it away, then run "
            "whatsapp-call setup --openclaw again.",
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} does not hold a JSON object at the top level; nothing was written.",
            "Fix the file or move it away, then run whatsapp-call setup --openclaw again.",
        )
    return data


def channel_key(config: dict[str, Any]) -> str:
    """The key our block lives under: an existing alias (wacall, …) or "whatsappcall"."""
    channels = config.get("channels")
    if isinstance(channels, dict):
        for key in CHANNEL_KEYS:
            if isinstance(channels.get(key), dict):
                return key
    return CHANNEL_KEY


def channel_block(config: dict[str, Any]) -> dict[str, Any]:
    channels = config.get("channels")
    if isinstance(channels, dict):
        block = channels.get(channel_key(config))
        if isinstance(block, dict):
            return dict(block)
    return {}


def whatsapp_call_command() -> str:
    """Absolute path of our CLI: agent hosts started by launchd/systemd have a short PATH."""
    beside = Path(sys.executable).with_name("whatsapp-call")
    if beside.exists():
        return str(beside)
    return shutil.which("whatsapp-call") or "whatsapp-call"


def mcp_server_entry(
    config_path: Path,
    *,
    service_url: str | None = None,
    command: str | None = None,
    own_config: bool = False,
) -> dict[str, Any]:
    """OpenClaw's stdio MCP server entry for our tool, reading its options from OpenClaw's
    config at `config_path` (or, with `own_config`, from our YAML file there). The path is
    explicit because `--openclaw` takes an optional value (`--openclaw mcp` would read "mcp"
    as the path). `service_url` makes the MCP process a thin client of a running
    `whatsapp-call serve`."""
    option = "-c" if own_config else "--openclaw"
    entry: dict[str, Any] = {
        "command": command or whatsapp_call_command(),
        "args": [option, str(config_path), "mcp"],
    }
    if service_url:
        entry["env"] = {"WHATSAPP_CALL_SERVICE_URL": service_url}
    return entry


def with_mcp_entry(config: dict[str, Any], mcp_entry: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` with our MCP server entry set, all else kept."""
    out = copy.deepcopy(config)
    mcp = out.get("mcp")
    if not isinstance(mcp, dict):
        mcp = out["mcp"] = {}
    servers = mcp.get("servers")
    if not isinstance(servers, dict):
        servers = mcp["servers"] = {}
    servers[MCP_SERVER_NAME] = dict(mcp_entry)
    return out


def updated_config(
    config: dict[str, Any], block: dict[str, Any], mcp_entry: dict[str, Any]
) -> dict[str, Any]:
    """A copy of `config` with our channel block and MCP server entry set, all else kept."""
    out = with_mcp_entry(config, mcp_entry)
    key = channel_key(out)
    channels = out.get("channels")
    if not isinstance(channels, dict):
        channels = out["channels"] = {}
    channels[key] = dict(block)
    return out


def backup(path: Path) -> Path | None:
    """Copy `path` to `path.<timestamp>.bak` (mode 600) before it is changed."""
    if not path.exists():
        return None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{stamp}.bak")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{stamp}-{n}.bak")
        n += 1
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(path.read_bytes())
    return target


def write_private(path: Path, text: str) -> None:
    """Write atomically (temp file + rename) with mode 600: the file holds secrets."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    path.chmod(0o600)


def write_openclaw_config(path: Path, config: dict[str, Any]) -> Path | None:
    """Back up the current file, then write `config`; returns the backup's path."""
    saved = backup(path)
    write_private(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return saved
