"""A command imports what it uses: ``swarm --help`` and a usage error cost argparse,
not libp2p, torch or OpenVINO (issue 11: 1.1 s for a help text). Each check runs
``python -m node.cli`` in a child, the way a user runs it, and reads the modules
it imported from ``-X importtime``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from node.defaults import REACHABILITY, STRATEGIES
from node.jobs.router import Strategy
from node.reach.config import Mode

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("libp2p", "torch", "openvino", "transformers", "numpy", "trio", "rich", "msgpack")


def imported(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime -m node.cli ARGS``; its result and every module it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "node.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=60,
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return done, modules


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_help_imports_only_the_standard_library_and_the_parser() -> None:
    for args in (["--help"], ["submit", "--help"], ["daemon", "--help"]):
        done, modules = imported(*args)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "usage: swarm" in done.stdout
        heavy = top_level(modules) & set(HEAVY)
        assert not heavy, f"swarm {' '.join(args)} imported {sorted(heavy)}"
        ours = sorted(m for m in modules if m.split(".")[0] in {"node", "protocols", "runners"})
        assert ours == [
            "node",
            "node.cli",
            "node.cli.main",
            "node.cli.parser",
            "node.data_dir",
            "node.defaults",
        ], ours


def test_a_usage_error_imports_nothing_heavy_either() -> None:
    done, modules = imported("submit")  # no MODEL: argparse's error, exit 2
    assert done.returncode == 2 and "the following arguments are required" in done.stderr
    assert not top_level(modules) & set(HEAVY)


def test_the_help_names_the_defaults_of_the_modules_that_own_them() -> None:
    """node.defaults copies the router's strategies and reach's modes so the parser
    need not import them."""
    assert tuple(str(s) for s in Strategy) == STRATEGIES
    assert tuple(str(m) for m in Mode) == REACHABILITY
    done, _ = imported("daemon", "--help")
    assert "{least-loaded,round-robin,best-performance,local-first}" in done.stdout
    assert "/ip4/0.0.0.0/tcp/7420" in done.stdout and "127.0.0.1:8470" in done.stdout
