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
SELECT = [
    r"^bench_cross_entropy\.CrossEntropy\.time_forward\('(fastce|numpy-stable|torch)', (1|32), (2|10), 'float32'\)",
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
                 "-a", "rounds=1", "-a", "repeat=1", "-a", "warmup_time=0"]
    for s in SELECT:
        cmd += ["-b", s]
    out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=600)
    assert (tmp / "results" / "benchmarks.json").is_file(), out.stdout + out.stderr
    return tmp / "results"


def _raw(results_dir, name):
    """The raw asv numbers, read independently of the report."""
    [f] = [p for p in (results_dir / "testbox").glob("*.json") if p.name != "machine.json"]
    d = json.loads(f.read_text())
    cols = d["result_columns"]
    res, params = (d["results"][name][cols.index(c)] for c in ("result", "params"))
    import itertools
    keys = [tuple(v.strip("'") for v in k) for k in itertools.product(*params)]
    return dict(zip(keys, res))


def test_tables_match_raw_results(asv_results):
    run = report.load_run(asv_results)
    assert run["machine"] == "testbox"
    tables = {(t["benchmark"], t["dtype"]): t for t in report.build_tables(run)}
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
        assert rows[(b, c)]["fastce"] == report.fmt_time(f)
        assert rows[(b, c)]["fastce vs numpy-stable"] == f"{s / f:.2f}x"
        assert rows[(b, c)]["fastce % of roof"] == f"{100 * roof[(b, c, 'float32')] / f:.0f}%"
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
