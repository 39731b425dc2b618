"""The examples run end to end at tiny sizes, so they cannot rot."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {
    "attention_demo": ("attention_demo.py", ["--seq", "64", "--heads", "2", "--reps", "1"]),
    "ring_attention": ("ring_attention.py", ["--nproc", "2", "--seq", "64", "--heads", "2",
                                             "--head-dim", "8", "--value-head-dim", "12",
                                             "--reps", "1", "--slots", "100", "--causal"]),
    "ntm_copy": ("ntm_copy.py", ["--steps", "3", "--batch", "2", "--max-length", "3"]),
    "memn2n_babi": ("memn2n_babi.py", ["--train", "40", "--test", "20", "--epochs", "2",
                                       "--linear-start", "1"]),
    **{f"seq2seq_{kind}": ("seq2seq_attention.py", ["--attention", kind, "--steps", "3",
                                                    "--batch", "4", "--hidden", "16"])
       for kind in ("bahdanau", "luong")},
    "product_key_lm": ("product_key_lm.py", ["--quick", "--report", "product_key_lm.md"]),
    **{name: ("decode.py", ["--batch", "3", "--layers", "1", "--heads", "6", "--kv-heads", "2",
                            "--head-dim", "12", "--prompt", "7", "--steps", "4",
                            "--page-size", "3", "--vocab", "64", *flags])
       for name, flags in (("decode", []),
                           ("decode_left_padded", ["--left-padded", "--interleaved"]))},
    "mla_decode": ("mla_decode.py", ["--batch", "3", "--layers", "1", "--dim", "24", "--heads",
                                     "3", "--q-rank", "12", "--kv-rank", "20", "--d-nope", "10",
                                     "--d-rope", "6", "--d-v", "12", "--prompt", "7", "--steps",
                                     "4", "--page-size", "3", "--vocab", "64"]),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_example_runs(name, tmp_path):
    script, args = RUNS[name]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)  # examples run as users run them
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script),
                             *args], capture_output=True, text=True, env=env, timeout=600,
                            cwd=tmp_path)  # files the examples write land there
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()
