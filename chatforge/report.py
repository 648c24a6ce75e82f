"""The report card: RUN/report.md, what went into each stage and what came out, with plots.

It only reads what the stages wrote (manifests, summaries, metrics.jsonl, eval.json,
stages.json), so it can be rebuilt at any time: `chatforge report RUN`.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.fileio import atomic_write_text, save_figure
from chatforge.options import ReportOptions


def shown_tools(sample: dict) -> str:
    """' (with the calculator)' for a sample answer asked with a tool shown, else ''."""
    return f" (with the {sample['tools']})" if sample.get("tools") else ""


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def plot_eval_bars(results: list[dict], png: Path) -> Path | None:
    """Accuracy of every accuracy-type task, with the world tasks broken down by attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [r for r in results if r["metric"] == "accuracy"]
    if not acc:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 2]})
    names = [r["task"] for r in acc]
    axes[0].bar(names, [100 * r["value"] for r in acc], color=[f"C{i}" for i in range(len(acc))])
    axes[0].set(ylabel="accuracy (%)", ylim=(0, 100), title="tasks")
    axes[0].tick_params(axis="x", rotation=30)
    world = [r for r in acc if r["groups"] and r["task"].startswith("world")]
    width = 0.8 / max(1, len(world))
    for i, r in enumerate(world):
        groups = list(r["groups"])
        xs = [j + i * width for j in range(len(groups))]
        axes[1].bar(
            xs, [100 * r["groups"][g]["value"] for g in groups], width, label=r["task"], color=f"C{i}"
        )
        axes[1].set_xticks(
            [j + width * (len(world) - 1) / 2 for j in range(len(groups))], groups, rotation=30
        )
    axes[1].set(ylabel="accuracy (%)", ylim=(0, 100), title="world questions by attribute")
    if world:
        axes[1].legend()
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, png)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _tool_kinds(result: dict) -> dict[str, dict]:
    """{kind: {"n", "accuracy", "call_rate"}} from a tool task's details, kinds in first-seen order,
    plus "all" (the fact questions of the false call rate are not problems: left out)."""
    rows: dict[str, list[dict]] = {}
    for d in result.get("details", []):
        if d.get("kind") != "fact":
            rows.setdefault(d["kind"], []).append(d)
    rows["all"] = [d for ds in rows.values() for d in ds]
    return {
        k: {
            "n": len(ds),
            "accuracy": sum(d["correct"] for d in ds) / len(ds),
            "call_rate": sum(d["called"] for d in ds) / len(ds),
        }
        for k, ds in rows.items()
        if ds
    }


