"""The typer app every command registers on, its error handling, the root callback and the entry point.

Exit codes: 0 success, 1 nothing could be done (every image failed), 2 a user error (bad flag, bad
data, missing weights: one `error: ...` line on stderr), 130 interrupted. Anything else is a bug and
keeps its traceback.

Named `base`, not `app`: `headstart.cli` exports the Typer object as `app`, and a submodule of that name
would be shadowed by it (or shadow it).
"""

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from headstart.cli import render
from headstart.errors import UserError


class _Group(TyperGroup):
    """Turns the errors a user can cause into one stderr line and an exit code; bugs keep their traceback."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            _report(f"error: {' '.join(str(exc).split())}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            # Caught here because typer would otherwise turn it into a silent exit 130.
            _report("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            if not _several_ranks():
                raise
            from headstart.runtime import distributed

            if not distributed.peer_lost(exc):
                raise
            _report(f"error: another process of this torchrun stopped ({' '.join(str(exc).split())[:200]}); "
                    "see its message above")
            raise typer.Exit(1) from None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # typer's (vendored) click usage and parameter errors
            # Typer draws usage errors as a multi-line panel; one line is easier to read and to grep.
            if type(exc).__name__ != "NoArgsIsHelpError":  # bare `headstart`: help was already printed
                ctx = getattr(exc, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                _report(f"error: {exc.format_message()}{_dash_hint(exc, args) or hint}")
            sys.exit(exc.exit_code)
        except typer.Abort:
            render.note("aborted")
            sys.exit(1)
        # Non-standalone click returns an Exit's code, or the command's return value (always None here).
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Group,
    help="Turn a folder of a few hundred photos into an image classifier by transfer learning.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion, --show-completion: typer (click) completes commands and options
    context_settings={"help_option_names": ["-h", "--help"]},  # `-h` as most command-line tools take it
    pretty_exceptions_show_locals=False,  # locals can be whole tensors; the stack is what a bug report needs
)


def _print_version(value: bool) -> None:
    if value:
        from headstart import __version__

        typer.echo(f"headstart {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log progress details (INFO) to stderr.")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print headstart's version and exit.")] = False,
) -> None:
    """Turn a folder of a few hundred photos into an image classifier by transfer learning."""
    if not main_rank():  # under torchrun rank 0 alone warns and logs
        warnings.simplefilter("ignore")
        render.setup_logging(logging.CRITICAL + 1)
        return
    render.setup_logging(logging.INFO if verbose else logging.WARNING)


def _dash_hint(exc: Exception, args: Sequence[str] | None) -> str:
    """For an unknown option that is really a file name starting with '-' (`predict model/ -x.jpg`): how to pass
    one, rather than only "No such option: -x"."""
    name = getattr(exc, "option_name", None)
    if type(exc).__name__ != "NoSuchOption" or not name:
        return ""
    word = next((a for a in (sys.argv[1:] if args is None else args) if a.startswith(name)), name)
    if not ("." in word or "/" in word):  # not a file name by its looks: the usual pointer to --help
        return ""
    return f"; if '{word}' is a file, put `--` before it (`-- {word}`) or write it as ./{word}"


def main_rank() -> bool:
    """Whether this process prints: always, but under torchrun, where rank 0 alone does (read cheaply: no torch)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _several_ranks() -> bool:
    """Whether torchrun started this process as one of several (read cheaply: no torch, no numpy)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def _report(line: str) -> None:
    """Print a line that ends the run, once per run: under torchrun, only the first process to stop prints it
    (the others stop for the same reason, or because it did)."""
    if _several_ranks():
        from headstart.runtime import distributed

        if not distributed.claim_report():
            return
    render.note(line)


def main() -> None:
    """Entry point of the `headstart` console script."""
    # Names are escaped where they are written (render.shown); this is the last resort for a terminal whose
    # encoding cannot carry a valid name (e.g. 'café' under an ASCII locale): an escape rather than a traceback.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    app(prog_name="headstart")
