"""Plots for the benchmarks: bar charts of throughput per tool and workload, and memory over time.

Bench scripts print markdown tables; ``recorded(name)`` wraps a script's ``main()`` and, when it
ends, draws each printed table that has a throughput column next to the text (PNG files in
``$CLOUDCKPT_BENCH_PLOTS`` or ``bench/results/``)::

    if __name__ == "__main__":
        with plots.recorded("bench_local"):
            main()

The same drawing runs on the tables already in a markdown file (the figures in
docs/benchmarks.md, without rerunning anything)::

    python bench/plots.py docs/benchmarks.md --out docs/img

``MemoryTrace`` samples a process's resident memory (with its children) while it runs, for
``memory_chart``. matplotlib is only needed to draw (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(os.environ.get("CLOUDCKPT_BENCH_PLOTS", Path(__file__).parent / "results"))

# Columns that carry a throughput, best first; their unit is the column's own.
THROUGHPUT_COLUMNS = ("GB/s", "MB/s", "MiB/s", "GiB/s")
# Columns naming what is compared (bars) and what it runs on (groups), in the order tried.
BAR_COLUMNS = ("tool", "mode", "client", "how")
GROUP_COLUMNS = ("workload", "op", "size", "what", "objects")


@dataclass
class Table:
    """One markdown table and the heading it sits under."""

    heading: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def column(self, names: tuple[str, ...]) -> str | None:
        for name in names:
            for col in self.columns:
                if col.strip().lower() == name.lower():
                    return col
        return None


def parse_tables(text: str) -> list[Table]:
    """Every markdown table in ``text``, with the nearest heading above it."""
    tables: list[Table] = []
    heading, current = "", None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        is_row = line.lstrip().startswith("|")
        if not is_row:
            current = None
            continue
        if current is None:
            if i + 1 < len(lines) and re.fullmatch(r"\|?[\s:|-]+\|?", lines[i + 1].strip()):
                current = Table(heading, cells)
                tables.append(current)
            continue
        if re.fullmatch(r"[\s:-]*", "".join(cells)):
            continue  # the |---| line
        current.rows.append(cells)
    return tables


def _number(cell: str) -> float | None:
    m = re.search(r"-?\d[\d,]*\.?\d*", cell)
    return float(m.group(0).replace(",", "")) if m else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "table"


def throughput_chart(table: Table, path: Path, title: str | None = None) -> Path | None:
    """Grouped bars, one panel per op (save, load, ...): one group per workload, one bar per
    tool, height = throughput, value written on each bar. ``None`` when the table has no
    throughput column or no numbers."""
    value_col = table.column(THROUGHPUT_COLUMNS)
    bar_col = table.column(BAR_COLUMNS)
    if value_col is None or bar_col is None:
        return None
    op_col = table.column(("op",))
    group_cols = [c for c in (table.column((g,)) for g in GROUP_COLUMNS) if c and c != op_col]
    idx = {c: table.columns.index(c) for c in table.columns}
    panels: dict[str, dict[str, dict[str, float]]] = {}
    for row in table.rows:
        if len(row) != len(table.columns):
            continue
        value = _number(row[idx[value_col]])
        if value is None:
            continue
        panel = row[idx[op_col]] if op_col else ""
        group = " / ".join(row[idx[c]] for c in group_cols) or table.heading
        panels.setdefault(panel, {}).setdefault(group, {})[row[idx[bar_col]]] = value
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = list(dict.fromkeys(t for p in panels.values() for g in p.values() for t in g))
    colors = {t: f"C{i}" for i, t in enumerate(tools)}
    n_groups = max(len(p) for p in panels.values())
    fig, axes = plt.subplots(
        1, len(panels), figsize=(max(6.0, 2.2 + 2.6 * n_groups * len(panels)), 4.4), squeeze=False
    )
    for ax, (panel, groups) in zip(axes[0], panels.items()):
        here = [t for t in tools if any(t in g for g in groups.values())]
        width = 0.8 / len(here)
        for k, tool in enumerate(here):
            xs = [i + (k - (len(here) - 1) / 2) * width for i in range(len(groups))]
            got = [g.get(tool) for g in groups.values()]
            bars = ax.bar(xs, [y or 0.0 for y in got], width, label=tool, color=colors[tool])
            labels = ["n/a" if y is None else f"{y:.2f}" for y in got]  # capped or not run
            ax.bar_label(bars, labels=labels, fontsize=6, padding=1)
            if tool == "cloudckpt":
                for b in bars:
                    b.set_edgecolor("black")
                    b.set_linewidth(1.2)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([_wrap(g) for g in groups], fontsize=8)
        ax.set_ylabel(value_col + " (higher is better)", fontsize=8)
        ax.set_title(panel or (title or table.heading), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    if op_col:
        fig.suptitle(title or table.heading, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 24) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


@dataclass
class MemoryTrace:
    """Resident memory (MiB) of process ``pid`` and its children, sampled every ``every`` s
    from a thread until ``stop()``; ``samples`` are ``(seconds since start, MiB)``."""

    pid: int
    every: float = 0.02
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemoryTrace:
        t0 = time.monotonic()

        def loop() -> None:
            while not self._stop.is_set():
                mib = tree_rss_mib(self.pid)
                if mib is None:
                    return
                self.samples.append((time.monotonic() - t0, mib))
                self._stop.wait(self.every)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.samples


def tree_rss_mib(pid: int) -> float | None:
    """RSS of ``pid`` plus its descendants, from /proc; ``None`` once ``pid`` is gone."""
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            if p == pid:
                return None
    return total


def memory_chart(
    traces: dict[str, list[tuple[float, float]]], path: Path, title: str, note: str = ""
) -> Path:
    """One line per trace: resident memory over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, samples in traces.items():
        if samples:
            ax.plot([s[0] for s in samples], [s[1] for s in samples], label=label, lw=1.4)
    ax.set_xlabel("seconds since the process started")
    ax.set_ylabel("resident memory, MiB (process + children)")
    ax.set_title(title, fontsize=10)
    if note:
        ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=7, alpha=0.7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tables(text: str, out: Path, prefix: str) -> list[Path]:
    """A throughput chart for each table in ``text`` that has one: ``out/prefix-<heading>.png``."""
    written, names = [], set()
    for table in parse_tables(text):
        name = f"{prefix}-{_slug(table.heading)}"
        while name in names:
            name += "-2"
        names.add(name)
        path = throughput_chart(table, out / f"{name}.png")
        if path is not None:
            written.append(path)
    return written


class _Tee(io.TextIOBase):
    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream, self.text = stream, io.StringIO()

    def write(self, s: str) -> int:
        self.text.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def recorded(name: str, out: Path | None = None) -> Iterator[None]:
    """Run the block with stdout teed; then draw every table it printed (see module doc)."""
    if "--child" in sys.argv:  # a measurement child prints JSON, not tables
        yield
        return
    tee = _Tee(sys.stdout)  # type: ignore[arg-type]
    sys.stdout = tee  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout = tee.stream  # type: ignore[assignment]
    try:
        paths = plot_tables(tee.text.getvalue(), out or RESULTS, name)
    except ImportError:
        print("(no plots: matplotlib is not installed; pip install -e '.[bench]')")
        return
    for p in paths:
        print(f"plot: {p}")


def main() -> None:
    p = argparse.ArgumentParser(description="Draw the throughput tables of a markdown file.")
    p.add_argument("markdown", type=Path)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--prefix", default="bench")
    a = p.parse_args()
    for path in plot_tables(a.markdown.read_text(), a.out, a.prefix):
        print(path)


if __name__ == "__main__":
    main()
