"""Running a command with its stderr on a pseudo-terminal, to see what it shows a person at a
terminal (progress bars) and not a pipe."""

from __future__ import annotations

import os
import pty
import subprocess


def run_with_a_terminal_stderr(argv: list[str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, bytes]:
    """Run ``argv`` with stdout piped and stderr on a pseudo-terminal 120 columns wide; returns the
    finished process and everything the terminal received."""
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=slave, env=env, timeout=timeout)
    finally:
        os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal is closed and drained
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc, shown
