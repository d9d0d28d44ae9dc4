"""HTTP load from wrk, a native generator, so the figures are the gateway's and not ours.

The load generator was a Python loop (httpx on trio, in the benchmark process).
At 64 clients it measured itself: 616 -> 239 req/s from 16 to 64 clients where
wrk against the same two nodes gave 738 / 664 / 613 req/s at 16 / 64 / 256.

wrk runs as a process of its own. The Lua script it loads (written to a temp
file per model) POSTs one JSON body, checks every answer in a ``response()``
hook (a status outside 2xx is counted, and so is a 2xx whose body lacks the
field the route must return), and prints its figures from ``done()`` as one
JSON line, so nothing is parsed from wrk's text. A run with any non-2xx
answer, malformed body or socket error (connect, read, write, timeout), or
with fewer answers than connections (requests still waiting when wrk stops are
counted nowhere), is not a throughput figure: ``WrkRun.clean`` says so, and
its req/s counts good answers only.

Errors: ``WrkMissing`` when there is no wrk binary (the Debian package is
``wrk``); ``RuntimeError`` when wrk fails or prints no figures.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import trio

DEBIAN_PACKAGE = "wrk"
MARK = "BENCH_WRK_JSON "
PERCENTILES = {"p50": 50, "p90": 90, "p99": 99, "p99_9": 99.9}
LONG_BRACKET = ("[==[", "]==]")  # Lua's raw string: nothing in it is escaped

SCRIPT = Template(
    r"""-- Written by scripts/bench_gateway.py for its wrk runs (bench_gateway_lib/wrk.py).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[${body}]==]
local expect = [==[${expect}]==]
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  non2xx, malformed, bad_status, bad_body = 0, 0, 0, ""
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    bad_status = status
    bad_body = string.sub(body, 1, 240)
  elseif not string.find(body, expect, 1, true) then
    malformed = malformed + 1
  end
end

function done(summary, latency, requests)
  local non2xx, malformed, bad_status, bad_body = 0, 0, 0, ""
  for _, thread in ipairs(threads) do
    non2xx = non2xx + thread:get("non2xx")
    malformed = malformed + thread:get("malformed")
    if thread:get("bad_status") ~= 0 then
      bad_status, bad_body = thread:get("bad_status"), thread:get("bad_body")
    end
  end
  bad_body = string.gsub(bad_body, '[%c"\\]', "?")  -- a JSON string without escapes
  local e = summary.errors
  local mean, stdev = 0, 0
  if summary.requests > 0 then mean, stdev = latency.mean, latency.stdev end
  local out = {
    string.format('"duration_us":%.0f,"requests":%.0f,"bytes":%.0f',
      summary.duration, summary.requests, summary.bytes),
    string.format('"non_2xx":%d,"malformed":%d,"last_bad_status":%d,"last_bad_body":"%s"',
      non2xx, malformed, bad_status, bad_body),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
      e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"mean_us":%.1f,"stdev_us":%.1f,"max_us":%.0f', mean, stdev, latency.max),
${percentiles}
  }
  io.write("${mark}{" .. table.concat(out, ",") .. "}\n")
end
"""
)


class WrkMissing(RuntimeError):
    """No wrk binary on PATH."""


def find_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise WrkMissing(
            "wrk is not installed, and it drives the HTTP load (there is no Python fallback: "
            f"a Python loop measures itself). Install the Debian package `{DEBIAN_PACKAGE}` "
            f"(apt-get install -y {DEBIAN_PACKAGE}), or run scripts/setup --test."
        )
    return path


def wrk_version(wrk: str) -> str:
    """wrk's first line (``wrk debian/4.1.0-3 [epoll] ...``); it prints it and exits 1."""
    done = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    line = (done.stdout or done.stderr).strip().splitlines()
    return line[0].split(" Copyright")[0] if line else "wrk (version unknown)"


