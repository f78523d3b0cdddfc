"""The README is a test: every ```python block runs as written, and every command line of its ```bash blocks
runs at a tiny size or is one of the few lines a test cannot run, named in SKIPPED with the reason.

A bash line that matches neither RUNNERS nor SKIPPED fails, so the README cannot grow an untested command.
Python blocks run in-process (each in a fresh namespace, on CPU tensors; the suite's conftest has set
TRITON_INTERPRET=1 without CUDA, so the kernels themselves run). Command lines run as subprocesses of this
interpreter, in a fresh folder, with this environment passed through.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fusedtx.highres import STRATEGIES
from fusedtx.kernels.support import FAMILIES

README = Path(__file__).resolve().parents[1] / "README.md"
TIMEOUT = 300

# Lines a test cannot run, each with the reason. A pattern matches one command (a line split on "&&").
SKIPPED = {
    r"pip install( .*)?": "installing the project is the precondition of this test",
    r"python -m pytest( .*)?": "the test suite itself (this test runs inside it)",
    r"bash bench/gpu_check\.sh": "the prepared GPU run (minutes on a GPU: tests, benches, profiles)",
}


def blocks(lang: str) -> list[tuple[int, str]]:
    """(first line number, source) of every ```lang block of the README."""
    found, current, start = [], None, 0
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if current is None and line.strip() == f"```{lang}":
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            found.append((start, "\n".join(current) + "\n"))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, f"README.md: the ```{lang} block from line {start} is not closed"
    return found


def commands() -> list[tuple[int, str]]:
    """(line number, command) of every command of the ```bash blocks: comments dropped, "&&" chains split."""
    found = []
    for start, source in blocks("bash"):
        for offset, line in enumerate(source.splitlines()):
            words = shlex.split(line, comments=True)
            command = []
            for word in [*words, "&&"]:
                if word == "&&":
                    if command:
                        found.append((start + offset, shlex.join(command)))
                    command = []
                else:
                    command.append(word)
    return found


PYTHON_BLOCKS = blocks("python")
COMMANDS = commands()


def test_readme_has_examples():
    assert len(PYTHON_BLOCKS) >= 5 and len(COMMANDS) >= 5


@pytest.mark.parametrize("source", [s for _, s in PYTHON_BLOCKS], ids=[f"line{n}" for n, _ in PYTHON_BLOCKS])
def test_python_block(source, capsys):
    """The block runs as written, in a fresh namespace, as a user would paste it."""
    exec(compile(source, str(README), "exec"), {"__name__": "__readme__"})
    if "print(report)" in source:  # the swap example prints what was replaced
        assert "replaced" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------------------


