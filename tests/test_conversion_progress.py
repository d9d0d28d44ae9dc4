"""A first-run conversion says what it converts and where it caches it, keeps saying
it is still at work while it runs, and gives its time when done; a cached start
says nothing. The converter here is a tiny real child process, not a model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from runners import ov_cache
from runners.errors import ModelLoadError

# Writes one file into the staging dir it is given, after a pause.
CONVERTER = (
    "import pathlib, sys, time; time.sleep(0.5); "
    "pathlib.Path(sys.argv[1], 'm.xml').write_text('ir')"
)


def command(staged: Path) -> list[str]:
    return ["-c", CONVERTER, str(staged)]


async def test_conversion_logs_start_progress_and_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ov_cache, "PROGRESS_EVERY_S", 0.1)
    root = tmp_path / "models" / "tiny"
    parts = {"recipe": "1"}
    with caplog.at_level(logging.INFO, logger="runners.ov_cache"):
        path, took = await ov_cache.find_or_convert(root, parts, command, name="tiny", timeout_s=30)
    assert (path / "m.xml").read_text() == "ir"
    assert took is not None and took >= 0.5
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == f"converting tiny to OpenVINO IR (first run; cached in {root})..."
    assert any(line.startswith("still converting tiny (") for line in lines[1:-1]), lines
    assert lines[-1].startswith("converted tiny to OpenVINO IR in ")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="runners.ov_cache"):
        again, took = await ov_cache.find_or_convert(
            root, parts, command, name="tiny", timeout_s=30
        )
    assert (again, took) == (path, None)
    assert caplog.records == []  # cached: nothing to report


async def test_a_converter_that_cannot_start_is_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An interpreter path that does not exist: run_process raises OSError at spawn.
    monkeypatch.setattr(ov_cache.sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(ModelLoadError, match="cannot run the converter"):
        await ov_cache.find_or_convert(
            tmp_path / "models" / "tiny", {"recipe": "1"}, command, name="tiny", timeout_s=30
        )
