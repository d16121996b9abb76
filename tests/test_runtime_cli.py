"""`aiflow serve`, `aiflow run` and `aiflow demo` as a user runs them: clear errors and exit codes, and the demo's
JSON on the tiny captioner."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from runtime_support import three_tier_plan

from aiflow_cli.transport import Identity


def aiflow(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aiflow_cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    three_tier_plan("builtin:gpt2-tiny", d / "plan.json", codec="raw")
    ident = Identity.generate(d / "keys")
    return d, ident


@pytest.mark.parametrize(
    "args, code, text",
    [
        ("serve --role fog --plan {plan} --identity {keys} --trust {fp}", 3, "choose edge or cloud"),
        ("serve --role edge --plan nope.json --identity {keys} --trust {fp}", 3, "nope.json"),
        ("serve --role cloud --plan {plan} --identity {keys}", 3, "--trust"),
        ("serve --role edge --plan {plan} --identity {keys} --trust {fp}", 3, "--next"),
        ("serve --role cloud --plan {plan} --identity {keys} --trust {fp} --speed 2", 3, "slower"),
        ("serve --role cloud --plan {plan} --identity {keys} --trust {fp} --metrics 9100", 3, "--metrics '9100'"),
        ("run hi --plan {plan} --identity {keys} --trust {fp}", 3, "--edge"),
        ("run hi --plan {plan} --identity {keys} --trust {fp} --edge 127.0.0.1:9 --timeout 1.5", 9, "edge"),
        ("run hi --plan {plan} --identity {keys} --trust {fp} --edge 127.0.0.1:9 --fallback sideways", 3, "fallback"),
        ("run missing.jpg --plan {plan} --identity nokeys --trust {fp} --edge 127.0.0.1:9", 3, "nokeys"),
    ],
)
def test_bad_runtime_invocations_exit_with_their_code_and_no_traceback(setup, args, code, text):
    d, ident = setup
    argv = args.format(plan=d / "plan.json", keys=d / "keys", fp=ident.fingerprint).split()
    out = aiflow(*argv, timeout=60)
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    assert text in out.stderr, out.stderr


def test_demo_json_on_the_tiny_captioner(tmp_path):
    out = aiflow(
        "demo",
        "--model",
        "builtin:captioner-tiny",
        "--workdir",
        str(tmp_path),
        "--max-new-tokens",
        "6",
        "--device-speed",
        "0.25",
        "--cloud-speed",
        "1",
        "--repeats",
        "2",
        "--json",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Warning" not in out.stderr, out.stderr[:2000]
    data = json.loads(out.stdout)
    s = data["strategies"]
    assert list(s) == ["device-only", "edge-only", "cloud-only", "raw-split", "aiflow"]
    assert data["dilation"] == 1.0
    for e in s.values():
        assert len(e["tokens"][0]) == 6 and len(e["samples_ms"]) == 2
        assert e["warm_ms"] > 0 and e["predicted_ms"] > 0 and e["cold_ms"] > 0
        assert 0 < e["ttft_ms"] <= max(e["samples_ms"]) + 1e-6 and e["tokens_per_s"] > 0
        assert e["predicted_cold_ms"] >= e["predicted_ms"]
    # baselines run the model uncoded: same tokens as the monolithic model
    assert s["device-only"]["agreement"] == 1.0 and s["cloud-only"]["agreement"] == 1.0
    assert 0.0 <= s["aiflow"]["agreement"] <= 1.0
    assert s["device-only"]["links"] == {}
    assert s["cloud-only"]["links"]["device-edge"]["up"] > 0
    assert s["cloud-only"]["links"]["edge-cloud"]["up"] > 0
    assert isinstance(data["verdict"]["fastest"], bool)
    # the profile is cached (shared with the benchmark): a second run does not measure again
    from aiflow_cli.runtime.demo import profile_cache_dir

    assert list(profile_cache_dir().glob("builtin_captioner-tiny-*.json"))


def test_demo_of_a_language_model_measures_the_split_that_keeps_the_prompt_on_the_device(tmp_path):
    """A slow device (0.01x) makes the unconstrained plan upload the prompt; ``private`` is the planner's best
    placement whose device runs a model stage, measured plainly and with the device drafting."""
    out = aiflow(
        "demo", "--model", "builtin:llama-tiny", "--workdir", str(tmp_path), "--max-new-tokens", "8",
        "--device-speed", "0.01", "--cloud-speed", "1", "--repeats", "1", "--min-fidelity", "1", "--json",
        timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    pv = data["private"]
    plain, fast = pv["private"], pv["private+spec"]
    assert plain["plan"].startswith("device[0:") and not plain["plan"].startswith("device[0:1]")
    assert plain["links"]["device-edge"]["messages"] == len(plain["tokens"][0])  # one round trip per token
    assert fast["plan"] == plain["plan"] and fast["speculation"]["rounds"] >= 1
    assert fast["links"]["device-edge"]["messages"] == 1 + fast["speculation"]["rounds"]
    assert plain["agreement"] == fast["agreement"] == 1.0  # lossless cuts: both are the model's greedy answer
    assert "private" not in data["strategies"]  # beside the strategies, not in the verdict
