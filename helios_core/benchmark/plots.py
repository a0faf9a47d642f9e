"""PNG plots of a `helios bench` results.json (needs matplotlib: pip install -e '.[bench]')."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_vs_load(report: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    specs = report["settings"]["loads"]
    for name, r in report["systems"].items():
        ax.plot(range(len(specs)), [x["output_tokens_per_s"] for x in r["loads"]], marker="o", label=name)
    ax.set_xticks(range(len(specs)), specs)
    ax.set(xlabel="load", ylabel="output tokens/s", title="Throughput by load")
    ax.legend()
    return _save(fig, out / "throughput_vs_load.png")


def latency_cdfs(report: dict, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in report["systems"].items():
        for ax, key in zip(axes, ("request_ttft_s", "request_e2e_s")):
            values = np.sort(r[key])
            ax.plot(values, np.arange(1, len(values) + 1) / max(len(values), 1), label=name)
    for ax, title in zip(axes, ("time to first token", "end-to-end latency")):
        ax.set(xlabel="seconds", ylabel="share of requests", title=f"{title} ({report['settings']['loads'][0]})")
    axes[0].legend()
    return _save(fig, out / "latency_cdfs.png")


def exit_histograms(report: dict, out: Path) -> Path:
    panels = [(name, model, h) for name, r in report["systems"].items() if name != "hf_generate"
              for model, h in r["exit_histograms"].items()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), squeeze=False)
    for ax, (name, model, h) in zip(axes[:, 0], panels):
        layers = [int(k) for k in h]
        total = sum(h.values())
        ax.bar(layers, [v / total for v in h.values()])
        ax.set(title=f"{name}: {model}", xlabel="exit layer", ylabel="share of tokens")
    return _save(fig, out / "exit_histograms.png")


def timeline(report: dict, out: Path) -> Path | None:
    loops = {name: loop["timeline"] for name, loop in report.get("loops", {}).items() if loop["timeline"]}
    if not loops:
        return None
    fig, axes = plt.subplots(len(loops), 1, figsize=(8, 4 * len(loops)), squeeze=False)
    for ax, (name, events) in zip(axes[:, 0], loops.items()):
        t0 = events[0]["time"]
        for model in sorted({e["model"] for e in events}):
            mine = [e for e in events if e["model"] == model]
            ax.step([e["time"] - t0 for e in mine], [e["capacity"] if e["kind"] != "release" else 0 for e in mine],
                    where="post", marker="o", label=model)
            for e in mine:
                ax.annotate(f"{e['kind']} {e['layers']}L", (e["time"] - t0, e["capacity"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set(xlabel="seconds since start", ylabel="batch capacity (sequences)",
               title=f"{name}: starts, loads, switches and capacity")
        ax.legend(fontsize=8)
    return _save(fig, out / "timeline.png")


def frontier(report: dict, out: Path) -> Path | None:
    points = report.get("sweep")
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(p["system"] for p in points):
        mine = [p for p in points if p["system"] == system]
        ax.scatter([p["accuracy"] for p in mine], [p["output_tokens_per_s"] for p in mine], label=system)
        for p in mine:
            label = f"{p['threshold']}" + (f"/{p.get('coverage', p.get('depth'))}" if system not in
                                            ("full_depth", "ee_baseline") else "")
            label += f" e{p['exit_every']}" if p.get("exit_every", 1) != 1 else ""
            ax.annotate(label, (p["accuracy"], p["output_tokens_per_s"]), fontsize=7, textcoords="offset points",
                        xytext=(3, 3))
    full = next(p for p in points if p["system"] == "full_depth")
    ax.axvline(full["accuracy"] - 0.01, color="grey", linestyle="--", linewidth=1, label="full depth - 1 point")
    ax.set(xlabel="top-1 accuracy on held-out text (teacher-forced)", ylabel="output tokens/s",
           title="Throughput vs quality (threshold[/coverage or depth][ eK: exits every K])")
    ax.legend(fontsize=8)
    return _save(fig, out / "frontier.png")


def plot_all(report: dict, out: Path) -> list[Path]:
    plots = [throughput_vs_load, latency_cdfs, exit_histograms, timeline, frontier]
    return [p for p in (plot(report, Path(out)) for plot in plots) if p is not None]
