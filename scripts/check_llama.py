"""Check the installed llama-cpp-python before the suite relies on it.

Two checks, each a reason for scripts/build_llama to throw the wheel away:

1. Its CPU library holds no AMX tile instructions and no AVX-512 (zmm) code, so it
   runs on every x86-64 machine CI may use (a native build on an Intel Xeon with AMX
   died at its first decode in ``ldtilecfg``; AMD EPYC before Zen 4 has no AVX-512).
   This check is the same on any machine: it reads the code, it does not run it.
2. The server it ships starts and answers one completion of SmolLM2-135M.

Run as ``python scripts/check_llama.py``; exits non-zero with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_server import ServerFailed, llama_server

# Instructions a portable x86-64-v3 build must not hold: AMX tile set-up and loads,
# and any use of a 512-bit register.
FORBIDDEN = re.compile(r"\b(ldtilecfg|tileloadd|tdpb\w+|tilezero|tilerelease)\b|%zmm\d+")


def cpu_libraries() -> list[Path]:
    """The ggml CPU libraries inside the installed llama_cpp package."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llama-cpp-python is not installed")
    root = Path(spec.submodule_search_locations[0])
    found = sorted(root.rglob("libggml-cpu*.so*"))
    if not found:
        raise SystemExit(f"no libggml-cpu library under {root}")
    return found


def forbidden_instructions(library: Path) -> dict[str, int]:
    """Counts of non-portable instructions in a shared library's code (objdump -d)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise SystemExit("objdump is missing (Debian: binutils)")
    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(library)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    counts: dict[str, int] = {}
    for match in FORBIDDEN.finditer(listing):
        name = "zmm" if match.group(0).startswith("%zmm") else match.group(0)
        counts[name] = counts.get(name, 0) + 1
    return counts


def answers_one_completion() -> str:
    """Start the server on loopback, ask for 4 greedy tokens; the text, or SystemExit."""
    body = json.dumps({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with llama_server(Path(tmp) / "server.log", "--n_ctx", "256") as url:
                request = urllib.request.Request(
                    f"{url}/v1/completions",
                    data=body.encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=60) as answer:
                    return str(json.load(answer)["choices"][0]["text"])
        except (ServerFailed, OSError, KeyError, ValueError) as exc:
            raise SystemExit(f"the llama server gave no completion: {exc}") from None


def main() -> None:
    for library in cpu_libraries():
        counts = forbidden_instructions(library)
        if counts:
            raise SystemExit(f"{library.name} is not portable: {counts}")
        print(f"check_llama: {library.name}: no AMX tile or AVX-512 instructions")
    text = answers_one_completion()
    print(f"check_llama: the server answered one completion: {text!r}")


if __name__ == "__main__":
    main()
