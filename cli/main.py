"""Assembles the commands and holds the one error boundary.

Exit codes: 0 success, 1 validation failed, 2 bad input or usage, 130 interrupted.
The library raises typed errors; here they become one line on stderr and an exit code.
A traceback is shown only with --debug.
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated

import typer

from parscale_export.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, ParScaleExportError

from .bench import bench_command
from .convert import convert_command
from .generate import generate_command
from .serve import serve_command
from .validate import validate_command

INTERRUPTED = "interrupted; nothing was left behind"

app = typer.Typer(
    name="parscale-export",
    help=(
        "Export ParScale checkpoints to ONNX and check them.\n\n"
        "Typical use:\n\n"
        "    parscale-export convert ./my-parscale-ckpt -o ./bundle\n"
        "    parscale-export validate ./bundle\n"
        "    parscale-export generate ./bundle --prompt 'Hello'\n\n"
        "Exit codes: 0 success, 1 validation failed, 2 bad input or usage, 130 interrupted."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("convert")(convert_command)
app.command("validate")(validate_command)
app.command("generate")(generate_command)
app.command("bench")(bench_command)
app.command("serve")(serve_command)


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show a Python traceback when something fails.")] = False,
) -> None:
    """Export ParScale checkpoints to ONNX and check them."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on `argv` and return the exit code (the tests call this directly)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        result = app(args=args, prog_name="parscale-export", standalone_mode=False)
    except ParScaleExportError as exc:
        return _fail(exc, f"error: {exc}", exc.exit_code, debug)
    except (KeyboardInterrupt, typer.Abort) as exc:
        return _fail(exc, INTERRUPTED, EXIT_INTERRUPTED, debug)
    except typer.TyperException as exc:  # usage errors: Typer prints them with the usage line
        exc.show()
        return EXIT_BAD_INPUT
    if result == EXIT_INTERRUPTED:  # Typer turns Ctrl-C inside a command into a plain exit code 130
        typer.echo(INTERRUPTED, err=True)
    return result if isinstance(result, int) else EXIT_OK


def _fail(exc: BaseException, message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc)
    typer.echo(message, err=True)
    return code


def run() -> None:
    """Console-script entry point. SIGTERM (a `kill`, a job scheduler, a container stop) unwinds as
    Ctrl-C does, so convert removes its half-written output instead of dying with it in place."""
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
