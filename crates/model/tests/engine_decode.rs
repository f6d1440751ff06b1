//! Generation on the engine (prefill and decode steps through the KV cache as hand-written passes)
//! against the candle graph path, for every architecture: same tokens, same log-probs, and proof
//! that the engine ran.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use rlhf_model::engine::decode_passes;
use rlhf_model::lora::{Lora, LoraConfig};
use rlhf_model::{
    generate, Backend, CausalLm, Decoder, GenOutput, GenRequest, ModelConfig, Precision, Sampling,
};

/// The architectures that decode on the engine (every one), and GPT-2 with per-layer attention
/// scales, an untied head and another activation.
fn decoder_configs() -> Vec<(&'static str, ModelConfig)> {
    let mut raw = gpt2_config().raw.clone();
    raw["scale_attn_by_inverse_layer_idx"] = true.into();
    raw["tie_word_embeddings"] = false.into();
    raw["activation_function"] = "relu".into();
    let gpt2_variant = ModelConfig::from_json(raw, "gpt2 variant").unwrap();
    let mut configs = all_configs();
    configs.push(("gpt2 variant", gpt2_variant));
    configs
}

/// Ragged prompts (left padding), rows finishing at different steps, greedy and sampled rows (with
/// temperature, top-k and top-p).
fn requests(vocab: usize) -> Vec<GenRequest> {
    let sampled = |temperature, top_k, top_p| Sampling {
        temperature,
        top_k,
        top_p,
    };
    [
        (3, 2, Sampling::greedy()),
        (9, 7, Sampling::default()),
        (1, 4, sampled(0.8, 9, 0.9)),
        (6, 5, sampled(1.3, 0, 0.7)),
        (4, 6, Sampling::greedy()),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (len, n, sampling))| GenRequest {
        prompt_ids: (0..len)
            .map(|j| ((i * 31 + j * 17 + 5) % vocab) as u32)
            .collect(),
        max_new_tokens: n,
        sampling,
        seed: 40 + i as u64,
        top_logprobs: 3,
        ..Default::default()
    })
    .collect()
}

/// The model on the candle graph: same parameters, precision and adapters' state.
fn on_graph(m: &CausalLm) -> CausalLm {
    let mut g = m.duplicate().unwrap();
    g.set_backend(Backend::Candle);
    g
}

/// `generate` and the number of cached passes the engine ran for it.
fn generate_counted(m: &CausalLm, reqs: &[GenRequest]) -> (Vec<GenOutput>, u64) {
    let before = decode_passes();
    let out = generate(m, reqs, None).unwrap();
    (out, decode_passes() - before)
}

fn assert_close(what: &str, a: &[GenOutput], b: &[GenOutput], tol: f32) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.tokens, y.tokens, "{what}: request {i}");
        assert_eq!(x.finish_reason, y.finish_reason, "{what}: request {i}");
        for (p, q) in x
            .logprobs
            .iter()
            .zip(&y.logprobs)
            .chain(x.sampling_logprobs.iter().zip(&y.sampling_logprobs))
        {
            assert!((p - q).abs() <= tol, "{what}: request {i}: {p} vs {q}");
        }
    }
}

#[test]
fn engine_decoding_matches_the_graph_and_really_runs() {
    for (name, cfg) in decoder_configs() {
        let m = model(cfg, 23);
        assert_eq!(m.backend(), Backend::Engine, "the default backend");
        let reqs = requests(m.vocab_size());
        let (engine, passes) = generate_counted(&m, &reqs);
        let (graph, graph_passes) = generate_counted(&on_graph(&m), &reqs);
        // One prefill, then a decode step for every token fed back (the longest request's 6).
        assert_eq!(passes, 7, "{name}: cached passes on the engine");
        assert_eq!(
            graph_passes, 0,
            "{name}: the candle backend stays on the graph"
        );
        assert_close(name, &engine, &graph, 1e-5);
    }
}

#[test]
fn continuous_batching_on_the_engine_matches_the_graph() {
    // Requests join between steps (re-padding the running rows), one is cancelled, rows leave.
    let run = |m: &CausalLm, reqs: &[GenRequest]| {
        let mut dec = Decoder::new(m).unwrap();
        let mut steps = vec![];
        dec.add(reqs[0].clone()).unwrap();
        for k in 0..9 {
            if k == 2 {
                dec.add(reqs[1].clone()).unwrap();
                dec.add(reqs[2].clone()).unwrap();
            }
            if k == 3 {
                let id = dec.add(reqs[3].clone()).unwrap();
                dec.step(None).unwrap();
                dec.cancel(id).unwrap();
            }
            if k == 4 {
                dec.add(reqs[4].clone()).unwrap();
            }
            let toks = dec.step(None).unwrap();
            steps.push((dec.batch_rows(), dec.cache_len(), toks));
        }
        steps
    };
    for (name, cfg) in decoder_configs() {
        let m = model(cfg, 24);
        let reqs = requests(m.vocab_size());
        let before = decode_passes();
        let engine = run(&m, &reqs);
        assert!(
            decode_passes() > before,
            "{name}: the engine did not decode"
        );
        let graph = run(&on_graph(&m), &reqs);
        assert_eq!(engine.len(), graph.len());
        for ((re, le, te), (rg, lg, tg)) in engine.iter().zip(&graph) {
            assert_eq!((re, le), (rg, lg), "{name}: batch rows and cache length");
            assert_eq!(te.len(), tg.len(), "{name}");
            for (a, b) in te.iter().zip(tg) {
                assert_eq!((a.id, a.token), (b.id, b.token), "{name}");
                assert!(
                    (a.logprob - b.logprob).abs() <= 1e-5,
                    "{name}: {a:?} vs {b:?}"
                );
                for ((ta, la), (tb, lb)) in a.top.iter().zip(&b.top) {
                    assert_eq!(ta, tb, "{name}");
                    assert!((la - lb).abs() <= 1e-5, "{name}");
                }
            }
        }
    }
}

