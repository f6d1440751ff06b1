#!/usr/bin/env python3
"""Write the reference fixtures under fixtures/ (see fixtures/README.md for every file).

Run with the pinned venv (torch/transformers/trl/tokenizers from /work/shared/bench-trl/requirements.txt):

    /work/venv/bin/python tools/make_fixtures.py                 # everything
    /work/venv/bin/python tools/make_fixtures.py --parts models  # a subset (see PARTS)

Everything is offline and deterministic (fixed seeds, 2 torch threads, fp32); re-running it rewrites
byte-identical model/tokenizer files and identical numbers (up to the last float bit on the same CPU).
"""
import argparse
import importlib
import json
import os
import random
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    MistralForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fixture_io import write_json

SEED = 1234
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "fixtures")
TOK_DIR = os.path.join(FIX, "tokenizer")
MODELS = os.path.join(FIX, "models")
REF = os.path.join(FIX, "reference")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# The same template as /work/shared/bench-trl/make_fixtures.py, so fixture-based tests and the TRL
# baseline format conversations identically.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Answer the question with a single number.",
    "What is the sum of the two numbers?",
    "Reinforcement learning from human feedback fine-tunes a language model.",
    "A reward model scores each response; the policy learns to prefer high scores.",
    "Please add the numbers and write only the result.",
    "The assistant is helpful, honest and harmless.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "She sells sea shells by the sea shore.",
    "Numbers like 12, 345 and 6789 appear in the text.",
    "You are a helpful assistant.",
    "Hello! How are you today?",
    "I am fine, thank you. And you?",
    "The preferred answer is correct; the rejected answer is off by one.",
    "Tokenizers split text into pieces called tokens.",
    "Let's think step by step.",
]

PARTS = ("tokenizer", "models", "logits", "greedy", "tokenizer_ref", "chat", "sft_tokenize",
         "sft_step", "pref_losses", "dpo_step", "rm_step", "rl")


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def tokenizer_corpus(rng):
    corpus = []
    for _ in range(4000):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        corpus.append(f"Q: {a}+{b}= {a + b}")
        corpus.append(f"User: Q: {a}+{b}=\nAssistant: {a + b}</s>\n")
    corpus += ENGLISH * 40
    return corpus


def build_tokenizer():
    """Byte-level BPE, vocab 512 (4 specials + 256 bytes + 252 merges); prepends <s> when
    add_special_tokens=True (TemplateProcessing), like Llama tokenizers."""
    rng = random.Random(SEED)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(rng), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=128,
        padding_side="right",
    )
    hf.chat_template = CHAT_TEMPLATE
    assert len(hf) == 512, len(hf)
    assert [hf.convert_tokens_to_ids(t) for t in SPECIALS] == [0, 1, 2, 3]
    return hf


def save_tokenizer(hf, out_dir):
    """tokenizer.json + tokenizer_config.json (chat_template inline) + special_tokens_map.json.

    transformers 5 would otherwise write chat_template.jinja and no special_tokens_map.json; the
    inline form is what most hub repos still ship and what older loaders read."""
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir, save_jinja_files=False)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    # "TokenizersBackend" is transformers-5 only; PreTrainedTokenizerFast loads everywhere.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = False
    cfg["chat_template"] = hf.chat_template
    write_json(cfg_path, cfg)
    write_json(os.path.join(out_dir, "special_tokens_map.json"),
               {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})


def load_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TOK_DIR)


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
COMMON = dict(vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, dtype="float32")
# 0.02 (the HF default) gives near-uniform logits whose top-2 gap is ~1e-3, so greedy decoding
# would hinge on float rounding; 0.1 gives clear argmaxes while staying well-conditioned.
INIT_RANGE = 0.1
# Mistral's sliding window: above every sequence of the logits and greedy references (≤ 65 tokens), so
# the window changes nothing there and a loader must refuse only longer sequences.
MISTRAL_WINDOW = 96


