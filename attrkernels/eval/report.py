"""Writers of frontier results: a CSV table with provenance lines and a plot of LDS against cost.

Both write atomically (``store.atomic_write``): a reader sees the old file or the new one.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..store import atomic_write
from .pareto import pareto

COLUMNS = ["family", "label", "lds", "ci_low", "ci_high", "train_s", "method_s", "cost_s"]


def write_csv(rows: list, path, header: dict) -> None:
    """``path``: one ``# key: value`` line per ``header`` item, then the rows: ``COLUMNS`` and
    every ``setting_*`` key any row has (sorted); floats with four decimals."""
    extra = sorted({k for r in rows for k in r if k.startswith("setting_")})
    text = io.StringIO(newline="")
    text.write("".join(f"# {k}: {v}\n" for k, v in header.items()))
    writer = csv.DictWriter(text, fieldnames=COLUMNS + extra, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    data = text.getvalue().encode()
    atomic_write(Path(path), lambda f: f.write(data))


def plot(rows: list, path, title: str) -> None:
    """PNG at ``path``: LDS (with its CI) against cost on a log axis, one marker per family, the
    Pareto front drawn as a step line with its points labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    markers = "osD^vP*Xhp<>"
    for i, family in enumerate(sorted({r["family"] for r in rows})):
        pts = [r for r in rows if r["family"] == family]
        ax.errorbar([r["cost_s"] for r in pts], [r["lds"] for r in pts],
                    yerr=[[r["lds"] - r["ci_low"] for r in pts], [r["ci_high"] - r["lds"] for r in pts]],
                    fmt=markers[i % len(markers)], ms=7, capsize=2, label=family, alpha=0.85)
    front = pareto(rows)
    ax.step([r["cost_s"] for r in front], [r["lds"] for r in front], where="post", color="k",
            lw=1, ls="--", label="Pareto front")
    for r in front:
        ax.annotate(r["label"], (r["cost_s"], r["lds"]), fontsize=7, xytext=(4, -10),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("cost: checkpoint training + method time (s, log scale)")
    ax.set_ylabel("LDS (95% CI over test examples)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=130, bbox_inches="tight"))
    plt.close(fig)
