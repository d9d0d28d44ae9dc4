"""Log lines carry the id of the job they are about, as text or as JSON."""

from __future__ import annotations

import json
import logging

import pytest

from node.observe import logs


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> object:
    saved = logging.getLogger().handlers[:], logging.getLogger().level
    yield capsys
    logging.getLogger().handlers[:], level = saved
    logging.getLogger().setLevel(level)


def test_text_lines_name_the_job(captured: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO")
    token = logs.request_id.set("job-42")
    try:
        logging.getLogger("node.test").info("attempt %d failed", 1)
    finally:
        logs.request_id.reset(token)
    logging.getLogger("node.test").info("between jobs")
    err = captured.readouterr().err.splitlines()
    assert err[0].endswith("node.test: [req=job-42] attempt 1 failed")
    assert err[1].endswith("node.test: between jobs")


def test_json_lines_carry_the_id_as_a_field(captured: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", json_lines=True)
    token = logs.request_id.set("job-7")
    try:
        logging.getLogger("node.test").warning("peer %s gone", "B")
    finally:
        logs.request_id.reset(token)
    entry = json.loads(captured.readouterr().err.splitlines()[0])
    assert entry["request_id"] == "job-7" and entry["message"] == "peer B gone"
    assert entry["level"] == "WARNING" and entry["logger"] == "node.test"
