#!/usr/bin/env python3
"""Write the quick-start datasets under data/ (standard library only, deterministic).

The rows are identical to those of /work/shared/bench-trl/make_fixtures.py (seed 1234): that script draws its
tokenizer corpus from the same RNG first, so we consume the same draws before making the problems. This keeps
our runs directly comparable with the TRL baseline.

  data/sft_train.jsonl, data/sft_eval.jsonl    prompt/completion          ("Q: 17+25=" -> " 42")
  data/pref_train.jsonl, data/pref_eval.jsonl  prompt/chosen/rejected     (rejected: near miss 70 %, random 30 %)
  data/prompts.jsonl                           prompt/answer (train problems, for online RL)
"""
import argparse
import json
import os
import random


def make_problems(rng, n_train, n_eval, lo, hi):
    """Unique a+b problems; train and eval are disjoint."""
    seen, probs = set(), []
    while len(probs) < n_train + n_eval:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        probs.append((a, b))
    return probs[:n_train], probs[n_train:]


def wrong_answer(rng, c):
    # mostly near-misses (hard negatives), sometimes a random number
    if rng.random() < 0.7:
        d = 0
        while d == 0:
            d = rng.randint(-10, 10)
        w = c + d
    else:
        w = c
        while w == c:
            w = rng.randint(0, 2 * c + 20)
    return max(w, 0) if max(w, 0) != c else c + 1


def rows_for(rng, probs):
    pref, sft, prompts = [], [], []
    for a, b in probs:
        c = a + b
        prompt = f"Q: {a}+{b}="  # no trailing space: completions start with " "
        pref.append({"prompt": prompt, "chosen": f" {c}", "rejected": f" {wrong_answer(rng, c)}"})
        sft.append({"prompt": prompt, "completion": f" {c}"})
        prompts.append({"prompt": prompt, "answer": c})
    return pref, sft, prompts


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=200)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    # The baseline's tokenizer corpus: 20000 x two randint(0, 99) draws, made before the problems.
    for _ in range(20000):
        rng.randint(0, 99), rng.randint(0, 99)

    os.makedirs(args.out, exist_ok=True)
    train, evl = make_problems(rng, args.n_train, args.n_eval, 10, 99)
    for split, probs in (("train", train), ("eval", evl)):
        pref, sft, prompts = rows_for(rng, probs)
        write_jsonl(os.path.join(args.out, f"pref_{split}.jsonl"), pref)
        write_jsonl(os.path.join(args.out, f"sft_{split}.jsonl"), sft)
        if split == "train":
            write_jsonl(os.path.join(args.out, "prompts.jsonl"), prompts)


if __name__ == "__main__":
    main()
