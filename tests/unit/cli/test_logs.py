"""``--log-format json``: every record one JSON object on one line, tracebacks included."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from mbt_core.cli.logs import configure_logging, json_logging
from mbt_core.cli.service import warn_plaintext


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def records(err: str) -> list[dict[str, str]]:
    lines = err.splitlines()
    parsed = [json.loads(line) for line in lines]  # a line that is not JSON fails here
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


def test_json_records_are_one_line_each_with_time_level_logger_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", "json")
    log = logging.getLogger("mbt_aggregator")
    log.info("admitted node %s", "n1")
    log.debug("not at INFO")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("call failed")
    first, second = records(capsys.readouterr().err)
    assert first["level"] == "INFO" and first["logger"] == "mbt_aggregator"
    assert first["message"] == "admitted node n1" and first["time"].endswith("+00:00")
    assert second["level"] == "ERROR" and second["message"] == "call failed"
    assert "Traceback" in second["exception"] and "boom\nsecond line" in second["exception"]


def test_text_stays_the_default_and_the_plaintext_warning_follows_the_format(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("WARNING")
    assert not json_logging()
    warn_plaintext("mbt-node")
    assert capsys.readouterr().err.startswith("mbt-node: warning: --insecure: plaintext gRPC")
    configure_logging("WARNING", "json")
    assert json_logging()
    warn_plaintext("mbt-node")
    (record,) = records(capsys.readouterr().err)
    assert record["level"] == "WARNING" and record["logger"] == "mbt-node"
    assert record["message"].startswith("--insecure: plaintext gRPC")


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format must be one of text, json"):
        configure_logging("INFO", "yaml")
