"""results.md tables and matplotlib plots from results.json."""

from __future__ import annotations

from pathlib import Path

from bench.common import write_atomic


def _f(v, fmt):
    return format(v, fmt) if isinstance(v, (int, float)) else "–"


MAX_REASONS = 8  # in results.md; results.json keeps them all


def _others(v, threshold):
    """Other processes' CPU-s per s, bold when over the threshold."""
    if not isinstance(v, (int, float)):
        return "–"
    return f"**{v:.2f}**" if threshold is not None and v > threshold else f"{v:.2f}"


def quiet_lines(res: dict) -> list[str]:
    """The header line(s) saying whether the machine was quiet, and why not."""
    q = res.get("quiet")
    if not q:
        return ["Quiet: not recorded (older results).", ""]
    st = q.get("start") or {}
    worst = max(
        (w["others_cpu_per_s"] for ph in q["methods"].values() for w in ph.values()), default=0.0
    )
    if q["ok"]:
        return [
            (
                f"Machine was quiet: other processes used at most {worst:.2f} CPU-s/s during any"
                f" method (threshold {q['threshold']:.2f}); load average at the start"
                f" {st.get('load1', float('nan')):.2f} (ours ~{st.get('own_load_estimate', 0):.2f})."
            ),
            "",
        ]
    return [
        "**Machine was NOT quiet: these figures are not a fair comparison.**",
        "",
        *[f"- {r}" for r in q["reasons"][:MAX_REASONS]],
        *(
            [f"- and {len(q['reasons']) - MAX_REASONS} more (results.json: quiet.reasons)"]
            if len(q["reasons"]) > MAX_REASONS
            else []
        ),
        "",
    ]


def machine_line(res: dict) -> str:
    """The report's line naming the CPU and the library versions."""
    m = res["machine"]
    return (
        f"Machine: {m.get('cpu', m['platform'])}; onnxruntime {m['onnxruntime']}, torch "
        f"{m.get('torch')}, transformers {m.get('transformers')}, ctranslate2 {m.get('ctranslate2')}"
    )


def markdown(res: dict) -> str:
    """The results.md text of a run_bench result."""
    s = res["settings"]
    thr = (res.get("quiet") or {}).get("threshold")
    lines = [
        (
            f"# stairs-bench: {s['prompts']} prompts, {s['max_new_tokens']} new tokens, "
            f"{s['threads']} threads, median of {s['rounds']} interleaved round(s)"
        ),
        "",
        machine_line(res),
        "",
        *quiet_lines(res),
        (
            "tok/s (interleaved): every method run prompt by prompt in turn; tok/s (alone): the"
            " method by itself on the same prompts afterwards. others CPU/s: other processes' CPU"
            " seconds per second while the method ran (interleaved / alone)."
        ),
        "",
        (
            "| method | tok/s (interleaved) | tok/s (alone) | x HF greedy | x engine greedy | p50 ms |"
            " p90 ms | main calls | accept | tok/main call | overhead % | mismatches | others CPU/s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += _row_lines(res, thr)
    lines += alone_lines(res, thr)
    lines += _profile_lines(res)
    lines += _sweep_lines(res)
    lines += _cost_curve_lines(res)
    lines += _tree_sim_lines(res)
    return "\n".join(lines) + "\n"


def _row_lines(res: dict, thr) -> list[str]:
    """One main-table line per result row."""
    lines = []
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:90]} ||||||||||| |")
            continue
        mm = r["mismatches"]
        mark = f"**{mm} ≠ {r['reference']}**" if mm else "0"
        others = _others(r.get("others_cpu_per_s"), thr)
        if "others_cpu_per_s_alone" in r:
            others += " / " + _others(r["others_cpu_per_s_alone"], thr)
        lines.append(
            f"| {r['method']} | {r['tokens_per_s']:.0f} | {_f(r.get('tokens_per_s_alone'), '.0f')}"
            f" | {_f(r.get('speedup_vs_hf_greedy'), '.2f')}"
            f" | {_f(r.get('speedup_vs_engine_greedy'), '.2f')} | {r['p50_ms']:.0f} | "
            f"{r['p90_ms']:.0f} | {_f(r.get('main_calls'), 'd')} | "
            f"{_f(r.get('acceptance_rate'), '.2f')} | {_f(r.get('tokens_per_main_call'), '.2f')} | "
            f"{_f(r.get('overhead_pct'), '.1f')} | {mark} | {others} |"
        )
    return lines


