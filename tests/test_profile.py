"""`aiflow profile`: structure and plausibility of a tiny model's profile, schema validation, CLI errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from aiflow_cli import codec
from aiflow_cli.cli import app
from aiflow_cli.errors import InputError
from aiflow_cli.models import load_model
from aiflow_cli.models.inputs import sample_image_file
from aiflow_cli.profile import load_profile, profile_model, save_profile

_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}


@pytest.fixture(scope="module")
def gpt2_profile():
    return profile_model(
        "builtin:gpt2-tiny", seq_len=16, decode_tokens=8, repeats=2, warmup=1, calibration_items=4, calibration_tokens=8
    )


def test_profile_structure_and_plausible_numbers(gpt2_profile):
    p = gpt2_profile
    m = load_model("builtin:gpt2-tiny")
    assert [s.name for s in p.stages] == m.stage_names and len(p.cuts) == m.num_stages - 1
    assert p.family == "gpt2" and p.task == "generate" and p.model_hash == m.model_hash
    prepare, *model_stages = p.stages
    # stage 0 prepares the raw input (token ids pass through): no weights, runs once per request, not per token
    assert (prepare.name, prepare.kind, prepare.param_bytes, prepare.decode_ms) == ("input.prepare", "input", 0, None)
    for s in model_stages:
        assert s.prefill_ms > 0 and s.prefill_p90_ms >= s.prefill_ms
        assert s.decode_ms is not None and s.decode_ms > 0
        assert s.param_bytes == m.stage_param_bytes(s.index) > 0
        assert s.peak_activation_bytes > 0
    prepared, *cuts = p.cuts
    # after stage 0: token ids, mask, positions; control tensors go raw under every codec
    assert {t.role for t in prepared.tensors} == {"control"} and len({r.bytes for r in prepared.codecs.values()}) == 1
    for cut in cuts:
        for t in cut.tensors:
            n = 1
            for d in t.shape:
                n *= d
            assert t.bytes == n * _ELEMENT_BYTES[t.dtype]
        assert cut.activation_bytes == sum(t.bytes for t in cut.tensors)
        hidden = next(t for t in cut.tensors if t.role == "hidden")
        assert hidden.shape == [1, 16, 64] and hidden.decode_step_bytes == 64 * 4
        assert set(cut.codecs) == set(codec.default_codecs())
        raw, int8, fp16, int4 = (cut.codecs[c] for c in ("raw", "int8", "fp16", "int4"))
        assert raw.bytes >= cut.activation_bytes  # frames carry headers
        assert int4.bytes < int8.bytes < fp16.bytes < raw.bytes
        assert raw.fidelity.min == raw.fidelity.mean == 1.0 and raw.fidelity.max_abs_error == 0.0
        assert 0.0 <= int8.fidelity.min <= int8.fidelity.mean <= 1.0 and int8.fidelity.kl_mean is not None
        assert 0.99 < int8.fidelity.cosine < 1.0 and int4.fidelity.cosine <= int8.fidelity.cosine
        assert raw.encode_ms > 0 and raw.decode_ms > 0
        assert raw.decode_step_bytes is not None and raw.decode_step_bytes < raw.bytes
    # the raw input, before stage 0: int64 input_ids, attention_mask, position_ids, measured like a cut, raw only
    assert p.input.after_stage == -1 and p.input.activation_bytes == 3 * 16 * 8 and set(p.input.codecs) == {"raw"}
    assert p.input.codecs["raw"].bytes >= p.input.activation_bytes and p.input.codecs["raw"].fidelity.min == 1.0
    assert p.input.description.startswith("raw input: input_ids [1, 16] int64")
    assert p.settings.seq_len == 16 and p.settings.decode_tokens == 8 and p.hardware.cores >= 1
    cal = p.calibration
    assert (cal.metric, cal.source, cal.items, cal.tokens) == ("token_agreement", "calibration set", 4, 8)
    # an early exit after each stage (the head on its output); after the last block it is the model itself
    exits = [s.exit_acceptance for s in p.stages]
    assert exits[0] is None  # input.prepare: token ids, no hidden state to exit from
    assert exits[-1] is None and all(e is not None and 0 <= e <= 1 for e in exits[1:-1])
    assert exits[-2] == 1.0
    assert cal.measured_cuts == list(range(len(p.cuts))) and cal.hash


def test_profile_roundtrips_through_the_schema(gpt2_profile, tmp_path):
    path = tmp_path / "p.json"
    save_profile(gpt2_profile, path)
    again = load_profile(str(path))
    assert again == gpt2_profile
    data = json.loads(path.read_text())
    del data["cuts"][0]["codecs"]["raw"]
    path.write_text(json.dumps(data))
    from aiflow_cli.errors import SchemaError

    with pytest.raises(SchemaError, match="raw"):
        load_profile(str(path))


def test_captioner_profile_marks_side_and_prefill_only_encoder():
    p = profile_model(
        "builtin:captioner-tiny",
        codecs=["int8"],
        repeats=1,
        warmup=0,
        decode_tokens=4,
        calibration_items=2,
        calibration_tokens=4,
    )
    enc = [s for s in p.stages if s.kind.startswith("encoder")]
    assert enc and all(s.decode_ms is None for s in enc) and p.stages[0].decode_ms is None  # input.prepare: once
    assert all(s.decode_ms is not None for s in p.stages[1:] if not s.kind.startswith("encoder"))
    side_cuts = [c for c in p.cuts if any(t.role == "side" for t in c.tensors)]
    assert side_cuts and side_cuts[0].after_stage == len(enc)  # stage 0 prepares the input, then the encoder
    # the raw input is the sample image's JPEG file; stage 0 decodes and preprocesses it (measured, not free)
    assert [t.name for t in p.input.tensors] == ["image_file"]
    assert p.input.activation_bytes == len(sample_image_file()) and p.stages[0].prefill_ms > 0
    assert [t.name for t in p.cuts[0].tensors][0] == "pixel_values"
    for c in side_cuts:
        side = next(t for t in c.tensors if t.role == "side")
        assert side.decode_step_bytes is None
        # a decode step does not resend the encoder output
        assert c.codecs["raw"].decode_step_bytes < side.bytes
    assert set(p.cuts[0].codecs) == {"raw", "int8"}


def test_encoder_profile_has_no_decode():
    p = profile_model("builtin:bert-tiny", codecs=["int8"], repeats=1, warmup=0)
    assert p.task == "encode" and all(s.decode_ms is None for s in p.stages)
    assert p.calibration.metric == "embedding_cosine" and p.cuts[0].codecs["int8"].fidelity.kl_mean is None
    with pytest.raises(InputError, match="decode_tokens"):
        profile_model("builtin:bert-tiny", decode_tokens=4, repeats=1)


runner = CliRunner()


def test_cli_profile_writes_valid_json(tmp_path):
    out = tmp_path / "vit.json"
    r = runner.invoke(
        app,
        [
            "profile",
            "builtin:vit-tiny",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--codecs",
            "int8,fp16",
            "-o",
            str(out),
            "--label",
            "test-box",
        ],
    )
    assert r.exit_code == 0, r.output
    p = load_profile(str(out))
    assert p.hardware.label == "test-box" and p.settings.image_size == 32
    r = runner.invoke(app, ["profile", "builtin:vit-tiny", "--repeats", "1", "--json", "--codecs", "int8"])
    assert r.exit_code == 0 and json.loads(r.stdout)["family"] == "vit"


def test_cli_models_lists_builtins():
    r = runner.invoke(app, ["models", "--json"])
    assert r.exit_code == 0 and "builtin:vit-gpt2-captioner" in r.stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["profile", "builtin:no-such"], 5, "unknown built-in"),
        (["profile", "builtin:vit-tiny", "--image-size", "64"], 3, "32x32"),
        (["profile", "builtin:gpt2-tiny", "--seq-len", "0"], 3, "--seq-len 0"),
        (["profile", "builtin:gpt2-tiny", "--codecs", "int9"], 4, "int9"),
        (["profile", "builtin:gpt2-tiny", "--dtype", "float64"], 3, "dtype"),
        (["profile", "builtin:gpt2-tiny", "--repeats", "0"], 3, "repeats"),
    ],
)
def test_cli_bad_inputs_exit_nonzero_without_traceback(args, code, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "aiflow_cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and message in r.stderr


def test_profile_settings_have_one_home_checked_without_a_model():
    """`profile_model`'s settings are a :class:`ProfileSettings`: the CLI checks them before torch, the profiler
    takes the same object (or its field names as keywords), and an unknown name is refused before any work."""
    from aiflow_cli.profile import ProfileSettings

    with pytest.raises(InputError, match="repeats=0: must be >= 1"):
        ProfileSettings(repeats=0).check()
    with pytest.raises(InputError, match="fidelity_cuts='every:0'"):
        ProfileSettings(fidelity_cuts="every:0").check()
    with pytest.raises(InputError, match="unknown profile setting 'repeat'"):
        profile_model("builtin:no-such-model", repeat=1)
    s = ProfileSettings.of(ProfileSettings(batch=2), codecs=["raw"])
    assert s.batch == 2 and s.codecs == ("raw",)
