"""Cross-implementation comparison report from asv results.

asv compares commits, not implementations.  The fastce suite makes the
implementation an asv parameter (``impl``); this module pivots on it and
writes, per benchmark and dtype:

* a table of (batch, classes) rows with each implementation's time, fastce's
  speedup over every other implementation and fastce's fraction of the
  memory-bandwidth roof measured in the same run;
* per timing benchmark and dtype, a summary line: in how many cells fastce is the
  fastest CPU implementation, and its worst cell with its ratio to the fastest peer;
* heatmaps of fastce's speedup over each peer (torch, torch.compile, jax,
  numpy-stable) across batch x classes, and a line plot of time against classes at
  one batch;
* accuracy and memory tables from the ``track_`` / ``peakmem_`` results.

Which benchmark is bounded by which roof, which operation it times and which
implementations are peers is read from the benchmark suite itself
(``benchmarks/common.py``'s ``declarations()``: the classes' ``op``, ``roof`` and
``roof_arrays`` attributes), not written here.  Cells whose samples spread widely
(interquartile range over ``NOISY_SPREAD`` of the median, from asv's stored
statistics) are marked noisy; a fraction of the roof above 100 % can only be a
measuring error and is flagged instead of printed; the machine's load average before
and after the run (recorded by ``benchmarks/run.sh``) heads the report.

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

__all__ = ["load_run", "load_declarations", "build_tables", "summaries", "write_report",
           "main"]

SKIP, FAIL, MISSING = "skip", "FAIL", "-"

# What an inf/nan output scores in the accuracy benchmarks (benchmarks/common.py
# imports it from here).  Finite on purpose: asv publish's step detection crashes on
# inf.  Shown as "inf/nan".
NONFINITE_ERROR = 1e30
# A cell is noisy when its samples' interquartile range exceeds this fraction of the median.
NOISY_SPREAD = 0.2
NOISY_MARK = " ~"
# What a "% of roof" above 100 % shows instead of a figure: faster than one streaming
# pass over the same bytes is impossible, so the roof or the timing was disturbed.
OVER_ROOF = "ERR>100%"
HEATMAP_REFS = ("torch", "torch-compile", "jax", "numpy-stable")
FASTCE = "fastce"
# where benchmarks/run.sh records the load average, under the results directory
LOAD_DIR = "fastce-load"


class NoResultsError(RuntimeError):
    """Raised when there is no asv run to report on."""


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------


def _load_json(path):
    # asv writes NaN / Infinity, which json accepts
    with open(path) as f:
        return json.load(f)


def _asv_conf():
    conf = Path("asv.conf.json")
    if conf.is_file():
        text = "\n".join(
            line for line in conf.read_text().splitlines() if not line.lstrip().startswith("//")
        )
        try:
            return json.loads(text)
        except ValueError:
            pass
    return {}


def _default_results_dir():
    return Path(_asv_conf().get("results_dir", ".asv/results"))


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
        "values", "spread"}}, "machine", "commit", "env", "path", "load"}``;
        ``values`` maps a tuple of parameter values to a float, ``SKIP`` or
        ``FAIL``; ``spread`` maps it to the samples' interquartile range over the
        median where asv stored one; ``load`` is the load average recorded by
        ``benchmarks/run.sh`` (``{"before": str, "after": str}``) or None.  The
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
    i_q25 = cols.index("stats_q_25") if "stats_q_25" in cols else None
    i_q75 = cols.index("stats_q_75") if "stats_q_75" in cols else None
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
            "spread": _spreads(combos, values, row, i_q25, i_q75),
            "params": params,
            "param_names": info.get("param_names", [f"p{i}" for i in range(len(params))]),
            "unit": info.get("unit", ""),
            "type": info.get("type", name.rsplit(".", 1)[-1].split("_", 1)[0]),
            "values": values,
        }
    commit = data.get("commit_hash", "?")
    return {
        "benchmarks": benchmarks,
        "machine": mach,
        "commit": commit,
        "env": data.get("env_name", "?"),
        "path": str(path),
        "load": _load_average(results_dir, commit),
    }


def _spreads(combos, values, row, i_q25, i_q75):
    """{combo: (q75 - q25) / median} where asv stored the quartiles."""
    if i_q25 is None or i_q75 is None or len(row) <= max(i_q25, i_q75):
        return {}
    q25, q75 = row[i_q25], row[i_q75]
    if not isinstance(q25, list):
        q25, q75 = [q25], [q75]
    out = {}
    for combo, a, b in zip(combos, q25, q75):
        v = values.get(combo)
        if _is_num(v) and v > 0 and isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if not (math.isnan(a) or math.isnan(b)):
                out[combo] = (b - a) / v
    return out


def _load_average(results_dir, commit):
    path = Path(results_dir) / LOAD_DIR / f"{commit}.json"
    try:
        d = _load_json(path)
    except (OSError, ValueError):
        return None
    return {k: str(d.get(k, "?")).strip() for k in ("before", "after")}


def load_declarations(benchmark_dir=None):
    """What the benchmark suite declares: roofs, operations, peers.

    Imports the suite's ``common`` module (the parent of ``benchmark_dir`` goes on
    ``sys.path``) and calls its ``declarations()``.

    Parameters
    ----------
    benchmark_dir : path-like, optional
        The suite (default: ``benchmark_dir`` of ./asv.conf.json, else ``benchmarks``).

    Returns
    -------
    dict or None
        ``declarations()``'s dict, or None (with a message on stderr) where the suite
        cannot be found or imported: the report then has no roof columns.
    """
    if benchmark_dir is None:
        conf = _asv_conf()
        benchmark_dir = Path(conf.get("benchmark_dir", "benchmarks"))
    bdir = Path(benchmark_dir).resolve()
    if not (bdir / "common.py").is_file():
        print(f"fastce-report: no benchmark suite at {bdir}: no roofs", file=sys.stderr)
        return None
    import importlib

    sys.path.insert(0, str(bdir.parent))
    try:
        common = importlib.import_module(f"{bdir.name}.common")
        return common.declarations()
    except Exception as exc:  # a broken or foreign suite: report without roofs
        print(f"fastce-report: cannot read the suite's declarations ({exc}): no roofs",
              file=sys.stderr)
        return None
    finally:
        sys.path.remove(str(bdir.parent))


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


def build_tables(run, decl=None):
    """Pivot a loaded run into tables.

    Parameters
    ----------
    run : dict
        From :func:`load_run`.
    decl : dict, optional
        From :func:`load_declarations`; without it there are no roof columns.

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
            tables.extend(_impl_tables(name, b, benches, decl))
        else:
            tables.append(_plain_table(name, b))
    return tables


