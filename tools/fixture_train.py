"""TRL-derived references: SFT tokenisation, one SFT / DPO / RM step, and preference-loss values.

Every number comes from TRL 1.16's own code paths: the trainers' dataset preparation
(`trainer.train_dataset`), their collators, `trainer.compute_loss`, and `trainer.create_optimizer()`
(HF AdamW with the Trainer's weight-decay parameter groups). A one-step `trainer.train()` cross-checks
the manual step against the real training loop.
"""
import math
import os
import tempfile
from types import SimpleNamespace

import torch
import transformers
from datasets import Dataset

from fixture_io import write_json

SEED = 1234
TMP = tempfile.mkdtemp(prefix="rlhf-fixtures-")


def tok_dir(fix):
    return os.path.join(fix, "tokenizer")


def load_tok(fix):
    return transformers.AutoTokenizer.from_pretrained(tok_dir(fix))


def load_llama(fix, name="llama"):
    cls = (transformers.LlamaForSequenceClassification if name == "llama-rm"
           else transformers.LlamaForCausalLM)
    return cls.from_pretrained(os.path.join(fix, "models", name), dtype=torch.float32)


def common_args(**kw):
    """TrainingArguments shared by every trainer here: CPU, fp32, constant LR, no clipping unless asked,
    no shuffling side effects on the recorded batch (all examples fit in one batch)."""
    base = dict(output_dir=TMP, report_to=[], use_cpu=True, seed=SEED, data_seed=SEED,
                logging_steps=1, save_strategy="no", lr_scheduler_type="constant", warmup_steps=0,
                max_grad_norm=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                weight_decay=0.0, optim="adamw_torch", dataloader_num_workers=0,
                disable_tqdm=True, bf16=False, fp16=False)
    base.update(kw)
    return base


def as_lists(batch):
    return {k: v.tolist() for k, v in batch.items() if isinstance(v, torch.Tensor)}


def grad_norms(model):
    norms = {n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None}
    total = math.sqrt(sum(v * v for v in norms.values()))
    return norms, total


# (parameter, row) samples recorded before/after the optimizer step. The first Adam step is about
# lr*sign(grad) per element whatever the gradient scale, so losses after one step barely depend on
# clipping or weight decay; these raw values do. Row 500 of the embedding gets no gradient (the token is
# not in any batch), so there the update is pure decoupled weight decay: p * (1 - lr * wd).
PARAM_SAMPLES = [("model.embed_tokens.weight", 366), ("model.embed_tokens.weight", 500),
                 ("model.layers.0.self_attn.q_proj.weight", 0), ("model.layers.1.mlp.down_proj.weight", 5),
                 ("model.norm.weight", None)]


def param_samples(model):
    params = dict(model.named_parameters())
    out = []
    for name, row in PARAM_SAMPLES:
        if name not in params:
            continue
        t = params[name].detach()
        vals = (t if row is None else t[row])[:6]
        out.append({"param": name, "row": row, "first_6": vals.tolist()})
    return out


def one_step(trainer, batch, weight_decay):
    """loss, grads, one optimizer step, loss again — on a fresh copy of the initial weights.

    The optimizer is `trainer.create_optimizer()`: torch AdamW with the HF Trainer's groups (weight decay
    on every parameter except biases and norm weights)."""
    model = trainer.model
    model.train()
    trainer.args.weight_decay = weight_decay
    trainer.optimizer = None
    opt = trainer.create_optimizer()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    loss = loss.detach()
    norms, total = grad_norms(model)
    decay = sorted(n for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]
                   for n, q in model.named_parameters() if q is p)
    before_samples = param_samples(model)
    opt.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = trainer.compute_loss(model, batch)
    return {"loss_before": float(loss), "grad_norms": norms, "total_grad_norm": total,
            "loss_after": float(after), "decayed_params": decay,
            "param_samples_before": before_samples, "param_samples_after": param_samples(model)}


def train_loop_check(make_trainer, loss, total_norm):
    """Run the real `trainer.train()` for one step and assert it logs the same loss and grad norm."""
    trainer = make_trainer()
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert abs(log["loss"] - loss) < 1e-4 * max(1.0, abs(loss)), (log, loss)
    assert abs(log["grad_norm"] - total_norm) < 1e-3 * max(1.0, total_norm), (log, total_norm)
    return {"loss": log["loss"], "grad_norm": log["grad_norm"], "learning_rate": log["learning_rate"]}


