"""``swarm models pull NAME|CONTENT_ID`` and ``swarm models share PATH``.

pull: the running daemon's view (or ``--peer``'s) names who shares what; this
command pulls from those peers itself, with the data dir's client identity,
into the data dir's models dir, where the daemon finds it: a model declared
``content=ID`` then loads from disk without a pull. share: the path's manifest
is made now (its content id printed) and the path declared in the data dir;
the daemon shares it from its next start.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from node.content.progress import ProgressDisplay
from node.content.pull import Puller
from node.content.shares import declare_share, dir_files, share_of
from node.data_dir import CLIENT_KEY
from protocols.content import BadContentId, cid_text, parse_cid
from protocols.errors import ConfigError
from runners.base import CONTENT_DIR


def resolve(target: str, body: Mapping[str, Any]) -> tuple[bytes, str]:
    """(content id, model name or "") for a content id or a model's name."""
    try:
        return parse_cid(target), ""
    except BadContentId:
        pass
    wanted = target.lower()
    for model in body.get("models", []):
        if str(model.get("name", "")).lower() == wanted and model.get("content"):
            return parse_cid(str(model["content"])), str(model["name"])
    for peer in body.get("view", {}).get("peers", []):
        content = peer.get("model_content") or {}
        for name, cid in content.items():
            if name.lower() == wanted:
                return parse_cid(cid), name
    raise ConfigError(f"no peer in view shares a model named {target!r}; give its content id")


def providers(body: Mapping[str, Any], cid: str) -> list[tuple[str, list[str]]]:
    """Linked peers whose records share ``cid``, with their addresses."""
    out = []
    for peer in body.get("view", {}).get("peers", []):
        if peer.get("status") == "linked" and cid in (peer.get("content") or []):
            out.append((str(peer["peer_id"]), [str(a) for a in peer.get("addrs", [])]))
    return out


async def pull(args: argparse.Namespace, body: Mapping[str, Any], as_json: bool) -> dict[str, Any]:
    from bootstrap.addrs import peer_info
    from node.net.host import load_or_create_identity, running_host

    from . import config_file

    content_id, name = resolve(args.target, body)
    cid = cid_text(content_id)
    found = providers(body, cid)
    if not found:
        raise ConfigError(f"no linked peer shares {cid}")
    data_dir = args.data_dir.expanduser()
    root = data_dir / "models" / CONTENT_DIR
    key_pair = load_or_create_identity(data_dir / CLIENT_KEY)
    swarm_key = config_file.swarm_key_or_default(args.swarm_key, args.data_dir)
    display = ProgressDisplay(sys.stderr)
    async with running_host(key_pair, (), psk=swarm_key) as host:
        reached = []
        for peer_id, addrs in found:
            for addr in addrs:
                with trio.move_on_after(10):
                    try:
                        await host.connect(peer_info(f"{addr}/p2p/{peer_id}"))
                    except Exception:
                        continue
                    reached.append(peer_id)
                    break
        puller = Puller(host, content_id, root, on_progress=None if as_json else display)
        path = await puller.run(reached)
    return {"content": cid, "model": name or None, "path": str(path), **puller.progress.describe()}


async def share(args: argparse.Namespace) -> dict[str, Any]:
    return await trio.to_thread.run_sync(_share, Path(args.target), args.data_dir)


def _share(target: Path, data_dir: Path) -> dict[str, Any]:
    path, data_dir = target.expanduser().resolve(), data_dir.expanduser()
    files = dir_files(path)
    if not files:
        raise ConfigError(f"nothing to share at {path}")
    made = share_of(files, data_dir / CONTENT_DIR / "index", str(path))
    declare_share(data_dir / CONTENT_DIR, path)
    return {
        "content": made.manifest.cid,
        "path": str(path),
        "files": len(made.manifest.files),
        "size": made.manifest.total_size,
        "note": "the daemon of this data dir shares it from its next start",
    }
