"""The content service's config: sharing limits and how pulls run."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocols.content import DEFAULT_CHUNK, MAX_CHUNK, MIN_CHUNK
from protocols.errors import ConfigError

from .blob import BlobLimits
from .pull import PullConfig


@dataclass(frozen=True, slots=True)
class ContentConfig:
    upload_rate: float = 0.0  # bytes a second over all uploads (0: no cap); --upload-rate
    max_uploads: int = 8  # blob streams served at once; --max-uploads
    chunk_size: int = DEFAULT_CHUNK  # of the manifests this node makes; --chunk-size
    share_models: bool = True  # share the files of the models served here
    pull: PullConfig = field(default_factory=PullConfig)
    pull_timeout_s: float = 3600.0  # a pull gives up (the partial dir stays for a resume)
    find_every_s: float = 2.0  # providers looked for again while none is known

    def __post_init__(self) -> None:
        if not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK:
            raise ConfigError(f"chunk_size must be {MIN_CHUNK} to {MAX_CHUNK} bytes")
        if self.pull_timeout_s <= 0 or self.find_every_s <= 0:
            raise ConfigError("content pull times must be positive")
        BlobLimits(self.upload_rate, self.max_uploads)  # checks them

    @property
    def limits(self) -> BlobLimits:
        return BlobLimits(self.upload_rate, self.max_uploads)
