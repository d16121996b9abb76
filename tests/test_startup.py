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
