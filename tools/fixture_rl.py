"""Online-RL references: TRL's advantage / KL / whitening formulas on fixed inputs, one GRPO loss + gradient
through TRL 1.16's own `GRPOTrainer._compute_loss`, and one PPO mini-batch step following TRL 1.12's
`PPOTrainer.train` (GAE, whitening, clipped policy and value losses) with its own `masked_whiten`.

The completions and rewards are fixed in the file, so the Rust side re-computes exactly these steps.
TRL 1.12 (the last release with PPO) is imported from a `--no-deps` overlay: set TRL112 to its folder
(`pip install --no-deps --target DIR trl==1.12.0`), as /work/shared/bench-trl/run_all.sh does.
"""
import importlib.util
import math
import os
import tempfile

import torch
import transformers
from datasets import Dataset

from fixture_io import write_json

TMP = tempfile.mkdtemp(prefix="rl_fixtures_")


def _trl112_ppo():
    base = os.environ.get("TRL112", "/work/trl112")
    path = os.path.join(base, "trl", "experimental", "ppo", "ppo_trainer.py")
    spec = importlib.util.spec_from_file_location("trl112_ppo_trainer", path)
    src = open(path).read()
    # Only the three pure helpers are needed; executing the whole module would import TRL 1.12's package.
    ns = {"torch": torch}
    for name in ("masked_mean", "masked_var", "masked_whiten"):
        start = src.index(f"def {name}(")
        end = src.index("\n\n\n", start)
        exec(compile(src[start:end], path, "exec"), ns)
    del spec
    return ns


def _load(fix, name, cls=transformers.AutoModelForCausalLM):
    return cls.from_pretrained(os.path.join(fix, "models", name), dtype=torch.float32)


def _prompts_and_completions(tok, n_prompts, g, lengths, seed):
    """Equal-length prompts (no left padding: HF positions would then differ from the padded layout) and
    random completions of the given lengths (ids 4..vocab, no special tokens)."""
    cands = [f"Q: {a}+{b}=" for a in range(10, 99, 7) for b in range(11, 99, 9)]
    ids = [tok(c)["input_ids"] for c in cands]
    want = len(ids[0])
    prompts = [x for x in ids if len(x) == want][:n_prompts]
    assert len(prompts) == n_prompts
    gen = torch.Generator().manual_seed(seed)
    completions = [torch.randint(4, tok.vocab_size, (lengths[i],), generator=gen).tolist() for i in range(n_prompts * g)]
    return prompts, completions


