#!/usr/bin/env python3
"""Load a model directory (e.g. one written by the Rust side) with transformers and compare its outputs
with a reference.  Usage (see tools/README.md):

    /work/venv/bin/python tools/check_reload.py MODEL_DIR REF [--key NAME] [--tol 1e-4]

REF is one of
  * fixtures/reference/logits.safetensors — uses its `input_ids`/`attention_mask` and the tensor
    `<NAME>.logits` (causal LM) or `<NAME>.scores` (sequence classifier); NAME defaults to the
XX
  * any safetensors file with `input_ids` [B, T] (int), optional `attention_mask` [B, T], and
    `logits` [B, T, V] or `scores` [B] — e.g. dumped by the Rust side for its own trained model;
  * another model directory — both models run on the fixed batch of logits.safetensors.

Prints one JSON line {"model_dir", "ref", "compared", "max_abs_err", "tol", "ok", ...} and exits 1 when
the error exceeds --tol, when weights are missing/unexpected (a tensor transformers had to initialise
randomly), or when the tokenizer in MODEL_DIR does not load.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch
import transformers
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BATCH = os.path.join(os.path.dirname(HERE), "fixtures", "reference", "logits.safetensors")


def is_classifier(config):
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def load(model_dir):
    """Returns (model, loading problems). transformers silently random-initialises tensors that are
    absent from the checkpoint, so missing/unexpected keys are reported as failures."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = (transformers.AutoModelForSequenceClassification if is_classifier(config)
           else transformers.AutoModelForCausalLM)
    model, info = cls.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                                      "mismatched_keys", "error_msgs")}
    return model.eval(), problems


def outputs(model, ids, mask):
    """Per-position logits for a causal LM, per-row scores for a classifier; pad positions zeroed,
    matching the convention of fixtures/reference/logits.safetensors."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits.float()
    if is_classifier(model.config):
        return "scores", out[:, 0]
    return "logits", out * mask.unsqueeze(-1).to(out.dtype)


def reference(model, ref, key):
    if os.path.isdir(ref):
        batch = load_file(DEFAULT_BATCH)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        ref_model, problems = load(ref)
        if problems:
            sys.exit(f"{ref}: reference model does not load cleanly: {problems}")
        kind, expected = outputs(ref_model, ids, mask)
        return ids, mask, kind, expected, f"model dir {ref}"
    tensors = load_file(ref)
    if "input_ids" not in tensors:
        sys.exit(f"{ref}: no tensor 'input_ids' (keys: {sorted(tensors)})")
    ids = tensors["input_ids"].long()
    mask = tensors.get("attention_mask", torch.ones_like(ids)).long()
    kind = "scores" if is_classifier(model.config) else "logits"
    if key is None and kind not in tensors:
        key = f"{model.config.model_type}-rm" if kind == "scores" else model.config.model_type
    name = kind if key is None else f"{key}.{kind}"
    if name not in tensors:
        sys.exit(f"{ref}: no tensor {name!r} (keys: {sorted(tensors)}); pass --key")
    expected = tensors[name].float()
    if kind == "logits":
        expected = expected * mask.unsqueeze(-1).float()
    return ids, mask, kind, expected, name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("ref")
    ap.add_argument("--key", help="tensor prefix in REF, e.g. llama, qwen2, gpt2, mistral, llama-rm, mistral-rm")
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs error allowed (default 1e-4)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    model, problems = load(args.model_dir)
    try:
        transformers.AutoTokenizer.from_pretrained(args.model_dir)
        tokenizer_ok = True
    except Exception as e:  # a missing tokenizer is reported, not fatal to the comparison
        tokenizer_ok = f"{type(e).__name__}: {e}"
    ids, mask, kind, expected, compared = reference(model, args.ref, args.key)
    _, got = outputs(model, ids, mask)
    if got.shape != expected.shape:
        sys.exit(f"shape mismatch: {args.model_dir} gives {kind} {tuple(got.shape)}, "
                 f"{args.ref} holds {tuple(expected.shape)}")
    err = float((got - expected).abs().max())
    ok = err <= args.tol and not problems and tokenizer_ok is True
    print(json.dumps({
        "model_dir": args.model_dir, "ref": args.ref, "compared": compared, "kind": kind,
        "shape": list(got.shape), "max_abs_err": err, "tol": args.tol,
        "loading_problems": problems, "tokenizer_loads": tokenizer_ok, "ok": ok,
        "transformers": transformers.__version__,
    }))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
