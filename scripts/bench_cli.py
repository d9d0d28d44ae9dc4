"""Benchmark the ``swarm`` command's wall time: help, and a job to the local daemon.

One daemon runs on loopback in its own temp data dir (``--no-mdns --no-dht
--http off``) serving ``fake:echo``, a fake model with no latency, so what is
measured is the command, not the model. Three commands, each a fresh process
exactly as a shell runs it (``python -m node.cli``, what the ``swarm`` entry
point runs), N times each:

- ``swarm --help``;
- ``swarm submit --data-dir D echo x``: no --peer, so the daemon's local socket;
- ``swarm submit --data-dir D --peer ADDR echo x``: libp2p (a host, a Noise
  handshake), as every submit went before.

With hyperfine installed it times them (``--warmup 1``, its JSON export read
back); else this script's own loop runs the three interleaved, one of each in
turn after a warm-up round, so load that drifts during the run falls on all
three alike. Every run must exit 0 (and a submit must say who served it). It
prints median and p90 of each, the local/libp2p ratio from this run, and the
targets of issue 11: help < 0.3 s, submit to the local daemon < 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_report import Summary, load_now
from bench_report import machine as bench_machine

REPO = Path(__file__).resolve().parents[1]
TARGET_HELP_S = 0.3
TARGET_SUBMIT_S = 0.5
READY_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 30.0
LISTENING = re.compile(r"  listening on (\S+)")


def env() -> dict[str, str]:
    # The commands run this checkout's code, whatever the venv's editable install names.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def swarm(*args: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", *args]


class Daemon:
    """``swarm daemon`` with a fake 0 ms model; killed (its process group) on close."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.log = data_dir.with_suffix(".stderr")
        command = swarm(
            "daemon",
            *("--data-dir", str(data_dir), "--listen", "/ip4/127.0.0.1/tcp/0"),
            *("--no-mdns", "--no-dht", "--http", "off", "--no-cuda-probe"),
            *("--model", "fake:echo"),
        )
        with open(self.log, "wb") as stderr:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=REPO,
                env=env(),
                start_new_session=True,
            )
        self.addr = ""

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        for line in self.proc.stdout:
            if match := LISTENING.match(line):
                self.addr = self.addr or match[1]
            if line.startswith("  serving "):
                break
            if time.monotonic() > deadline:
                break
        state = self.data_dir / "daemon.json"
        if not self.addr or not state.exists() or not json.loads(state.read_text())["socket"]:
            raise SystemExit(f"bench_cli: the daemon did not start:\n{self.log.read_text()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def run_once(command: Sequence[str], expect: str) -> float:
    """Wall seconds of one run of ``command``, which must exit 0 printing ``expect``."""
    began = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env=env(), timeout=RUN_TIMEOUT_S
    )
    took = time.perf_counter() - began
    if done.returncode != 0 or expect not in done.stdout:
        raise SystemExit(f"bench_cli: {' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return took


def own_loop(commands: dict[str, tuple[list[str], str]], runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(runs + 1):  # round 0 warms the caches and is not counted
        for name, (command, expect) in commands.items():
            took = run_once(command, expect)
            if round_:
                times[name].append(took)
        print(f"bench_cli: round {round_}/{runs}", file=sys.stderr, end="\r", flush=True)
    print(file=sys.stderr)
    return times


def with_hyperfine(
    hyperfine: str, commands: dict[str, tuple[list[str], str]], runs: int, scratch: Path
) -> dict[str, list[float]]:
    for command, expect in commands.values():
        run_once(command, expect)  # hyperfine checks exit codes only: check outputs once
    export = scratch / "hyperfine.json"
    args = [hyperfine, "--warmup", "1", "--runs", str(runs), "--export-json", str(export)]
    for name in commands:
        args += ["--command-name", name]
    args += [shlex.join(command) for command, _ in commands.values()]
    subprocess.run(args, check=True, cwd=REPO, env=env(), timeout=RUN_TIMEOUT_S * runs * 4)
    results = json.loads(export.read_text())["results"]
    return {r["command"]: [float(t) for t in r["times"]] for r in results}


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def report(r: dict[str, Any]) -> Summary:
    print(f"\nswarm command wall time, {r['runs']} runs each ({r['timer']})")
    print(f"  {'command':<44} {'median':>8} {'p90':>8} {'min':>8}")
    for name, f in r["figures"].items():
        print(f"  {name:<44} {f['median']:>7.3f}s {f['p90']:>7.3f}s {f['min']:>7.3f}s")
    local, remote = r["figures"]["submit (local socket)"], r["figures"]["submit --peer (libp2p)"]
    ratio = local["median"] / remote["median"]
    print(f"\n  local socket / libp2p (medians, same run): {ratio:.2f}x")
    print(
        f"  a script of 100 submits: {100 * local['median']:.0f} s on the socket, "
        f"{100 * remote['median']:.0f} s over libp2p"
    )
    summary = Summary()
    help_ = r["figures"]["--help"]
    summary.add(
        "swarm --help (median)",
        f"{help_['median']:.3f} s",
        f"< {TARGET_HELP_S} s",
        help_["median"] < TARGET_HELP_S,
    )
    summary.add(
        "swarm submit, local daemon (median)",
        f"{local['median']:.3f} s",
        f"< {TARGET_SUBMIT_S} s",
        local["median"] < TARGET_SUBMIT_S,
    )
    summary.add(
        "swarm submit, local daemon (p90)",
        f"{local['p90']:.3f} s",
        f"< {TARGET_SUBMIT_S} s",
        local["p90"] < TARGET_SUBMIT_S,
    )
    print("\nSummary (targets from issue 11)")
    width = max(len(row["figure"]) for row in summary)
    for row in summary:
        figure, value, target = row["figure"], row["value"], row["target"]
        print(f"   {figure:<{width}}  {value:>10}  {target:<10} {row['verdict']}")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each command")
    parser.add_argument("--own-loop", action="store_true", help="time without hyperfine")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    machine = bench_machine()
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as scratch:
        daemon = Daemon(Path(scratch, "node"))
        try:
            daemon.wait_ready()
            home = ("--data-dir", str(daemon.data_dir))
            commands = {
                "--help": (swarm("--help"), "usage: swarm"),
                "submit (local socket)": (swarm("submit", *home, "echo", "x"), "served by"),
                "submit --peer (libp2p)": (
                    swarm("submit", *home, "--peer", daemon.addr, "echo", "x"),
                    "served by",
                ),
            }
            hyperfine = None if args.own_loop else shutil.which("hyperfine")
            if hyperfine:
                times = with_hyperfine(hyperfine, commands, args.runs, Path(scratch))
            else:
                times = own_loop(commands, args.runs)
        finally:
            daemon.close()
    machine["load_after"] = load_now()
    results: dict[str, Any] = {
        "runs": args.runs,
        "timer": "hyperfine" if hyperfine else "own loop, interleaved, 1 warm-up round",
        "figures": {
            name: {
                "median": statistics.median(t),
                "p90": quantile(t, 0.9),
                "min": min(t),
                "times": t,
            }
            for name, t in times.items()
        },
        "machine": machine,
    }
    results["summary"] = report(results)
    print(
        f"\n{machine['cpu']}, {machine['cpus']} CPUs; load {machine['load_before']} before, "
        f"{machine['load_after']} after"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
