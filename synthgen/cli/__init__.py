"""The ``synthgen`` command line: a thin typer layer over the library.

Each command module registers its commands on :data:`app`. :func:`main` runs it and turns every
error into one ``error: ...`` line on stderr and a non-zero exit: a
:class:`~synthgen.errors.SynthgenError` (status 1), a file-system error (1) and a usage error --
missing argument, unknown option, bad value, no command -- (2, from typer's vendored click or
click itself). A traceback means a bug.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from synthgen.errors import SynthgenError


class CommandGroup(TyperGroup):
    """Lists each command with its whole first sentence, wrapped, instead of click's cut at the
    terminal width with "..." mid-sentence."""

    def format_commands(self, ctx, formatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=400)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    cls=CommandGroup,
    name="synthgen",
    help="Build synthetic image datasets with Stable Diffusion, publish them, and score them with CAS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click help: rich markup would read "[default: ...]" in help texts as a tag and drop it,
    # and re-wraps docstrings mid-sentence. _register() applies the same to every sub-app.
    rich_markup_mode=None,
)


@app.callback()
def _root(
    recipes: Optional[List[Path]] = typer.Option(
        None,
        "--recipes",
        metavar="DIR",
        exists=True,
        file_okay=False,
        help="A folder of your own dataset recipes, searched before the built-in ones (repeatable; "
        "also SYNTHGEN_RECIPES, a path list).",
    ),
) -> None:
    """Build synthetic image datasets with Stable Diffusion, publish them, and score them with CAS."""
    from synthgen.paths import USER_RECIPES_ENV

    if recipes:
        # The environment (not a module global) so that worker processes started from here see it.
        current = [p for p in os.environ.get(USER_RECIPES_ENV, "").split(os.pathsep) if p]
        os.environ[USER_RECIPES_ENV] = os.pathsep.join([*map(str, recipes), *current])


def _register() -> None:
    # Imported for their side effect of adding commands to ``app``.
    from synthgen.cli import dataset_cmds  # noqa: F401
    from synthgen.cli import hub_cmds  # noqa: F401
    from synthgen.cli import pretrain_cmds, train_cmds  # noqa: F401
    from synthgen.cli import classcond_cmds  # noqa: F401

    # Every sub-app gets the root's help style, whoever added it.
    pending = [app]
    while pending:
        typer_app = pending.pop()
        typer_app.rich_markup_mode = None
        for info in typer_app.registered_groups:
            if info.typer_instance is None:
                continue
            if not isinstance(info.cls, type) and not isinstance(info.typer_instance.info.cls, type):
                info.cls = CommandGroup  # neither add_typer nor the sub-app chose a group class
            pending.append(info.typer_instance)


def error_line(message: str) -> None:
    """Print one ``error: ...`` line on stderr (newlines in ``message`` are folded)."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)


def _usage_exit(exc: BaseException) -> Optional[int]:
    """The exit status for typer's (vendored click) or click's control-flow exceptions, after
    printing them as one line; None for anything else."""
    import click
    from typer import _click as vendored
    from typer import exceptions as typer_exceptions

    click_no_args = getattr(click.exceptions, "NoArgsIsHelpError", vendored.exceptions.NoArgsIsHelpError)  # click < 8.2
    if isinstance(exc, (vendored.exceptions.NoArgsIsHelpError, click_no_args)):
        ctx = exc.ctx
        print(ctx.get_help())
        what = "a command" if ctx.parent is None else f"a {ctx.info_name} command"
        error_line(f"missing {what} (see '{ctx.command_path} --help')")
        return 2
    if isinstance(exc, (vendored.exceptions.UsageError, click.exceptions.UsageError)):
        ctx = exc.ctx
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        error_line(exc.format_message() + hint)
        return exc.exit_code
    if isinstance(exc, (vendored.exceptions.ClickException, click.exceptions.ClickException)):
        error_line(exc.format_message())
        return exc.exit_code
    if isinstance(exc, (typer_exceptions.Abort, click.exceptions.Abort)):
        error_line("aborted")
        return 1
    if isinstance(exc, (typer_exceptions.Exit, click.exceptions.Exit)):
        return exc.exit_code
    return None


# what each command keeps when it is interrupted (Ctrl-C), so that running it again resumes
_KEPT_ON_INTERRUPT = {
    "build": "finished shards are kept; run the same command again to resume",
    "pretrain": "the last checkpoint is kept; run the same command again to resume from it",
    "classcond": "finished epochs and trials are kept; run the same command again to resume",
    "push": "uploaded files are kept; run the same command again to finish the push",
}


def interrupted_line(args: list[str]) -> str:
    """The line printed after Ctrl-C: what the interrupted command kept, when it keeps anything."""
    words = iter(args)
    command = None
    for word in words:
        if word == "--recipes":  # the one global option that takes a value
            next(words, None)
        elif not word.startswith("-"):
            command = word
            break
    kept = _KEPT_ON_INTERRUPT.get(command or "")
    return f"interrupted: {kept}" if kept else "interrupted"


def main(argv: list[str] | None = None) -> int:
    _register()
    try:
        result = app(args=argv, standalone_mode=False, prog_name="synthgen")
    except SynthgenError as exc:
        error_line(str(exc))
        return 1
    except KeyboardInterrupt:
        result = 130
    except OSError as exc:  # a file-system error no command turned into a SynthgenError
        from synthgen.dataset.build import disk_error_message

        error_line(disk_error_message(exc))
        return 1
    except Exception as exc:
        code = _usage_exit(exc)
        if code is None:
            raise
        return code
    if result == 130:  # typer turns Ctrl-C into Exit(130)
        print(interrupted_line(sys.argv[1:] if argv is None else argv), file=sys.stderr)
    # click returns an ``Exit``'s code instead of raising it when standalone_mode is off
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