def _roof_of(name, decl):
    """(roof benchmark name, arrays streamed) declared for ``name``, or None."""
    d = (decl or {}).get("benchmarks", {}).get(name)
    if not d or not d.get("roof"):
        return None
    return d["roof"], d.get("roof_arrays", 1)


def _dtype_cells(b):
    """(row parameter names, dtypes, cells(dtype) -> [(row combo, full key builder)])."""
    names = b["param_names"]
    rest_names, rest_values = names[1:], b["params"][1:]
    split_dtype = "dtype" in rest_names
    di = rest_names.index("dtype") if split_dtype else None
    dtypes = rest_values[di] if split_dtype else [None]
    row_names = [n for n in rest_names if n != "dtype"]
    row_values = [v for n, v in zip(rest_names, rest_values) if n != "dtype"]

    def key(impl, combo, dt):
        vals = list(combo)
        if split_dtype:
            vals.insert(di, dt)
        return (impl, *vals)

    return row_names, row_values, dtypes, key


def _noisy(b, k):
    return b.get("spread", {}).get(k, 0.0) > NOISY_SPREAD


def _fmt_roof(v):
    if _is_num(v) and v > 1.0:
        return OVER_ROOF
    return _fmt_pct(v)


def _impl_tables(name, b, benches, decl=None):
    impls = b["params"][0]
    row_names, row_values, dtypes, key = _dtype_cells(b)

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
    roof = _roof_of(name, decl) if is_time else None
    # The compared implementation: fastce, or where a suite has no plain fastce column (the
    # torch modules), the first fastce-* one (fastce-torch against torch).
    ours = FASTCE if FASTCE in shown else next(
        (i for i in shown if i.startswith(FASTCE + "-")), None)
    refs = [i for i in shown if i != ours] if ours else []
    # A front end beside the plain fastce column is compared with its own library too
    # (fastce-torch vs torch): the figure its users decide on.
    twins = [(i, i[len(FASTCE) + 1:]) for i in shown
             if ours == FASTCE and i.startswith(FASTCE + "-") and i[len(FASTCE) + 1:] in shown]

    out = []
    for dt in dtypes:
        headers = list(row_names) + shown
        if is_time:
            headers += [f"{ours} vs {r}" for r in refs]
            headers += [f"{i} vs {r}" for i, r in twins]
            if roof and FASTCE in shown:
                headers.append("fastce % of roof")
        rows = []
        n_noisy = n_over = 0
        for combo in itertools.product(*row_values):
            vals = {i: b["values"].get(key(i, combo, dt), MISSING) for i in shown}
            if all(not _is_num(v) for v in vals.values()) and vals:
                # a row skipped for every implementation (size cap) says so once
                row = list(combo) + [vals[shown[0]]] * len(shown)
            else:
                row = list(combo)
                for i in shown:
                    cell = fmt_value(vals[i], unit)
                    if is_time and _is_num(vals[i]) and _noisy(b, key(i, combo, dt)):
                        cell += NOISY_MARK
                        n_noisy += 1
                    row.append(cell)
            if is_time:
                f = vals.get(ours, MISSING)
                row += [_fmt_speedup(_ratio(vals[r], f)) for r in refs]
                row += [_fmt_speedup(_ratio(vals[r], vals[i])) for i, r in twins]
                if roof and FASTCE in shown:
                    rb = benches.get(roof[0])
                    rv = rb["values"].get(key(None, combo, dt)[1:], MISSING) if rb else MISSING
                    rv = rv * roof[1] if _is_num(rv) else rv
                    frac = _ratio(rv, f)
                    n_over += _is_num(frac) and frac > 1.0
                    row.append(_fmt_roof(frac))
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
        if n_over:
            notes.append(f"{OVER_ROOF}: {n_over} cell(s) faster than the roof, which no "
                         "implementation can be: a measuring error (the roof or the timing "
                         "was disturbed), not a figure.")
        if is_time and refs:
            notes.append(f"Speedup = other implementation's time / {ours}'s time (>1: {ours} "
                         "faster)" + "".join(f"; {i} vs {r} = {r}'s time / {i}'s time"
                                             for i, r in twins) + ".")
        if n_noisy:
            notes.append(f"~ = noisy ({n_noisy} cell(s)): the samples' interquartile range "
                         f"exceeds {NOISY_SPREAD:.0%} of the median.")
        title = _short(name) + (f" [{dt}]" if dt else "") + (f" ({unit})" if not is_time else "")
        out.append({
            "title": title, "benchmark": name, "dtype": dt, "headers": headers,
            "rows": rows, "notes": notes, "kind": kind,
        })
    return out


