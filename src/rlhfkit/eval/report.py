"""`report.html` and `summary.json` of a pipeline run: curves, a before/after table, samples side by side.

The page is one self-contained HTML file (plots are inline PNGs), so it can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from rlhfkit.runtime.metrics_log import read_metrics

# Training curves per fine-tuning stage: (metric key in its metrics.jsonl, title), plotted when present.
_RL_CURVES = [("objective/scores", "Reward-model score"), ("objective/gold", "Gold score (VADER)"),
              ("objective/kl", "KL to reference (nats / response)"), ("ppo/entropy", "Policy entropy (nats / token)"),
              ("loss/value", "Value loss"), ("ppo/clipfrac", "Clip fraction"),
              ("response/length_mean", "Response length (tokens)")]
CURVES = {
    "ppo": ("PPO iteration", _RL_CURVES),
    "grpo": ("GRPO iteration", _RL_CURVES),
    "rloo": ("RLOO iteration", _RL_CURVES),
    "dpo": ("optimizer step", [("loss", "DPO loss"), ("dpo/accuracy", "Implicit-reward accuracy (train)"),
                               ("dpo/margin", "Implicit-reward margin"), ("dpo/chosen_reward", "Chosen reward"),
                               ("dpo/rejected_reward", "Rejected reward"), ("eval/dpo/accuracy", "Held-out accuracy")]),
}
# (eval.json key prefix, label) of the before/after table.
TABLE = [("gold_reward", "Gold score (held-out)"), ("proxy_reward", "Reward-model score"),
         ("kl_exact", "KL to reference (nats)"), ("kl_to_reference", "KL, sampled k1 estimate (as in training)"),
         ("win_rate_vs_reference", "Gold win rate vs reference"),
         ("response_length", "Response length (tokens)"), ("ended_with_eos", "Ended with EOS")]


def kl_key(ev: dict) -> str:
    """The eval.json prefix of the headline KL: the exact one (summed over the vocabulary, never negative), or the
    sampled k1 estimate in an eval.json written before the exact KL was computed."""
    return "kl_exact" if "kl_exact_mean" in ev else "kl_to_reference"


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1):i + 1] if v is not None]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def curves_png(rows: list[dict], curves: list[tuple[str, str]], xlabel: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(k, t) for k, t in curves if any(k in r for r in rows)]
    if not present:
        return None
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(present) / cols), cols, figsize=(13, 3.4 * math.ceil(len(present) / cols)),
                             squeeze=False)
    for ax, (key, title) in zip(axes.flat, present):
        steps = [r["step"] for r in rows if r.get(key) is not None]
        values = [r[key] for r in rows if r.get(key) is not None]
        ax.plot(steps, values, color="#9ab", lw=1, label="per step")
        ax.plot(steps, _smooth(values), color="#1f5f8b", lw=2, label="moving mean (5)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def best_of_n_rows(evals: dict[str, dict]) -> list[dict]:
    """The best-of-n baseline of the reference (drawn by one evaluation, usually the starting policy's), or []."""
    return next((ev["best_of_n"] for ev in evals.values() if ev.get("best_of_n")), [])


def benchmark_rows(evals: dict[str, dict]) -> list[dict]:
    """One row per benchmark task and metric: the reference's score and each policy's, with standard errors and
    the change from the reference; [] without a benchmark."""
    rows: dict[tuple[str, str], dict] = {}
    for name, ev in evals.items():
        for task, entry in (ev.get("benchmark") or {}).get("tasks", {}).items():
            for metric, m in entry["metrics"].items():
                row = rows.setdefault((task, metric), {
                    "task": task, "metric": metric, "n": entry["n"], "higher_is_better": m["higher_is_better"],
                    "reference": {"value": m["reference"], "stderr": m["reference_stderr"]}, "policies": {}})
                row["policies"][name] = {"value": m["policy"], "stderr": m["policy_stderr"], "delta": m["delta"],
                                         "delta_stderr": m["delta_stderr"]}
    return list(rows.values())


def _pm(value: float, stderr: float | None) -> str:
    return f"{value:.3f}" + (f" <span class=ci>&plusmn; {stderr:.3f}</span>" if stderr is not None else "")


def _benchmark_section(rows: list[dict], names: list[str]) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = ""
    for r in rows:
        cells = ""
        for n in names:
            p = r["policies"].get(n)
            if p is None:
                cells += "<td>&ndash;</td>"
                continue
            change = f"change {p['delta']:+.3f}"
            if p["delta_stderr"] is not None:
                change += f" &plusmn; {p['delta_stderr']:.3f}"
            cells += f"<td>{_pm(p['value'], p['stderr'])}<div class=gold>{change}</div></td>"
        body += (f"<tr><td>{html.escape(r['task'])}</td><td>{html.escape(r['metric'])}</td><td>{r['n']}</td>"
                 f"<td>{_pm(r['reference']['value'], r['reference']['stderr'])}</td>{cells}</tr>")
    return ("<h2>Capability benchmark (lm-eval)</h2><p>What the gold score's gain cost: each policy and the reference "
            "on the same documents, &plusmn; one standard error (lm-eval's); the change's error treats the two as "
            "independent, so it is conservative.</p>"
            f"<table><tr><th>task</th><th>metric</th><th>documents</th><th>reference</th>{head}</tr>{body}</table>")


def gold_vs_kl_png(evals: dict[str, dict]) -> str | None:
    """Each policy as a point on the (KL to reference, gold score) plane, with 95% intervals; the best-of-n
    baseline of the reference as a curve over n, at its closed-form KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not evals:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, ev in evals.items():
        key = kl_key(ev)
        kl, gold = ev[f"{key}_mean"], ev["gold_reward_mean"]
        ax.errorbar([kl], [gold], xerr=[[kl - ev[f"{key}_ci95"][0]], [ev[f"{key}_ci95"][1] - kl]],
                    yerr=[[gold - ev["gold_reward_ci95"][0]], [ev["gold_reward_ci95"][1] - gold]], fmt="o", capsize=4,
                    label=name)
        ax.annotate(name, (kl, gold), textcoords="offset points", xytext=(6, 6), fontsize=9)
    baseline = best_of_n_rows(evals)
    if baseline:
        kls, golds = [r["kl"] for r in baseline], [r["gold_reward_mean"] for r in baseline]
        ax.errorbar(kls, golds, yerr=[[g - r["gold_reward_ci95"][0] for g, r in zip(golds, baseline)],
                                      [r["gold_reward_ci95"][1] - g for g, r in zip(golds, baseline)]],
                    fmt="s--", color="grey", capsize=3, alpha=0.8, label="best-of-n of the reference")
        for r in baseline:
            ax.annotate(f"n={r['n']}", (r["kl"], r["gold_reward_mean"]), textcoords="offset points", xytext=(4, -12),
                        fontsize=8, color="grey")
        ax.legend(fontsize=8, loc="best")
    exact = all(kl_key(ev) == "kl_exact" for ev in evals.values())
    ax.set_xlabel("KL to reference (nats / response" + (", exact)" if exact else ")"))
    ax.set_ylabel("Gold score (held-out)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def _fmt(ev: dict, key: str) -> str:
    if f"{key}_mean" not in ev:
        return "&ndash;"
    lo, hi = ev[f"{key}_ci95"]
    return f"{ev[f'{key}_mean']:.3f} <span class=ci>[{lo:.3f}, {hi:.3f}]</span>"


def intervals_apart(better: dict, worse: dict, key: str = "gold_reward") -> bool:
    """True when the 95% interval of `better` lies entirely above that of `worse`."""
    return better[f"{key}_ci95"][0] > worse[f"{key}_ci95"][1]


def _policy_rank(name: str, order: tuple[str, ...]) -> tuple[int, str]:
    return (order.index(name) if name in order else len(order), name)


def build_summary(out: Path, kl_budget: float, timings: dict, order: tuple[str, ...] = ()) -> dict:
    """summary.json's content. `order`: the policies' column order (the caller's, e.g. the pipeline's starting
    policy and then its fine-tuning methods); policies not in it follow alphabetically."""
    folders = sorted((p for p in (out / "eval").glob("*") if (p / "eval.json").is_file()),
                     key=lambda p: _policy_rank(p.name, tuple(order)))
    evals = {p.name: _read_json(p / "eval.json") for p in folders}
    reward_rows = read_metrics(out / "reward" / "metrics.jsonl") if (out / "reward" / "metrics.jsonl").is_file() else []
    final_rm = next((r for r in reversed(reward_rows) if "eval/accuracy" in r), {})
    summary = {
        "policies": evals,
        "annotate": _read_json(out / "annotate" / "summary.json"),
        "reward_model": {k.removeprefix("eval/"): v for k, v in final_rm.items() if k.startswith("eval/")},
        "kl_budget": kl_budget,
        "timings_s": timings,
        "total_s": sum(timings.values()),
        "checks": {},
    }
    if best_of_n_rows(evals):
        summary["best_of_n"] = best_of_n_rows(evals)
    if benchmark_rows(evals):
        summary["benchmark"] = benchmark_rows(evals)
    base = evals.get("sft")
    for name, ev in evals.items():
        if name == "sft" or base is None:
            continue
        summary["checks"][f"{name}_gold_above_sft"] = intervals_apart(ev, base)
        # The exact KL (never negative, the lower variance): the sampled k1 mean can sit under the budget by noise.
        summary["checks"][f"{name}_kl_within_budget"] = ev[f"{kl_key(ev)}_mean"] <= kl_budget
    return summary


def _samples_table(out: Path, names: list[str], limit: int = 10) -> str:
    columns = {n: [json.loads(line) for line in (out / "eval" / n / "samples.jsonl").read_text().splitlines()]
               for n in names if (out / "eval" / n / "samples.jsonl").is_file()}
    if not columns:
        return ""
    rows, seen = [], set()
    first = next(iter(columns.values()))
    for i, sample in enumerate(first):
        prompt = json.dumps(sample["prompt"]) if not isinstance(sample["prompt"], str) else sample["prompt"]
        if prompt in seen:
            continue
        seen.add(prompt)
        cells = "".join(f"<td>{html.escape(col[i]['response'])}<div class=gold>gold {col[i]['gold']:+.2f}</div></td>"
                        for col in columns.values() if i < len(col))
        rows.append(f"<tr><td class=prompt>{html.escape(prompt)}</td>{cells}</tr>")
        if len(rows) >= limit:
            break
    head = "".join(f"<th>{html.escape(n)}</th>" for n in columns)
    return f"<table class=samples><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.35em .6em;vertical-align:top;
font-size:.92em}th{background:#f3f5f7;text-align:left}.ci{color:#777;font-size:.85em}.ok{color:#187a2f;
font-weight:600}.bad{color:#b3261e;font-weight:600}.samples td{max-width:380px}.prompt{font-weight:600}
.gold{color:#777;font-size:.8em;margin-top:.3em}img{max-width:100%}"""


def write_report(out: Path, kl_budget: float, timings: dict, order: tuple[str, ...] = ()) -> Path:
    out = Path(out)
    summary = build_summary(out, kl_budget, timings, order)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    evals = summary["policies"]
    names = list(evals)
    parts = [f"<h1>rlhfkit report</h1><p>Output folder: <code>{html.escape(str(out))}</code>. "
             f"Total wall time {summary['total_s'] / 60:.1f} min.</p>"]
    if summary["checks"]:
        items = "".join(f"<li>{html.escape(k)}: <span class={'ok' if v else 'bad'}>{'yes' if v else 'no'}</span></li>"
                        for k, v in summary["checks"].items())
        parts.append(f"<h2>Checks</h2><ul>{items}</ul><p>Gold above SFT means the 95% intervals do not overlap; "
                     f"the KL budget is {kl_budget:g} nats per response, checked against the exact KL.</p>")
    if evals:
        first = next(iter(evals.values()))
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        body = "".join(f"<tr><td>{label}</td>{''.join(f'<td>{_fmt(evals[n], key)}</td>' for n in names)}</tr>"
                       for key, label in TABLE)
        parts.append(f"<h2>Before and after (held-out prompts)</h2><p>{first['n_prompts']} prompts x "
                     f"{first['samples_per_prompt']} samples; mean and 95% interval over prompts; reference: "
                     f"<code>{html.escape(first['ref_model'])}</code>.</p><table><tr><th>metric</th>{head}</tr>{body}</table>")
        plane = gold_vs_kl_png(evals)
        if plane:
            parts.append(f"<h2>Gold score against KL to the reference</h2><img src='data:image/png;base64,{plane}'>")
        baseline = best_of_n_rows(evals)
        if baseline:
            rows = "".join(f"<tr><td>{r['n']}</td><td>{r['kl']:.3f}</td><td>{_fmt(r, 'gold_reward')}</td>"
                           f"<td>{_fmt(r, 'proxy_reward')}</td></tr>" for r in baseline)
            parts.append("<h2>Best-of-n baseline</h2><p>Per prompt, n samples of the reference; the one the reward "
                         "model scores highest is kept. KL to the reference: log n - (n-1)/n (closed form). A trained "
                         "policy above this curve at the same KL beat a method that needs no training.</p>"
                         f"<table><tr><th>n</th><th>KL (nats)</th><th>gold score</th><th>reward-model score</th></tr>"
                         f"{rows}</table>")
    if summary.get("benchmark"):
        parts.append(_benchmark_section(summary["benchmark"], names))
    for stage, (xlabel, wanted) in CURVES.items():
        metrics = out / stage / "metrics.jsonl"
        curves = curves_png(read_metrics(metrics), wanted, xlabel) if metrics.is_file() else None
        if curves:
            parts.append(f"<h2>{stage.upper()} training curves</h2><img src='data:image/png;base64,{curves}'>")
    rm = summary["reward_model"]
    if rm:
        agreement = f", agreement with the gold scorer {rm['gold_agreement']:.3f}" if "gold_agreement" in rm else ""
        parts.append(f"<h2>Reward model</h2><p>Held-out pairwise accuracy on annotator labels "
                     f"{rm.get('accuracy', float('nan')):.3f}{agreement}.</p>")
    table = _samples_table(out, names)
    if table:
        parts.append(f"<h2>Sample generations (held-out prompts)</h2>{table}")
    if timings:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.0f} s</td></tr>" for k, v in timings.items())
        parts.append(f"<h2>Wall time per stage</h2><table>{rows}</table>")
    page = f"<!doctype html><html><head><meta charset=utf-8><title>rlhfkit report</title><style>{STYLE}</style>" \
           f"</head><body>{''.join(parts)}</body></html>"
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"