/// At bf16 both paths round the same operands (weights packed once, activations per product) and
/// differ only in the order of f32 sums (the engine adds residuals inside the product).
#[test]
fn bf16_engine_decoding_matches_the_graph() {
    for (name, cfg) in decoder_configs() {
        let mut m = model(cfg, 25);
        m.set_precision(Precision::Bf16);
        let reqs = requests(m.vocab_size());
        let (engine, passes) = generate_counted(&m, &reqs);
        let (graph, _) = generate_counted(&on_graph(&m), &reqs);
        assert_eq!(passes, 7, "{name}");
        assert_close(name, &engine, &graph, 2e-3);
    }
}

#[test]
fn lora_models_decode_on_the_engine_like_the_graph() {
    const DECODER: &[&str] = &[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    ];
    const GPT2: &[&str] = &["c_attn", "c_proj", "c_fc", "lm_head"];
    for (name, cfg) in decoder_configs() {
        let targets = if name.starts_with("gpt2") {
            GPT2
        } else {
            DECODER
        };
        let config = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.25,
            target_modules: targets.iter().map(|m| m.to_string()).collect(),
        };
        // Twin models with twin adapters (B non-zero so that they change the outputs).
        let attach = |backend| {
            let mut m = model(cfg.clone(), 26);
            m.set_backend(backend);
            let lora = Lora::attach(&mut m, &config, 9).unwrap();
            let mut vars: Vec<_> = lora
                .varmap()
                .data()
                .lock()
                .unwrap()
                .clone()
                .into_iter()
                .collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (i, (k, v)) in vars.iter().enumerate() {
                if k.contains("lora_B") {
                    let n = v.elem_count();
                    let data: Vec<f32> = (0..n)
                        .map(|j| ((j * 7 + i * 13) % 17) as f32 / 40.0 - 0.2)
                        .collect();
                    v.set(&Tensor::from_vec(data, v.dims(), &Device::Cpu).unwrap())
                        .unwrap();
                }
            }
            (m, lora)
        };
        let ((me, le), (mg, lg)) = (attach(Backend::Engine), attach(Backend::Candle));
        let reqs = requests(me.vocab_size());
        // Evaluating adapters, then training ones (a dropout mask drawn per adapter and pass).
        for training in [false, true] {
            le.set_training(training);
            lg.set_training(training);
            let (engine, passes) = generate_counted(&me, &reqs);
            let (graph, _) = generate_counted(&mg, &reqs);
            assert_eq!(passes, 7, "{name} training={training}");
            assert_close(
                &format!("{name} lora training={training}"),
                &engine,
                &graph,
                1e-5,
            );
            assert_eq!(
                le.dropout_state(),
                lg.dropout_state(),
                "{name}: dropout draws"
            );
        }
    }
}

#[test]
fn the_public_cached_forward_runs_on_the_engine_like_the_graph() {
    for (name, cfg) in decoder_configs() {
        let m = model(cfg, 28);
        let g = on_graph(&m);
        let seq = ids(2, 8, m.vocab_size(), 3);
        let run = |m: &CausalLm| {
            let mut cache = m.new_kv_cache(2, 8).unwrap();
            let mut out = vec![];
            for (start, len) in [(0, 5), (5, 1), (6, 2)] {
                let pos: Vec<u32> = (start as u32..(start + len) as u32).collect();
                let pos = Tensor::new(pos.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap()
                    .repeat((2, 1))
                    .unwrap();
                cache.begin_step(len).unwrap();
                let h = m
                    .hidden_states_cached(&seq.narrow(1, start, len).unwrap(), &pos, &mut cache)
                    .unwrap();
                cache.end_step();
                out.push(h);
            }
            Tensor::cat(&out, 1).unwrap()
        };
        let before = decode_passes();
        let he = run(&m);
        assert_eq!(decode_passes() - before, 3, "{name}");
        let hg = run(&g);
        assert!(max_abs_diff(&he, &hg).unwrap() < 1e-5, "{name}");
        // A step that was not begun is an error on the engine as on the graph.
        let mut cache = m.new_kv_cache(2, 8).unwrap();
        let pos = Tensor::zeros((2, 1), candle_core::DType::U32, &Device::Cpu).unwrap();
        let err = m
            .hidden_states_cached(&seq.narrow(1, 0, 1).unwrap(), &pos, &mut cache)
            .unwrap_err()
            .to_string();
        assert!(err.contains("begin_step"), "{name}: {err}");
        // A cache made for another batch size is an error on both paths.
        for model in [&m, &g] {
            let mut cache = model.new_kv_cache(3, 8).unwrap();
            cache.begin_step(1).unwrap();
            let res = model.hidden_states_cached(&seq.narrow(1, 0, 1).unwrap(), &pos, &mut cache);
            assert!(res.is_err(), "{name}: {:?}", model.backend());
        }
    }
}

#[test]
fn decoding_split_across_threads_matches_one_pass() {
    // With two threads a small model's rows run as two passes, each on its own rows of the cache.
    for (name, cfg) in decoder_configs() {
        let m = model(cfg, 29);
        let reqs = requests(m.vocab_size());
        let run = |threads: usize| on_threads(threads, || generate_counted(&m, &reqs));
        let ((one, p1), (two, p2)) = (run(1), run(2));
        assert_eq!((p1, p2), (7, 7), "{name}");
        assert_close(name, &one, &two, 1e-5);
        assert_close(
            name,
            &two,
            &generate(&on_graph(&m), &reqs, None).unwrap(),
            1e-5,
        );
    }
}
