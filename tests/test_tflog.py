"""TensorFlow's start-up log lines under TF_CPP_MIN_LOG_LEVEL (tf_bus.tflog), and which
`tf-bus` commands import TensorFlow at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tf_bus.tflog import ABSL_NOTICE, filtered_stderr, hidden, min_log_level

REPO = Path(__file__).resolve().parents[1]
# Lines TensorFlow 2.21 wrote here at `import tensorflow`, and some that only look alike.
ONEDNN = b"I0000 00:00:1796590057.628672   21805 port.cc:153] oneDNN custom operations are on."
GUARD = b"I0000 00:00:1796590057.763361   21805 cpu_feature_guard.cc:227] This TensorFlow binary is optimized"
WARN = b"W1206 20:51:02.123456    4242 tensorflow/core/framework/op_kernel.cc:1857] OP_REQUIRES failed"
ERROR = b"E1206 20:51:02.123456    4242 grpc_server.cc:88] UNAVAILABLE"
FATAL = b"F1206 20:51:02.123456    4242 logging.cc:12] Check failed"


@pytest.mark.parametrize("line, level, expected", [
    (ABSL_NOTICE, 0, False), (ABSL_NOTICE, 1, True), (ABSL_NOTICE + b"\n", 2, True),
    (ONEDNN, 0, False), (ONEDNN, 1, True), (ONEDNN + b"\n", 2, True), (GUARD, 2, True),
    (WARN, 1, False), (WARN, 2, True),
    (ERROR, 2, False), (ERROR, 3, True),
    (FATAL, 3, False),  # a crash's reason is never hidden
    (b"To enable the following instructions: AVX2 AVX512F, in other operations, rebuild", 3, False),
    (b"UserWarning: I0000 00:00:1.0 1 port.cc:1] quoted inside a Python warning", 3, False),
    (b"I0000 is how the line starts, but not an Abseil prefix", 3, False),
    (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDOUT", 3, False),
    (b"", 3, False),
])
def test_hidden_follows_tensorflows_levels(line, level, expected):
    assert hidden(line, level) is expected


@pytest.mark.parametrize("value, level", [(None, 0), ("", 0), ("0", 0), ("2", 2), (" 3 ", 3), ("two", 0), ("-1", 0)])
def test_min_log_level_reads_the_variable_as_tensorflow_does(value, level):
    assert min_log_level({} if value is None else {"TF_CPP_MIN_LOG_LEVEL": value}) == level


def test_filtered_stderr_drops_hidden_lines_written_to_the_descriptor_and_passes_the_rest():
    """In a process of its own (stderr a pipe, as under a terminal or a log file): what C++
    writes to descriptor 2 (os.write, a child process inheriting it) is filtered, in order
    with Python's sys.stderr; a last line without a newline is not lost; afterwards
    descriptor 2 is the real stderr again."""
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        from tf_bus.tflog import filtered_stderr
        with filtered_stderr(2):
            os.write(2, {ABSL_NOTICE!r} + b"\\n" + {ONEDNN!r} + b"\\nkept by C++\\n")
            print("kept by Python", file=sys.stderr, flush=True)
            child = "import os; os.write(2, " + repr({WARN!r} + b"\\n" + {ERROR!r} + b"\\n") + ")"
            subprocess.run([sys.executable, "-c", child], check=True)
            os.write(2, b"no newline at the end")
        os.write(2, b"\\n" + {ONEDNN!r} + b" after the block\\n")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["kept by C++", "kept by Python", ERROR.decode(), "no newline at the end",
                                     ONEDNN.decode() + " after the block"]


def test_level_zero_leaves_the_descriptor_alone(capfd):
    before = os.fstat(2)
    with filtered_stderr(0):
        assert os.fstat(2) == before
        os.write(2, ONEDNN + b"\n")
    assert capfd.readouterr().err == ONEDNN.decode() + "\n"


def _stderr(argv: list[str], level: str, tmp: Path) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": level, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    assert r.returncode == 0, r.stderr
    return r.stderr


def _absl(text: str) -> list[str]:
    return [line for line in text.splitlines() if hidden(line.encode(), 1)]


@pytest.mark.slow
def test_tf_bus_starts_quietly_at_the_level_it_sets_and_passes_everything_at_zero(prepared, tmp_path):
    """`tf-bus eda` imports TensorFlow. At level 2 (the CLI's default) none of TensorFlow's
    start-up INFO lines or the Abseil notice reach stderr, though a plain `import tensorflow`
    prints them at that level; at level 0 the CLI shows exactly what the plain import shows."""
    plain = {level: _absl(_stderr(["-c", "import tf_bus, tensorflow"], level, tmp_path)) for level in "20"}
    assert plain["2"], "TensorFlow no longer logs before its level applies: tf_bus.tflog may go"
    eda = ["-m", "tf_bus.cli", "eda", str(prepared)]
    quiet = _stderr([*eda, "--out", str(tmp_path / "quiet")], "2", tmp_path)
    assert _absl(quiet) == [] and "Traceback" not in quiet
    loud = _absl(_stderr([*eda, "--out", str(tmp_path / "loud")], "0", tmp_path))
    strip = lambda lines: [line.split("]", 1)[1] for line in lines if "]" in line]  # noqa: E731  (no timestamps)
    assert strip(loud) == strip(plain["0"]) and len(loud) > len(plain["2"])
    assert (tmp_path / "quiet" / "eda.json").is_file() and (tmp_path / "loud" / "eda.json").is_file()


@pytest.mark.slow
def test_commands_listed_without_tensorflow_never_import_it(synthetic_release, tmp_path):
    """Each command of WITHOUT_TENSORFLOW, run for real in one fresh process, leaves
    TensorFlow unimported (so `tf-bus check` starts in a fraction of a second); the list
    names real commands."""
    from tf_bus.cli import WITHOUT_TENSORFLOW, build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(WITHOUT_TENSORFLOW) <= set(commands)
    for side, predicted in (("a", [0, 1, 2, 0]), ("b", [0, 1, 1, 2])):
        rows = [{"name": f"case ({i})", "label": y, "probabilities": [0.7 if k == p else 0.15 for k in range(3)]}
                for i, (y, p) in enumerate(zip([0, 1, 2, 2], predicted))]
        (tmp_path / f"{side}.json").write_text(json.dumps({"per_image": rows}))
    runs = [["synth", "s", "--n", "9"], ["check", "s"], ["prepare", str(synthetic_release), "p"],
            ["stage", "prepare", str(synthetic_release), "q"],
            ["compare", "a.json", "b.json", "--resamples", "200", "--out", "c.json", "--plot", "c.png"]]
    assert {r[0] for r in runs} == set(WITHOUT_TENSORFLOW)
    script = textwrap.dedent(f"""
        import sys
        from tf_bus.cli import main
        for argv in {runs!r}:
            assert main(argv) == 0, argv
        print("tensorflow" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "False"
    assert json.loads((tmp_path / "c.json").read_text())["kind"] == "classifier"
    assert (tmp_path / "c.png").is_file() and (tmp_path / "q" / "manifest.json").is_file()


def test_a_process_without_stderr_still_imports():
    """A daemon may run with descriptor 2 closed: the filter steps aside instead of failing."""
    script = "import os; os.close(2)\nfrom tf_bus.tflog import filtered_stderr\nwith filtered_stderr(2):\n    print('in')"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (r.returncode, r.stdout) == (0, "in\n")


def test_without_tensorflow_a_command_that_needs_it_says_how_to_install_it(synthetic_release, tmp_path):
    """TensorFlow is an extra: in a Python without it (here: blocked in sys.modules), a command
    that needs it is refused in one line naming the extras, and `check` still runs."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tensorflow"] = None  # `import tensorflow` now fails as where it is not installed
        from tf_bus.cli import main
        print(main(["eda", {str(synthetic_release)!r}, "--out", "eda"]), main(["check", {str(synthetic_release)!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "2 0"
    assert r.stderr.strip().splitlines() == [
        f"tf-bus eda: error: TensorFlow is not installed for {sys.executable}. It is an extra: pip install -e "
        "'.[cpu]' (tensorflow-cpu) or -e '.[gpu]' (NVIDIA GPUs); see the README, \"Installing\". `synth`, `check`, "
        "`prepare`, `stage` and `compare` run without it."]
    assert not (tmp_path / "eda").exists()


def test_a_stderr_that_went_away_never_blocks_the_writers():
    """The real stderr is a pipe nobody reads any more: the filter keeps draining, so writing
    more than a pipe holds (64 KiB) inside the block neither blocks nor fails."""
    script = textwrap.dedent("""
        import os
        r, w = os.pipe()
        os.close(r)
        os.dup2(w, 2)
        from tf_bus.tflog import filtered_stderr
        with filtered_stderr(2):
            for _ in range(64):
                os.write(2, b"x" * 4095 + b"\\n")
        print("done")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (r.returncode, r.stdout) == (0, "done\n"), r.stderr