def _environment(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # $OUT would redirect the benches' output
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(argv: list[str], cwd: Path, **env: str | None) -> str:
    """Run ``argv`` (its ``fusedtx`` / ``python`` replaced by this interpreter); its output, after checking
    that it exited 0."""
    if argv[0] == "fusedtx":
        argv = [sys.executable, "-m", "fusedtx", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    done = subprocess.run(argv, cwd=cwd, env=_environment(**env), capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{shlex.join(argv)} exited {done.returncode}:\n{output[-4000:]}"
    return done.stdout


def _positional(args: list[str], takes_value: tuple[str, ...]) -> list[str]:
    """The positional arguments among ``args``, skipping the options and the values of ``takes_value``."""
    found, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in takes_value
        else:
            found.append(arg)
    return found


def _option(argv: list[str], name: str, default: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def run_info(argv, cwd):
    out = _run(argv, cwd)
    assert "op family" in out and "window_attention" in out, out


def run_profile(argv, cwd):
    # The line as written, made tiny (argparse takes the last of a repeated option).
    # As a user runs it on a CPU: no interpreter, so fusedtx takes its fast PyTorch path (the kernels are
    # tested elsewhere; in the interpreter this line alone took half a minute).
    out = _run([*argv, "--model", "vit_tiny_patch16_224", "--img-size", "64", "--batch", "1", "--steps", "1"], cwd,
               TRITON_INTERPRET=None)
    report = cwd / _option(argv, "--out", "fusedtx-profile") / "report.md"
    assert report.is_file(), out
    assert "Speedup" in out and "fusedtx.swap: replaced" in out, out


def run_profile_strategy(argv, cwd):
    # The line as written, made small: ViT-Ti at 384 px (576 patches; at 256 merging cannot halve the
    # FLOPs); a --weights file named on the line is written first, with that model's weights, so the line loads
    # a real checkpoint.
    tiny = ["--model", "vit_tiny_patch16_224", "--img-size", "384", "--batch", "1", "--steps", "1"]
    if "--weights" in argv:
        from safetensors.torch import save_file

        from fusedtx.highres.compare import build_model

        save_file(build_model("vit_tiny_patch16_224").state_dict(), cwd / _option(argv, "--weights", ""))
    out = _run([*argv, *tiny], cwd, TRITON_INTERPRET=None)
    folder = cwd / _option(argv, "--out", "fusedtx-profile")
    assert (folder / "strategies.md").is_file() and (folder / "strategies.png").is_file(), out
    rows = {line.split("|")[1].split()[0] for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    strategy = _option(argv, "--strategy", "")
    assert rows == ({"strategy", *STRATEGIES} if strategy == "all" else {"strategy", "full", strategy}), out
    assert ("Weights: " in out) == ("--weights" in argv), out


def run_bench(argv, cwd):
    assert "--quick" in argv, "a README bench line must be --quick, so that it runs here at a tiny size"
    out = _run(argv, cwd, TRITON_INTERPRET=None)  # as a CPU user runs it: the fast path, not the interpreter
    names = _positional(argv[2:], takes_value=("--out",))
    families = list(FAMILIES) if names in ([], ["all"]) else names
    folder = cwd / _option(argv, "--out", "fusedtx-bench")  # the documented default: ./fusedtx-bench
    for family in families:
        assert (folder / f"{family}.md").is_file(), out
        assert f"{family}:" in out, out


def run_bench_module(argv, cwd):
    assert "--quick" in argv, "a README bench line must be --quick, so that it runs here at a tiny size"
    out = _run(argv, cwd, TRITON_INTERPRET=None)
    family = re.fullmatch(r"fusedtx\.bench\.bench_(\w+)", argv[2]).group(1)
    folder = cwd / _option(argv, "--out", "fusedtx-bench")
    table = folder / f"{family}.md"
    assert table.is_file(), out
    assert "fusedtx" in table.read_text(encoding="utf-8")


def run_resources(argv, cwd):
    # It compiles for GPU targets with Triton's real compiler, which the interpreter replaces: no
    # TRITON_INTERPRET for it. The line's targets and families, but only the largest config of each kernel
    # (--sample 1; every config of a family takes minutes); a line naming no family checks one small one.
    if not _positional(argv[3:], takes_value=("--arch", "--out-dir", "--sample", "--tables")):
        argv = [*argv, "sinusoidal"]
    out = _run([*argv, "--sample", "1"], cwd, TRITON_INTERPRET=None)
    assert re.search(r"^sm_\d+a?(, sm_\d+a?)*: .*fit", out, re.M), out


def run_check(argv, cwd):
    # The self-test as written, on its fastest family unless the line names some (all four take ~20 s here).
    if not _positional(argv[2:], takes_value=()):
        argv = [*argv, "sinusoidal"]
    out = _run(argv, cwd)
    assert "backend triton forced" in out and "comparisons within their bounds" in out, out


def run_tune(argv, cwd):
    # The line as written, made tiny, its file kept in the test's folder.
    # A model line tunes one tiny attention shape instead (--shapes wins over --model): every kernel of a
    # model takes its candidates through the interpreter, which is slow and tested in tests/test_tune.py.
    out = _run([*argv, "--shapes", "1,2,9,16"], cwd, FUSEDTX_CONFIG_DIR=str(cwd))
    assert "kernel configs tuned" in out and list(cwd.glob("*.json")), out


# (pattern of one command, runner); the first match runs it.
RUNNERS = [
    (r"fusedtx tune( .*)?", run_tune),
    (r"fusedtx info", run_info),
    (r"fusedtx check( .*)?", run_check),
    (r"fusedtx profile --strategy .*", run_profile_strategy),
    (r"fusedtx profile( .*)?", run_profile),
    (r"fusedtx bench( .*)?", run_bench),
    (r"python -m fusedtx\.bench\.bench_\w+( .*)?", run_bench_module),
    (r"python -m fusedtx\.bench\.resources( .*)?", run_resources),
]


def classify(command: str):
    """The runner of ``command``, or the reason it is skipped; AssertionError for a command nobody knows."""
    for pattern, runner in RUNNERS:
        if re.fullmatch(pattern, command):
            return runner
    for pattern, reason in SKIPPED.items():
        if re.fullmatch(pattern, command):
            return reason
    raise AssertionError(f"README.md runs {command!r}, which tests/test_readme.py neither runs nor knows to skip: "
                         "add a runner (at a tiny size) or, if it cannot run in a test, a SKIPPED pattern")


def test_unknown_command_fails():
    with pytest.raises(AssertionError, match="neither runs nor knows"):
        classify("fusedtx frobnicate --all")
    with pytest.raises(AssertionError, match="neither runs nor knows"):
        classify("rm -rf build")


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[f"line{n}" for n, _ in COMMANDS])
def test_command(command, tmp_path):
    how = classify(command)
    if isinstance(how, str):
        pytest.skip(f"{command}: {how}")
    how(shlex.split(command), tmp_path)
