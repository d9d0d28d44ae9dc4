"""The node's content: what it shares, its blob server, and the pulls it runs.

The daemon hands each served model to ``share_model`` (its files get a
manifest, kept in the data dir, and the content id goes into the capability
record and the DHT) and each ``content=ID`` model to ``pull`` before loading
it. Providers come from ``find``: the daemon's merge of the peers whose
records list the content and the DHT's provider records for it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from node.net.access import AccessPolicy
from protocols.content import BadManifest, cid_text, describe
from protocols.errors import ConfigError
from runners.base import Runner

from .blob import BlobServer
from .config import ContentConfig
from .pull import Progress, Puller, PullFailed, pulled_manifest
from .shares import Share, Shares, declared_shares, dir_files, share_of

log = logging.getLogger(__name__)

Find = Callable[[bytes], Awaitable[list[str]]]


class ContentService:
    def __init__(
        self,
        host: Any,
        config: ContentConfig,
        *,
        content_dir: Path,
        root: Path,
        access: AccessPolicy | None = None,
        find: Find | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        """``content_dir``: the data dir's ``content/`` (manifests, declared shares);
        ``root``: where pulled content lies (the models dir's ``content/``)."""
        self.host = host
        self.config = config
        self.content_dir = content_dir
        self.root = root
        self.shares = Shares()
        self.server = BlobServer(self.shares, config.limits, access)
        self.models: dict[str, str] = {}  # served model name -> its content id (base58)
        self.pulls: dict[str, Progress] = {}  # content id -> the pull's progress
        self.find = find
        self._on_progress = on_progress

    @property
    def index_dir(self) -> Path:
        return self.content_dir / "index"

    def describe(self) -> dict[str, Any]:
        return {
            **self.server.describe(),
            "shares": [
                {**describe(s.manifest), "label": s.label, "files": len(s.manifest.files)}
                for s in self.shares.shares()
            ],
            "pulls": {cid: p.describe() for cid, p in self.pulls.items()},
        }

    def share_ids(self) -> list[str]:
        return [cid_text(c) for c in self.shares.ids()]

    async def share_model(self, runner: Runner) -> str | None:
        """Share the files ``runner`` is made of; its content id, or None when it has
        no files here (a remote model) or they do not read."""
        files = runner.files()
        name = runner.info.name
        if not self.config.share_models or not files:
            return None
        try:
            share = await trio.to_thread.run_sync(self._model_share, files, name)
        except (OSError, BadManifest) as exc:
            log.warning("model %s is not shared: %s", name, exc)
            return None
        cid = cid_text(self.shares.add(share))
        self.models[name] = cid
        log.info("model %s shared as content %s (%d bytes)", name, cid, share.manifest.total_size)
        return cid

    def _model_share(self, files: tuple[Path, ...], label: str) -> Share:
        # Pulled content is shared on as it was pulled, under the same id; a
        # model's own files are named by their file names.
        if files[0].is_relative_to(self.root) and len(files[0].relative_to(self.root).parts) > 1:
            cid = files[0].relative_to(self.root).parts[0]
            manifest = pulled_manifest(self.root, cid)
            if manifest is None:
                raise BadManifest(f"pulled content {cid} has no whole manifest")
            base = self.root / cid
            return Share(manifest, tuple(base / f.name for f in manifest.files), label)
        named = [(f.name, f) for f in files]
        return share_of(named, self.index_dir, label, self.config.chunk_size)

    def unshare_model(self, name: str) -> None:
        cid = self.models.pop(name, None)
        if cid is not None and cid not in self.models.values():
            self.shares.remove(next(c for c in self.shares.ids() if cid_text(c) == cid))

    async def share_path(self, path: Path) -> str:
        """Share a file or a directory's files (``swarm models share PATH``)."""
        files = await trio.to_thread.run_sync(dir_files, path)
        if not files:
            raise ConfigError(f"cannot share {path}: no files there")
        share = await trio.to_thread.run_sync(
            share_of, files, self.index_dir, str(path), self.config.chunk_size
        )
        return cid_text(self.shares.add(share))

    async def share_declared(self) -> None:
        """The paths ``swarm models share`` declared in this data dir."""
        for text in declared_shares(self.content_dir):
            try:
                cid = await self.share_path(Path(text))
            except (OSError, BadManifest, ConfigError) as exc:
                log.warning("declared share %s is not shared: %s", text, exc)
            else:
                log.info("sharing %s as content %s", text, cid)

    async def pull(self, content_id: bytes) -> Path:
        """Fetch ``content_id`` into ``root`` from the providers ``find`` names, looking
        again while there are none or the ones there were could not finish it; the
        content's dir. PullFailed after ``pull_timeout_s``."""
        puller = Puller(
            self.host, content_id, self.root, self.config.pull, on_progress=self._on_progress
        )
        self.pulls[puller.progress.content] = puller.progress
        last: Exception | None = None
        with trio.move_on_after(self.config.pull_timeout_s):
            while True:
                providers = await self.find(content_id) if self.find is not None else []
                providers = [p for p in providers if p not in puller.progress.struck]
                if providers:
                    try:
                        return await puller.run(providers)
                    except PullFailed as exc:
                        last = exc
                        log.info(
                            "pull %s: %s; looking for providers again", cid_text(content_id), exc
                        )
                await trio.sleep(self.config.find_every_s)
        raise PullFailed(
            f"{cid_text(content_id)}: not pulled in {self.config.pull_timeout_s:g} s"
            + (f": {last}" if last else ": no provider found")
        )