def _batch(prompts, completions, g, pad):
    rows = [prompts[i // g] for i in range(len(completions))]
    t = max(len(c) for c in completions)
    comp = torch.full((len(completions), t), pad)
    mask = torch.zeros((len(completions), t), dtype=torch.long)
    for i, c in enumerate(completions):
        comp[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    return torch.tensor(rows), comp, mask


def _token_logps(model, prompt_ids, comp, temperature):
    ids = torch.cat([prompt_ids, comp], 1)
    logits = model(ids).logits[:, prompt_ids.size(1) - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)


def make_rl_functions(fix, ref):
    ppo = _trl112_ppo()
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randn(2, 6, generator=gen)
    values = torch.randn(2, 6, generator=gen)
    logp = -torch.rand(2, 6, generator=gen) * 3
    ref_logp = -torch.rand(2, 6, generator=gen) * 3
    cases = []
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8)]:
        # TRL 1.12 PPOTrainer.train, "6. compute advantages and returns".
        lastgaelam, rev = 0, []
        for t in reversed(range(6)):
            nextvalues = values[:, t + 1] if t < 5 else 0.0
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            rev.append(lastgaelam)
        adv = torch.stack(rev[::-1], axis=1)
        cases.append({"gamma": gamma, "lam": lam, "advantages": adv.tolist(), "returns": (adv + values).tolist()})
    mask = torch.ones_like(rewards, dtype=torch.bool)
    logr = ref_logp - logp
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.0, 0.25, 1.0])
    grouped = scores.view(-1, 4)
    std_g = grouped.std(dim=1).repeat_interleave(4)
    mean_g = grouped.mean(dim=1).repeat_interleave(4)
    loo = (grouped.sum(1, keepdim=True) - grouped) / 3
    ref["rl_functions"] = {
        "rewards": rewards.tolist(), "values": values.tolist(), "gae": cases,
        "whiten": ppo["masked_whiten"](values, mask).tolist(),
        "whiten_keep_mean": ppo["masked_whiten"](values, mask, shift_mean=False).tolist(),
        "logp": logp.tolist(), "ref_logp": ref_logp.tolist(),
        # TRL 1.12 PPO: k1 = -logr, k3 = (exp(logr) - 1) - logr; GRPO's per-token KL is the same k3.
        "kl_k1": (-logr).tolist(), "kl_k3": ((logr.exp() - 1) - logr).tolist(),
        "scores": scores.tolist(),
        # TRL 1.16 GRPO: (r - mean_group) / (std_group + 1e-4); batch: std over all rewards.
        "grpo_group": ((scores - mean_g) / (std_g + 1e-4)).tolist(),
        "grpo_batch": ((scores - mean_g) / (scores.std() + 1e-4)).tolist(),
        "grpo_none": (scores - mean_g).tolist(),
        # TRL 1.16 RLOO: r - (sum_group - r) / (k - 1).
        "rloo": (grouped - loo).view(-1).tolist(),
    }


def make_grpo_step(fix, ref):
    from trl import GRPOConfig, GRPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(fix, "tokenizer"))
    g = 4
    lengths = [5, 3, 6, 6, 2, 6, 4, 6]
    prompts, completions = _prompts_and_completions(tok, 2, g, lengths, seed=11)
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.0, 0.0]
    prompt_ids, comp, mask = _batch(prompts, completions, g, tok.pad_token_id)
    reference = _load(fix, "qwen2")
    temperature = 0.9
    with torch.no_grad():
        ref_logps = _token_logps(reference, prompt_ids, comp, temperature)
    cases = []
    for loss_type, beta, level, eps_high in [("dapo", 0.0, "token", None), ("grpo", 0.04, "token", None),
                                              ("bnpo", 0.0, "sequence", 0.28), ("dr_grpo", 0.1, "token", None)]:
        cfg = GRPOConfig(output_dir=TMP, report_to=[], use_cpu=True, num_generations=g, per_device_train_batch_size=8,
                         max_completion_length=6, temperature=temperature, beta=beta, loss_type=loss_type,
                         importance_sampling_level=level, epsilon_high=eps_high, scale_rewards="group",
                         bf16=False, disable_dropout=True)
        ds = Dataset.from_list([{"prompt": "Q: 1+1="}] * 8)
        trainer = GRPOTrainer(model=os.path.join(fix, "models", "llama"), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=cfg, train_dataset=ds, processing_class=tok)
        model = trainer.model
        model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.training_step; one step, no accumulation
        r = torch.tensor(rewards)
        grouped = r.view(-1, g)
        adv = (r - grouped.mean(1).repeat_interleave(g)) / (grouped.std(1).repeat_interleave(g) + 1e-4)
        inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": comp,
                  "completion_mask": mask, "advantages": adv, "num_items_in_batch": mask.sum()}
        if beta != 0.0:
            inputs["ref_per_token_logps"] = ref_logps
        model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters() if p.grad is not None))
        with torch.no_grad():
            logps = _token_logps(model, prompt_ids, comp, temperature)
        cases.append({"loss_type": loss_type, "beta": beta, "importance_sampling_level": level, "epsilon_high": eps_high,
                      "loss": float(loss), "total_grad_norm": total, "advantages": adv.tolist(),
                      "per_token_logps": [logps[i, : lengths[i]].tolist() for i in range(len(lengths))]})
    ref["grpo_step"] = {"prompts": prompts, "completions": completions, "rewards": rewards, "num_generations": g,
                        "temperature": temperature, "max_completion_length": 6, "reference_model": "qwen2",
                        "ref_per_token_logps": [ref_logps[i, : lengths[i]].tolist() for i in range(len(lengths))],
                        "cases": cases}


