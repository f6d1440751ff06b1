#!/usr/bin/env python3
"""Ratios of one benchmark sitting (the JSON lines `tools/bench_sitting.sh` prints) against TRL's.

Usage: tools/bench_summary.py SITTING.jsonl [...]

For each rlhf bench line: tokens/s over TRL's (both harnesses: total tokens over total time after 5 warm-up
steps) and, for the online trainers, the same ratio at the median step (tokens per step over the median step
time, both sides), which slow outlier steps do not move.
"""
import json
import sys

TRL_RUN = {"grpo": "grpo", "rloo": "rloo", "ppo": "ppo_trl112", "sft": "sft", "rm": "rm", "dpo": "dpo"}


def main(paths):
    for path in paths:
        trl, ours = {}, []
        for line in open(path):
            if line.startswith("#"):
                print(line.strip())
            if not line.startswith("{"):
                continue
            d = json.loads(line)
            if "run" in d and d.get("tokens_per_sec"):
                trl[d["run"]] = d
            elif d.get("what"):
                trl["generate"] = d
            else:
                ours.append(d)
        for d in ours:
            name = d.get("bench") or d.get("trainer")
            label = f"{name} {d.get('precision', '?')} {d.get('backend', 'engine')}"
            if name == "generate":
                t = trl.get("generate")
                if t:
                    print(f"  {label}: {d['new_tokens_per_sec'] / t['new_tokens_per_s']:.2f}x transformers")
                continue
            t = trl.get(TRL_RUN.get(name, ""))
            if not t or not d.get("tokens_per_sec"):
                continue
            line = f"  {label}: {d['tokens_per_sec']:,.0f} vs {t['tokens_per_sec']:,.1f} tok/s = {d['tokens_per_sec'] / t['tokens_per_sec']:.2f}x"
            if "tokens_per_step_mean" in d and "tokens_per_step_mean" in t:
                ours_med = d["tokens_per_step_mean"] / d["sec_per_step_median"]
                trl_med = t["tokens_per_step_mean"] / t["sec_per_step_median"]
                line += f"; at the median step {ours_med:,.0f} vs {trl_med:,.1f} = {ours_med / trl_med:.2f}x"
                p90 = f", p90 {d['sec_per_step_p90'] * 1e3:.1f}" if "sec_per_step_p90" in d else ""
                line += f" (step {d['sec_per_step_median'] * 1e3:.1f} ms{p90}; TRL {t['sec_per_step_median'] * 1e3:.1f} ms)"
            if "peak_rss_mb" in d:
                line += f", {d['peak_rss_mb']:.0f} MB vs {t.get('peak_rss_mb', float('nan')):.0f}"
            print(line)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
