"""The ``aiflow`` command line: parses arguments and prints; the work lives in the library modules.

Each verb lives in its own module under :mod:`aiflow_cli.commands` with a ``register(app, bench)`` function.
Failures are :class:`aiflow_cli.errors.AiflowError`: one line on stderr (a JSON object on stdout under
``--json``) and the exit code of the error's class; never a traceback. SIGINT and SIGTERM end any command within
2 s with exit code 130 / 143 and its child processes gone (:mod:`aiflow_cli.signals`).
"""

from __future__ import annotations

import importlib
import json
import signal
import sys

import typer
from rich.markup import escape

from aiflow_cli import signals
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
    "aiflow_cli.commands.decode",
    "aiflow_cli.commands.load",
    "aiflow_cli.commands.draft",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app, bench)


def main() -> None:
    """Console-script entry point."""
    signals.install()
    code: int | str | None = 0
    try:
        app()
    except SystemExit as e:  # typer's normal way out (click also turns Ctrl-C into "Aborted!" + exit 1)
        code = e.code
    except KeyboardInterrupt:
        code = signals.exit_code()
    except AiflowError as e:
        if signals.received() is None:  # after a signal, an error is its consequence: report the signal
            kind, message = type(e).__name__, for_cli(e)
            if "--json" in sys.argv[1:]:
                sys.stdout.write(json.dumps({"error": message, "kind": kind, "exit_code": e.exit_code}) + "\n")
            err_console.print(
                f"[bold red]error[/] ({kind}): {escape(message)}", highlight=False, markup=True, soft_wrap=True
            )
            code = e.exit_code
    sig = signals.received()
    if sig is not None:
        err_console.print(f"interrupted ({signal.Signals(sig).name})", highlight=False)
        signals.exit_now()
    sys.exit(code)


if __name__ == "__main__":
    main()
