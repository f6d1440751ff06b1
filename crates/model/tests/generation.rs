mod common;

use candle_core::{Device, Tensor};
use common::*;
use rlhf_model::{
    generate, token_logprobs, CausalLm, Decoder, FinishReason, GenOutput, GenRequest, Sampling,
};

fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    [3usize, 9, 1, 6]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n)
                .map(|j| ((i * 31 + j * 17 + 5) % vocab) as u32)
                .collect()
        })
        .collect()
}

/// Argmax decoding by re-running the full forward pass at every step (no cache, no padding).
fn greedy_no_cache(m: &CausalLm, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m
            .forward(&ids)
            .unwrap()
            .get(0)
            .unwrap()
            .get(seq.len() - 1)
            .unwrap();
        seq.push(logits.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
    seq[prompt.len()..].to_vec()
}

fn request(prompt: &[u32], n: usize, sampling: Sampling, seed: u64) -> GenRequest {
    GenRequest {
        prompt_ids: prompt.to_vec(),
        max_new_tokens: n,
        sampling,
        seed,
        ..Default::default()
    }
}

#[test]
fn kv_cache_greedy_equals_full_forward_greedy() {
    for (name, cfg) in all_configs() {
        let m = model(cfg, 11);
        let ps = prompts(m.vocab_size());
        let reqs: Vec<GenRequest> = ps
            .iter()
            .map(|p| request(p, 7, Sampling::greedy(), 0))
            .collect();
        let out = generate(&m, &reqs, None).unwrap();
        for (p, o) in ps.iter().zip(&out) {
            assert_eq!(o.tokens, greedy_no_cache(&m, p, 7), "{name}: prompt {p:?}");
            assert_eq!(o.finish_reason, FinishReason::Length);
        }
    }
}

/// Log-prob of each generated token from one full forward pass over prompt + completion.
fn rescore(m: &CausalLm, prompt: &[u32], tokens: &[u32]) -> Vec<f32> {
    rescore_at(m, prompt, tokens, 1.0)
}

/// As [`rescore`], under `log_softmax(logits / temperature)`.
fn rescore_at(m: &CausalLm, prompt: &[u32], tokens: &[u32], temperature: f64) -> Vec<f32> {
    let seq: Vec<u32> = prompt.iter().chain(tokens).copied().collect();
    let n = seq.len();
    let ids = Tensor::new(&seq[..n - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let targets = Tensor::new(&seq[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = (m.forward(&ids).unwrap() / temperature).unwrap();
    let lp = token_logprobs(&logits, &targets).unwrap();
    lp.get(0).unwrap().to_vec1::<f32>().unwrap()[prompt.len() - 1..].to_vec()
}

#[test]
fn sampled_logprobs_match_full_forward_rescoring() {
    for (name, cfg) in all_configs() {
        let m = model(cfg, 12);
        let ps = prompts(m.vocab_size());
        // Temperature/top-k/top-p change what is sampled, never the reported (T = 1) log-probs.
        let samplings = [
            Sampling::default(),
            Sampling {
                temperature: 0.7,
                top_k: 5,
                top_p: 1.0,
            },
            Sampling {
                temperature: 1.3,
                top_k: 0,
                top_p: 0.8,
            },
            Sampling::greedy(),
        ];
        let reqs: Vec<GenRequest> = ps
            .iter()
            .zip(samplings.iter().cycle())
            .enumerate()
            .map(|(i, (p, s))| request(p, 9, s.clone(), i as u64))
            .collect();
        let out = generate(&m, &reqs, None).unwrap();
        for (p, o) in ps.iter().zip(&out) {
            assert_eq!(o.tokens.len(), 9);
            let expect = rescore(&m, p, &o.tokens);
            for (a, b) in o.logprobs.iter().zip(&expect) {
                assert!(
                    (a - b).abs() <= 1e-4,
                    "{name}: logprob {a} vs re-scored {b}"
                );
            }
        }
    }
}

#[test]
fn same_seed_and_prompt_give_the_same_output_in_any_batch() {
    for (name, cfg) in all_configs() {
        let m = model(cfg, 13);
        let ps = prompts(m.vocab_size());
        let target = request(&ps[0], 10, Sampling::default(), 42);
        let alone = generate(&m, std::slice::from_ref(&target), None)
            .unwrap()
            .remove(0);
        // In a batch with longer prompts (so it is left-padded) at another index.
        let mut batch: Vec<GenRequest> = ps[1..]
            .iter()
            .enumerate()
            .map(|(i, p)| request(p, 12, Sampling::default(), i as u64))
            .collect();
        batch.insert(2, target.clone());
        let in_batch = generate(&m, &batch, None).unwrap().remove(2);
        assert_eq!(alone.tokens, in_batch.tokens, "{name}");
        for (a, b) in alone.logprobs.iter().zip(&in_batch.logprobs) {
            assert!((a - b).abs() < 1e-5, "{name}");
        }
        // A different seed gives a different sample (10 tokens from ~90 ids).
        let other = generate(&m, &[request(&ps[0], 10, Sampling::default(), 43)], None).unwrap();
        assert_ne!(other[0].tokens, alone.tokens, "{name}");
    }
}

#[test]
fn top_k_one_is_greedy_and_lengths_are_per_request() {
    let m = model(llama_config(), 14);
    let ps = prompts(m.vocab_size());
    let reqs: Vec<GenRequest> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| {
            request(
                p,
                i + 1,
                Sampling {
                    temperature: 1.0,
                    top_k: 1,
                    top_p: 1.0,
                },
                i as u64,
            )
        })
        .collect();
    let out = generate(&m, &reqs, None).unwrap();
    for (i, (p, o)) in ps.iter().zip(&out).enumerate() {
        assert_eq!(o.tokens, greedy_no_cache(&m, p, i + 1));
        assert_eq!(o.logprobs.len(), i + 1);
    }
}

#[test]
fn stop_ids_and_stop_strings_end_generation() {
    let m = model(gpt2_config(), 15);
    let p = prompts(m.vocab_size())[1].clone();
    let free = generate(&m, &[request(&p, 8, Sampling::greedy(), 0)], None)
        .unwrap()
        .remove(0);
    let third = free.tokens[2];
    let first = free.tokens.iter().position(|&t| t == third).unwrap();

    let mut r = request(&p, 8, Sampling::greedy(), 0);
    r.stop_ids = vec![third];
    let out = generate(&m, &[r], None).unwrap().remove(0);
    assert_eq!(out.tokens, free.tokens[..=first]);
    assert_eq!(out.finish_reason, FinishReason::Eos);

    let decode = |ids: &[u32]| ids.iter().map(|i| format!("<{i}>")).collect::<String>();
    let mut r = request(&p, 8, Sampling::greedy(), 0);
    r.stop_strings = vec![format!("<{third}>")];
    let out = generate(&m, &[r.clone()], Some(&decode)).unwrap().remove(0);
    assert_eq!(out.tokens, free.tokens[..=first]);
    assert_eq!(out.finish_reason, FinishReason::StopString);

    let err = generate(&m, &[r], None).unwrap_err().to_string();
    assert!(err.contains("decode callback"), "{err}");
    let err = generate(&m, &[request(&[], 3, Sampling::greedy(), 0)], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("request 0") && err.contains("empty"), "{err}");
    let err = generate(&m, &[request(&[1, 9999], 3, Sampling::greedy(), 0)], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("9999"), "{err}");
}

#[test]
fn position_ids_shift_rope_invariantly_but_not_learned_positions() {
    for (name, cfg) in all_configs() {
        let m = model(cfg, 16);
        let ids = ids(2, 7, m.vocab_size(), 9);
        let plain = m.hidden_states(&ids, None).unwrap();
        let arange = Tensor::arange(0u32, 7, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((2, 1))
            .unwrap();
        let same = m.hidden_states(&ids, Some(&arange)).unwrap();
        assert!(max_abs_diff(&plain, &same).unwrap() < 1e-6, "{name}");
        let shifted = (arange + 5.0).unwrap();
        let moved = m.hidden_states(&ids, Some(&shifted)).unwrap();
        let d = max_abs_diff(&plain, &moved).unwrap();
        // RoPE attention depends only on relative positions; GPT-2's learned table does not.
        if name == "gpt2" {
            assert!(d > 1e-3, "{name}: {d}");
        } else {
            assert!(d < 1e-4, "{name}: {d}");
        }
    }
}

#[test]
fn public_cached_forward_matches_full_forward() {
    for (name, cfg) in all_configs() {
        let m = model(cfg, 17);
        let seq = ids(1, 8, m.vocab_size(), 4);
        let full = m.hidden_states(&seq, None).unwrap();
        let mut cache = m.new_kv_cache(1, 8).unwrap();
        for (start, len) in [(0, 5), (5, 1), (6, 2)] {
            let pos = Tensor::arange(start as u32, (start + len) as u32, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            cache.begin_step(len).unwrap();
            let h = m
                .hidden_states_cached(&seq.narrow(1, start, len).unwrap(), &pos, &mut cache)
                .unwrap();
            cache.end_step();
            let d = max_abs_diff(&h, &full.narrow(1, start, len).unwrap()).unwrap();
            assert!(d < 1e-5, "{name}: step at {start}: {d}");
        }
        assert!(
            cache.begin_step(1).is_err(),
            "{name}: overflow must be an error"
        );
    }
}

#[test]
fn sampling_logprobs_match_rescoring_at_the_sampling_temperature() {
    for (name, cfg) in all_configs() {
        let m = model(cfg, 18);
        let ps = prompts(m.vocab_size());
        // (sampling, temperature the scores are under): truncation never renormalises them.
        let cases = [
            (
                Sampling {
                    temperature: 0.7,
                    top_k: 5,
                    top_p: 1.0,
                },
                0.7,
            ),
            (
                Sampling {
                    temperature: 1.3,
                    top_k: 0,
                    top_p: 0.8,
                },
                1.3,
            ),
            (
                Sampling {
                    temperature: 0.5,
                    top_k: 0,
                    top_p: 1.0,
                },
                0.5,
            ),
            (
                Sampling {
                    temperature: 2.0,
                    top_k: 7,
                    top_p: 0.9,
                },
                2.0,
            ),
            (Sampling::greedy(), 1.0),
        ];
        for (i, (s, t)) in cases.iter().enumerate() {
            let reqs: Vec<GenRequest> = ps
                .iter()
                .enumerate()
                .map(|(j, p)| request(p, 6, s.clone(), (i * 10 + j) as u64))
                .collect();
            for (p, o) in ps.iter().zip(generate(&m, &reqs, None).unwrap()) {
                assert_eq!(o.sampling_logprobs.len(), o.tokens.len());
                let expect = rescore_at(&m, p, &o.tokens, *t);
                for (a, b) in o.sampling_logprobs.iter().zip(&expect) {
                    assert!(
                        (a - b).abs() <= 1e-5,
                        "{name} {s:?}: sampling logprob {a} vs re-scored {b}"
                    );
                }
                if *t != 1.0 {
                    assert!(
                        o.sampling_logprobs
                            .iter()
                            .zip(&o.logprobs)
                            .any(|(a, b)| (a - b).abs() > 1e-3),
                        "{name}"
                    );
                }
            }
        }
    }
}

fn solo(m: &CausalLm, r: &GenRequest) -> GenOutput {
    generate(m, std::slice::from_ref(r), None)
        .unwrap()
        .remove(0)
}

fn assert_same(name: &str, a: &GenOutput, b: &GenOutput) {
    assert_eq!(a.tokens, b.tokens, "{name}");
    assert_eq!(a.finish_reason, b.finish_reason, "{name}");
    for (x, y) in a
        .logprobs
        .iter()
        .zip(&b.logprobs)
        .chain(a.sampling_logprobs.iter().zip(&b.sampling_logprobs))
    {
        assert!((x - y).abs() < 1e-5, "{name}: {x} vs {y}");
    }
}

/// Runs the decoder to the end, collecting outputs by request id.
fn drain(dec: &mut Decoder, outs: &mut std::collections::BTreeMap<u64, GenOutput>) {
    while !dec.is_empty() {
        for t in dec.step(None).unwrap() {
            if let Some(o) = t.finished {
                outs.insert(t.id, o);
            }
        }
    }
}

#[test]
fn finished_rows_leave_the_batch_and_the_rest_decode_unchanged() {
    for (name, cfg) in all_configs() {
        let m = model(cfg, 19);
        let ps = prompts(m.vocab_size());
        // The 9-token prompt finishes first: its left padding is trimmed from the others' rows.
        let reqs = [
            request(&ps[1], 2, Sampling::default(), 1),
            request(
                &ps[0],
                4,
                Sampling {
                    temperature: 0.8,
                    top_k: 9,
                    top_p: 0.9,
                },
                2,
            ),
            request(&ps[3], 7, Sampling::greedy(), 3),
        ];
        let mut dec = Decoder::new(&m).unwrap();
        for r in &reqs {
            dec.add(r.clone()).unwrap();
        }
        let mut rows = vec![];
        let mut outs = std::collections::BTreeMap::new();
        while !dec.is_empty() {
            for t in dec.step(None).unwrap() {
                if let Some(o) = t.finished {
                    outs.insert(t.id, o);
                }
            }
            rows.push((dec.batch_rows(), dec.cache_len()));
        }
        // After prefill (9 positions): 3 rows; request 0 leaves after its 2nd token, taking the
        // padding its 9-token prompt forced on the others (6 prompt + 1 fed positions remain);
        // request 1 leaves after its 4th.
        assert_eq!(
            rows,
            [(3, 9), (2, 7), (2, 8), (1, 9), (1, 10), (1, 11), (0, 0)],
            "{name}"
        );
        for (i, r) in reqs.iter().enumerate() {
            assert_same(name, &outs[&(i as u64)], &solo(&m, r));
        }
    }
}

#[test]
fn requests_joining_between_steps_decode_as_if_alone() {
    for (name, cfg) in all_configs() {
        let m = model(cfg, 20);
        let ps = prompts(m.vocab_size());
        let reqs = [
            request(&ps[0], 8, Sampling::default(), 5),
            // Joins after 3 steps with a prompt longer than the running rows: they get re-padded.
            request(
                &ps[1],
                5,
                Sampling {
                    temperature: 0.9,
                    top_k: 0,
                    top_p: 0.7,
                },
                6,
            ),
            request(&ps[2], 6, Sampling::greedy(), 7),
            request(&ps[3], 9, Sampling::default(), 8),
        ];
        let mut dec = Decoder::new(&m).unwrap();
        let mut outs = std::collections::BTreeMap::new();
        dec.add(reqs[0].clone()).unwrap();
        for _ in 0..3 {
            assert_eq!(dec.step(None).unwrap().len(), 1);
        }
        dec.add(reqs[1].clone()).unwrap();
        dec.add(reqs[2].clone()).unwrap();
        assert_eq!(
            dec.step(None).unwrap().len(),
            3,
            "{name}: running row + two prefills"
        );
        assert_eq!((dec.batch_rows(), dec.cache_len()), (3, 9), "{name}");
        let cancelled = dec.add(reqs[3].clone()).unwrap();
        dec.step(None).unwrap();
        assert!(dec.cancel(cancelled).unwrap());
        assert!(!dec.cancel(cancelled).unwrap());
        assert_eq!(dec.batch_rows(), 3, "{name}");
        drain(&mut dec, &mut outs);
        assert_eq!(outs.len(), 3);
        for (i, r) in reqs[..3].iter().enumerate() {
            assert_same(name, &outs[&(i as u64)], &solo(&m, r));
        }
        assert!(dec.add(request(&ps[0], 0, Sampling::greedy(), 0)).is_err());
    }
}

/// At bf16, generation (weights converted once, decode through the cache) reports the log-probs a
/// bf16 full forward pass gives the same tokens: both round the same activations and weights, so
/// only f32 summation order differs — and the rare activation whose rounding that order flips
/// moves a log-prob by up to ~1.5e-3 (seen on the Mistral config with the AMX kernel; 0 for Llama),
/// hence 2e-3, and at most a quarter of the bf16–f32 gap (≈ 5e-3–1e-2 here).
#[test]
fn bf16_generation_matches_bf16_rescoring() {
    for (name, cfg) in all_configs() {
        let mut m = model(cfg, 12);
        m.set_precision(rlhf_model::Precision::Bf16);
        let ps = prompts(m.vocab_size());
        let reqs: Vec<GenRequest> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| request(p, 9, Sampling::default(), i as u64))
            .collect();
        let out = generate(&m, &reqs, None).unwrap();
        let mut m32 = m.duplicate().unwrap();
        m32.set_precision(rlhf_model::Precision::Fp32);
        let (mut err16, mut diff32) = (0f32, 0f32);
        for (p, o) in ps.iter().zip(&out) {
            for ((a, b), c) in o
                .logprobs
                .iter()
                .zip(rescore(&m, p, &o.tokens))
                .zip(rescore(&m32, p, &o.tokens))
            {
                err16 = err16.max((a - b).abs());
                diff32 = diff32.max((a - c).abs());
            }
        }
        assert!(
            err16 <= 2e-3,
            "{name}: bf16 generation vs bf16 re-scoring differ by {err16}"
        );
        assert!(
            4.0 * err16 <= diff32,
            "{name}: bf16 generation is not much closer to bf16 ({err16}) than to f32 ({diff32})"
        );
    }
}

#[test]
fn samples_of_one_prompt_share_its_prefill_and_decode_as_if_alone() {
    // GRPO's batch shape: each prompt several times with its own seed (and length), interleaved
    // with another prompt; the prefill runs each distinct prompt once.
    for (name, cfg) in all_configs() {
        let m = model(cfg, 15);
        let ps = prompts(m.vocab_size());
        let reqs: Vec<GenRequest> = [(0, 9, 1), (0, 6, 2), (1, 9, 3), (0, 9, 4), (1, 1, 5)]
            .into_iter()
            .map(|(p, n, seed)| request(&ps[p], n, Sampling::default(), seed))
            .collect();
        let outs = generate(&m, &reqs, None).unwrap();
        for (r, o) in reqs.iter().zip(&outs) {
            assert_same(name, &solo(&m, r), o);
        }
        // Different seeds of one prompt really are different samples.
        assert_ne!(outs[0].tokens, outs[3].tokens, "{name}");
    }
}
