"""Start-up in one clear line: a temporary Prefect server that does not answer in time
is stopped and named with the fix, and bad inputs fail before any server or cluster
starts. Real `samplemix run` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import write_tiny_corpus

from flows.runtime import (
    START_ATTEMPTS,
    STARTUP_TIMEOUT_VAR,
    ServerStartError,
    start_temporary_server,
)


def samplemix_run(args: list[str], **env: str) -> tuple[subprocess.CompletedProcess, str]:
    """``samplemix run ARGS`` in a fresh process with no Prefect API set (so that it
    starts its own server); returns it and the marker its environment carries."""
    mark = uuid.uuid4().hex
    environ = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # INFO: Prefect then says "Starting temporary server" each time it starts one.
    environ |= {"SAMPLEMIX_TEST_MARK": mark, "PREFECT_LOGGING_LEVEL": "INFO", **env}
    cmd = [sys.executable, "-m", "samplemix.cli", "run", *args]
    proc = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=600)
    return proc, mark


def processes_marked(mark: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``mark`` (the server inherits it)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("SAMPLEMIX_TEST_MARK") == mark:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_a_server_that_does_not_answer_in_time_is_one_line_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    """0.05 s is shorter than any server start: both tries time out."""
    corpus = write_tiny_corpus(tmp_path / "corpus")
    proc, mark = samplemix_run(
        ["--input", str(corpus), "--output", str(tmp_path / "out")],
        **{STARTUP_TIMEOUT_VAR: "0.05"},
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert f"did not answer within 0.05 s ({START_ATTEMPTS} tries" in errors[0]
    assert STARTUP_TIMEOUT_VAR in errors[0] and "PREFECT_API_URL" in errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.count("Starting temporary server") == START_ATTEMPTS
    assert processes_marked(mark) == []
    assert not (tmp_path / "out" / "mixture").exists()


def test_a_bad_timeout_setting_is_named(tmp_path: Path) -> None:
    corpus = write_tiny_corpus(tmp_path / "corpus")
    proc, _ = samplemix_run(
        ["--input", str(corpus), "--output", str(tmp_path / "out")],
        **{STARTUP_TIMEOUT_VAR: "soon"},
    )
    assert proc.returncode == 1
    assert f"error: {STARTUP_TIMEOUT_VAR}='soon' is not a number of seconds" in proc.stderr


def test_a_missing_input_fails_before_any_server_starts(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-corpus"
    proc, mark = samplemix_run(["--input", str(missing), "--output", str(tmp_path / "out")])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: corpus.input {str(missing)!r} does not exist"
    ]
    assert "Starting temporary server" not in proc.stderr + proc.stdout
    assert processes_marked(mark) == []


def test_an_output_that_cannot_be_written_fails_before_any_server_starts(tmp_path: Path) -> None:
    corpus = write_tiny_corpus(tmp_path / "corpus")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    proc, _ = samplemix_run(["--input", str(corpus), "--output", str(blocked / "out")])
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(blocked) in lines[0], lines
    assert "Starting temporary server" not in proc.stderr + proc.stdout


def test_a_timed_out_server_is_stopped_at_once_in_a_long_lived_process(monkeypatch) -> None:  # noqa: ANN001
    """Prefect leaves a timed-out server running until its process exits; a test
    session or a long-lived worker must not keep it."""

    monkeypatch.setenv(STARTUP_TIMEOUT_VAR, "0.05")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ServerStartError):
        start_temporary_server()
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert [p.cmdline() for p in left if p.is_running() and p.status() != "zombie"] == []