def make_ppo_step(fix, ref):
    ppo = _trl112_ppo()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(fix, "tokenizer"))
    n, length = 4, 5
    prompts, completions = _prompts_and_completions(tok, n, 1, [length] * n, seed=12)
    scores = torch.tensor([0.7, -0.2, 1.1, 0.1])
    prompt_ids, comp, _ = _batch(prompts, completions, 1, tok.pad_token_id)
    policy = _load(fix, "llama")
    reference = _load(fix, "qwen2")
    value_model = _load(fix, "llama-rm", transformers.LlamaForSequenceClassification)
    kl_coef, gamma, lam, cliprange, cliprange_value, vf_coef, temperature = 0.05, 1.0, 0.95, 0.2, 0.2, 0.1, 0.7
    ids = torch.cat([prompt_ids, comp], 1)
    ctx = prompt_ids.size(1)

    def values_of(m):
        h = m.model(ids).last_hidden_state
        return m.score(h)[:, ctx - 1 : -1].squeeze(-1)

    with torch.no_grad():
        logprobs = _token_logps(policy, prompt_ids, comp, temperature)
        ref_logprobs = _token_logps(reference, prompt_ids, comp, temperature)
        values = values_of(value_model)
    # TRL 1.12 PPOTrainer.train steps 4-6 (no padding: every response has `length` tokens and no EOS).
    logr = ref_logprobs - logprobs
    kl = -logr
    rewards = -kl_coef * kl
    rewards[:, -1] += scores
    lastgaelam, rev = 0, []
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        rev.append(lastgaelam)
    advantages = torch.stack(rev[::-1], axis=1)
    returns = advantages + values
    mask = torch.ones_like(advantages, dtype=torch.bool)
    advantages = ppo["masked_whiten"](advantages, mask)
    # First mini-batch of the first epoch (one mini-batch = the whole batch): the new log-probs equal the
    # old ones, so the ratio is 1 and the policy gradient is the advantage-weighted score function.
    policy.train()
    value_model.train()
    new_logprobs = _token_logps(policy, prompt_ids, comp, temperature)
    vpred = values_of(value_model)
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * ppo["masked_mean"](torch.max(vf_losses1, vf_losses2), mask)
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = ppo["masked_mean"](torch.max(pg_losses, pg_losses2), mask)
    loss = pg_loss + vf_coef * vf_loss
    loss.backward()
    params = list(policy.parameters()) + [p for n_, p in value_model.named_parameters()]
    total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in params if p.grad is not None))
    ref["ppo_step"] = {"prompts": prompts, "completions": completions, "scores": scores.tolist(),
                       "kl_coef": kl_coef, "gamma": gamma, "lam": lam, "cliprange": cliprange,
                       "cliprange_value": cliprange_value, "vf_coef": vf_coef, "temperature": temperature,
                       "reference_model": "qwen2", "value_model": "llama-rm",
                       "old_logprobs": logprobs.tolist(), "ref_logprobs": ref_logprobs.tolist(),
                       "values": values.tolist(), "advantages": advantages.tolist(), "returns": returns.tolist(),
                       "pg_loss": float(pg_loss), "vf_loss": float(vf_loss), "loss": float(loss),
                       "total_grad_norm": total}


def make_rl(fix, ref_dir):
    ref = {}
    make_rl_functions(fix, ref)
    make_grpo_step(fix, ref)
    make_ppo_step(fix, ref)
    write_json(os.path.join(ref_dir, "rl.json"), ref)
