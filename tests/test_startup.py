"""The CLI starts without torch: `--help`, `aiflow plan` (no measured floor) and option errors answer at once;
torch and the models are imported by the verbs and library paths that run a model (commands/, plan/verify.py)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers")


def test_the_cli_the_planner_and_the_profiles_import_without_torch():
    code = (
        "import sys, json\n"
        "import aiflow_cli.cli, aiflow_cli.plan.solver, aiflow_cli.plan.verify, aiflow_cli.profile\n"
        "import aiflow_cli.profile.calibration\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_profile_model_is_still_importable_from_the_package():
    from aiflow_cli.profile import profile_model
    from aiflow_cli.profile.profiler import profile_model as direct

    assert profile_model is direct


BAD = [
    ("profile builtin:gpt2-tiny --repeats 0", 3),
    ("profile builtin:gpt2-tiny --seq-len 0", 3),
    ("profile builtin:gpt2-tiny --dtype float64", 3),
    ("profile builtin:gpt2-tiny --codecs int9", 4),
    ("serve --role fog --plan nope.json --identity nokeys --trust ab", 3),
    ("serve --role edge --plan nope.json --identity nokeys --trust ab", 3),
    ("serve --role cloud --plan nope.json --identity nokeys --trust ab --metrics 9100", 3),
    ("run hi --plan nope.json --identity nokeys", 3),
    ("demo --device-speed 0", 3),
    ("demo --link nosuch", 3),
    ("demo --image nope.jpg", 3),
    ("bench e2e --quick --links nosuch", 3),
    ("bench e2e --quick --image nope.jpg", 3),
]


def test_bad_options_are_refused_before_torch_is_imported():
    """The verbs check their options, files and plan before importing torch, loading a model or starting a
    server: a bad flag is answered at once (tests/test_runtime_cli.py and tests/test_profile.py check the
    messages). One process runs every invocation, so torch imported by any of them shows."""
    run = (
        "import sys, json\n"
        "from aiflow_cli.cli import main\n"
        f"for argv in {[a.split() for a, _ in BAD]!r}:\n"
        "    sys.argv = ['aiflow', *argv]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as e:\n"
        f"        print(json.dumps([' '.join(argv), e.code, [m for m in {HEAVY!r} if m in sys.modules]]))\n"
    )
    r = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=120)
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert got == [[a, code, []] for a, code in BAD], r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("error (") == len(BAD), r.stderr
