"""The ``aiflow`` command line: parses arguments and prints; the work lives in the library modules.

Each verb lives in its own module under :mod:`aiflow_cli.commands` with a ``register(app, bench)`` function.
Failures are :class:`aiflow_cli.errors.AiflowError`: one line on stderr (a JSON object on stdout under
``--json``) and the exit code of the error's class; never a traceback.
"""

from __future__ import annotations

import importlib
import json
import sys

import typer
from rich.markup import escape

from aiflow_cli.commands.flags import for_cli
from aiflow_cli.console import err_console
from aiflow_cli.errors import AiflowError

app = typer.Typer(
    name="aiflow",
    help="Split AI inference across device, edge and cloud; ship compressed activations over QUIC.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench = typer.Typer(help="Benchmarks: measure speed against baselines measured in the same run.", no_args_is_help=True)
app.add_typer(bench, name="bench")

#: One module per verb (or group of verbs); each registers its commands on `app` and `bench`.
COMMAND_MODULES = [
    "aiflow_cli.commands.codec",
    "aiflow_cli.commands.transport",
    "aiflow_cli.commands.models",
    "aiflow_cli.commands.plan",
    "aiflow_cli.commands.runtime",
    "aiflow_cli.commands.e2e",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app, bench)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except AiflowError as e:
        kind, message = type(e).__name__, for_cli(e)
        if "--json" in sys.argv[1:]:
            sys.stdout.write(json.dumps({"error": message, "kind": kind, "exit_code": e.exit_code}) + "\n")
        err_console.print(f"[bold red]error[/] ({kind}): {escape(message)}", highlight=False, markup=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
