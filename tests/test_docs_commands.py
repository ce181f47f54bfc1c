"""Every command of the five scripts written in the README or a docs page parses as written: no renamed flag, no
unknown preset, no value the parser rejects. (Parsing only: nothing is trained.)"""
import contextlib
import importlib
import io
import re
import shlex

import pytest

from conftest import REPO

SCRIPTS = ["wgan_optimizer_study", "alpha_dual_gan", "adaptive_wgan", "tempered_lens", "sqd_monitor"]
COMMAND = re.compile(r"python (?:\S+/)?(" + "|".join(SCRIPTS) + r")\.py([^`\n#|]*)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text().replace("\\\n", " ")  # join continued shell lines
        for match in COMMAND.finditer(text):
            flags = re.split(r"\s[;&]|\s>", match.group(2))[0]  # stop at a shell separator or redirection
            argv = shlex.split(flags)
            if any(a.startswith(("--resume", "--help", "-h")) or "$" in a or "<" in a or "NAME" in a or "…" in a
                   for a in argv):
                continue  # placeholders and shell variables: not literal commands
            found.append((page.name, match.group(1), argv))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 30 and {name for _, name, _ in COMMANDS} == set(SCRIPTS)


@pytest.mark.parametrize("page,name,argv", COMMANDS, ids=[f"{p}:{n}:{' '.join(a)[:60]}" for p, n, a in COMMANDS])
def test_documented_command_parses(page, name, argv):
    module = importlib.import_module(name)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            module.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: python {name}.py {' '.join(argv)} does not parse: {e.code} {stderr.getvalue()[-300:]}")


BENCH = re.compile(r"python (?:\S+/)?benchmarks/(bench_\w+)\.py([^`\n#|]*)")


def documented_benchmark_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text().replace("\\\n", " ")
        for match in BENCH.finditer(text):
            argv = shlex.split(re.split(r"\s[;&]|\s>", match.group(2))[0])
            if not any("…" in a for a in argv):
                found.append((page.name, match.group(1), argv))
    return found


BENCH_COMMANDS = documented_benchmark_commands()


def test_the_docs_show_every_benchmark():
    assert {name for _, name, _ in BENCH_COMMANDS} == {p.stem for p in (REPO / "benchmarks").glob("bench_*.py")}


@pytest.mark.parametrize("page,name,argv", BENCH_COMMANDS,
                         ids=[f"{p}:{n}:{' '.join(a)[:60]}" for p, n, a in BENCH_COMMANDS])
def test_documented_benchmark_command_parses(page, name, argv, monkeypatch):
    import sys

    import tyro
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    module = importlib.import_module(name)
    config = getattr(module, "BenchArgs", None) or module.Args
    try:
        with contextlib.redirect_stderr(io.StringIO()) as stderr, contextlib.redirect_stdout(io.StringIO()):
            tyro.cli(config, args=argv)
    except SystemExit as e:
        pytest.fail(f"{page}: python benchmarks/{name}.py {' '.join(argv)} does not parse: {e.code} "
                    f"{stderr.getvalue()[-300:]}")
    assert sys.modules[name].__file__.startswith(str(REPO / "benchmarks"))
