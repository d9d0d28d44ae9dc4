"""What this machine compiled must run on every machine CI may use.

Native code built here (llama.cpp inside llama-cpp-python, fastecdsa for libp2p)
is the risk: a build tuned to the build machine's CPU died on an Intel Xeon with
AMX at its first decode (``ldtilecfg``), and AVX-512 code would die on an AMD
EPYC without it. Every extension in the venv that was built locally (a wheel
tagged plain ``linux_*``, not ``manylinux``) is read with objdump and must hold
no AMX tile and no AVX-512 instruction. Reading the code, not running it, makes
this the same check on AMD and Intel machines alike.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import sysconfig
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _check_llama() -> object:
    spec = importlib.util.spec_from_file_location("check_llama", SCRIPTS / "check_llama.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _check_llama()


def _locally_built() -> dict[str, list[Path]]:
    """Shared libraries of each locally built distribution in this environment."""
    site = Path(sysconfig.get_paths()["platlib"])
    found: dict[str, list[Path]] = {}
    for wheel in site.glob("*.dist-info/WHEEL"):
        tags = [line for line in wheel.read_text().splitlines() if line.startswith("Tag:")]
        if not tags or any("manylinux" in t or "-any" in t or "musllinux" in t for t in tags):
            continue
        record = wheel.parent / "RECORD"
        files = [line.split(",")[0] for line in record.read_text().splitlines()]
        libs = [site / f for f in files if ".so" in Path(f).name and (site / f).is_file()]
        # A wheel holds each library several times (libx.so, libx.so.0, libx.so.0.25):
        # read each content once.
        unique = {hashlib.sha256(lib.read_bytes()).digest(): lib for lib in libs}
        if unique:
            found[wheel.parent.name] = sorted(unique.values())
    return found


def test_the_forbidden_pattern_finds_tile_and_avx512_code() -> None:
    """The check itself: the pattern matches what a native AMX/AVX-512 build holds."""
    listing = "\n".join(
        [
            "  401000:\tldtilecfg (%rax)",
            "  401005:\ttileloadd (%rsi,%rdx,1),%tmm0",
            "  40100b:\tvfmadd231ps %zmm1,%zmm2,%zmm3",
            "  401011:\tvfmadd231ps %ymm1,%ymm2,%ymm3",  # AVX2: allowed
        ]
    )
    names = [m.group(0) for m in check.FORBIDDEN.finditer(listing)]  # type: ignore[attr-defined]
    assert names == ["ldtilecfg", "tileloadd", "%zmm1", "%zmm2", "%zmm3"]


@pytest.mark.skipif(sys.platform != "linux", reason="objdump checks of ELF libraries")
def test_locally_built_libraries_hold_no_tile_or_avx512_code() -> None:
    built = _locally_built()
    # llama-cpp-python is always built here (scripts/build_llama); finding none means
    # this test looked in the wrong place, not that there is nothing to check.
    assert any(name.startswith("llama_cpp_python") for name in built), sorted(built)
    bad = {}
    for dist, libs in built.items():
        for lib in libs:
            counts = check.forbidden_instructions(lib)  # type: ignore[attr-defined]
            if counts:
                bad[f"{dist}: {lib.name}"] = counts
    print({dist: [lib.name for lib in libs] for dist, libs in built.items()})
    assert not bad, f"non-portable code in locally built libraries: {bad}"
