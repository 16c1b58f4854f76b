"""fastce.report on a small but real asv results directory made by asv itself."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastce import report

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("asv")
pytest.importorskip("matplotlib")

CE = "bench_cross_entropy.CrossEntropy.time_forward"
# what the suite declares (roofs, peers), read the way fastce-report reads it
DECL = report.load_declarations(ROOT / "benchmarks")
SELECT = [
    r"^bench_cross_entropy\.CrossEntropy\.time_forward\('(fastce|numpy-stable|torch)', (1|32), (2|10), 'float32'\)",
    # a compiled peer on one cell of its grid (jax: torch.compile's cold compile in a fresh
    # clone costs tens of seconds; tests/test_benchmarks.py runs its benchmarks)
    r"^bench_cross_entropy\.CrossEntropy\.time_forward\('jax', 1, 10, 'float32'\)",
    r"^bench_roof\.Roof\.time_read\((1|32), (2|10), 'float32'\)",
    r"^bench_cross_entropy\.CrossEntropyAccuracy\.track_max_rel_error\('(fastce|numpy-naive)', 10, 'float32', (1|100)\)",
]


@pytest.fixture(scope="module")
def asv_results(tmp_path_factory):
    """Run asv (--python=same) on a tiny subset; return the results dir."""
    tmp = tmp_path_factory.mktemp("asv")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    conf = json.loads("\n".join(
        l for l in (ROOT / "asv.conf.json").read_text().splitlines()
        if not l.lstrip().startswith("//")))
    conf.update(repo=str(ROOT), benchmark_dir=str(ROOT / "benchmarks"),
                results_dir=str(tmp / "results"), html_dir=str(tmp / "html"),
                env_dir=str(tmp / "env"))
    (tmp / "asv.conf.json").write_text(json.dumps(conf))
    env = dict(os.environ, HOME=str(tmp))  # asv's machine file goes to $HOME
    asv = [sys.executable, "-m", "asv"]
    subprocess.run(asv + ["machine", "--yes", "--machine", "testbox"], cwd=tmp, env=env,
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    cmd = asv + ["run", "--python=same", "--set-commit-hash", commit, "--machine", "testbox",
                 "-a", "rounds=1", "-a", "repeat=3", "-a", "warmup_time=0"]
    for s in SELECT:
        cmd += ["-b", s]
    out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=600)
    assert (tmp / "results" / "benchmarks.json").is_file(), out.stdout + out.stderr
    return tmp / "results"


def _raw(results_dir, name, column="result"):
    """The raw asv numbers (or another column), read independently of the report."""
    [f] = [p for p in (results_dir / "testbox").glob("*.json") if p.name != "machine.json"]
    d = json.loads(f.read_text())
    cols = d["result_columns"]
    res, params = (d["results"][name][cols.index(c)] for c in (column, "params"))
    import itertools
    keys = [tuple(v.strip("'") for v in k) for k in itertools.product(*params)]
    return dict(zip(keys, res))


def test_tables_match_raw_results(asv_results):
    run = report.load_run(asv_results)
    assert run["machine"] == "testbox"
    tables = {(t["benchmark"], t["dtype"]): t for t in report.build_tables(run, DECL)}
    t = tables[(CE, "float32")]
    h = t["headers"]
    assert h[:2] == ["batch", "classes"]
    for col in ("fastce", "numpy-stable", "fastce vs numpy-stable", "fastce % of roof"):
        assert col in h
    rows = {(r[0], r[1]): dict(zip(h, r)) for r in t["rows"]}
    raw = _raw(asv_results, CE)
    roof = _raw(asv_results, "bench_roof.Roof.time_read")
    for b, c in [("1", "2"), ("1", "10"), ("32", "2"), ("32", "10")]:
        f = raw[("fastce", b, c, "float32")]
        s = raw[("numpy-stable", b, c, "float32")]
        assert f > 0 and s > 0
        q25, q75 = (_raw(asv_results, CE, q)[("fastce", b, c, "float32")]
                    for q in ("stats_q_25", "stats_q_75"))
        noisy = (q75 - q25) / f > report.NOISY_SPREAD
        assert rows[(b, c)]["fastce"] == report.fmt_time(f) + (report.NOISY_MARK if noisy else "")
        assert rows[(b, c)]["fastce vs numpy-stable"] == f"{s / f:.2f}x"
        frac = roof[(b, c, "float32")] / f
        assert rows[(b, c)]["fastce % of roof"] == (
            report.OVER_ROOF if frac > 1 else f"{100 * frac:.0f}%")
    # not run here: marked as skipped, never a number
    assert rows[("4096", "1000")]["fastce"] == report.SKIP
    assert rows[("4096", "1000")]["fastce vs numpy-stable"] == report.SKIP
    # GPU columns hold nothing on this machine: listed in a note instead
    assert "fastce-cuda" not in h
    assert any("fastce-cuda" in n for n in t["notes"])

    acc = tables[("bench_cross_entropy.CrossEntropyAccuracy.track_max_rel_error", "float32")]
    arows = {(r[0], r[1]): dict(zip(acc["headers"], r)) for r in acc["rows"]}
    assert arows[("10", "100")]["numpy-naive"] == "inf/nan"  # exp(300) overflows float32
    assert float(arows[("10", "1")]["fastce"]) < 1e-5


def test_cli_writes_markdown_and_pngs(asv_results, tmp_path, capsys):
    rc = report.main(["--results-dir", str(asv_results), "-o", str(tmp_path), "--line-batch", "32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "CrossEntropy.time_forward [float32]" in printed
    md = (tmp_path / "report.md").read_text()
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "heatmap_CrossEntropy.time_forward_float32.png" in pngs
    assert "lines_CrossEntropy.time_forward_float32_batch32.png" in pngs
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md
    assert "| batch | classes |" in md


def test_module_entry_point(asv_results, tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastce.report", "--results-dir",
                          str(asv_results), "-o", str(tmp_path), "--no-plots", "-q"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "report.md").is_file() and not list(tmp_path.glob("*.png"))


def test_empty_results_dir_says_what_to_run(tmp_path, capsys):
    assert report.main(["--results-dir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "sh benchmarks/run.sh" in err and "asv run" in err
    (tmp_path / "results").mkdir()
    assert report.main(["--results-dir", str(tmp_path / "results")]) == 2
    assert "no asv runs" in capsys.readouterr().err


def test_markers_never_numbers():
    run = {"benchmarks": {CE: {
        "params": [["fastce", "torch"], ["1"], ["2", "10"], ["float32"]],
        "param_names": ["impl", "batch", "classes", "dtype"], "unit": "seconds", "type": "time",
        "values": {("fastce", "1", "2", "float32"): 1e-5,
                   ("torch", "1", "2", "float32"): report.FAIL,
                   ("fastce", "1", "10", "float32"): report.SKIP,
                   ("torch", "1", "10", "float32"): 3e-5},
    }}, "machine": "m", "commit": "c", "env": "e", "path": "p"}
    [t] = report.build_tables(run)
    row = dict(zip(t["headers"], t["rows"][0]))
    assert row["torch"] == "FAIL" and row["fastce vs torch"] == "FAIL"
    assert row["fastce"] == "10 us"
    row = dict(zip(t["headers"], t["rows"][1]))
    assert row["fastce"] == "skip" and row["fastce vs torch"] == "skip"
    assert row["torch"] == "30 us"
    # absent from the run entirely
    run["benchmarks"][CE]["values"].pop(("fastce", "1", "10", "float32"))
    [t] = report.build_tables(run)
    row = dict(zip(t["headers"], t["rows"][1]))
    assert row["fastce"] == "-" and row["fastce vs torch"] == "-"



def test_front_end_beside_its_library():
    """A suite with fastce, fastce-torch and torch columns (linear cross-entropy) compares
    fastce-torch with torch as well as fastce with both."""
    lin = "bench_linear.LinearCrossEntropy.time_forward_backward"
    run = {"benchmarks": {lin: {
        "params": [["fastce", "fastce-torch", "torch"], ["(4, 8, 16)"]],
        "param_names": ["impl", "shape"], "unit": "seconds", "type": "time",
        "values": {("fastce", "(4, 8, 16)"): 2.0, ("fastce-torch", "(4, 8, 16)"): 1.0,
                   ("torch", "(4, 8, 16)"): 1.5},
    }}, "machine": "m", "commit": "c", "env": "e", "path": "p"}
    [t] = report.build_tables(run)
    assert t["headers"][-3:] == ["fastce vs fastce-torch", "fastce vs torch",
                                 "fastce-torch vs torch"]
    row = dict(zip(t["headers"], t["rows"][0]))
    assert row["fastce-torch"] == report.fmt_time(1.0) and row["torch"] == report.fmt_time(1.5)
    assert row["fastce-torch vs torch"] == report._fmt_speedup(1.5)
    assert row["fastce vs torch"] == report._fmt_speedup(0.75)
    assert any("fastce-torch vs torch = torch's time" in n for n in t["notes"])


def _doctored(results_dir, tmp_path, edit):
    """A copy of the real results directory whose result file ``edit(data)`` changed."""
    out = tmp_path / "results"
    shutil.copytree(results_dir, out)
    [f] = [p for p in (out / "testbox").glob("*.json") if p.name != "machine.json"]
    data = json.loads(f.read_text())
    edit(data)
    f.write_text(json.dumps(data))
    return out


def _set(data, name, combo, column, value):
    """Set ``column`` of ``name``'s entry for ``combo`` (asv's flattened layout)."""
    import itertools
    cols = data["result_columns"]
    row = data["results"][name]
    keys = [tuple(v.strip("'") for v in k) for k in itertools.product(*row[cols.index("params")])]
    row[cols.index(column)][keys.index(combo)] = value


def test_declarations_come_from_the_suite():
    b = DECL["benchmarks"]
    assert b[CE] == {"op": "cross_entropy", "roof": "bench_roof.Roof.time_read", "roof_arrays": 1}
    assert b["bench_bce.BinaryCrossEntropy.time_forward"]["roof_arrays"] == 2
    assert b["bench_logsumexp.Softmax.time_softmax"]["roof"] == "bench_roof.Roof.time_read_write"
    assert b["bench_cross_entropy.CrossEntropyKDimGrad.time_forward_grad"]["roof"] == (
        "bench_roof.RoofKDim.time_read_write")
    assert {"torch-compile", "jax"} == set(DECL["compiled_impls"])
    assert "numpy-naive" in DECL["not_peers"] and "torch-cuda" in DECL["gpu_impls"]
    # every declared roof is a benchmark of the suite
    from benchmarks import bench_roof
    for d in b.values():
        mod, cls, meth = d["roof"].split(".")
        assert mod == "bench_roof" and hasattr(getattr(bench_roof, cls), meth)


def test_compiled_peer_has_columns(asv_results):
    run = report.load_run(asv_results)
    tables = {(t["benchmark"], t["dtype"]): t for t in report.build_tables(run, DECL)}
    h = tables[(CE, "float32")]["headers"]
    for col in ("jax", "fastce vs jax"):
        assert col in h
    raw = _raw(asv_results, CE)
    assert raw[("jax", "1", "10", "float32")] > 0
    # outside the compiled peers' grid: skipped, not failed
    rows = {(r[0], r[1]): dict(zip(h, r)) for r in tables[(CE, "float32")]["rows"]}
    assert rows[("32", "2")]["jax"] == report.SKIP


def test_summary_lines_match_the_raw_results(asv_results):
    run = report.load_run(asv_results)
    [line] = [s for s in report.summaries(run, DECL) if s["benchmark"] == CE]
    raw = _raw(asv_results, CE)
    cells = [(b, c) for b in ("1", "32") for c in ("2", "10")]
    peers = ["numpy-stable", "torch", "jax"]
    ratios = {}
    for b, c in cells:
        best = min((raw[(p, b, c, "float32")], p) for p in peers
                   if isinstance(raw.get((p, b, c, "float32")), float))
        ratios[(b, c)] = (raw[("fastce", b, c, "float32")] / best[0], best[1])
    assert line["cells"] == 4
    assert line["fastest"] == sum(r <= 1 for r, _ in ratios.values())
    worst = max(ratios, key=lambda k: ratios[k][0])
    assert line["worst"] == worst and line["peer"] == ratios[worst][1]
    assert line["ratio"] == pytest.approx(ratios[worst][0])
    assert line["line"].startswith(
        f"CrossEntropy.time_forward [float32]: fastest in {line['fastest']} of 4 cells; "
        f"worst cell ({worst[0]}, {worst[1]}): {ratios[worst][0]:.2f}x vs {ratios[worst][1]}")


def test_noisy_cells_and_roof_above_100_percent_are_flagged(asv_results, tmp_path, capsys):
    combo = ("fastce", "32", "10", "float32")
    raw = _raw(asv_results, CE)
    f = raw[combo]

    def edit(data):
        # quartiles 0.5x .. 1.5x the median: an interquartile range of 100 %
        _set(data, CE, combo, "stats_q_25", 0.5 * f)
        _set(data, CE, combo, "stats_q_75", 1.5 * f)
        # a roof 3x slower than fastce: 300 % of the roof, impossible
        _set(data, "bench_roof.Roof.time_read", ("32", "10", "float32"), "result", 3 * f)

    doctored = _doctored(asv_results, tmp_path, edit)
    run = report.load_run(doctored)
    assert run["benchmarks"][CE]["spread"][combo] == pytest.approx(1.0)
    # the untouched cells keep asv's own spread, which is below the threshold or not
    t = {(t["benchmark"], t["dtype"]): t for t in report.build_tables(run, DECL)}[(CE, "float32")]
    rows = {(r[0], r[1]): dict(zip(t["headers"], r)) for r in t["rows"]}
    assert rows[("32", "10")]["fastce"] == report.fmt_time(f) + report.NOISY_MARK
    assert rows[("32", "10")]["fastce % of roof"] == report.OVER_ROOF
    assert any(report.OVER_ROOF in n and "measuring error" in n for n in t["notes"])
    assert any(n.startswith("~ = noisy") for n in t["notes"])
    # no table anywhere prints a roof fraction above 100 %
    for tab in report.build_tables(run, DECL):
        if "fastce % of roof" in tab["headers"]:
            i = tab["headers"].index("fastce % of roof")
            for r in tab["rows"]:
                if r[i].endswith("%") and r[i][:-1].isdigit():
                    assert int(r[i][:-1]) <= 100
    [line] = [s for s in report.summaries(run, DECL) if s["benchmark"] == CE]
    assert line["noisy"] >= 1 and "noisy cell" in line["line"]
    # the report names the flags and states the load average run.sh recorded
    (doctored / report.LOAD_DIR).mkdir()
    (doctored / report.LOAD_DIR / f"{run['commit']}.json").write_text(
        json.dumps({"before": "0.50 0.40 0.30 1/100 7", "after": "1.50 0.90 0.45 2/120 9"}))
    assert report.main(["--results-dir", str(doctored), "-o", str(tmp_path / "out"),
                        "--no-plots", "--benchmark-dir", str(ROOT / "benchmarks")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "before the run: 0.50 0.40 0.30 1/100 7; after: 1.50 0.90 0.45 2/120 9" in md
    assert "## Summary" in md and line["line"] in md
    assert report.OVER_ROOF in md and "300%" not in md
