"""Cross-implementation comparison report from asv results.

asv compares commits, not implementations.  The fastce suite makes the
implementation an asv parameter (``impl``); this module pivots on it and
writes, per benchmark and dtype:

* a table of (batch, classes) rows with each implementation's time, fastce's
  speedup over every other implementation and fastce's fraction of the
  memory-bandwidth roof measured in the same run;
* heatmaps of fastce's speedup over torch and over numpy-stable across
  batch x classes, and a line plot of time against classes at one batch;
* accuracy and memory tables from the ``track_`` / ``peakmem_`` results.

Everything is bundled in ``report.md``; the tables are also printed.

Usage::

    fastce-report                       # latest run in .asv/results
    python -m fastce.report --commit 1a2b3c4d --machine mybox -o out/

Entries asv skipped show as ``skip``, failed ones as ``FAIL``, absent ones as
``-``; none of them is ever shown as a number.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
from pathlib import Path

__all__ = ["load_run", "build_tables", "write_report", "main"]

SKIP, FAIL, MISSING = "skip", "FAIL", "-"

# Which roof bounds which benchmark, and how many logits-sized arrays it must
# stream (binary cross-entropy reads input and target).
ROOFS = {
    "bench_cross_entropy.CrossEntropy.time_forward": ("bench_roof.Roof.time_read", 1),
    "bench_cross_entropy.CrossEntropyGrad.time_forward_grad": (
        "bench_roof.Roof.time_read_write", 1),
    "bench_logsumexp.LogSumExp.time_logsumexp": ("bench_roof.Roof.time_read", 1),
    "bench_logsumexp.LogSoftmax.time_log_softmax": ("bench_roof.Roof.time_read_write", 1),
    "bench_logsumexp.Softmax.time_softmax": ("bench_roof.Roof.time_read_write", 1),
    "bench_bce.BinaryCrossEntropy.time_forward": ("bench_roof.Roof.time_read", 2),
    "bench_bce.BinaryCrossEntropyWithLogits.time_forward": ("bench_roof.Roof.time_read", 2),
    "bench_cross_entropy.CrossEntropyKDim.time_forward": ("bench_roof.RoofKDim.time_read", 1),
    "bench_cross_entropy.CrossEntropyKDimGrad.time_forward_grad": (
        "bench_roof.RoofKDim.time_read_write", 1),
}
HEATMAP_REFS = ("torch", "numpy-stable")
# benchmarks/common.py scores an inf/nan output with this finite value
NONFINITE_ERROR = 1e30
FASTCE = "fastce"


class NoResultsError(RuntimeError):
    """Raised when there is no asv run to report on."""


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------


def _load_json(path):
    # asv writes NaN / Infinity, which json accepts
    with open(path) as f:
        return json.load(f)


def _default_results_dir():
    conf = Path("asv.conf.json")
    if conf.is_file():
        text = "\n".join(
            line for line in conf.read_text().splitlines() if not line.lstrip().startswith("//")
        )
        try:
            return Path(json.loads(text).get("results_dir", ".asv/results"))
        except ValueError:
            pass
    return Path(".asv/results")


def _unrepr(s):
    """asv stores parameter values as repr strings: "'float32'" -> 'float32'."""
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


def _run_files(results_dir):
    out = []
    for machine_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        if not (machine_dir / "machine.json").is_file():
            continue
        for f in machine_dir.glob("*.json"):
            if f.name != "machine.json":
                out.append((machine_dir.name, f))
    return out


def load_run(results_dir=None, machine=None, commit=None, env=None):
    """Load one asv run (one result file) and the benchmark metadata.

    Parameters
    ----------
    results_dir : path-like, optional
        asv's results directory (default: ``results_dir`` of ./asv.conf.json,
        else ``.asv/results``).
    machine : str, optional
        Machine name (a sub-directory); default: any.
    commit : str, optional
        Commit hash or prefix; default: any.
    env : str, optional
        Substring of the environment name (e.g. ``virtualenv``, ``existing``).

    Returns
    -------
    dict
        ``{"benchmarks": {name: {"params", "param_names", "unit", "type",
        "values"}}, "machine", "commit", "env", "path"}``; ``values`` maps a
        tuple of parameter values to a float, ``SKIP`` or ``FAIL``.  The
        newest matching file is used (by the latest ``started_at`` in it).

    Raises
    ------
    NoResultsError
        If nothing matches; the message says which command produces results.
    """
    results_dir = Path(results_dir) if results_dir is not None else _default_results_dir()
    how = (
        "Run the benchmarks first: `sh benchmarks/run.sh` (sets everything up), or "
        "`asv machine --yes && asv run --quick`, or for the installed checkout "
        "`asv run --python=same --set-commit-hash $(git rev-parse HEAD) --quick`."
    )
    if not results_dir.is_dir():
        raise NoResultsError(f"no asv results directory at {results_dir}. {how}")
    meta_path = results_dir / "benchmarks.json"
    files = _run_files(results_dir)
    if not meta_path.is_file() or not files:
        raise NoResultsError(f"no asv runs in {results_dir}. {how}")
    meta = _load_json(meta_path)

    candidates = []
    for mach, path in files:
        if machine is not None and mach != machine:
            continue
        data = _load_json(path)
        if commit is not None and not str(data.get("commit_hash", "")).startswith(commit):
            continue
        if env is not None and env not in str(data.get("env_name", "")):
            continue
        cols = data.get("result_columns", [])
        started = 0
        if "started_at" in cols:
            i = cols.index("started_at")
            started = max(
                (r[i] for r in data.get("results", {}).values() if len(r) > i and r[i]),
                default=0,
            )
        candidates.append((started, os.path.getmtime(path), mach, path, data))
    if not candidates:
        raise NoResultsError(
            f"no asv run in {results_dir} matches machine={machine!r} commit={commit!r} "
            f"env={env!r}. {how}"
        )
    _, _, mach, path, data = max(candidates, key=lambda c: (c[0], c[1]))

    cols = data["result_columns"]
    i_res, i_par = cols.index("result"), cols.index("params")
    benchmarks = {}
    for name, row in data.get("results", {}).items():
        info = meta.get(name, {})
        params = [[_unrepr(v) for v in p] for p in (row[i_par] or [])]
        result = row[i_res]
        if not isinstance(result, list):
            result = [result]
        combos = list(itertools.product(*params)) if params else [()]
        values = {}
        for combo, v in zip(combos, result):
            if v is None:
                values[combo] = FAIL
            elif isinstance(v, float) and math.isnan(v):
                values[combo] = SKIP
            else:
                values[combo] = float(v)
        benchmarks[name] = {
            "params": params,
            "param_names": info.get("param_names", [f"p{i}" for i in range(len(params))]),
            "unit": info.get("unit", ""),
            "type": info.get("type", name.rsplit(".", 1)[-1].split("_", 1)[0]),
            "values": values,
        }
    return {
        "benchmarks": benchmarks,
        "machine": mach,
        "commit": data.get("commit_hash", "?"),
        "env": data.get("env_name", "?"),
        "path": str(path),
    }


# ---------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------


def _is_num(v):
    return isinstance(v, float)


def fmt_time(v):
    """Seconds -> '12.3 us' etc.; markers pass through."""
    if not _is_num(v):
        return v
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if abs(v) >= scale or unit == "ns":
            return f"{v / scale:.3g} {unit}"
    return str(v)  # pragma: no cover


def fmt_bytes(v):
    if not _is_num(v):
        return v
    return f"{v / 2**20:.1f} MiB"


def fmt_value(v, unit):
    if not _is_num(v):
        return v
    if unit == "seconds":
        return fmt_time(v)
    if unit == "bytes":
        return fmt_bytes(v)
    if math.isinf(v):
        return "inf"
    if unit == "relative error":
        if v >= NONFINITE_ERROR:
            return "inf/nan"
        return f"{v:.1e}"
    if unit.startswith("x "):
        return f"{v:.2f}x"
    return f"{v:.4g}"


def _ratio(num, den):
    if _is_num(num) and _is_num(den) and den > 0:
        return num / den
    # the marker of whichever side is missing
    for v in (den, num):
        if not _is_num(v):
            return v
    return MISSING


def _fmt_speedup(v):
    return f"{v:.2f}x" if _is_num(v) else v


def _fmt_pct(v):
    return f"{100 * v:.0f}%" if _is_num(v) else v


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------


def _short(name):
    return name.split(".", 1)[-1]


def build_tables(run):
    """Pivot a loaded run into tables.

    Returns
    -------
    list of dict
        Each ``{"title", "benchmark", "dtype", "headers", "rows", "notes",
        "kind"}`` with ``rows`` a list of lists of strings.
    """
    benches = run["benchmarks"]
    tables = []
    for name in sorted(benches):
        b = benches[name]
        names = b["param_names"]
        if names and names[0] == "impl":
            tables.extend(_impl_tables(name, b, benches))
        else:
            tables.append(_plain_table(name, b))
    return tables


def _impl_tables(name, b, benches):
    names = b["param_names"]
    impls = b["params"][0]
    rest_names = names[1:]
    rest_values = b["params"][1:]
    split_dtype = "dtype" in rest_names
    di = rest_names.index("dtype") if split_dtype else None
    dtypes = rest_values[di] if split_dtype else [None]
    row_names = [n for n in rest_names if n != "dtype"]

    # an implementation with no number anywhere (a GPU one on a CPU machine,
    # torch not installed) is a note, not a column of 'skip'
    has_data = {i: any(_is_num(v) for k, v in b["values"].items() if k[0] == i) for i in impls}
    shown = [i for i in impls if has_data[i]]
    absent = [
        f"{i}: " + ("all skipped" if all(v == SKIP for k, v in b["values"].items() if k[0] == i)
                    else "no results")
        for i in impls if not has_data[i]
    ]
    unit, kind = b["unit"], b["type"]
    is_time = kind == "time"
    roof = ROOFS.get(name) if is_time else None
    refs = [i for i in shown if i != FASTCE] if FASTCE in shown else []

    out = []
    for dt in dtypes:
        headers = list(row_names) + shown
        if is_time:
            headers += [f"fastce vs {r}" for r in refs]
            if roof and FASTCE in shown:
                headers.append("fastce % of roof")
        rows = []
        for combo in itertools.product(*[v for n, v in zip(rest_names, rest_values) if n != "dtype"]):
            def key(impl, combo=combo):
                vals = list(combo)
                if split_dtype:
                    vals.insert(di, dt)
                return (impl, *vals)

            vals = {i: b["values"].get(key(i), MISSING) for i in shown}
            if all(not _is_num(v) for v in vals.values()) and vals:
                # a row skipped for every implementation (size cap) says so once
                row = list(combo) + [vals[shown[0]]] * len(shown)
            else:
                row = list(combo) + [fmt_value(vals[i], unit) for i in shown]
            if is_time:
                f = vals.get(FASTCE, MISSING)
                row += [_fmt_speedup(_ratio(vals[r], f)) for r in refs]
                if roof and FASTCE in shown:
                    rb = benches.get(roof[0])
                    if rb is not None:
                        rvals = list(combo)
                        if split_dtype:
                            rvals.insert(di, dt)
                        rv = rb["values"].get(tuple(rvals), MISSING)
                        rv = rv * roof[1] if _is_num(rv) else rv
                    else:
                        rv = MISSING
                    row.append(_fmt_pct(_ratio(rv, f)))
            rows.append([str(c) for c in row])
        notes = []
        if absent:
            notes.append("Not shown: " + "; ".join(absent) + ".")
        if roof and FASTCE in shown:
            notes.append(
                f"Roof: {_short(roof[0])}"
                + (f" x {roof[1]} (arrays streamed)" if roof[1] != 1 else "")
                + "; % of roof = roof time / fastce time."
            )
        if is_time and refs:
            notes.append("Speedup = other implementation's time / fastce's time (>1: fastce faster).")
        title = _short(name) + (f" [{dt}]" if dt else "") + (f" ({unit})" if not is_time else "")
        out.append({
            "title": title, "benchmark": name, "dtype": dt, "headers": headers,
            "rows": rows, "notes": notes, "kind": kind,
        })
    return out


def _plain_table(name, b):
    names = b["param_names"] or []
    rows = []
    for combo in itertools.product(*b["params"]) if b["params"] else [()]:
        v = b["values"].get(tuple(combo), MISSING)
        rows.append([str(c) for c in combo] + [fmt_value(v, b["unit"])])
    return {
        "title": _short(name), "benchmark": name, "dtype": None,
        "headers": list(names) + [b["unit"] or "value"], "rows": rows, "notes": [],
        "kind": b["type"],
    }


def text_table(t):
    """Render a table dict as aligned plain text."""
    cells = [t["headers"]] + t["rows"]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(t["headers"]))]
    line = "  ".join("-" * w for w in widths)
    out = [t["title"], line]
    out.append("  ".join(str(h).rjust(w) for h, w in zip(t["headers"], widths)))
    out.append(line)
    for r in t["rows"]:
        out.append("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    out.extend(t["notes"])
    return "\n".join(out)


def markdown_table(t):
    """Render a table dict as a GitHub Markdown table."""
    out = ["| " + " | ".join(t["headers"]) + " |",
           "|" + "|".join("---:" for _ in t["headers"]) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in t["rows"]]
    if t["notes"]:
        out.append("")
        out += [f"*{n}*" for n in t["notes"]]
    return "\n".join(out)


# ---------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------


def _grid_values(b, impl, dtype):
    """(batches, classes, {(batch, classes): value}) of a benchmark with those params."""
    names = b["param_names"]
    ib, ic, idt = names.index("batch"), names.index("classes"), names.index("dtype")
    batches = [int(x) for x in b["params"][ib]]
    classes = [int(x) for x in b["params"][ic]]
    out = {}
    for k, v in b["values"].items():
        if k[0] == impl and k[idt] == dtype:
            out[(int(k[ib]), int(k[ic]))] = v
    return batches, classes, out


def _safe(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def make_plots(run, out_dir, line_batch=512):
    """Write heatmaps and line plots; return their paths grouped by benchmark.

    Returns
    -------
    dict
        ``{(benchmark, dtype): [Path, ...]}``.  Empty if matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return {}
    import numpy as np

    out_dir = Path(out_dir)
    written = {}
    for name, b in sorted(run["benchmarks"].items()):
        names = b["param_names"]
        if b["type"] != "time" or not names or names[0] != "impl" or not {
            "batch", "classes", "dtype"} <= set(names):
            continue
        impls = b["params"][0]
        if FASTCE not in impls:
            continue
        for dt in b["params"][names.index("dtype")]:
            batches, classes, f = _grid_values(b, FASTCE, dt)
            if not any(_is_num(v) for v in f.values()):
                continue
            paths = []
            refs = [r for r in HEATMAP_REFS if r in impls]
            fig, axes = plt.subplots(1, len(refs), figsize=(5.2 * len(refs), 3.8), squeeze=False)
            for ax, ref in zip(axes[0], refs):
                _, _, r = _grid_values(b, ref, dt)
                grid = np.full((len(batches), len(classes)), np.nan)
                labels = [[MISSING] * len(classes) for _ in batches]
                for i, nb in enumerate(batches):
                    for j, nc in enumerate(classes):
                        s = _ratio(r.get((nb, nc), MISSING), f.get((nb, nc), MISSING))
                        if _is_num(s):
                            grid[i, j] = math.log2(s)
                            labels[i][j] = f"{s:.2g}x"
                        else:
                            labels[i][j] = s
                lim = max(1.0, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
                # skipped / failed cells: grey, labelled
                cmap = plt.get_cmap("RdBu").with_extremes(bad="0.85")
                im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap,
                               norm=TwoSlopeNorm(0.0, -lim, lim), aspect="auto")
                for i in range(len(batches)):
                    for j in range(len(classes)):
                        ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8)
                ax.set_xticks(range(len(classes)), [str(c) for c in classes])
                ax.set_yticks(range(len(batches)), [str(x) for x in batches])
                ax.set_xlabel("classes")
                ax.set_ylabel("batch")
                ax.set_title(f"fastce speedup over {ref}")
                cb = fig.colorbar(im, ax=ax)
                cb.set_label("log2(speedup)  (blue: fastce faster)")
            fig.suptitle(f"{_short(name)} [{dt}]")
            fig.tight_layout()
            p = out_dir / f"heatmap_{_safe(_short(name))}_{dt}.png"
            fig.savefig(p, dpi=100)
            plt.close(fig)
            paths.append(p)

            # time vs classes at one batch, every implementation with data
            nb = line_batch if line_batch in batches else batches[len(batches) // 2]
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            plotted = False
            for impl in impls:
                _, _, v = _grid_values(b, impl, dt)
                pts = [(c, v[(nb, c)]) for c in classes if _is_num(v.get((nb, c)))]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
                    plotted = True
            roof = ROOFS.get(name)
            if roof and roof[0] in run["benchmarks"]:
                rb = run["benchmarks"][roof[0]]
                if "batch" in rb["param_names"]:
                    _, _, rv = _grid_values({**rb, "param_names": ["impl", *rb["param_names"]],
                                             "params": [["roof"], *rb["params"]],
                                             "values": {("roof", *k): x for k, x in
                                                        rb["values"].items()}}, "roof", dt)
                    pts = [(c, rv[(nb, c)] * roof[1]) for c in classes
                           if _is_num(rv.get((nb, c)))]
                    if pts:
                        ax.plot(*zip(*pts), "k--", label=f"roof ({_short(roof[0]).split('.')[-1]})")
            if plotted:
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("classes")
                ax.set_ylabel("time per call (s)")
                ax.set_title(f"{_short(name)} [{dt}], batch {nb}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
                fig.tight_layout()
                p = out_dir / f"lines_{_safe(_short(name))}_{dt}_batch{nb}.png"
                fig.savefig(p, dpi=100)
                paths.append(p)
            plt.close(fig)
            written[(name, dt)] = paths
    return written


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def write_report(run, out_dir, plots=True, line_batch=512, stream=None):
    """Write ``report.md`` (+ PNGs) to ``out_dir`` and print the tables.

    Parameters
    ----------
    run : dict
        From :func:`load_run`.
    out_dir : path-like
    plots : bool
        Write PNGs (needs matplotlib).
    line_batch : int
        Batch size of the time-vs-classes line plots.
    stream : file, optional
        Where the text tables go (default stdout; None-like to silence).

    Returns
    -------
    (Path, list of Path)
        The Markdown file and the images written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(run)
    images = make_plots(run, out_dir, line_batch=line_batch) if plots else {}
    header = (
        f"machine `{run['machine']}`, commit `{str(run['commit'])[:8]}`, "
        f"environment `{run['env']}`"
    )
    if stream is None:
        stream = sys.stdout
    if stream:
        print(f"fastce benchmark report: {header}\n", file=stream)
        for t in tables:
            print(text_table(t) + "\n", file=stream)

    md = [
        "# fastce benchmark report", "",
        f"From {header}; results file `{run['path']}`.", "",
        "Times are asv's medians per call.  `skip` = skipped by the benchmark "
        "(size cap, library or GPU absent), `FAIL` = the benchmark raised, `-` = "
        "not in this run.", "",
    ]
    order = ["time", "track", "peakmemory"]
    sections = {"time": "Timings", "track": "Accuracy and other tracked values",
                "peakmemory": "Peak memory"}
    all_images = []
    for kind in order:
        ts = [t for t in tables if t["kind"] == kind]
        if not ts:
            continue
        md += [f"## {sections[kind]}", ""]
        for t in ts:
            md += [f"### {t['title']}", "", markdown_table(t), ""]
            for p in images.get((t["benchmark"], t["dtype"]), []):
                md += [f"![{p.stem}]({p.name})", ""]
                all_images.append(p)
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md))
    return md_path, all_images


def main(argv=None):
    """Command-line entry point (``fastce-report``, ``python -m fastce.report``)."""
    ap = argparse.ArgumentParser(
        prog="fastce-report",
        description="Compare implementations across an asv run of the fastce suite.",
    )
    ap.add_argument("--results-dir", default=None,
                    help="asv results directory (default: from ./asv.conf.json, .asv/results)")
    ap.add_argument("--machine", default=None, help="machine name (default: newest run's)")
    ap.add_argument("--commit", default=None, help="commit hash or prefix (default: newest run)")
    ap.add_argument("--env", default=None,
                    help="substring of the asv environment name, e.g. 'existing' or 'virtualenv'")
    ap.add_argument("-o", "--output-dir", default="fastce-report",
                    help="where report.md and the PNGs go (default: ./fastce-report)")
    ap.add_argument("--line-batch", type=int, default=512,
                    help="batch size of the time-vs-classes plots (default 512)")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    ap.add_argument("-q", "--quiet", action="store_true", help="don't print the tables")
    args = ap.parse_args(argv)
    try:
        run = load_run(args.results_dir, args.machine, args.commit, args.env)
    except NoResultsError as exc:
        print(f"fastce-report: {exc}", file=sys.stderr)
        return 2
    print(describe_run(run, args.results_dir), file=sys.stderr)
    md, images = write_report(run, args.output_dir, plots=not args.no_plots,
                              line_batch=args.line_batch,
                              stream=False if args.quiet else sys.stdout)
    why = ""
    if not images:
        why = (" (--no-plots)" if args.no_plots else
               " (plots need a time_ benchmark over impl x batch x classes x dtype with "
               "fastce results; this run has none)")
    print(f"wrote {md} and {len(images)} images in {md.parent}{why}")
    return 0


def describe_run(run, results_dir=None):
    """One line saying which results file the report reads and how much of the suite it holds
    (a subset run, e.g. ``-b`` or ``--python=same --quick``, shows only what it ran)."""
    results_dir = Path(results_dir) if results_dir is not None else _default_results_dir()
    try:
        n_suite = len([k for k in _load_json(results_dir / "benchmarks.json")
                       if k != "version"])
    except (OSError, ValueError):
        n_suite = None
    n_run = len(run["benchmarks"])
    of = f" of the suite's {n_suite}" if n_suite else ""
    return (f"fastce-report: read {run.get('path')} (commit {str(run.get('commit'))[:8]}, "
            f"machine {run.get('machine')}, env {run.get('env')}): {n_run}{of} benchmarks "
            f"in this run; pick another with --commit/--machine/--env")


if __name__ == "__main__":
    sys.exit(main())
