"""What an installed aiflow relies on: the profiles shipped inside the package, and a clear error when an
optional extra is missing. (`make wheel-check` builds and installs the real wheel; this runs from the tree.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from aiflow_cli.links import available_links, load_link
from aiflow_cli.shipped import HARDWARE_DIR, LINKS_DIR, shipped_names


def test_shipped_profiles_are_in_the_package_and_load():
    assert LINKS_DIR.is_relative_to(HARDWARE_DIR.parent) and LINKS_DIR.parent.parent.name == "aiflow_cli"
    assert {"lte", "wan", "lan"} <= set(available_links())
    for name in available_links():
        assert load_link(name).name
    # each hardware profile loading (and carrying current fidelity figures) is test_fidelity's
    assert "cpu-2core-gpt2" in shipped_names(HARDWARE_DIR, ".json")


@pytest.mark.parametrize("module,command", [("grpc", "transport"), ("zstandard", "codec")])
def test_a_missing_bench_extra_is_one_line_naming_it(module, command):
    code = (
        f"import sys; sys.modules[{module!r}] = None; sys.argv = ['aiflow', 'bench', {command!r}, '--quick']; "
        "from aiflow_cli.cli import main; main()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert "pip install 'aiflow[bench]'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