def write_script(path: Path, body: dict[str, Any], expect: str) -> Path:
    """The Lua script that POSTs ``body`` and counts answers lacking ``expect``."""
    text, close = json.dumps(body), LONG_BRACKET[1]
    if close in text or close in expect:
        raise ValueError(f"the body may not hold {close!r} (it ends Lua's raw string)")
    percentiles = "\n".join(
        f"    string.format('\"{key}_us\":%.0f', latency:percentile({q})),"
        for key, q in PERCENTILES.items()
    )
    path.write_text(SCRIPT.substitute(body=text, expect=expect, percentiles=percentiles, mark=MARK))
    return path


@dataclass(frozen=True, slots=True)
class WrkRun:
    """One wrk run's figures, as its ``done()`` hook reported them."""

    connections: int
    threads: int
    seconds: int
    raw: dict[str, Any]

    @property
    def socket_errors(self) -> dict[str, int]:
        e = self.raw["errors"]
        return {k: int(e[k]) for k in ("connect", "read", "write", "timeout")}

    @property
    def bad(self) -> int:
        """Answers that are not throughput: non-2xx and malformed 2xx."""
        return int(self.raw["non_2xx"]) + int(self.raw["malformed"])

    @property
    def starved(self) -> bool:
        """Fewer answers than connections: some waited the whole run, and wrk counts
        no request it stopped waiting for (neither as an error nor in the latencies)."""
        return bool(self.raw["requests"] < self.connections)

    @property
    def clean(self) -> bool:
        return not self.starved and not self.bad and not any(self.socket_errors.values())

    def row(self) -> dict[str, Any]:
        """The JSON row; ``clients``/``requests``/``errors``/``req_per_s``/p50/p99 as before."""
        took = self.raw["duration_us"] / 1e6
        good = int(self.raw["requests"]) - self.bad
        ms = {k: self.raw[f"{k}_us"] / 1000 for k in PERCENTILES}
        return {
            "clients": self.connections,  # one wrk connection is one client in a loop
            "threads": self.threads,
            "seconds": self.seconds,
            "requests": good,
            "answers": int(self.raw["requests"]),  # good or not
            "errors": self.bad + sum(self.socket_errors.values()),
            "non_2xx": int(self.raw["non_2xx"]),
            "malformed": int(self.raw["malformed"]),
            "last_bad_status": int(self.raw["last_bad_status"]),
            "last_bad_body": str(self.raw["last_bad_body"]),
            "socket_errors": self.socket_errors,
            "starved": self.starved,
            "clean": self.clean,
            "req_per_s": good / took if took > 0 else 0.0,
            **{f"{k}_ms": v for k, v in ms.items()},
            "mean_ms": self.raw["mean_us"] / 1000,
            "max_ms": self.raw["max_us"] / 1000,
        }


def threads_for(connections: int, most: int) -> int:
    """wrk needs connections >= threads; past ``most`` threads only add contention."""
    return max(1, min(most, connections))


async def run_wrk(
    wrk: str,
    url: str,
    script: Path,
    connections: int,
    *,
    threads: int,
    seconds: int,
    timeout_s: int,
) -> WrkRun:
    """``connections`` keep-alive connections, each a request at a time, for ``seconds``."""
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s"]
    command += [f"--timeout={timeout_s}s", "--latency", "-s", str(script), url]
    with trio.fail_after(seconds + timeout_s + 30):
        done = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )
    out = done.stdout.decode(errors="replace")
    line = next((x for x in out.splitlines() if x.startswith(MARK)), None)
    if done.returncode != 0 or line is None:
        err = done.stderr.decode(errors="replace")
        raise RuntimeError(f"wrk exited {done.returncode} without its figures:\n{out}{err}")
    raw = json.loads(line[len(MARK) :])
    numbers = [v for v in raw.values() if isinstance(v, int | float)]
    if not all(math.isfinite(float(v)) for v in numbers):
        raise RuntimeError(f"wrk reported figures that are not numbers: {line}")
    return WrkRun(connections, threads, seconds, raw)


def children_cpu_s() -> float:
    """User + system CPU of this process's reaped children (wrk, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