# ----------------------------------------------------------------------------------------------
# SFT tokenisation
# ----------------------------------------------------------------------------------------------
def sft_trainer(fix, rows, tokenizer=None, **cfg):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common_args(per_device_train_batch_size=len(rows), max_steps=1,
                                   **{"learning_rate": 1e-3, **cfg}))
    transformers.set_seed(SEED)
    return SFTTrainer(model=load_llama(fix), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer or load_tok(fix))


SFT_CASES = [
    # name, rows, SFTConfig overrides, tokenizer chat template override
    ("text", [{"text": "Q: 3+4= 7"}, {"text": "The quick brown fox.</s>"}, {"text": "Hello  world\n"}], {}, None),
    ("prompt_completion", [{"prompt": "Q: 17+25=", "completion": " 42"},
                           {"prompt": "Q: 3+4=", "completion": " 7"},
                           {"prompt": "The quick", "completion": " brown fox."}], {}, None),
    ("prompt_completion_full_loss", [{"prompt": "Q: 17+25=", "completion": " 42"},
                                     {"prompt": "Q: 3+4=", "completion": " 7"}],
     {"completion_only_loss": False}, None),
    ("messages", [{"messages": [{"role": "user", "content": "Q: 17+25="},
                                {"role": "assistant", "content": " 42"}]},
                  {"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Q: 3+4="},
                                {"role": "assistant", "content": " 7"},
                                {"role": "user", "content": "Q: 1+1="},
                                {"role": "assistant", "content": " 2"}]}], {}, None),
    ("messages_assistant_only", [{"messages": [{"role": "user", "content": "Q: 17+25="},
                                               {"role": "assistant", "content": " 42"}]},
                                 {"messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Q: 3+4="},
                                               {"role": "assistant", "content": " 7"},
                                               {"role": "user", "content": "Q: 1+1="},
                                               {"role": "assistant", "content": " 2"}]}],
     {"assistant_only_loss": True}, "generation_tags"),
    ("conversational_prompt_completion",
     [{"prompt": [{"role": "user", "content": "Q: 17+25="}],
       "completion": [{"role": "assistant", "content": " 42"}]},
      {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 3+4="}],
       "completion": [{"role": "assistant", "content": " 7"}]}], {}, None),
    ("prompt_completion_truncated", [{"prompt": "The quick brown fox jumps over", "completion": " the lazy dog."},
                                     {"prompt": "Q: 3+4=", "completion": " 7"}],
     {"max_length": 8}, None),
]


def make_sft_tokenize(fix, ref):
    from fixture_chat import GENERATION

    cases = []
    for name, rows, cfg, template in SFT_CASES:
        tok = load_tok(fix)
        if template == "generation_tags":
            tok.chat_template = GENERATION
        trainer = sft_trainer(fix, rows, tokenizer=tok, **cfg)
        ds = trainer.train_dataset
        out_rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds]
        collated = trainer.data_collator([ds[i] for i in range(len(ds))])
        cases.append({
            "name": name,
            "sft_config": {"completion_only_loss": trainer.args.completion_only_loss,
                           "assistant_only_loss": trainer.args.assistant_only_loss,
                           "max_length": trainer.args.max_length,
                           "truncation_mode": trainer.args.truncation_mode,
                           "packing": trainer.args.packing,
                           "dataset_text_field": trainer.args.dataset_text_field},
            "chat_template": tok.chat_template,
            "input": rows,
            "dataset": out_rows,
            "collated": as_lists(collated),
        })
    write_json(os.path.join(ref, "sft_tokenize.json"), {"tokenizer_dir": "fixtures/tokenizer", "cases": cases})


# ----------------------------------------------------------------------------------------------
# SFT step
# ----------------------------------------------------------------------------------------------
SFT_STEP_ROWS = [
    {"prompt": "Q: 17+25=", "completion": " 42"},
    {"prompt": "Q: 3+4=", "completion": " 7"},
    {"prompt": "User: Q: 60+39=\nAssistant:", "completion": " 99"},
    {"prompt": "The quick brown", "completion": " fox jumps."},
]


