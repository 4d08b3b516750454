"""The benchmark's report: derived figures, the terminal table, ratios to peers, the chart."""

from __future__ import annotations

from collections.abc import Sequence

MiB = 2**20
PEER_NAMES = {"llama_cpp": "llama.cpp", "transformers": "transformers"}


def column_name(result: dict) -> str:
    """"jaxinfer int8/float32", "llama.cpp", ..."""
    if result["engine"] == "jaxinfer":
        return f"jaxinfer {result['quant'] or 'none'}/{result['dtype']}"
    return PEER_NAMES[result["engine"]]


def add_bandwidth(result: dict, bandwidth_gbps: float) -> None:
    """Adds achieved bandwidth per decode batch size: parameter bytes x decode steps/s (one
    step makes one token per row), in GB/s and as a fraction of the measured machine figure.
    A mixture of experts counts its active parameters (`active_param_bytes`: the experts one
    token reads), exact at batch 1 and a lower bound above it."""
    if "error" in result:
        return
    weights = result.get("active_param_bytes", result["param_bytes"])
    achieved = {b: weights * rate / int(b) / 1e9
                for b, rate in result["decode_tok_s"].items()}
    result["decode_weight_gbps"] = achieved
    result["bandwidth_fraction"] = {b: gbps / bandwidth_gbps for b, gbps in achieved.items()}


def ratios(results: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{peer: {jaxinfer column: {metric: jaxinfer rate / peer rate}}} for every throughput."""
    out: dict = {}
    mine = [r for r in results if r["engine"] == "jaxinfer" and "error" not in r]
    for peer in (r for r in results if r["engine"] != "jaxinfer" and "error" not in r):
        out[column_name(peer)] = {
            column_name(r): {metric: rate / peer_rate
                             for metric, rate, peer_rate in _paired_rates(r, peer)}
            for r in mine
        }
    return out


def _paired_rates(a: dict, b: dict):
    for kind, unit in (("prefill_tok_s", "prefill {} tok/s"), ("decode_tok_s", "decode b{} tok/s")):
        for key, rate in a[kind].items():
            if b[kind].get(key):
                yield unit.format(key), rate, b[kind][key]


def _rows(results: Sequence[dict], prefill: Sequence[int], batches: Sequence[int],
          prompt_tokens: int):
    """(label, function of a result -> cell text) for every table row."""

    def num(fmt: str, get):
        def cell(r: dict) -> str:
            try:
                value = get(r)
            except (KeyError, TypeError):
                return "-"
            return "-" if value is None else format(value, fmt)
        return cell

    yield "load (s)", num(".2f", lambda r: r["load_s"])
    yield "compile, cold cache, all shapes (s)", num(".1f", lambda r: r["compile_s"])
    yield f"first request, {prompt_tokens}-token prompt (s)", num(".3f", lambda r: r["ttft_cold_s"])
    yield f"TTFT, {prompt_tokens}-token prompt (s)", num(".3f", lambda r: r["ttft_s"])
    for n in prefill:
        yield f"prefill tok/s, {n} tokens", num(".1f", lambda r, n=n: r["prefill_tok_s"][str(n)])
    for b in batches:
        yield f"decode tok/s, batch {b}", num(".1f", lambda r, b=b: r["decode_tok_s"][str(b)])
    for b in batches:
        yield (f"weight GB/s (fraction of machine), batch {b}",
               lambda r, b=b: _bandwidth_cell(r, str(b)))
    yield "parameter MiB", num(".1f", lambda r: r["param_bytes"] / MiB)
    yield "peak RSS MiB", num(".0f", lambda r: r["peak_rss_bytes"] / MiB)


def _bandwidth_cell(r: dict, b: str) -> str:
    if b not in r.get("decode_weight_gbps", {}):
        return "-"
    return f"{r['decode_weight_gbps'][b]:.2f} ({r['bandwidth_fraction'][b]:.0%})"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, columns padded so it also reads as plain text."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, rows)])


def table(report: dict) -> str:
    """The whole report as text: results per engine, ratios to each peer, machine notes."""
    results, s = report["results"], report["settings"]
    rows = [[label] + [cell(r) for r in results]
            for label, cell in _rows(results, s["prefill_tokens"], s["batch_sizes"],
                                     s["prompt_tokens"])]
    parts = [markdown(["metric", *map(column_name, results)], rows)]
    for peer, by_column in report["ratios"].items():
        metrics = list(next(iter(by_column.values()), {}))
        if metrics:
            parts.append(f"\njaxinfer / {peer} (above 1: jaxinfer faster)\n" + markdown(
                ["metric", *by_column],
                [[m] + [f"{by_column[c][m]:.2f}x" for c in by_column] for m in metrics]))
    for r in results:
        if "error" in r:
            parts.append(f"\n{column_name(r)} failed: {r['error']}")
            parts += [f"    {line}" for line in r.get("stderr_tail", [])]
    m = report["machine"]
    bw = m["bandwidth"]
    parts.append(
        f"\nmachine bandwidth {bw['gbps']:.1f} GB/s ({bw['method']}, "
        + ", ".join(f"{k} {v:.1f}" for k, v in bw["all_gbps"].items())
        + f"); {s['threads']} threads of {m['cpus']} cores; peers' OMP_WAIT_POLICY "
        f"{s['peer_omp_wait_policy']}; best of {s['repeats']}; decode "
        f"prompts {s['prompt_tokens']} tokens, {s['decode_tokens']} new tokens per row; "
        f"1-minute load average {m['load_avg_before']:.1f} before, {m['load_avg_after']:.1f} after")
    if "cpu" in m:  # reports written before it was recorded lack it
        c = m["cpu"]
        built = "no compiler" if c["kernel_build_s"] is None else f"{c['kernel_build_s']:.1f} s"
        parts.append(f"CPU {c['model']}; flags {' '.join(c['isa_flags'])}; kernel paths "
                     f"{', '.join(c['kernel_isas']) or 'none'}; kernel build {built}")
    return "\n".join(parts)


def chart(report: dict, path: str) -> None:
    """Bar charts of prefill and decode tok/s per engine, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = [r for r in report["results"] if "error" not in r]
    s = report["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind, keys, title in (
        (axes[0], "prefill_tok_s", s["prefill_tokens"], "prefill tok/s (batch 1) by prompt tokens"),
        (axes[1], "decode_tok_s", s["batch_sizes"], "decode tok/s by batch size"),
    ):
        x = np.arange(len(keys))
        width = 0.8 / max(len(results), 1)
        for i, r in enumerate(results):
            values = [r[kind].get(str(k), 0.0) for k in keys]
            bars = ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width,
                          label=column_name(r))
            ax.bar_label(bars, fmt="%.0f", fontsize="x-small")
        ax.set_xticks(x, [str(k) for k in keys])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize="small")
    fig.suptitle(f"{report['settings']['model_name']}, {s['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
