"""Where the command line prints: one stdout and one stderr console for every command.

Piped or redirected output is not wrapped at 80 columns (a YAML recipe, a summary line or a table
row stays whole); on a terminal rich wraps to the window as usual.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from rich.console import Console

from synthgen.errors import SynthgenError

# Wide enough for any line we print; tables still size to their content.
PIPE_WIDTH = 10_000


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    interactive = stream.isatty()
    return Console(stderr=stderr, width=None if interactive else PIPE_WIDTH, soft_wrap=not interactive)


console = make_console()
err_console = make_console(stderr=True)


def write_plain(text: str) -> None:
    """Text that must reach stdout byte for byte (YAML, TSV): no markup, no wrapping."""
    sys.stdout.write(text)
    sys.stdout.flush()


def refuse_folder_as_report(path: Optional[Path], option: str) -> None:
    """Check a report file option before the run it reports: a folder there would fail only once
    the (possibly hours-long) run had finished, losing its results."""
    if path is not None and path.expanduser().is_dir():
        raise SynthgenError(f"{option} {path} is a folder; give a file path, e.g. {path / 'report.json'}")
