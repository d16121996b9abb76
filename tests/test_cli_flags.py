"""The library names parameters, the CLI names flags: errors are rewritten in one place (commands/flags.py), and
no library module spells a flag in its messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aiflow_cli.commands.flags import FLAGS, for_cli
from aiflow_cli.errors import InputError, LimitExceeded, PlanError
from aiflow_cli.links import load_link
from aiflow_cli.plan import solve
from aiflow_cli.plan.synthetic import synthetic_profile
from aiflow_cli.runtime import protocol

ROOT = Path(__file__).resolve().parent.parent / "aiflow_cli"
#: Library files that still name flags (owned by other work in flight; remove each entry once its file is done).
NOT_YET: dict[str, int] = {}


@pytest.mark.parametrize(
    "exc, cli",
    [
        (InputError("speed=1.5: too fast", param="speed"), "--speed 1.5: too fast"),
        (
            InputError("speeds[edge]=0: a speed must be a positive number", param="speeds"),
            "--speed edge=0: a speed must be a positive number",
        ),
        (
            InputError("give `trust` FINGERPRINT (`insecure_dev` exists)", param="trust,insecure_dev"),
            "give --trust FINGERPRINT (--insecure-dev exists)",
        ),
        (InputError("max_new_tokens=0: must be >= 1", param="max_new_tokens"), "--max-new-tokens 0: must be >= 1"),
        # only the parameters the error names are rewritten, and only where they are spelled as parameters
        (InputError("tokens=3 and max_new_tokens=4", param="tokens"), "--tokens 3 and max_new_tokens=4"),
        (PlanError("the edge profile has seq_len=8"), "the edge profile has seq_len=8"),
    ],
)
def test_errors_are_rewritten_to_flags(exc, cli) -> None:
    assert for_cli(exc) == cli


def test_a_library_error_names_the_parameter_and_the_cli_the_flag() -> None:
    prof = synthetic_profile(4, seed=2)
    with pytest.raises(InputError) as e:
        solve({"*": prof}, {"device-edge": load_link("lte")}, speeds={"device": 1.0, "edge": 0.0})
    assert "speeds[edge]=0.0" in str(e.value) and "--" not in str(e.value)
    assert for_cli(e.value).startswith("--speed edge=0.0: ")


def test_the_parameter_crosses_tiers_with_the_error() -> None:
    env = protocol.error_reply("edge", LimitExceeded("KV cache full (`cache_limit_bytes`)", param="cache_limit_bytes"))
    with pytest.raises(LimitExceeded) as e:
        protocol.expect_reply(env, protocol.Result)
    assert for_cli(e.value) == "edge: KV cache full (--cache-mib)"


def test_every_mapped_flag_is_a_real_flag_and_no_library_message_names_one() -> None:
    flag_re = re.compile(r"""["'(`\s]--[a-z][a-z-]+""")
    cli = "\n".join(p.read_text() for p in [ROOT / "cli.py", *(ROOT / "commands").glob("*.py")])
    for flag in set(FLAGS.values()):
        assert f'"{flag}"' in cli, flag
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "cli.py" or rel.startswith("commands/"):
            continue
        lines = [
            ln
            for ln in path.read_text().splitlines()
            if flag_re.search(ln)
            and ("Error(" in ln or ln.lstrip().startswith(('f"', '"')))
            and '"""' not in ln
            and "args" not in ln
        ]  # docstrings may show the CLI; args lists build it
        if lines:
            found[rel] = len(lines)
    assert found == NOT_YET
