"""Every node a gateway: OpenAI-compatible (chat, completions, embeddings, Responses),
Anthropic Messages, Ollama and KServe v2 HTTP into the swarm."""

from .app import Backend, swarm_models
from .config import GatewayConfig
from .server import Gateway, build_app

__all__ = ["Backend", "Gateway", "GatewayConfig", "build_app", "swarm_models"]