def _profile_lines(res: dict) -> list[str]:
    """The time breakdown table of the engine rows, if profiled."""
    prof = [r for r in res["rows"] if r.get("engine_total_s")]
    if not prof:
        return []
    n = res["settings"]["prompts"]
    lines = [
        "",
        "## Where the time goes (engine rows, ms per prompt, first round)",
        "",
        "| method | total | encoders | draft | verify | other | in ORT % | python % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in prof:
        tot = r["engine_total_s"]
        other = tot - r["encoder_s"] - r["draft_s"] - r["verify_s"]
        lines.append(
            f"| {r['method']} | {1e3 * tot / n:.1f} | {1e3 * r['encoder_s'] / n:.1f} | "
            f"{1e3 * r['draft_s'] / n:.1f} | {1e3 * r['verify_s'] / n:.1f} | "
            f"{1e3 * other / n:.1f} | {100 * r['session_s'] / tot:.1f} | "
            f"{r['overhead_pct']:.1f} |"
        )
    return lines


def _sweep_lines(res: dict) -> list[str]:
    """A table per parameter sweep that ran."""
    lines = []
    for title, key in (
        ("stairs batch size", "batch_size"),
        ("assisted draft length K", "draft_tokens"),
    ):
        sw = res.get("sweeps", {}).get(key)
        if sw:
            lines += [
                "",
                f"## Sweep: {title}",
                "",
                f"| {key} | x engine greedy | tok/s | accept | tok/main call |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {p[key]} | {p['speedup_vs_engine_greedy']:.2f} | "
                f"{p['tokens_per_s']:.0f} | {p['acceptance_rate']:.2f} | "
                f"{p['tokens_per_main_call']:.2f} |"
                for p in sw
            ]
    return lines


def _cost_curve_lines(res: dict) -> list[str]:
    """The main decoder call cost table, if measured."""
    lines = []
    cc = res.get("cost_curve")
    if cc:
        lines += [
            "",
            (
                f"## Main decoder call cost (past {cc['past']}, encoder {cc['encoder_length']};"
                f" 1 row x 1 token = {cc['base_ms']:.2f} ms)"
            ),
            "",
            "| n | n rows x 1 token | 1 row x n tokens | n x n (staircase) |",
            "|---|---|---|---|",
        ]
        for a, b, c in zip(cc["rows"], cc["tokens"], cc["staircase"]):
            lines.append(f"| {a['n']} | {a['ratio']:.2f} | {b['ratio']:.2f} | {c['ratio']:.2f} |")
    return lines


def _tree_sim_lines(res: dict) -> list[str]:
    """The tree-attention simulation table, if run."""
    lines = []
    ts = res.get("tree_sim")
    if ts:
        lines += [
            "",
            "## Tree simulation: would a tree-attention verify pay?",
            "",
            (
                f"Assistant top-1 agreement {ts['top1']:.3f}, top-2 {ts['top2']:.3f} (teacher-forced"
                f" on the main model's greedy output); encoders {ts['encoders_ms']:.1f} ms per prompt."
                " Predicted from measured call costs (main call 1 row x n tokens ="
                f" {ts['main_ms_fit'][0]:.2f} + {ts['main_ms_fit'][1]:.3f} n ms, fitted), the whole tree"
                " verified as one row; compare rows, the absolute figures leave out cache effects:"
            ),
            "",
            "| draft | nodes | depth | tok/main call | ms per prompt | predicted tok/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in ts["linear"]:
            lines.append(
                f"| linear K={r['draft_tokens']} | {r['nodes']} | {r['depth']} | "
                f"{r['tokens_per_main_call']:.2f} | {r['ms_per_prompt']:.1f} | "
                f"{r['tokens_per_s']:.0f} |"
            )
        for r in ts["tree"]:
            lines.append(
                f"| best tree (depth cap tried 3-10) | {r['nodes']} | {r['depth']} | {r['tokens_per_main_call']:.2f} | "
                f"{r['ms_per_prompt']:.1f} | {r['tokens_per_s']:.0f} |"
            )
    return lines


def alone_lines(res: dict, thr) -> list[str]:
    """The alone-against-alone table and the headline ratios restated from it."""
    al = [r for r in res["rows"] if "tokens_per_s_alone" in r]
    if not al:
        return []
    lines = [
        "",
        "## Measured alone (each method by itself, same prompts; ratios alone against alone)",
        "",
        (
            "| method | tok/s alone | tok/s interleaved | x HF greedy | x CT2 float32 |"
            " x engine greedy | output ≠ interleaved | others CPU/s |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in al:
        d = r.get("alone_outputs_differ", 0)
        lines.append(
            f"| {r['method']} | {r['tokens_per_s_alone']:.0f} | {r['tokens_per_s']:.0f} | "
            f"{_f(r.get('speedup_alone_vs_hf_greedy'), '.2f')} | "
            f"{_f(r.get('speedup_alone_vs_ct2_float32'), '.2f')} | "
            f"{_f(r.get('speedup_alone_vs_engine_greedy'), '.2f')} | "
            f"{f'**{d}**' if d else '0'} | {_others(r.get('others_cpu_per_s_alone'), thr)} |"
        )
    lines += _fastest_alone_lines(res["rows"], al)
    return lines


def _fastest_alone_lines(rows: list[dict], al: list[dict]) -> list[str]:
    """The fastest of the engine rows measured alone against each peer alone; it names the
    rows it was chosen from when other engine rows ran interleaved only."""
    engine = [r for r in al if r.get("kind") == "engine"]
    peers = [r for r in al if r.get("kind") != "engine"]
    if not engine or not peers:
        return []
    best = max(engine, key=lambda r: r["tokens_per_s_alone"])
    vs = [
        f"{best['tokens_per_s_alone'] / r['tokens_per_s_alone']:.2f}x {r['method']}" for r in peers
    ]
    figure = f"{best['method']}, {best['tokens_per_s_alone']:.0f} tok/s = {', '.join(vs)}"
    others = [
        r for r in rows if r.get("kind") == "engine" and "tokens_per_s" in r and r not in engine
    ]
    if not others:
        return ["", f"Fastest engine row alone: {figure} (all alone)."]
    which = "Engine row" if len(engine) == 1 else f"Fastest of the {len(engine)} engine rows"
    return [
        "",
        (
            f"{which} measured alone: {figure} (all alone; the other {len(others)} engine rows"
            " ran interleaved only: --alone all measures every row alone)."
        ),
    ]


def plots(res: dict, out: Path) -> list[str]:
    """Write the single-prompt mode's PNG plots to out; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ok = [r for r in res["rows"] if "tokens_per_s" in r]
    if ok:
        made.append(_throughput_plot(plt, ok, out))
    sw = res.get("sweeps", {})
    if sw:
        made.append(_sweeps_plot(plt, sw, out))
    cc = res.get("cost_curve")
    if cc:
        made.append(_cost_curve_plot(plt, cc, out))
    return made


def _throughput_plot(plt, ok: list[dict], out: Path) -> str:
    """Bar chart of tok/s per method; returns its file name."""
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ok) + 1.5))
    names = [r["method"] for r in ok]
    vals = [r["tokens_per_s"] for r in ok]
    colors = [
        "tab:red" if r["mismatches"] else ("tab:blue" if r["kind"] == "engine" else "tab:gray")
        for r in ok
    ]
    ax.barh(names, vals, color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (blue: stairs engine, gray: peers, red: output differs)")
    ax.set_title("Throughput, batch 1, greedy-exact")
    return _save_plot(plt, fig, out, "tokens_per_s.png")


def _sweeps_plot(plt, sw: dict, out: Path) -> str:
    """Speed-up over engine greedy along each sweep; returns its file name."""
    labels = (
        ("batch_size", "stairs: batch size (rows)"),
        ("draft_tokens", "assisted: draft length K"),
    )
    series = [
        ([p[key] for p in sw[key]], [p["speedup_vs_engine_greedy"] for p in sw[key]], label)
        for key, label in labels
        if sw.get(key)
    ]
    ylabel = "speed-up over engine greedy"
    return _line_plot(plt, series, ("batch size / K", ylabel), out, "sweeps.png", unit_line=True)


def _cost_curve_plot(plt, cc: dict, out: Path) -> str:
    """Main decoder call cost against n; returns its file name."""
    labels = (
        ("rows", "n rows x 1 token"),
        ("tokens", "1 row x n tokens"),
        ("staircase", "n rows x n tokens (staircase)"),
    )
    series = [([p["n"] for p in cc[k]], [p["ratio"] for p in cc[k]], label) for k, label in labels]
    axes = ("n", "main decoder call time / (1 row, 1 token)")
    return _line_plot(plt, series, axes, out, "cost_curve.png")


def _line_plot(plt, series, axes: tuple, out: Path, name: str, unit_line=False) -> str:
    """Lines with markers, one per (xs, ys, label), a rule at y = 1 if unit_line, axes
    (x label, y label); written to out/name."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for xs, ys, label in series:
        ax.plot(xs, ys, "o-", label=label)
    if unit_line:
        ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.legend()
    return _save_plot(plt, fig, out, name)


def _save_plot(plt, fig, out: Path, name: str) -> str:
    """fig laid out, written to out/name through a temporary file and closed; returns name."""
    fig.tight_layout()
    write_atomic(out / name, lambda f: fig.savefig(f, dpi=110))
    plt.close(fig)
    return name


def _mm(r: dict, key: str) -> str:
    v = r.get(f"mismatches_vs_{key}")
    return "–" if v is None else (f"**{v}**" if v else "0")


def _peer_leak_lines(rows: list[dict]) -> list[str]:
    """The most CPU this process (the engine's threads) used while a peer's worker process ran."""
    peers = [r for r in rows if r.get("worker") and "this_process_cpu_per_s" in r]
    if not peers:
        return []
    worst = max(peers, key=lambda r: r["this_process_cpu_per_s"])
    return [
        "",
        (
            f"While the peers ran, this process (the engine's thread pools) used at most"
            f" {worst['this_process_cpu_per_s']:.3f} CPU-s/s ({worst['method']} at"
            f" B={worst['batch_size']}): a pool left spinning would show here."
        ),
    ]


def batch_markdown(res: dict) -> str:
    """results.md of the batch mode: method x batch size -> tok/s, latency, mismatches."""
    s = res["settings"]
    thr = (res.get("quiet") or {}).get("threshold")
    sizes = s["batch_sizes"]
    rows = res["rows"]
    lines = [
        (
            f"# stairs-bench batch mode: {s['prompts']} prompts, {s['max_new_tokens']} new tokens,"
            f" {s['threads']} threads"
            f"{' (one shared ORT pool)' if s.get('shared_thread_pool') else ''}, batch sizes"
            f" {', '.join(map(str, sizes))}, one run; assistant {s.get('assistant') or 'none'}"
        ),
        "",
        machine_line(res),
        "",
        *quiet_lines(res),
        (
            "Aggregate tok/s: all new tokens (EOS not counted) / summed batch wall time, the prompts"
            " split into batches of B, every method run on each batch in turn. A request's latency"
            " is its batch's wall time. Mismatches: prompts whose tokens differ from engine greedy"
            " at batch 1 (the fp32 main) / from its own main's greedy at batch 1 (methods @NAME run"
            " another export of the main) / HF greedy at batch 1. x CT2: tok/s over CTranslate2"
            " float32 (int8) translate_batch at the same B. main calls: summed over requests (a call shared by"
            " n requests counts n times); rows/call: requests sharing a main call on average."
            " stairs/greedy (generate): Engine.generate one prompt at a time, batch 1 only."
        ),
        "",
        "## Aggregate tokens/s",
        "",
        "| method | " + " | ".join(f"B={b}" for b in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    lines += _batch_tokens_lines(rows, sizes)
    lines += _batch_size_lines(rows, sizes, thr)
    lines += _fastest_lines(rows, sizes)
    lines += _peer_leak_lines(rows)
    lines += _memory_lines(res.get("memory") or [])
    errors = res.get("errors") or {}
    if errors:
        lines += ["", "## Failed methods", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def _batch_tokens_lines(rows: list[dict], sizes: list[int]) -> list[str]:
    """Aggregate tok/s table body: one line per method, a column per batch size."""
    lines = []
    names = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["batch_size"]): r for r in rows}
    for name in names:
        vals = []
        for b in sizes:
            r = cell.get((name, b))
            if r is None:
                vals.append("")
            elif "tokens_per_s" not in r:
                vals.append("failed")
            else:
                x = r.get("x_ct2_float32")
                vals.append(f"{r['tokens_per_s']:.0f}" + (f" ({x:.2f}x)" if x else ""))
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return lines


def _batch_size_lines(rows: list[dict], sizes: list[int], thr) -> list[str]:
    """The per method and batch size table."""
    has_ct2 = any(r.get("x_ct2_float32") for r in rows)
    lines = [
        *(["", "(in parentheses: x CT2 float32 at the same B)"] if has_ct2 else []),
        "",
        "## Per method and batch size",
        "",
        (
            "| B | method | tok/s | x CT2 float32 | x CT2 int8 | p50 ms | p90 ms |"
            " mismatches vs engine B1 | mismatches vs own greedy B1 | mismatches vs HF B1 |"
            " failed prompts | main calls | rows/call | verify ms/call | draft ms/call |"
            " encoder ms/request | others CPU/s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in sizes:
        for r in (r for r in rows if r["batch_size"] == b):
            if "tokens_per_s" not in r:
                lines.append(
                    f"| {b} | {r['method']} | failed: {r.get('error', '')[:90]} |||||||||||||||"
                )
                continue
            fp = r.get("failed_prompts", 0)
            lines.append(
                f"| {b} | {r['method']} | {r['tokens_per_s']:.{0 if r['tokens_per_s'] >= 100 else 2}f} | "
                f"{_f(r.get('x_ct2_float32'), '.2f')} | {_f(r.get('x_ct2_int8'), '.2f')} | "
                f"{r['p50_ms']:.0f} | {r['p90_ms']:.0f} | "
                f"{_mm(r, 'engine_greedy_b1')} | {_mm(r, 'own_greedy_b1')} | "
                f"{_mm(r, 'hf_greedy_b1')} | "
                f"{f'**{fp}**' if fp else '0'} | {_f(r.get('main_calls'), 'd')} | "
                f"{_f(r.get('mean_batch_rows'), '.2f')} | {_f(r.get('verify_ms_per_call'), '.1f')} | "
                f"{_f(r.get('draft_ms_per_call'), '.1f')} | "
                f"{_f(r.get('encoder_ms_per_request'), '.0f')} | "
                f"{_others(r.get('others_cpu_per_s'), thr)} |"
            )
    return lines


def _fastest_lines(rows: list[dict], sizes: list[int]) -> list[str]:
    """The fastest engine method at each batch size against CTranslate2 float32."""
    lines = []
    engine = [r for r in rows if r.get("kind") == "engine" and "tokens_per_s" in r]
    ct2 = {r["batch_size"]: r for r in rows if r["method"] == "ct2/float32" and "tokens_per_s" in r}
    if engine and ct2:
        lines += ["", "Fastest engine method at each B against CTranslate2 float32:", ""]
        for b in sizes:
            at = [r for r in engine if r["batch_size"] == b]
            if at and b in ct2:
                best = max(at, key=lambda r: r["tokens_per_s"])
                lines.append(
                    f"- B={b}: {best['method']} {best['tokens_per_s']:.0f} tok/s ="
                    f" {best['tokens_per_s'] / ct2[b]['tokens_per_s']:.2f}x CT2 float32"
                    f" ({ct2[b]['tokens_per_s']:.0f})"
                )
    return lines


def _memory_lines(mem: list[dict]) -> list[str]:
    """Peak resident memory table after each batch size."""
    lines = []
    if mem:
        keys = sorted({k for m in mem for k in m if k.endswith("_worker_max_rss_mb")})
        head = ["B", "this process (engine, and HF if it ran)"]
        head += [k.removesuffix("_worker_max_rss_mb") + " worker" for k in keys]
        lines += [
            "",
            "## Peak resident memory (MiB, peak so far after each batch size)",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for m in mem:
            cells = [str(m["batch_size"]), f"{m['process_max_rss_mb']:.0f}"]
            cells += [_f(m.get(k), ".0f") for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def batch_plots(res: dict, out: Path) -> list[str]:
    """batch_throughput.png: aggregate tokens/s against batch size, one line per method (engine
    solid, peers dashed; a method whose output differs is drawn with x markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in res["rows"] if "tokens_per_s" in r]
    if not ok:
        return []
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(r["method"] for r in ok):
        pts = sorted((r for r in ok if r["method"] == name), key=lambda r: r["batch_size"])
        bad = any(r.get("mismatches_vs_engine_greedy_b1") or r.get("failed_prompts") for r in pts)
        ax.plot(
            [r["batch_size"] for r in pts],
            [r["tokens_per_s"] for r in pts],
            marker="x" if bad else "o",
            ls="-" if pts[0].get("kind") == "engine" else "--",
            label=name + (" (output differs)" if bad else ""),
        )
    ax.set_xscale("log", base=2)
    sizes = res["settings"]["batch_sizes"]
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput vs batch size (solid: stairs engine, dashed: peers)")
    ax.legend(fontsize=8)
    return [_save_plot(plt, fig, out, "batch_throughput.png")]