def model_configs():
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    return {
        "llama": (LlamaForCausalLM, LlamaConfig(
            hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
            rope_parameters=rope, tie_word_embeddings=False, initializer_range=INIT_RANGE, **COMMON)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(
            hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
            rope_parameters=rope, tie_word_embeddings=True, use_sliding_window=False,
            initializer_range=INIT_RANGE, **COMMON)),
        "gpt2": (GPT2LMHeadModel, GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=128, activation_function="gelu_new",
            tie_word_embeddings=True, initializer_range=INIT_RANGE, **COMMON)),
        # Last, so the models above keep their seeds. head_dim 32 ≠ hidden/heads exercises an explicit head_dim.
        "mistral": (MistralForCausalLM, MistralConfig(
            hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6,
            rope_parameters=rope, tie_word_embeddings=False, sliding_window=MISTRAL_WINDOW,
            initializer_range=INIT_RANGE, **COMMON)),
    }


def randomize_biases_and_norms(model, gen):
    """HF initialises biases to 0 and norm weights to 1, so a loader that silently skipped them
    would still match; random values make every tensor matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def set_generation_config(model):
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = 0, 1, 2


def build_models(tok):
    gen = torch.Generator().manual_seed(SEED)
    for i, (name, (cls, cfg)) in enumerate(model_configs().items()):
        torch.manual_seed(SEED + i)
        model = cls(cfg).eval()
        randomize_biases_and_norms(model, gen)
        set_generation_config(model)
        out = os.path.join(MODELS, name)
        save_model(model, tok, out)
        if name == "llama":
            # ~140 k params = 560 kB of fp32; 200 kB shards give several files + index.
            save_model(model, tok, os.path.join(MODELS, "llama-sharded"), max_shard_size="200KB")
    # Reward models: a backbone plus a fresh scalar head, as an RM initialised from a causal-LM
    # checkpoint would be.
    for seed, (base, cls) in enumerate(RM_CLASSES.items(), SEED + 10):
        torch.manual_seed(seed)
        rm = cls.from_pretrained(os.path.join(MODELS, base), num_labels=1, pad_token_id=0).eval()
        save_model(rm, tok, os.path.join(MODELS, f"{base}-rm"))


RM_CLASSES = {"llama": LlamaForSequenceClassification, "mistral": MistralForSequenceClassification}


def save_model(model, tok, out, **kw):
    if os.path.exists(out):
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True, **kw)
    save_tokenizer(tok, out)
    rope = getattr(model.config, "rope_parameters", None)
    if rope:
        # transformers 5 writes only rope_parameters; loaders written against v4 configs (and most
        # hub checkpoints) read a top-level rope_theta, so write both (v5 reads the file fine).
        path = os.path.join(out, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["rope_theta"] = rope["rope_theta"]
        write_json(path, cfg)


def load_model(name):
    d = os.path.join(MODELS, name)
    cls = RM_CLASSES[name[:-3]] if name.endswith("-rm") else transformers.AutoModelForCausalLM
    return cls.from_pretrained(d, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------------------
# logits
# ----------------------------------------------------------------------------------------------
LOGIT_TEXTS = ["User: Q: 17+25= 42</s>", "Q: 3+4="]


def logits_batch(tok):
    rows = [tok(t)["input_ids"] for t in LOGIT_TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int64)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int64)
    return ids, mask, [len(r) for r in rows]


def make_logits(tok):
    ids, mask, lens = logits_batch(tok)
    assert lens == [11, 7], lens
    tensors = {"input_ids": ids, "attention_mask": mask, "lengths": torch.tensor(lens)}
    valid = mask.unsqueeze(-1).float()
    with torch.no_grad():
        for name in ("llama", "qwen2", "gpt2", "mistral", "llama-sharded"):
            model = load_model(name)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            for r, n in enumerate(lens):  # right padding must not change the valid positions
                alone = model(input_ids=ids[r:r + 1, :n]).logits[0]
                assert (alone - logits[r, :n]).abs().max() < 1e-5, name
            # Positions past each row's length are padding: their values are implementation
            # details of the attention mask, so they are stored as 0.
            tensors[f"{name}.logits"] = (logits * valid).contiguous()
        check_mistral_window_is_live(load_model("mistral"))
        for base in RM_CLASSES:
            rm = load_model(f"{base}-rm")
            out = rm(input_ids=ids, attention_mask=mask)
            tensors[f"{base}-rm.scores"] = out.logits[:, 0].contiguous()
            per_pos = rm.score(rm.model(input_ids=ids, attention_mask=mask).last_hidden_state)
            assert torch.allclose(per_pos[torch.arange(2), torch.tensor(lens) - 1, 0], out.logits[:, 0])
            tensors[f"{base}-rm.token_scores"] = (per_pos * valid).contiguous()
    assert torch.equal(tensors["llama.logits"], tensors["llama-sharded.logits"])
    del tensors["llama-sharded.logits"]
    os.makedirs(REF, exist_ok=True)
    save_file(tensors, os.path.join(REF, "logits.safetensors"),
              # One key: safetensors writes metadata in hash order, so several keys would make the
              # file's bytes vary between runs.
              metadata={"info": json.dumps({"texts": LOGIT_TEXTS, "torch": torch.__version__,
                                            "transformers": transformers.__version__})})


def check_mistral_window_is_live(model):
    """transformers applies `sliding_window`: up to the window the logits equal full causal attention's,
    one token beyond they differ, so a loader without a window must refuse longer sequences."""
    ids = torch.randint(4, 512, (1, MISTRAL_WINDOW + 1), generator=torch.Generator().manual_seed(SEED))

    def last_logits(ids, window):
        model.config.sliding_window = window
        return model(input_ids=ids).logits[0, -1]

    within = ids[:, :MISTRAL_WINDOW]
    assert (last_logits(within, MISTRAL_WINDOW) - last_logits(within, None)).abs().max() < 1e-5
    assert (last_logits(ids, MISTRAL_WINDOW) - last_logits(ids, None)).abs().max() > 1e-4
    model.config.sliding_window = MISTRAL_WINDOW


# ----------------------------------------------------------------------------------------------
# greedy generation
# ----------------------------------------------------------------------------------------------
GREEDY_PROMPTS = [
    "Q: 3+4=",
    "User: Q: 17+25=\nAssistant:",
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and",
]
MAX_NEW = 12


def manual_greedy(model, prompt_ids, n, eos):
    """Full-recompute argmax loop (no KV cache); also reports the smallest top-1/top-2 logit gap."""
    ids = list(prompt_ids)
    gap = float("inf")
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 2).values
        gap = min(gap, float(top[0] - top[1]))
        nxt = int(logits.argmax())
        ids.append(nxt)
        if eos is not None and nxt == eos:
            break
    return ids[len(prompt_ids):], gap


def make_greedy(tok):
    out = {
        "max_new_tokens": MAX_NEW,
        "prompts": GREEDY_PROMPTS,
        "prompt_ids": [tok(p)["input_ids"] for p in GREEDY_PROMPTS],
        "models": {},
    }
    ids, mask = left_padded(out["prompt_ids"])
    out["batched_left_padded"] = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "models": {}}
    with torch.no_grad():
        for name in ("llama", "qwen2", "gpt2", "mistral"):
            model = load_model(name)
            rows = []
            for p_ids in out["prompt_ids"]:
                x = torch.tensor([p_ids])
                row = {}
                for key, eos in (("no_eos_stop", None), ("eos_stop", 2)):
                    # eos_token_id=-1 never matches, so generate always produces max_new_tokens.
                    g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                       max_new_tokens=MAX_NEW, eos_token_id=-1 if eos is None else eos,
                                       pad_token_id=0)
                    new = g[0, len(p_ids):].tolist()
                    ref, gap = manual_greedy(model, p_ids, MAX_NEW, eos)
                    if eos is not None and 2 in new:  # generate pads finished rows; trim them
                        new = new[:new.index(2) + 1]
                    assert new == ref, (name, new, ref)
                    row[key] = new
                    row[f"{key}_min_top2_gap"] = round(gap, 6)
                row["no_eos_stop_text"] = tok.decode(row["no_eos_stop"])
                # EOS (id 2) never wins an argmax with these random weights, so also stop on the
                # 4th generated token to exercise the stop logic.
                stop = row["no_eos_stop"][3]
                g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=MAX_NEW, eos_token_id=stop, pad_token_id=0)
                new = g[0, len(p_ids):].tolist()
                assert new[:new.index(stop) + 1] == row["no_eos_stop"][:row["no_eos_stop"].index(stop) + 1]
                row["custom_stop"] = {"eos_token_id": stop, "ids": new[:new.index(stop) + 1]}
                rows.append(row)
            out["models"][name] = rows
            out["batched_left_padded"]["models"][name] = batched_greedy(model, ids, mask, rows)
    write_json(os.path.join(REF, "greedy.json"), out)


def left_padded(prompt_ids):
    width = max(map(len, prompt_ids))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    return ids, mask


def batched_greedy(model, ids, mask, rows):
    """All prompts in one left-padded batch (HF derives position ids from the mask, so each row starts
    at position 0); must reproduce the one-at-a-time results."""
    g = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                       eos_token_id=-1, pad_token_id=0)
    new = g[:, ids.shape[1]:].tolist()
    assert new == [r["no_eos_stop"] for r in rows], new
    return new


# ----------------------------------------------------------------------------------------------
# tokenizer reference
# ----------------------------------------------------------------------------------------------
TOKENIZER_TEXTS = [
    "Q: 17+25= 42",
    "User: Q: 17+25=\nAssistant: 42</s>\n",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "hello   world\t\ttabs\n\n\nnewlines   ",
    "  leading and trailing spaces  ",
    "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 日本語, 中文",
    "emoji 🤗🚀 and ZWJ 👨‍👩‍👧 and flags 🇫🇷",
    "special tokens in text: <s> hi </s> <pad> <unk> end",
    "<s><s></s>",
    "mixed\r\nline endings\rok",
    "numbers 0123456789 3.14159 -42 1e10",
    "code: def f(x):\n    return x ** 2  # square",
]


def make_tokenizer_ref(tok):
    cases = []
    for text in TOKENIZER_TEXTS:
        case = {"text": text}
        for key, add in (("with_special", True), ("without_special", False)):
            ids = tok(text, add_special_tokens=add)["input_ids"]
            case[key] = {
                "ids": ids,
                "tokens": tok.convert_ids_to_tokens(ids),
                "decode": tok.decode(ids),
                "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        cases.append(case)
    pair = tok("Q: 1+2=", " 3")
    out = {
        "tokenizer_dir": "fixtures/tokenizer",
        "cases": cases,
        "pair": {"text": "Q: 1+2=", "text_pair": " 3", "ids": pair["input_ids"],
                 "token_type_ids": pair.get("token_type_ids")},
        "decode_only": [
            {"ids": ids, "decode": tok.decode(ids), "decode_skip_special": tok.decode(ids, skip_special_tokens=True)}
            for ids in ([1, 2, 0, 3], [300, 301, 302, 511], list(range(4, 40)))
        ],
    }
    write_json(os.path.join(REF, "tokenizer.json"), out)


# ----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.set_seed(SEED)
    torch.use_deterministic_algorithms(True)

    if "tokenizer" in args.parts:
        if os.path.exists(TOK_DIR):
            shutil.rmtree(TOK_DIR)
        save_tokenizer(build_tokenizer(), TOK_DIR)
    tok = load_tokenizer()
    steps = {
        "models": lambda: build_models(tok),
        "logits": lambda: make_logits(tok),
        "greedy": lambda: make_greedy(tok),
        "tokenizer_ref": lambda: make_tokenizer_ref(tok),
        # Imported lazily: fixture_train pulls in TRL, which the model/tokenizer parts don't need.
        "chat": lambda: importlib.import_module("fixture_chat").make_chat_templates(tok, REF),
        "sft_tokenize": lambda: importlib.import_module("fixture_train").make_sft_tokenize(FIX, REF),
        "sft_step": lambda: importlib.import_module("fixture_train").make_sft_step(FIX, REF),
        "pref_losses": lambda: importlib.import_module("fixture_train").make_pref_losses(FIX, REF),
        "dpo_step": lambda: importlib.import_module("fixture_train").make_dpo_step(FIX, REF),
        "rm_step": lambda: importlib.import_module("fixture_train").make_rm_step(FIX, REF),
        "rl": lambda: importlib.import_module("fixture_rl").make_rl(FIX, REF),
    }
    for part in PARTS:
        if part in args.parts and part in steps:
            print(f"[make_fixtures] {part}", file=sys.stderr)
            transformers.set_seed(SEED)
            steps[part]()


if __name__ == "__main__":
    main()