def _peers(b, decl):
    """CPU implementations fastce is compared against in the summaries."""
    decl = decl or {}
    gpu = set(decl.get("gpu_impls", ())) | {i for i in b["params"][0] if i.endswith("-cuda")}
    not_peers = set(decl.get("not_peers", ()))
    return [i for i in b["params"][0] if i != FASTCE and i not in gpu and i not in not_peers]


def summaries(run, decl=None):
    """One line per timing benchmark and dtype: where fastce is fastest, its worst cell.

    A cell counts where fastce and at least one CPU peer (every implementation but
    fastce, the GPU ones and the suite's ``not_peers``) have a time.  The worst cell
    is the one where fastce's time over the fastest peer's time is largest.

    Returns
    -------
    list of dict
        ``{"benchmark", "dtype", "op", "fastest", "cells", "worst", "ratio", "peer",
        "noisy", "line"}``; ``worst`` is the cell's row values, ``noisy`` the number of
        noisy cells (fastce's or the peer's) among those counted.
    """
    out = []
    for name in sorted(run["benchmarks"]):
        b = run["benchmarks"][name]
        if b["type"] != "time" or not b["param_names"] or b["param_names"][0] != "impl":
            continue
        if FASTCE not in b["params"][0]:
            continue
        peers = _peers(b, decl)
        row_names, row_values, dtypes, key = _dtype_cells(b)
        op = ((decl or {}).get("benchmarks", {}).get(name) or {}).get("op")
        for dt in dtypes:
            cells = fastest = noisy = 0
            worst = None
            for combo in itertools.product(*row_values):
                f = b["values"].get(key(FASTCE, combo, dt), MISSING)
                times = {p: b["values"].get(key(p, combo, dt), MISSING) for p in peers}
                times = {p: v for p, v in times.items() if _is_num(v)}
                if not _is_num(f) or not times:
                    continue
                cells += 1
                peer = min(times, key=times.get)
                ratio = f / times[peer]
                fastest += ratio <= 1.0
                cell_noisy = _noisy(b, key(FASTCE, combo, dt)) or _noisy(b, key(peer, combo, dt))
                noisy += cell_noisy
                if worst is None or ratio > worst[1]:
                    worst = (combo, ratio, peer, f, times[peer], cell_noisy)
            if not cells:
                continue
            combo, ratio, peer, f, p, cell_noisy = worst
            cell = "(" + ", ".join(str(c) for c in combo) + ")"
            label = _short(name) + (f" [{dt}]" if dt else "")
            line = (f"{label}: fastest in {fastest} of {cells} cells; worst cell {cell}: "
                    f"{ratio:.2f}x vs {peer} (fastce {fmt_time(f)}, {peer} {fmt_time(p)})"
                    + (" [noisy]" if cell_noisy else "")
                    + (f"; {noisy} noisy cell(s)" if noisy else ""))
            out.append({"benchmark": name, "dtype": dt, "op": op, "fastest": fastest,
                        "cells": cells, "worst": combo, "ratio": ratio, "peer": peer,
                        "noisy": noisy, "line": line})
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