def make_sft_step(fix, ref):
    lr = 1e-3
    results = {}
    batch = None
    for wd in (0.0, 0.01):
        trainer = sft_trainer(fix, SFT_STEP_ROWS, learning_rate=lr)
        ds = trainer.train_dataset
        batch = trainer.data_collator([ds[i] for i in range(len(ds))])
        results[str(wd)] = {"weight_decay": wd, **one_step(trainer, batch, wd)}
    base = results["0.0"]
    labels = batch["labels"]
    # Completion-only mean: CE summed over every label != -100 in the batch / their count.
    with torch.no_grad():
        model = load_llama(fix)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1),
                                               ignore_index=-100, reduction="sum")
        n_tok = int((labels[:, 1:] != -100).sum())
    assert abs(float(ce) / n_tok - base["loss_before"]) < 1e-5
    loop = train_loop_check(lambda: sft_trainer(fix, SFT_STEP_ROWS, learning_rate=lr),
                            base["loss_before"], base["total_grad_norm"])
    # The clipped variant (TRL/HF default max_grad_norm=1.0) only changes the update.
    clip_trainer = sft_trainer(fix, SFT_STEP_ROWS, learning_rate=lr, max_grad_norm=1.0)
    clip_trainer.train()
    with torch.no_grad():
        clipped_after = float(clip_trainer.compute_loss(clip_trainer.model, batch))
    write_json(os.path.join(ref, "sft_step.json"), {
        "model_dir": "fixtures/models/llama",
        "examples": SFT_STEP_ROWS,
        "batch": as_lists(batch),
        "num_loss_tokens": n_tok,
        "loss_sum": float(ce),
        "optimizer": {"type": "AdamW (torch.optim.AdamW via HF Trainer)", "lr": lr, "betas": [0.9, 0.999],
                      "eps": 1e-8, "lr_scheduler": "constant", "max_grad_norm": 0.0},
        "no_weight_decay": results["0.0"],
        "weight_decay_0.01": results["0.01"],
        "clipped_max_grad_norm_1.0": {"weight_decay": 0.0, "max_grad_norm": 1.0,
                                       "loss_after": clipped_after},
        "trainer_train_check": loop,
    })


# ----------------------------------------------------------------------------------------------
# preference losses from explicit log-probs
# ----------------------------------------------------------------------------------------------
PREF = {
    "policy_chosen_logps": [-12.3, -8.7, -2.0, -5.5],
    "policy_rejected_logps": [-15.2, -9.9, -30.0, -7.7],
    "ref_chosen_logps": [-13.0, -8.0, -10.0, -6.0],
    "ref_rejected_logps": [-14.1, -10.5, -25.0, -7.0],
    "chosen_lengths": [3, 2, 5, 1],
    "rejected_lengths": [4, 2, 3, 2],
}


