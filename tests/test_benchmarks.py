"""Tests of benchmarks/: the harness's operator count on steps whose operators are known, its optimizer share, the
four-mode matrix (each mode in its own process), and a tiny eager run of every benchmark checked on the rows it
emits. Timings are never asserted: they are measurements, not properties."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import harness  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_op_calls_count_the_operators_that_do_work():
    x, y = torch.randn(8, 8), torch.randn(8, 8)

    def step(k):  # matmul, relu_ and sum do work; view, transpose and empty only alias or allocate
        out = (x @ y).relu_().view(-1).sum()
        x.t(), torch.empty(3)
        return out

    calls, top, optimizer_calls = harness.op_calls(step, top=5)
    assert (calls, optimizer_calls) == (3, 0)
    # each counted by its innermost working operator: matmul → mm (whose resolve_conj calls are no work),
    # relu_ → clamp_min_, and sum → the fill_ it runs inside (CPU's sum calls one)
    assert dict(top) == {"aten::mm": 1, "aten::clamp_min_": 1, "aten::fill_": 1}
    # a composite operator counts once, by the operators it runs: linear = addmm (one kernel) here
    assert harness.op_calls(lambda k: torch.nn.functional.linear(x, y, y[0]))[0] == 1


def test_optimizer_calls_are_those_inside_an_optimizer_step():
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = torch.optim.SGD(params, lr=0.1, foreach=False)  # the for-loop implementation: one add_ per tensor
    for p in params:
        p.grad = torch.ones(4)

    def step(k):
        (params[0] * 2).sum()
        opt.step()

    calls, _, optimizer_calls = harness.op_calls(step)
    assert optimizer_calls == 3 and calls == 3 + 2  # mul, sum outside the step


def test_the_matrix_runs_each_mode_in_its_own_process(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(REPO / 'benchmarks')!r})\nimport harness\n"
                      "harness.emit({'argv': sys.argv[1:], 'pid': os.getpid()})\n")
    rows = harness.run_matrix(str(script), ["--steps", "2", "--matrix"])
    assert [r["argv"] for r in rows] == [["--steps", "2", flag, "--matmul-precision", precision]
                                         for flag, precision in [("--no-compile", "highest"), ("--no-compile", "medium"),
                                                                 ("--compile", "highest"), ("--compile", "medium")]]
    assert len({r["pid"] for r in rows}) == 4


@pytest.mark.parametrize("argv", [
    ["bench_alpha_dual_gan.py", "--layers", "1", "--stacks", "1", "2", "--steps", "2"],
    ["bench_wgan_optimizer_study.py", "--cells", "1", "2", "--steps", "1", "--warmup", "1", "--batch-size", "16"],
    ["bench_tempered_lens.py", "--preset", "cpu-mini", "--width", "4", "--lens-width", "4", "--batch-size", "4",
     "--steps", "1", "--warmup", "1"],
    ["bench_adaptive_wgan.py", "--loss", "wgan-gp", "--channels", "1", "--width", "4", "--batch-size", "4",
     "--steps", "1", "--warmup", "1"],
    ["bench_sqd_monitor.py", "--image-sizes", "16", "--widths", "4", "8", "--batch-size", "8", "--iterations", "1",
     "--no-monitor"],
])
def test_every_benchmark_emits_rows_with_operator_counts(argv):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / argv[0]), *argv[1:], "--threads", "1"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line[len(harness.RESULT):]) for line in out.stdout.splitlines() if line.startswith(harness.RESULT)]
    assert len(rows) >= 2 and all(r["mode"] == "eager, highest" for r in rows)
    assert all(r["op_calls"] > 0 for r in rows if "op_calls" in r) and sum("op_calls" in r for r in rows) >= 2
    assert "| mode |" in out.stdout  # the markdown table
