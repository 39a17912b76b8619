"""`banger`: the CLI. It only talks to the daemon; errors become `error: ...` lines and exit codes."""

from __future__ import annotations

import os
import sys

from banger.cli.fast import try_fast

TYPE_CHECKING = False  # typing costs milliseconds on the CLI's fast path; mypy still sees the import
if TYPE_CHECKING:
    from typing import Any


def main(argv: list[str] | None = None) -> None:
    """Entry point of `banger`."""
    fast = try_fast(sys.argv[1:] if argv is None else argv)
    if fast is not None:
        sys.exit(fast)
    debug = "--debug" in (argv or sys.argv[1:]) or os.environ.get("BANGER_DEBUG") == "1"
    import click

    from banger.cli.app import cli
    from banger.errors import BangerError

    try:
        rv: Any = cli.main(args=argv, prog_name="banger", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        # click turns Ctrl-C into Abort; by now the RPC client has had the daemon cancel the call.
        click.echo("error: interrupted (the daemon cancelled the operation)", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BangerError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        sys.exit(1)
    except BrokenPipeError:
        sys.exit(1)
    except OSError as exc:  # e.g. a BANGER_HOME that is a file or cannot be created
        if debug:
            import traceback

            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"error: {exc.strerror or exc}{where}", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