class TableLM(torch.nn.Module):
    """Stand-in for the policy/reference forward: the log-prob of the token at position t+1 is
    `table[input_ids[t+1]]` (0 where labels are -100), so a trainer's per-sequence sums equal the
    log-probs we choose. Returns the fields TRL's fused LM head returns."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, labels, **_):
        nxt, lab = input_ids[:, 1:], labels[:, 1:]
        lp = torch.where(lab != -100, self.table[nxt], torch.zeros(()))
        zeros = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(lp, dtype=torch.bool), aux_loss=None)


def table_batch(seq_logps, lengths):
    """One row per sequence: [prompt token, completion tokens..., pads]; completion token ids index a
    table holding seq_logp / length each, so the completion sum is seq_logp."""
    width = 1 + max(lengths)
    table = [0.0]
    ids, comp, attn = [], [], []
    for lp, n in zip(seq_logps, lengths):
        row = [0]
        for _ in range(n):
            table.append(lp / n)
            row.append(len(table) - 1)
        pad = width - len(row)
        ids.append(row + [0] * pad)
        comp.append([0] + [1] * n + [0] * pad)
        attn.append([1] * (1 + n) + [0] * pad)
    return (torch.tensor(ids), torch.tensor(comp), torch.tensor(attn),
            torch.tensor(table, dtype=torch.float32))


def dpo_trainer(fix, rows, **cfg):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common_args(per_device_train_batch_size=len(rows), max_steps=1, **cfg))
    transformers.set_seed(SEED)
    return DPOTrainer(model=load_llama(fix), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=load_tok(fix))


def dpo_losses(fix):
    p = PREF
    ids, comp, attn, table = table_batch(p["policy_chosen_logps"] + p["policy_rejected_logps"],
                                         p["chosen_lengths"] + p["rejected_lengths"])
    inputs = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp,
              "ref_chosen_logps": torch.tensor(p["ref_chosen_logps"]),
              "ref_rejected_logps": torch.tensor(p["ref_rejected_logps"])}
    rows = [{"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 3"}]
    out = {}
    for name, cfg in (("dpo_sigmoid", {"loss_type": ["sigmoid"], "beta": 0.1}),
                      ("dpo_ipo", {"loss_type": ["ipo"], "beta": 0.1}),
                      ("dpo_robust", {"loss_type": ["robust"], "beta": 0.1, "label_smoothing": 0.1}),
                      ("dpo_hinge", {"loss_type": ["hinge"], "beta": 0.1})):
        trainer = dpo_trainer(fix, rows, **cfg)
        trainer.precompute_ref_logps = True  # take the reference log-probs from `inputs`
        trainer.model.train()
        loss = trainer._compute_loss(TableLM(table), inputs, return_outputs=False)
        m = trainer._metrics["train"]
        beta = trainer.beta
        out[name] = {
            "config": {**cfg, "loss_type": cfg["loss_type"][0]},
            "loss": float(loss),
            "chosen_rewards": [beta * (a - b) for a, b in zip(p["policy_chosen_logps"], p["ref_chosen_logps"])],
            "rejected_rewards": [beta * (a - b) for a, b in zip(p["policy_rejected_logps"], p["ref_rejected_logps"])],
            "metrics": {k: m[k][-1] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                              "rewards/margins", "logps/chosen", "logps/rejected")},
        }
    return out


def orpo_simpo_losses():
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    p = PREF
    avg_c = torch.tensor([a / n for a, n in zip(p["policy_chosen_logps"], p["chosen_lengths"])])
    avg_r = torch.tensor([a / n for a, n in zip(p["policy_rejected_logps"], p["rejected_lengths"])])
    dev = SimpleNamespace(device=torch.device("cpu"))
    nll = 1.25  # stands in for the chosen-sequence cross-entropy (prompt + completion) ORPO adds

    orpo_self = SimpleNamespace(beta=0.1, accelerator=dev)
    losses, cr, rr, ratio, log_odds = ORPOTrainer.odds_ratio_loss(orpo_self, avg_c, avg_r)
    orpo = {
        "config": {"beta": 0.1},
        "inputs": {"policy_chosen_logps_avg": avg_c.tolist(), "policy_rejected_logps_avg": avg_r.tolist(),
                   "nll_loss": nll},
        "or_losses": losses.tolist(),  # beta * logsigmoid(log_odds), per pair (negative)
        "log_odds": ((avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))).tolist(),
        "loss": float(nll - losses.mean()),
        "chosen_rewards": cr.tolist(), "rejected_rewards": rr.tolist(),
        "log_odds_ratio_mean": float(ratio), "log_odds_chosen_mean": float(log_odds),
    }
    simpo_self = SimpleNamespace(beta=2.0, simpo_gamma=0.5, label_smoothing=0.0, alpha=0.0,
                                 loss_type="simpo", accelerator=dev)
    losses, cr, rr = CPOTrainer.cpo_loss(simpo_self, avg_c, avg_r)
    simpo = {
        "config": {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "label_smoothing": 0.0,
                   "cpo_alpha": 0.0},
        "inputs": {"policy_chosen_logps_avg": avg_c.tolist(), "policy_rejected_logps_avg": avg_r.tolist()},
        "losses": losses.tolist(),
        "loss": float(losses.mean()),
        "chosen_rewards": cr.tolist(), "rejected_rewards": rr.tolist(),
    }
    return orpo, simpo


KTO = {
    # 4 desirable (label true) then 4 undesirable completions, unpaired.
    "policy_logps": [-12.3, -8.7, -2.0, -5.5, -15.2, -9.9, -30.0, -7.7],
    "ref_logps": [-13.0, -8.0, -10.0, -6.0, -14.1, -10.5, -25.0, -7.0],
    "labels": [True, True, True, True, False, False, False, False],
    "lengths": [3, 2, 5, 1, 4, 2, 3, 2],
    # log-probs of the mismatched (prompt_i, completion_{i-1}) KL sequences under policy and reference
    "policy_KL_logps": [-14.0, -11.0, -9.5, -13.25, -12.0, -16.5, -10.0, -11.75],
    "ref_KL_logps": [-14.5, -11.5, -9.0, -13.0, -12.5, -17.0, -10.25, -12.0],
    "KL_lengths": [2, 3, 2, 4, 3, 3, 2, 2],
}


def kto_loss(fix):
    from trl import KTOConfig, KTOTrainer

    k = KTO
    n = len(k["labels"])
    ids, comp, attn, table = table_batch(k["policy_logps"] + k["policy_KL_logps"], k["lengths"] + k["KL_lengths"])
    inputs = {"input_ids": ids[:n], "attention_mask": attn[:n], "completion_mask": comp[:n],
              "KL_input_ids": ids[n:], "KL_attention_mask": attn[n:], "KL_completion_mask": comp[n:],
              "label": torch.tensor(k["labels"]), "ref_logps": torch.tensor(k["ref_logps"]),
              "ref_KL_logps": torch.tensor(k["ref_KL_logps"])}
    rows = [{"prompt": "Q: 1+1=", "completion": " 2", "label": True},
            {"prompt": "Q: 1+2=", "completion": " 4", "label": False}]
    args = KTOConfig(**common_args(per_device_train_batch_size=2, max_steps=1, beta=0.1,
                                   desirable_weight=1.0, undesirable_weight=1.0))
    transformers.set_seed(SEED)
    trainer = KTOTrainer(model=load_llama(fix), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=load_tok(fix))
    trainer.precompute_ref_logps = True
    assert trainer.calculate_KL
    trainer.model.train()
    loss = trainer._compute_loss(TableLM(table), inputs, return_outputs=False)
    m = trainer._metrics["train"]
    kl = max(0.0, sum(a - b for a, b in zip(k["policy_KL_logps"], k["ref_KL_logps"])) / n)
    assert abs(m["kl"][-1] - kl) < 1e-5
    return {
        "config": {"loss_type": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
        "inputs": k,
        "kl": m["kl"][-1],
        "loss": float(loss),
        "metrics": {key: m[key][-1] for key in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                                "logps/chosen", "logps/rejected")},
    }


def check_dpo_formulas(dpo):
    """Independent float64 re-derivation of the DPO-family values TRL produced."""
    p = PREF
    d = [(pc - rc) - (pr - rr) for pc, rc, pr, rr in zip(p["policy_chosen_logps"], p["ref_chosen_logps"],
                                                           p["policy_rejected_logps"], p["ref_rejected_logps"])]
    ipo = [((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * 0.1)) ** 2
           for pc, rc, pr, rr, nc, nr in zip(p["policy_chosen_logps"], p["ref_chosen_logps"], p["policy_rejected_logps"],
                                             p["ref_rejected_logps"], p["chosen_lengths"], p["rejected_lengths"])]
    ls = 0.1
    expected = {
        "dpo_sigmoid": [math.log1p(math.exp(-0.1 * x)) for x in d],
        "dpo_hinge": [max(0.0, 1 - 0.1 * x) for x in d],
        "dpo_ipo": ipo,
        "dpo_robust": [((1 - ls) * math.log1p(math.exp(-0.1 * x)) - ls * math.log1p(math.exp(0.1 * x))) / (1 - 2 * ls)
                       for x in d],
    }
    for name, per in expected.items():
        mean = sum(per) / len(per)
        assert abs(dpo[name]["loss"] - mean) < 1e-5 * max(1.0, abs(mean)), (name, dpo[name]["loss"], mean)


def make_pref_losses(fix, ref):
    orpo, simpo = orpo_simpo_losses()
    dpo = dpo_losses(fix)
    check_dpo_formulas(dpo)
    write_json(os.path.join(ref, "pref_losses.json"), {
        "inputs": PREF,
        **dpo,
        "orpo": orpo,
        "simpo": simpo,
        "kto": kto_loss(fix),
    })


# ----------------------------------------------------------------------------------------------
# DPO step / RM step on the real tiny models
# ----------------------------------------------------------------------------------------------
PAIRS = [
    {"prompt": "Q: 17+25=", "chosen": " 42", "rejected": " 43"},
    {"prompt": "Q: 3+4=", "chosen": " 7", "rejected": " 12"},
    {"prompt": "User: Q: 60+39=\nAssistant:", "chosen": " 99", "rejected": " 96"},
    {"prompt": "The quick brown", "chosen": " fox jumps.", "rejected": " dog"},
]


def make_dpo_step(fix, ref):
    lr = 1e-3

    def make():
        return dpo_trainer(fix, PAIRS, loss_type=["sigmoid"], beta=0.1, learning_rate=lr)

    trainer = make()
    ds = trainer.train_dataset
    rows = [ds[i] for i in range(len(ds))]
    batch = trainer.data_collator(rows)
    step = one_step(trainer, batch, 0.0)
    loss, total = step["loss_before"], step["total_grad_norm"]
    assert abs(loss - math.log(2)) < 1e-6  # policy == reference at the first step
    # Sequence log-probs of the initial model (policy == reference) for every completion.
    with torch.no_grad():
        model = load_llama(fix)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        lp = torch.log_softmax(logits, -1)
        tgt = labels[:, 1:]
        per_tok = torch.where(tgt != -100, lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
        seq = per_tok.sum(1)
    n = len(PAIRS)
    loop = train_loop_check(make, loss, total)
    write_json(os.path.join(ref, "dpo_step.json"), {
        "model_dir": "fixtures/models/llama",
        "reference_model": "a frozen copy of the same initial weights (DPOTrainer ref_model=None)",
        "config": {"loss_type": "sigmoid", "beta": 0.1, "lr": lr, "optimizer": "AdamW betas (0.9, 0.999) eps 1e-8",
                   "weight_decay": 0.0, "max_grad_norm": 0.0, "lr_scheduler": "constant"},
        "pairs": PAIRS,
        "tokenized": [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids") if k in r} for r in rows],
        "batch": as_lists(batch),
        "initial_chosen_logps": seq[:n].tolist(),
        "initial_rejected_logps": seq[n:].tolist(),
        **{k: v for k, v in step.items() if k != "decayed_params"},
        "trainer_train_check": loop,
    })


def make_rm_step(fix, ref):
    from trl import RewardConfig, RewardTrainer

    lr = 1e-3

    def make():
        args = RewardConfig(**common_args(per_device_train_batch_size=len(PAIRS), max_steps=1, learning_rate=lr))
        transformers.set_seed(SEED)
        return RewardTrainer(model=load_llama(fix, "llama-rm"), args=args,
                             train_dataset=Dataset.from_list(PAIRS), processing_class=load_tok(fix))

    trainer = make()
    ds = trainer.train_dataset
    rows = [ds[i] for i in range(len(ds))]
    batch = trainer.data_collator(rows)
    step = one_step(trainer, batch, 0.0)
    loss, total = step["loss_before"], step["total_grad_norm"]
    with torch.no_grad():
        model = load_llama(fix, "llama-rm").eval()
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    n = len(PAIRS)
    bt = float(-torch.nn.functional.logsigmoid(rewards[:n] - rewards[n:]).mean())
    assert abs(bt - loss) < 1e-5, (bt, loss)
    loop = train_loop_check(make, loss, total)
    write_json(os.path.join(ref, "rm_step.json"), {
        "model_dir": "fixtures/models/llama-rm",
        "config": {"loss": "-logsigmoid(r_chosen - r_rejected).mean()", "center_rewards_coefficient":
                   trainer.args.center_rewards_coefficient, "lr": lr,
                   "optimizer": "AdamW betas (0.9, 0.999) eps 1e-8", "weight_decay": 0.0,
                   "max_grad_norm": 0.0, "lr_scheduler": "constant"},
        "pairs": PAIRS,
        "tokenized": [{k: r[k] for k in ("chosen_ids", "rejected_ids") if k in r} for r in rows],
        "batch": as_lists(batch),
        "rewards_chosen": rewards[:n].tolist(),
        "rewards_rejected": rewards[n:].tolist(),
        **{k: v for k, v in step.items() if k != "decayed_params"},
        "trainer_train_check": loop,
    })
