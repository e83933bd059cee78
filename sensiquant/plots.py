"""PNG plots of what a plan decided and why: the score profiles with the flagged layers, the bit allocation as a
block x module heatmap, and perplexity against bits/param for benchmark runs."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .errors import SensiquantError  # noqa: E402
from .planning.plan import Plan  # noqa: E402


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size and perplexity, by increasing size."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _save(fig, path) -> Path:
    """Write the PNG whole: to a temporary sibling, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _title(plan: Plan) -> str:
    mode = " (budget-exact)" if plan.exact else ""
    return (f"{plan.model or 'model'}: {plan.method}{mode}, {plan.bits_per_param:.3f} bits/param "
            f"(budget {plan.budget_bits_per_param:.3f})")


def plot_profiles(plan: Plan, path) -> Path:
    """One panel per score (sensitivity, kurtosis): a line per type across blocks, flagged layers ringed in red."""
    kinds = [k for k, profile in (plan.profiles or {}).items() if profile and any(profile.values())]
    if not kinds:
        raise SensiquantError("the plan has no score profiles to plot (uniform and MXQ plans score no layers)")
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 3.6 * len(kinds)), squeeze=False, layout="constrained")
    for ax, kind in zip(axes[:, 0], kinds):
        for part, values in plan.profiles[kind].items():
            if values:
                ax.plot(range(len(values)), values, marker=".", label=part)
        marked = [(f, plan.profiles[kind][f["part"]][f["block"]]) for f in plan.flagged
                  if f.get("score", kind) == kind and 0 <= f["block"] < len(plan.profiles[kind].get(f["part"], []))]
        top: dict[int, float] = {}  # labels of flags sharing a block are stacked above the highest of them
        for f, y in marked:
            top[f["block"]] = max(top.get(f["block"], y), y)
        stacked: dict[int, int] = {}
        for f, y in sorted(marked, key=lambda item: -item[1]):
            ax.scatter([f["block"]], [y], s=160, facecolors="none", edgecolors="red", linewidths=2, zorder=5)
            k = stacked[f["block"]] = stacked.get(f["block"], -1) + 1
            ax.annotate(f"{f['part']} z={f['zscore']:.1f}", (f["block"], top[f["block"]]), textcoords="offset points",
                        xytext=(8, 6 + 10 * k), color="red", fontsize=7)
        if stacked:  # headroom so the stacked labels stay inside the panel
            ax.margins(y=0.08 + 0.06 * (max(stacked.values()) + 1))
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("output MSE at base config" if kind == "sensitivity" else "kurtosis (Pearson)")
        ax.set_title(f"{kind} per block (red: flagged outlier layers)")
        ax.legend(fontsize=7, ncol=4)
        ax.grid(alpha=0.3)
    fig.suptitle(_title(plan))
    return _save(fig, path)


def plot_allocation(plan: Plan, path) -> Path:
    """Heatmap of exact bits/param per layer, rows = blocks, columns = modules; boosted layers bold with *."""
    modules: list[str] = []
    for layer in plan.layers:
        if layer.module not in modules:
            modules.append(layer.module)
    blocks = sorted({layer.block for layer in plan.layers if layer.block is not None})
    rows = blocks + (["other"] if any(layer.block is None for layer in plan.layers) else [])
    grid = [[math.nan] * len(modules) for _ in rows]
    text: list[list[tuple[str, bool] | None]] = [[None] * len(modules) for _ in rows]
    for layer in plan.layers:
        r = rows.index(layer.block if layer.block is not None else "other")
        c = modules.index(layer.module)
        grid[r][c] = layer.bits / layer.numel
        label = layer.config
        if layer.outlier_ratio:
            label += f"+{layer.outlier_ratio * 100:g}%"
        boosted = bool(layer.allocated) and layer.config != layer.allocated
        text[r][c] = (label + "*" if boosted else label, boosted)
    fig, ax = plt.subplots(figsize=(1.4 * len(modules) + 3, 0.28 * len(rows) + 2))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="bits/param")
    for r, row in enumerate(text):
        for c, cell in enumerate(row):
            if not cell:
                continue
            label, boosted = cell
            red, green, blue, _ = image.cmap(image.norm(grid[r][c]))
            light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5  # dark text on the light end of the map
            ax.text(c, r, label, ha="center", va="center", fontsize=6, color="black" if light else "white",
                    fontweight="bold" if boosted else "normal")
    ax.set_xticks(range(len(modules)), [m.rsplit(".", 1)[-1] for m in modules], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=6)
    ax.set_ylabel("block")
    ax.set_title(_title(plan) + "\ncell: rung (+FP16 outliers), bold * = boosted", fontsize=9)
    return _save(fig, path)


def plot_ppl_vs_bits(rows: list[dict], path, metric: str = "ppl_wikitext2", title: str | None = None,
                     frontier: bool = False, label_key: str | None = None, y_max: float | None = None) -> Path:
    """Perplexity against exact bits/param, one line per method (rows: dicts with method, bits_per_param, metric).

    ``frontier`` adds the Pareto front over all points (dashed); ``label_key`` writes that field next to each point.
    ``y_max`` clips the axis so diverged runs do not squash the rest: points above it sit on the top edge as
    triangles, labelled with their value.
    """
    by_method: dict[str, list[tuple[float, float, str]]] = {}
    for row in rows:
        value = row.get(metric)
        if isinstance(value, int | float) and math.isfinite(value) and "bits_per_param" in row:
            label = str(row.get(label_key, "")) if label_key else ""
            by_method.setdefault(row["method"], []).append((row["bits_per_param"], value, label))
    if not by_method:
        raise SensiquantError(f"no row has {metric!r} to plot")

    def shown(y: float) -> float:
        return y if y_max is None else min(y, y_max)

    fig, ax = plt.subplots(figsize=(10, 6) if label_key else (8, 5))
    for method, points in by_method.items():
        points.sort()
        line = ax.plot([p[0] for p in points], [shown(p[1]) for p in points], marker="o", label=method)[0]
        for x, y, label in points:
            clipped = y_max is not None and y > y_max
            if clipped:
                ax.plot([x], [y_max], marker="^", markersize=9, color=line.get_color())
                label = f"{label} ({y:.3g})".strip()
            if label and (label_key or clipped):
                ax.annotate(label, (x, shown(y)), fontsize=6, xytext=(3, 3 if not clipped else -9),
                            textcoords="offset points")
    if frontier:
        front = pareto_front([(x, y) for points in by_method.values() for x, y, _ in points])
        ax.plot([p[0] for p in front], [shown(p[1]) for p in front], ls="--", color="black", lw=1,
                label="Pareto front")
    ax.set_yscale("log")
    if y_max is not None:
        ax.set_ylim(top=y_max * 1.15)
    ax.set_xlabel("bits/param (exact, everything counted)")
    ax.set_ylabel(metric.replace("ppl_", "perplexity, ") + (f" (clipped at {y_max:g})" if y_max else ""))
    ax.set_title(title or f"{metric} against bits/param")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)