def _paired_bars(labels: list[str], series: dict[str, list[float]], title: str, png: Path) -> Path:
    """Accuracies (0-1) as percent bars, the series side by side over each label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(labels), 4))
    width = 0.76 / len(series)
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [100 * v for v in values], width, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, png)


def plot_tool_bars(on: dict[str, dict], off: dict[str, dict], png: Path) -> Path:
    """Accuracy per kind of problem, with the calculator and without, side by side."""
    kinds = list(on)
    series = {label: [table.get(k, {}).get("accuracy", 0.0) for k in kinds]
              for label, table in (("with calculator", on), ("without", off))}  # fmt: skip
    return _paired_bars(kinds, series, "calculator problems", png)


def plot_rag_bars(by_kind: dict[str, dict], png: Path) -> Path:
    """Accuracy per kind of question, closed-book and with retrieval (`rag eval`'s by_kind)."""
    labels = [f"{k} (n={m['n']})" for k, m in by_kind.items()]
    series = {label: [m[key] for m in by_kind.values()]
              for label, key in (("closed-book", "closed_book"), ("with retrieval", "with_retrieval"))}  # fmt: skip
    return _paired_bars(labels, series, "questions closed-book and with retrieval", png)


def _rag_section(run: Path) -> list[str]:
    result = _load(run / "rag" / "rag_eval.json")
    if not result or "answers" not in result:
        return []
    a, k = result["answers"], result["k"]
    recall = ", ".join(f"{m} {_fmt(r[f'recall@{k}'])}" for m, r in result["retrieval"].items())
    lines = [
        "## Answers from documents (retrieval)", "",
        f"The held-out people's biographies (never in pretraining) as a collection; each question asked "
        f"of `{Path(result['model']).name}` without documents and with the {result['answer_k']} best "
        f"retrieved ({result['embedding']} + BM25) in its prompt. Recall@{k}: {recall}.", "",
        "| questions | n | closed-book | with retrieval |", "|---|---|---|---|",
    ]  # fmt: skip
    for kind, m in a["by_kind"].items():
        lines.append(f"| {kind} | {m['n']} | {_pct(m['closed_book'])} | {_pct(m['with_retrieval'])} |")
    lines += [
        "", f"Citation rate {_pct(a['citation_rate'])}; faithfulness (a cited document holds the answer) "
        f"{_pct(a['faithfulness'])}. Reverse questions (\"Who is X's son?\") test the reversal curse: "
        "closed-book the model must invert what it read; with retrieval the child's biography states the answer.", "",
    ]  # fmt: skip
    if (run / "rag" / "rag.png").exists():
        lines += ["![answers from documents](rag/rag.png)", ""]
    return lines


def _tools_section(results: list[dict], run: Path) -> list[str]:
    """The same calculator problems with tools shown and without, side by side (eval/tools.py)."""
    by_name = {r["task"]: r for r in results}
    on, off = by_name.get("tools_on"), by_name.get("tools_off")
    if on is None or off is None:
        return []
    kon, koff = _tool_kinds(on), _tool_kinds(off)
    lines = [
        "## Tool use",
        "",
        f"The same {on['n']:,} calculator problems asked with the calculator shown (tools on) and without "
        "(tools off); correct = the exact result is a number of the final answer; call rate = share of "
        "problems where the assistant called a tool.",
        "",
        "| problems | n | accuracy, tools on | accuracy, tools off | call rate, tools on | call rate, tools off |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, row in kon.items():
        other = koff.get(kind, {})
        name = f"**{kind}**" if kind == "all" else kind
        lines.append(
            f"| {name} | {row['n']:,} | {_pct(row['accuracy'])} | {_pct(other.get('accuracy'))} | "
            f"{_pct(row['call_rate'])} | {_pct(other.get('call_rate'))} |"
        )
    lines.append("")
    extra = on.get("extra", {})
    if "false_call_rate" in extra:
        fwd = by_name.get("world_forward")
        plain = f" (world_forward, no tools shown: {_pct(fwd['value'])})" if fwd else ""
        lines += [
            f"With the calculator shown, the assistant called a tool on {_pct(extra['false_call_rate'])} of "
            f"{extra['fact_n']:,} plain fact questions that need none (false calls), and answered "
            f"{_pct(extra['fact_accuracy'])} of them right{plain}"
            + (
                f"; {extra['fact_skipped']:,} of them did not fit the context."
                if extra.get("fact_skipped")
                else "."
            ),
            "",
        ]
    for r, label in ((on, "tools on"), (off, "tools off")):
        if r.get("extra", {}).get("skipped"):
            lines += [
                f"{r['extra']['skipped']:,} problems did not fit the model's context ({label}) and count as wrong.",
                "",
            ]
    png = plot_tool_bars(kon, koff, run / "eval" / "tools.png")
    lines += [f"![tool use]({png.relative_to(run)})", ""]
    return lines


def _interval(summary: dict, when: str) -> str:
    """Held-out pass@1 at `when` (start, end) with its 95% Wilson interval."""
    h = summary.get("heldout", {}).get(when)
    return "–" if not h else f"{_pct(h['pass1'])} [{_pct(h['lo'])}, {_pct(h['hi'])}]"


def _value(result: dict | None) -> str:
    if result is None or result.get("value") is None:
        return "–"
    return _fmt(result["value"]) if result["metric"] == "bpb" else _pct(result["value"])


def _rl_section(run: Path, results: list[dict]) -> list[str]:
    """Before (the assistant, eval/) and after GRPO (rl/eval/): every task, side by side."""
    summary = _load(run / "rl" / "rl_summary.json")
    after_eval = _load(run / "rl" / "eval" / "eval.json")
    if summary is None or after_eval is None:
        return []
    cfg = (_load(run / "rl" / "config.json") or {}).get("rl", {})
    before = {r["task"]: r for r in results}
    after = {r["task"]: r for r in after_eval["results"]}
    lines = [
        "## Reinforcement learning (GRPO, with the calculator)",
        "",
        f"{summary['steps']} steps of GRPO from the assistant, with the calculator shown: each step "
        f"{cfg.get('prompts_per_step', '?')} problems ({summary['problems']:,} in all: forward fact questions "
        f"about the SFT people, small sums, calculator problems), {cfg.get('group_size', '?')} answers sampled for each, reward 1 "
        f"when the answer states the right one; {summary['train_seconds'] / 60:.1f} min. The model kept is the one "
        f"that scored best on {summary.get('val_problems', '?')} validation problems (about half the evaluation "
        f"people): step {summary.get('best_step', '?')}. Held-out pass@1 ({summary.get('heldout_problems', '?')} "
        f"fact questions and small sums about the other half, greedy, with 95% intervals): "
        f"**{_interval(summary, 'start')} → {_interval(summary, 'end')}**.",
        "",
        "The evaluation's tasks again, on the RL model:",
        "",
        "| task | assistant (SFT) | after RL | n |",
        "|---|---:|---:|---:|",
    ]
    if "tools_on" in before and "tools_on" in after:
        kb, ka = _tool_kinds(before["tools_on"]), _tool_kinds(after["tools_on"])
        for kind, row in ka.items():
            name = f"**calculator problems, {kind}**" if kind == "all" else f"calculator problems, {kind}"
            lines.append(
                f"| {name} | {_pct(kb.get(kind, {}).get('accuracy'))} | {_pct(row['accuracy'])} | {row['n']:,} |"
            )
        eb, ea = before["tools_on"].get("extra", {}), after["tools_on"].get("extra", {})
        if "false_call_rate" in ea:
            lines.append(
                f"| tool called on a plain fact question | {_pct(eb.get('false_call_rate'))} | "
                f"{_pct(ea['false_call_rate'])} | {ea['fact_n']:,} |"
            )
    for task, r in after.items():
        if task != "tools_on":
            name = f"{task} (no tools shown)" if task == "world_forward" else f"{task} ({r['metric']})"
            lines.append(f"| {name} | {_value(before.get(task))} | {_value(r)} | {r['n']:,} |")
    lines.append("")
    if after_eval.get("samples"):
        lines += ["Sample answers of the RL model:", ""]
        lines += [f"- **{s['prompt']}**{shown_tools(s)} → {s['answer']}" for s in after_eval["samples"]]
        lines.append("")
    for png, alt in (("rl_pass1.png", "pass@1 against step"), ("rl.png", "reinforcement learning")):
        if (run / "rl" / png).exists():
            lines += [f"![{alt}](rl/{png})", ""]
    return lines


def machine_words(s: dict) -> str:
    """Where a stage ran, in words, from what the speedrun records per stage (device.machine())."""
    gpu = f", {s['gpu']}" if s.get("gpu") else ""
    return f"{s.get('cpu', 'unknown CPU')}{gpu}, {s.get('threads', '?')} thread{'' if s.get('threads') == 1 else 's'}"


def _stages_section(stages: dict) -> list[str]:
    """Seconds and share of the total per stage, and the machine they ran on (per stage when they differ,
    as when a run was resumed elsewhere)."""
    if not stages:
        return []
    total = sum(s.get("seconds", 0) for s in stages.values())
    machines = {machine_words(s) for s in stages.values() if "cpu" in s}
    one = len(machines) == 1 and all("cpu" in s for s in stages.values())
    lines = ["## Stages", ""]
    if one:
        lines += [f"Measured on {machines.pop()}.", ""]
    head, rule = ("| stage | seconds | share |", "|---|---:|---:|")
    if not one:
        head, rule = head + " machine |", rule + "---|"
    lines += [head, rule]
    for name, s in stages.items():
        share = f"{100 * s.get('seconds', 0) / total:.1f}%" if total else "–"
        where = "" if one else f" {machine_words(s) if 'cpu' in s else 'not recorded'} |"
        lines.append(f"| {name} | {_fmt(s.get('seconds'), 1)} | {share} |{where}")
    lines += [f"| **total** | **{total:.1f}** ({total / 60:.1f} min) | 100% |" + ("" if one else " |"), ""]
    return lines


def _training_section(title: str, folder: Path, summary_name: str, run: Path) -> list[str]:
    summary = _load(folder / summary_name)
    if summary is None:
        return []
    lines = [f"## {title}", ""]
    rows = [
        ("parameters", _fmt(summary.get("params"))),
        ("steps", _fmt(summary.get("steps"))),
        ("tokens trained on", _fmt(summary.get("tokens"))),
        ("training time", f"{summary.get('train_seconds', 0) / 60:.1f} min"),
        ("throughput", f"{_fmt(summary.get('tokens_per_second'), 0)} tokens/s"),
    ]
    if summary.get("val_bpb_start") is not None:
        rows.append(
            ("val bits per byte", f"{_fmt(summary['val_bpb_start'])} → {_fmt(summary['val_bpb_end'])}")
        )
    if summary.get("val_loss_start") is not None:
        rows.append(
            ("val loss (nats)", f"{_fmt(summary['val_loss_start'])} → {_fmt(summary['val_loss_end'])}")
        )
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if (folder / "loss.png").exists():
        lines += [f"![{title} loss]({(folder / 'loss.png').relative_to(run)})", ""]
    return lines


def build_report(run: Path) -> Path:
    run = Path(run)
    if not run.is_dir():
        raise ChatforgeError(f"no such run folder: {run}")
    stages = _load(run / "stages.json") or {}
    preset = _load(run / "preset.json") or {}
    out = [f"# chatforge report: {run.name}", ""]
    if preset:
        out += [f"Preset `{preset.get('name')}`: {preset.get('description', '')}.", ""]
    out += _stages_section(stages)

    world = _load(run / "world" / "manifest.json")
    if world:
        counts = ", ".join(f"{v:,} {k}" for k, v in world.get("counts", {}).items())
        out += [
            "## Data",
            "",
            f"- world: {world['n_people']:,} people ({world['n_heldout']} held out for retrieval), "
            f"{world['paraphrases']} biographies each; pretraining documents: {counts}",
        ]
        sft = _load(run / "sft_data" / "manifest.json")
        if sft:
            c = sft.get("counts", {})
            kinds = ", ".join(f"{v:,} {k}" for k, v in c.get("kinds", {}).items())
            out.append(
                f"- SFT: {c.get('train', 0):,} training conversations ({kinds}) about {c.get('sft_people', 0)} people; "
                f"evaluation asks {c.get('eval_forward', 0):,} forward questions about {c.get('eval_people', 0)} "
                f"other people and {c.get('eval_reverse', 0):,} reverse ones"
            )
        aug = stages.get("sft_data", {}).get("result", {}).get("qa_pretrain_docs")
        if aug:
            out.append(
                f"- knowledge augmentation: {aug:,} single-turn chats (ChatML, special tokens included) asking about "
                "the SFT people, mixed into pretraining; none about the evaluation people"
            )
        index = _load(run / "data" / "index.json")
        if index:
            sp, clean = index["splits"], index.get("clean", {})
            out.append(
                f"- shards: {sp['train']['tokens']:,} train / {sp['val']['tokens']:,} val tokens; cleaning "
                f"removed {clean.get('n_exact_dup', 0)} exact and {clean.get('n_near_dup', 0)} near duplicates"
            )
        tok = stages.get("tokenizer", {}).get("result", {})
        if tok:
            out.append(
                f"- tokenizer: {tok.get('vocab_size'):,} tokens, "
                f"{_fmt(tok.get('bytes_per_token'), 2)} bytes/token on held-out biographies"
            )
        out.append("")

    out += _training_section("Pretraining (base model)", run / "base", "pretrain_summary.json", run)
    out += _training_section("Supervised finetuning (assistant)", run / "sft", "sft_summary.json", run)

    evaluation = _load(run / "eval" / "eval.json")
    if evaluation:
        results = evaluation["results"]
        out += ["## Evaluation", "", "| task | metric | value | n |", "|---|---|---|---|"]
        out += [f"| {r['task']} | {r['metric']} | {_fmt(r['value'])} | {r['n']:,} |" for r in results]
        out.append("")
        fwd = next((r for r in results if r["task"] == "world_forward"), None)
        rev = next((r for r in results if r["task"] == "world_reverse"), None)
        if fwd and rev:
            out += [
                f"**The reversal curse, measured:** asked about people whose questions it never saw in "
                f"finetuning, the assistant answers {100 * fwd['value']:.1f}% of forward questions "
                f"(child → parent and other facts, the direction the biographies state) but "
                f"{100 * rev['value']:.1f}% of reverse questions (parent → child, never stated).",
                "",
            ]
        png = plot_eval_bars(results, run / "eval" / "eval.png")
        if png:
            out += [f"![evaluation]({png.relative_to(run)})", ""]
        out += _tools_section(results, run)
        samples = evaluation.get("samples")
        if samples:
            out += ["### Sample answers", ""]
            out += [f"- **{s['prompt']}**{shown_tools(s)} → {s['answer']}" for s in samples]
            out.append("")
        out += _rl_section(run, results)
    out += _rag_section(run)
    path = run / "report.md"
    atomic_write_text(path, "\n".join(out))
    return path


def cmd_report(opts: ReportOptions) -> None:
    print(f"report written to {build_report(opts.run)}")
