"""FakeDocker: a real program standing in for the ``docker`` client, where no engine runs.

Container mode runs docker as a child process named by its ``engine`` (a name
on PATH or a path). This writes a small executable script that answers the
few commands container mode gives, so the real argv building, process
running, exit statuses and cancellation are exercised; only the engine is
absent. Every call appends its argv (without the program) as one JSON line to
a log, read back by ``calls()``.

- ``info``: prints a server version (an engine is there);
- ``run``: ``run_mode`` "ok" prints a container id, "fail" exits 125 with
  docker's words for a name conflict, "hang" sleeps (to be cancelled);
- ``stop``, ``rm`` and anything else: exit 0, silently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONTAINER_ID = "f00dcafe" * 8

_SCRIPT = """\
#!{python}
import json, sys, time
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
command = sys.argv[1] if len(sys.argv) > 1 else ""
if command == "info":
    print("27.0.0-fake")
elif command == "run":
    mode = {run_mode!r}
    if mode == "fail":
        print("docker: Error response from daemon: Conflict. The container name is in use.",
              file=sys.stderr)
        sys.exit(125)
    if mode == "hang":
        time.sleep(60)
    print({container_id!r})
"""


class FakeDocker:
    """``FakeDocker(tmp_path).path`` is the engine to give ContainedRunner."""

    def __init__(self, where: Path, run_mode: str = "ok") -> None:
        self.log = where / "docker-calls.jsonl"
        self.path = where / "docker"
        self.path.write_text(
            _SCRIPT.format(
                python=sys.executable,
                log=str(self.log),
                run_mode=run_mode,
                container_id=CONTAINER_ID,
            )
        )
        self.path.chmod(0o755)

    @property
    def engine(self) -> str:
        return str(self.path)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def commands(self) -> list[str]:
        """The docker command of each call, in order: ["info", "run", "stop", "rm"]."""
        return [call[0] for call in self.calls() if call]
