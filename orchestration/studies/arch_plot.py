"""CLI: compare the architectures of a study at equal training compute (#25).

A study whose ``--variants`` are architectures (``timm:<name>:...``, docs/architectures.md) at
comparable FLOPs per image is read as: accuracy (eval top-1, few-shot, ...) against training
FLOPs, one colour per architecture, one line per trial (its evaluations), a large marker at each
trial's end. Writes ``archs_<metrics>.png`` and ``archs_table.md`` (each trial's final values,
with the architecture's parameters and forward MACs per image)::

    python -m orchestration.studies.arch_plot studies/digits-archs-analysis/points.parquet \\
        --out docs/studies/digits-archs --metric eval_top1 --metric fewshot/digits59/10shot
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[2]))

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

#: ``eval_top1`` is read from the table's ``eval_error`` (1 - top-1).
DERIVED = {"eval_top1": ("eval_error", lambda e: 1.0 - e)}


def short_name(variant: str) -> str:
    """``timm:swin_tiny_patch4_window7_224:...`` -> ``Swin``; a ViT size stays as it is (``ViT mu/4``)."""
    if not variant.startswith("timm:"):
        return f"ViT {variant}"
    name = variant.split(":")[1]
    for prefix, label in (("deit", "DeiT"), ("swin", "Swin"), ("pvt_v2", "PVT-v2"), ("cait", "CaiT"),
                          ("beit", "BEiT"), ("resnet", "ResNet"), ("regnet", "RegNetY"), ("vit", "ViT (timm)")):
        if name.startswith(prefix):
            return label
    return name


def metric_values(rows: list[dict[str, Any]], metric: str) -> list[float | None]:
    col, fn = DERIVED.get(metric, (metric, lambda v: v))
    if rows and col not in rows[0]:
        have = sorted(k for k in rows[0] if "/" in k or k.startswith("eval_"))
        raise ValueError(f"metric {metric!r}: the table has no column {col!r} (it has {', '.join(have)})")
    return [None if r.get(col) is None else float(fn(r[col])) for r in rows]


def plot(rows: list[dict[str, Any]], metrics: Sequence[str], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({r["variant"] for r in rows}, key=short_name)
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = metric_values(rows, metric)
        for trial in sorted({r["trial"] for r in rows}):
            pts = sorted((r["flops"], v, r["variant"]) for r, v in zip(rows, values, strict=True)
                         if r["trial"] == trial and v is not None)
            if not pts:
                continue
            xs, ys, variant = [p[0] for p in pts], [p[1] for p in pts], pts[0][2]
            ax.plot(xs, ys, "-", color=colours[variant], alpha=0.5, lw=1)
            ax.plot(xs[-1:], ys[-1:], "o", color=colours[variant], ms=7)
        for v in variants:
            params = next(r["params"] for r in rows if r["variant"] == v)
            ax.plot([], [], "o-", color=colours[v], label=f"{short_name(v)} ({params / 1e3:.0f}k params)")
        ax.set_xscale("log")
        ax.set_xlabel("training compute (FLOPs)")
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "architectures at comparable FLOPs per image")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(rows: list[dict[str, Any]], metrics: Sequence[str]) -> str:
    """Markdown: each trial's final evaluation, by architecture then length."""
    values = {m: metric_values(rows, m) for m in metrics}
    last: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r["trial"] not in last or r["step"] > rows[last[r["trial"]]]["step"]:
            last[r["trial"]] = i
    lines = ["| architecture | params | steps | training FLOPs | " + " | ".join(metrics) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    for i in sorted(last.values(), key=lambda i: (short_name(rows[i]["variant"]), rows[i]["steps"])):
        r = rows[i]
        cells = [f"{values[m][i]:.3f}" if values[m][i] is not None else "-" for m in metrics]
        lines.append(f"| {short_name(r['variant'])} | {r['params'] / 1e3:.1f}k | {r['steps']} | {r['flops']:.3g} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Variants (the study's `--variants`):", ""] + [f"- {short_name(v)}: `{v}`"
                                                                   for v in sorted({r['variant'] for r in rows})]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration.studies.arch_plot", description=__doc__.split("\n")[0])
    p.add_argument("table", help="points.parquet of a study (orchestration/sweep.py)")
    p.add_argument("--out", required=True, help="folder for archs_<metrics>.png and archs_table.md")
    p.add_argument("--metric", action="append", default=None,
                   help="repeatable: eval_top1 (default), eval_error, eval_loss or a logged column such as "
                        "fewshot/NAME/10shot")
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    metrics = a.metric or ["eval_top1"]
    try:
        rows = pq.read_table(a.table).to_pylist()
        for m in metrics:
            metric_values(rows, m)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    slug = "_".join(m.replace("/", "_") for m in metrics)
    print(plot(rows, metrics, out / f"archs_{slug}.png", a.title))
    (out / "archs_table.md").write_text(table(rows, metrics))
    print(out / "archs_table.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
