"""The ``synthgen`` command line: a thin typer layer over the library.

Each command module registers its commands on :data:`app`; :func:`main` turns a
:class:`~synthgen.errors.SynthgenError` into one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

import sys

import typer

from synthgen.errors import SynthgenError

app = typer.Typer(
    name="synthgen",
    help="Build synthetic image datasets with Stable Diffusion, publish them, and score them with CAS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    # Imported for their side effect of adding commands to ``app``.
    from synthgen.cli import dataset_cmds  # noqa: F401
    from synthgen.cli import hub_cmds  # noqa: F401

    from synthgen.cli import pretrain_cmds, train_cmds  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    _register()
    try:
        result = app(args=argv, standalone_mode=False)
    except SynthgenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # click's usage errors and aborts
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        raise
    # click returns an ``Exit``'s code instead of raising it when standalone_mode is off
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
