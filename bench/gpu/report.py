"""Markdown tables of a `stairs-bench gpu` run (results.json)."""

from __future__ import annotations


def _ms(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else f"n/a ({v})"


def exact_tables(name: str, ex: dict) -> list[str]:
    """Mismatches per strategy and back end (summed over batch sizes), and invariance."""
    keys = sorted({(c["tf32"], c["kv_cache"]) for c in ex["cells"]}, key=str)
    head = " | ".join(f"{kv} tf32={tf} own / CPU" for tf, kv in keys)
    sizes = sorted({c["size"] for c in ex["cells"]})
    out = [
        f"\n### {name}: mismatching prompts, batch sizes {sizes} summed\n",
        f"| strategy | {head} |",
        "|---" * (1 + len(keys)) + "|",
    ]
    for spec in dict.fromkeys(c["strategy"] for c in ex["cells"]):
        row = []
        for key in keys:
            cs = [
                c
                for c in ex["cells"]
                if (c["tf32"], c["kv_cache"]) == key and c["strategy"] == spec
            ]
            row.append(
                f"{sum(c['vs_own_greedy'] for c in cs)} / {sum(c['vs_cpu_greedy'] for c in cs)}"
            )
        out.append(f"| {spec} | " + " | ".join(row) + " |")
    out += [
        "",
        "| back end | tf32 | tokens compared | bit-identical | max diff |",
        "|---|---|---|---|---|",
    ]
    for inv in ex["invariance"]:
        out.append(
            f"| {inv['back_end']} | {inv['tf32']} | {inv['rows_compared']} | "
            f"{inv['bit_identical']} | {inv['max_diff']:.3g} |"
        )
    return out


def cost_table(name: str, cost: dict) -> list[str]:
    """Step ms per (rows, tokens) and back end, against the bandwidth floor."""
    out = [
        (
            f"\n### {name}: main step ms (past {cost['past']}, encoder {cost['encoder']}, "
            f"{cost['weight_bytes'] / 1e6:.0f} MB of decoder weights)\n"
        ),
        (
            "| rows x tokens | numpy back end | device back end | resident bound | CUDA graph |"
            " floor | device / floor |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for p in cost["points"]:
        ratio = p["device_ms"] / p["floor_ms"]
        out.append(
            f"| {p['rows']} x {p['tokens']} | {_ms(p['numpy_ms'])} | {_ms(p['device_ms'])}"
            f" | {_ms(p['resident_ms'])} | {_ms(p.get('cuda_graph_ms', '-'))} | "
            f"{p['floor_ms']:.3f} | {ratio:.1f} |"
        )
    return out


def speed_table(name: str, speed: dict) -> list[str]:
    """tok/s (x greedy) per batch size and strategy, device vs numpy."""
    cells = {(c["size"], c["strategy"], c["kv_cache"]): c for c in speed["cells"]}
    out = [
        f"\n### {name}: tokens/s (x greedy of the same back end)\n",
        "| batch | strategy | device | numpy | device / numpy |",
        "|---|---|---|---|---|",
    ]
    for size, spec in dict.fromkeys((s, sp) for s, sp, _ in cells):
        d, n = cells[(size, spec, "device")], cells[(size, spec, "numpy")]
        out.append(
            f"| {size} | {spec} | {d['tok_s']:.0f} ({d['x_greedy']:.2f}) | "
            f"{n['tok_s']:.0f} ({n['x_greedy']:.2f}) | {d['tok_s'] / n['tok_s']:.2f} |"
        )
    return out


def tables(res: dict) -> str:
    """Every table of every pair; a failed or skipped section says so."""
    out = [
        (
            f"## bench.gpu: {res['provider']}, onnxruntime {res.get('onnxruntime')}, "
            f"{res['prompts']} prompts x {res['max_new_tokens']} tokens, "
            f"{res.get('seconds', 0):.0f} s"
        )
    ]
    if "quiet_before_after" in res:
        out.append("\nquiet before / after: " + " / ".join(res["quiet_before_after"]))
    for name, pair in res["pairs"].items():
        for section, fn in (("exact", exact_tables), ("cost", cost_table), ("speed", speed_table)):
            part = pair.get(section, {})
            if "error" in part or "skipped" in part or not part:
                out.append(f"\n### {name}: {section}: {part.get('error') or part.get('skipped')}")
                continue
            out += fn(name, part)
    return "\n".join(out) + "\n"