def make_plots(run, out_dir, line_batch=512, decl=None):
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
            # one panel per peer with a number somewhere in this dtype
            refs = [r for r in HEATMAP_REFS if r in impls
                    and any(_is_num(v) for v in _grid_values(b, r, dt)[2].values())]
            if not refs:
                continue
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
            roof = _roof_of(name, decl)
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


def write_report(run, out_dir, plots=True, line_batch=512, stream=None, decl=None):
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
    decl : dict, optional
        From :func:`load_declarations` (roofs, peers); None: no roof columns.

    Returns
    -------
    (Path, list of Path)
        The Markdown file and the images written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(run, decl)
    summary = summaries(run, decl)
    images = make_plots(run, out_dir, line_batch=line_batch, decl=decl) if plots else {}
    header = (
        f"machine `{run['machine']}`, commit `{str(run['commit'])[:8]}`, "
        f"environment `{run['env']}`"
    )
    load = run.get("load")
    load_line = (
        f"Load average (1, 5, 15 min; running/total tasks) before the run: {load['before']}; "
        f"after: {load['after']}."
        if load else "Load average during the run: not recorded (benchmarks/run.sh records it)."
    )
    grid = (decl or {}).get("compiled_grid")
    compiled = ", ".join((decl or {}).get("compiled_impls", []))
    grid_line = (f"The compiled peers ({compiled}) ran on part of the grid only: {grid} "
                 "(FASTCE_BENCH_COMPILED_GRID=full runs them everywhere)." if grid else "")
    summary_intro = (
        "Per timing benchmark and dtype: in how many cells fastce is the fastest CPU "
        "implementation (peers: every CPU implementation but "
        + ", ".join((decl or {}).get("not_peers", [])) + "), and the cell where it does "
        "worst: fastce's time / the fastest peer's time (>1: fastce slower).  [noisy] = "
        "that cell's samples spread widely."
    )
    if stream is None:
        stream = sys.stdout
    if stream:
        print(f"fastce benchmark report: {header}\n{load_line}\n", file=stream)
        for t in tables:
            print(text_table(t) + "\n", file=stream)
        if summary:
            print("Summary: " + summary_intro, file=stream)
            for s_ in summary:
                print("  " + s_["line"], file=stream)
            if grid_line:
                print(grid_line, file=stream)

    md = [
        "# fastce benchmark report", "",
        f"From {header}; results file `{run['path']}`.", "",
        load_line, "",
        "Times are asv's medians per call.  `skip` = skipped by the benchmark "
        "(size cap, library or GPU absent, outside the compiled peers' grid), `FAIL` = "
        "the benchmark raised, `-` = not in this run.  A time marked `~` is noisy: its "
        f"samples' interquartile range exceeds {NOISY_SPREAD:.0%} of the median.  "
        f"`{OVER_ROOF}` replaces a fraction of the roof above 100 %: a measuring error, "
        "not a figure.", "",
    ]
    if grid_line:
        md += [grid_line, ""]
    if summary:
        md += ["## Summary", "", summary_intro, ""]
        md += [f"* {s_['line']}" for s_ in summary]
        md += [""]
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
    ap.add_argument("--benchmark-dir", default=None,
                    help="the asv suite whose declarations (roofs, peers) the report reads "
                         "(default: benchmark_dir of ./asv.conf.json, benchmarks)")
    args = ap.parse_args(argv)
    try:
        run = load_run(args.results_dir, args.machine, args.commit, args.env)
    except NoResultsError as exc:
        print(f"fastce-report: {exc}", file=sys.stderr)
        return 2
    print(describe_run(run, args.results_dir), file=sys.stderr)
    decl = load_declarations(args.benchmark_dir)
    md, images = write_report(run, args.output_dir, plots=not args.no_plots,
                              line_batch=args.line_batch,
                              stream=False if args.quiet else sys.stdout, decl=decl)
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
