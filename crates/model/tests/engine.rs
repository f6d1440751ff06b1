//! The engine's hand-written stacks against candle's graph (values and every parameter's gradient,
//! both precisions) and against central finite differences.

mod common;

use candle_core::{Device, Tensor, Var};
use rlhf_model::lora::{Lora, LoraConfig};
use rlhf_model::{attention_group, backward, Backend, CausalLm, Precision, GROUP_MEMBER_BITS};
use serde_json::json;

/// Deterministic values in [-1, 1).
fn uniform(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Two packed sequences per row (positions restart), t = 40 spans two attention tiles.
fn batch(m: &CausalLm) -> (Tensor, Tensor, Tensor) {
    let (b, t) = (2, 40);
    let ids = common::ids(b, t, m.vocab_size(), 7);
    let targets = common::ids(b, t, m.vocab_size(), 8);
    let pos: Vec<u32> = (0..b * t).map(|i| (i % t) as u32 % 25).collect();
    (
        ids,
        targets,
        Tensor::from_vec(pos, (b, t), &Device::Cpu).unwrap(),
    )
}

/// The trainers' seam (mean token log-prob) plus a random projection of the hidden states, so that
/// the hidden states' gradient is not only what the head sends back.
fn loss(m: &CausalLm, (ids, targets, pos): &(Tensor, Tensor, Tensor)) -> Tensor {
    let hidden = m.hidden_states(ids, Some(pos)).unwrap();
    let proj = uniform(hidden.dims(), 11);
    let lp = m
        .token_logprobs_from_hidden(&hidden, targets)
        .unwrap()
        .mean_all()
        .unwrap();
    (lp + (hidden * proj).unwrap().mean_all().unwrap()).unwrap()
}

fn with(cfg: rlhf_model::ModelConfig, precision: Precision, backend: Backend) -> CausalLm {
    let mut m = common::model(cfg, 4);
    m.set_precision(precision);
    m.set_backend(backend);
    m
}

/// Every architecture with a stack on the engine.
fn engine_configs() -> Vec<(&'static str, rlhf_model::ModelConfig)> {
    vec![
        ("llama", common::llama_config()),
        ("qwen2", common::qwen2_config()),
        ("mistral", common::mistral_config()),
        ("gpt2", common::gpt2_config()),
    ]
}

/// GPT-2 with each `activation_function` it supports besides the default `gelu_new` (the engine's
/// kernels against candle's ops), and with per-layer attention scales and an untied head.
fn gpt2_variant_configs() -> Vec<(&'static str, rlhf_model::ModelConfig)> {
    let variants = [
        ("gpt2 gelu", json!({"activation_function": "gelu"})),
        ("gpt2 relu", json!({"activation_function": "relu"})),
        ("gpt2 silu", json!({"activation_function": "silu"})),
        (
            "gpt2 scaled by layer, untied",
            json!({"scale_attn_by_inverse_layer_idx": true, "tie_word_embeddings": false}),
        ),
    ];
    variants
        .into_iter()
        .map(|(name, fields)| {
            let mut raw = common::gpt2_config().raw.clone();
            for (k, v) in fields.as_object().unwrap() {
                raw[k] = v.clone();
            }
            (name, rlhf_model::ModelConfig::from_json(raw, name).unwrap())
        })
        .collect()
}

#[test]
fn engine_matches_the_candle_graph_in_values_and_every_gradient() {
    // bf16: both paths round the same operands for the same products, but a few f32 sums are added
    // in another order and a last-bit difference can round a later operand to the neighbouring
    // bf16 value (2^-8 relative): a quarter of that.
    for (precision, tol) in [(Precision::Fp32, 1e-5), (Precision::Bf16, 1e-3)] {
        for (name, cfg) in engine_configs() {
            assert_parity(name, cfg, precision, tol);
        }
    }
}

#[test]
fn gpt2_variants_on_the_engine_match_the_candle_graph() {
    for (name, cfg) in gpt2_variant_configs() {
        assert_parity(name, cfg, Precision::Fp32, 1e-5);
    }
}

/// The engine and the candle graph agree on the loss and every parameter's gradient.
fn assert_parity(name: &str, cfg: rlhf_model::ModelConfig, precision: Precision, tol: f32) {
    let (engine, graph) = (
        with(cfg.clone(), precision, Backend::Engine),
        with(cfg, precision, Backend::Candle),
    );
    let data = batch(&engine);
    let (le, lg) = (loss(&engine, &data), loss(&graph, &data));
    let (a, b) = (
        le.to_scalar::<f32>().unwrap(),
        lg.to_scalar::<f32>().unwrap(),
    );
    assert!(
        (a - b).abs() < tol * (1.0 + b.abs()),
        "{name} {precision:?}: loss {a} vs {b}"
    );
    let (ge, gg) = (backward(&le).unwrap(), backward(&lg).unwrap());
    let (ve, vg) = (
        engine.varmap().data().lock().unwrap(),
        graph.varmap().data().lock().unwrap(),
    );
    assert_eq!(ve.len(), vg.len());
    for (pname, v) in vg.iter() {
        let y = gg
            .get(v)
            .unwrap_or_else(|| panic!("{name}: `{pname}` has no gradient on the graph"));
        let x = ge
            .get(&ve[pname])
            .unwrap_or_else(|| panic!("{name}: `{pname}` has no gradient on the engine"));
        let err = max_abs(&(x - y).unwrap());
        assert!(
            err <= tol * (1.0 + max_abs(y)),
            "{name} {precision:?}: gradient of `{pname}` differs by {err}"
        );
        assert!(max_abs(y) > 0.0, "{name}: `{pname}` got a zero gradient");
    }
}

#[test]
fn the_engine_really_runs_and_hands_its_gradients_to_backward_only() {
    // candle's own backward sees the stack as one op of the embedding: inside-stack parameters get
    // their gradients only through `rlhf_model::backward`. (Proves the engine path was taken.)
    let cases = [
        (
            common::llama_config(),
            "model.embed_tokens.weight",
            &["model.layers.0.self_attn.q_proj.weight"][..],
        ),
        // GPT-2's learned positions are a second embedding: inside the stack as well.
        (
            common::gpt2_config(),
            "transformer.wte.weight",
            &[
                "transformer.h.0.attn.c_attn.weight",
                "transformer.wpe.weight",
            ][..],
        ),
    ];
    for (cfg, embed, inside) in cases {
        let m = with(cfg, Precision::Fp32, Backend::Engine);
        let data = batch(&m);
        let l = loss(&m, &data);
        let plain = l.backward().unwrap();
        let vars = m.varmap().data().lock().unwrap();
        for name in inside {
            assert!(
                plain.get(&vars[*name]).is_none(),
                "`{name}`: the stack ran on candle's graph, not the engine"
            );
        }
        assert!(plain.get(&vars[embed]).is_some());
        drop(vars);
        // The tape was spent by that backward: a second one is refused with a message, not a panic.
        let err = backward(&l).unwrap_err().to_string();
        assert!(err.contains("second backward"), "{err}");
        let full = backward(&loss(&m, &data)).unwrap();
        let vars = m.varmap().data().lock().unwrap();
        for name in inside {
            assert!(full.get(&vars[*name]).is_some(), "`{name}` has no gradient");
        }
    }
}

/// The gradient's projection on a random direction of every parameter against the central
/// difference of the loss along it, evaluated at f32 (at bf16 the loss is a step function at the
/// scale of the operands' rounding, so the bf16 gradient is checked against the f32 derivative).
fn directional_check(m: &mut CausalLm, eps: f64, tol: f64, what: &str) {
    let vars = sorted_vars(m.varmap());
    directional_check_of(m, &vars, &|| (), eps, tol, what);
}

/// The variables of `varmap`, sorted by name.
fn sorted_vars(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<_> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// [`directional_check`] along `vars`, calling `rewind` before every loss (e.g. to draw the same
/// dropout masks).
fn directional_check_of(
    m: &mut CausalLm,
    vars: &[(String, Var)],
    rewind: &dyn Fn(),
    eps: f64,
    tol: f64,
    what: &str,
) {
    let data = batch(m);
    rewind();
    let grads = backward(&loss(m, &data)).unwrap();
    let dirs: Vec<Tensor> = vars
        .iter()
        .enumerate()
        .map(|(i, (_, v))| uniform(v.dims(), 100 + i as u64))
        .collect();
    let analytic: f64 = vars
        .iter()
        .zip(&dirs)
        .map(|((_, v), d)| {
            (grads.get(v).unwrap() * d)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .sum();
    let precision = m.precision();
    m.set_precision(Precision::Fp32);
    let origin: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    let at = |s: f64| {
        for (((_, v), o), d) in vars.iter().zip(&origin).zip(&dirs) {
            v.set(&(o + (d * s).unwrap()).unwrap()).unwrap();
        }
        rewind();
        loss(m, &data).to_scalar::<f32>().unwrap() as f64
    };
    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
    at(0.0);
    m.set_precision(precision);
    assert!(
        (numeric - analytic).abs() <= tol * analytic.abs().max(1e-3),
        "{what} {precision:?}: directional derivative {analytic} vs finite difference {numeric}"
    );
}

#[test]
fn engine_gradients_match_finite_differences_in_both_precisions() {
    for (name, cfg) in engine_configs() {
        // f32 central differences at this step are within ~1e-3 of the derivative here.
        directional_check(
            &mut with(cfg.clone(), Precision::Fp32, Backend::Engine),
            1e-3,
            5e-3,
            name,
        );
        // bf16 products carry ~2^-9 relative rounding each; their gradient stays within 2 %.
        directional_check(
            &mut with(cfg, Precision::Bf16, Backend::Engine),
            1e-3,
            2e-2,
            name,
        );
    }
}

#[test]
fn frozen_models_on_the_engine_compute_the_graph_values() {
    for (name, cfg) in engine_configs() {
        let mut engine = with(cfg.clone(), Precision::Fp32, Backend::Engine);
        let mut graph = with(cfg, Precision::Fp32, Backend::Candle);
        engine.set_trainable(false).unwrap();
        graph.set_trainable(false).unwrap();
        let (ids, _, pos) = batch(&engine);
        let (a, b) = (
            engine.hidden_states(&ids, Some(&pos)).unwrap(),
            graph.hidden_states(&ids, Some(&pos)).unwrap(),
        );
        assert!(max_abs(&(a - b).unwrap()) < 1e-5, "{name}");
    }
}

#[test]
fn bad_token_ids_and_over_long_sequences_are_errors_on_the_engine() {
    let m = with(common::llama_config(), Precision::Fp32, Backend::Engine);
    let ids = Tensor::new(&[[3u32, 500]], &Device::Cpu).unwrap();
    let err = m.hidden_states(&ids, None).unwrap_err().to_string();
    assert!(
        err.contains("token id 500") && err.contains("vocab_size"),
        "{err}"
    );
    let mut raw = common::mistral_config().raw.clone();
    raw["sliding_window"] = 8.into();
    let m = common::model(rlhf_model::ModelConfig::from_json(raw, "t").unwrap(), 1);
    let err = m
        .hidden_states(&common::ids(1, 9, m.vocab_size(), 1), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sliding_window"), "{err}");
    let m = with(common::gpt2_config(), Precision::Fp32, Backend::Engine);
    let err = m.hidden_states(&ids, None).unwrap_err().to_string();
    assert!(
        err.contains("token id 500") && err.contains("vocab_size"),
        "{err}"
    );
    // The test config has n_positions = 64.
    let err = m
        .hidden_states(&common::ids(1, 65, m.vocab_size(), 1), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("beyond n_positions = 64"), "{err}");
}

/// Architectures whose stacks run LoRA on the engine: every linear of the stack and the head
/// adapted, and the name of one adapter factor inside the stack.
fn lora_cases() -> Vec<(
    &'static str,
    rlhf_model::ModelConfig,
    &'static [&'static str],
    &'static str,
)> {
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
    vec![
        (
            "llama",
            common::llama_config(),
            DECODER,
            "model.layers.0.self_attn.q_proj.lora_A.weight",
        ),
        (
            "qwen2",
            common::qwen2_config(),
            DECODER,
            "model.layers.0.self_attn.q_proj.lora_A.weight",
        ),
        (
            "gpt2",
            common::gpt2_config(),
            GPT2,
            "transformer.h.0.attn.c_attn.lora_A.weight",
        ),
    ]
}

/// `modules` adapted (r = 4, dropout 0.25, training mode), B drawn non-zero so that every factor
/// gets a gradient and the adapters change the values.
fn with_lora(
    cfg: rlhf_model::ModelConfig,
    modules: &[&str],
    precision: Precision,
    backend: Backend,
) -> (CausalLm, Lora) {
    let mut m = with(cfg, precision, backend);
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.25,
        target_modules: modules.iter().map(|m| m.to_string()).collect(),
    };
    let lora = Lora::attach(&mut m, &config, 9).unwrap();
    for (i, (name, v)) in sorted_vars(lora.varmap()).iter().enumerate() {
        if name.contains("lora_B") {
            v.set(&(uniform(v.dims(), 300 + i as u64) * 0.2).unwrap())
                .unwrap();
        }
    }
    (m, lora)
}

#[test]
fn lora_with_dropout_on_the_engine_matches_the_graph_and_finite_differences() {
    for (precision, tol) in [(Precision::Fp32, 1e-5), (Precision::Bf16, 1e-3)] {
        for (name, cfg, modules, probe) in lora_cases() {
            let (engine, le_lora) = with_lora(cfg.clone(), modules, precision, Backend::Engine);
            let (graph, lg_lora) = with_lora(cfg, modules, precision, Backend::Candle);
            let adapters = le_lora.dropout_state().len();
            let data = batch(&engine);
            // Two steps: the second draws each layer's second dropout mask on both paths.
            for step in 0..2 {
                let before = le_lora.dropout_state();
                let (le, lg) = (loss(&engine, &data), loss(&graph, &data));
                let (a, b) = (
                    le.to_scalar::<f32>().unwrap(),
                    lg.to_scalar::<f32>().unwrap(),
                );
                assert!(
                    (a - b).abs() < tol * (1.0 + b.abs()),
                    "{name} {precision:?} step {step}: loss {a} vs {b}"
                );
                assert_eq!(le_lora.dropout_state(), lg_lora.dropout_state());
                assert_eq!(le_lora.dropout_state(), vec![step + 1; adapters]);
                // The engine proof: candle's own backward reaches the stack's op (hung on a
                // constant variable, the base being frozen) but the stack's adapters get their
                // gradients only through `rlhf_model::backward`.
                let plain = le.backward().unwrap();
                let q_a = le_lora.varmap().data().lock().unwrap()[probe].clone();
                assert!(
                    plain.get(&q_a).is_none(),
                    "{name}: the stack ran on the graph"
                );
                // That backward spent the tape: the same loss again, with the same masks.
                le_lora.set_dropout_state(&before).unwrap();
                let (ge, gg) = (
                    backward(&loss(&engine, &data)).unwrap(),
                    backward(&lg).unwrap(),
                );
                let (ve, vg) = (sorted_vars(le_lora.varmap()), sorted_vars(lg_lora.varmap()));
                assert_eq!(ve.len(), 2 * adapters);
                for ((pname, x), (_, y)) in ve.iter().zip(&vg) {
                    let x = ge.get(x).unwrap_or_else(|| {
                        panic!("{name}: `{pname}` has no gradient on the engine")
                    });
                    let y = gg.get(y).unwrap();
                    let err = max_abs(&(x - y).unwrap());
                    assert!(
                        err <= tol * (1.0 + max_abs(y)),
                        "{name} {precision:?}: gradient of `{pname}` differs by {err}"
                    );
                    assert!(max_abs(y) > 0.0, "{name}: `{pname}` got a zero gradient");
                }
                // The frozen base gets no gradient.
                let base = engine.varmap().data().lock().unwrap();
                assert!(base.values().all(|v| ge.get(v).is_none()), "{name}");
            }
        }
    }
    // Finite differences along the adapters, with the same masks for every evaluation.
    for (name, cfg, modules, _) in lora_cases() {
        for (precision, tol) in [(Precision::Fp32, 5e-3), (Precision::Bf16, 2e-2)] {
            let (mut m, lora) = with_lora(cfg.clone(), modules, precision, Backend::Engine);
            let state = lora.dropout_state();
            let vars = sorted_vars(lora.varmap());
            let rewind = || lora.set_dropout_state(&state).unwrap();
            directional_check_of(&mut m, &vars, &rewind, 1e-3, tol, name);
        }
    }
}

#[test]
fn disabled_or_evaluating_adapters_on_the_engine_compute_the_graph_values() {
    for (name, cfg, modules, _) in lora_cases() {
        let (engine, le) = with_lora(cfg.clone(), modules, Precision::Fp32, Backend::Engine);
        let (graph, lg) = with_lora(cfg, modules, Precision::Fp32, Backend::Candle);
        let adapters = le.dropout_state().len();
        let (ids, _, pos) = batch(&engine);
        for (enabled, training) in [(false, true), (true, false)] {
            for l in [&le, &lg] {
                l.set_enabled(enabled);
                l.set_training(training);
            }
            let (a, b) = (
                engine.hidden_states(&ids, Some(&pos)).unwrap(),
                graph.hidden_states(&ids, Some(&pos)).unwrap(),
            );
            assert!(
                max_abs(&(a - b).unwrap()) < 1e-5,
                "{name} {enabled} {training}"
            );
            // No dropout mask is drawn by a disabled or evaluating adapter.
            assert_eq!(le.dropout_state(), vec![0; adapters]);
            assert_eq!(lg.dropout_state(), vec![0; adapters]);
        }
    }
}

#[test]
fn small_models_split_the_batch_across_threads_with_the_same_result() {
    // Two threads run the rows of a small model's batch as two passes (one per thread), one
    // thread as one pass: same values and gradients up to the order of float sums (at bf16 the
    // split pass converts each weight once for both chunks, the single pass per product).
    for ((name, cfg), (precision, tol)) in engine_configs().into_iter().flat_map(|c| {
        [
            (c.clone(), (Precision::Fp32, 1e-5)),
            (c, (Precision::Bf16, 1e-3)),
        ]
    }) {
        let m = with(cfg, precision, Backend::Engine);
        let data = batch(&m);
        let run = |threads: usize| {
            common::on_threads(threads, || {
                let l = loss(&m, &data);
                (l.to_scalar::<f32>().unwrap(), named_grads(&m, &l))
            })
        };
        let ((l1, g1), (l2, g2)) = (run(1), run(2));
        assert!(
            (l1 - l2).abs() < tol * (1.0 + l1.abs()),
            "{name} {precision}: loss {l1} vs {l2}"
        );
        assert_grads_close(&format!("{name} {precision}"), &g2, &g1, tol);
    }
}

/// Every parameter's gradient of `l`, by name.
fn named_grads(m: &CausalLm, l: &Tensor) -> Vec<(String, Tensor)> {
    let g = backward(l).unwrap();
    let vars = m.varmap().data().lock().unwrap();
    vars.iter()
        .map(|(k, v)| (k.clone(), g.get(v).unwrap().clone()))
        .collect()
}

/// `got` within `tol` (relative to `want`'s size) of `want`, gradient by gradient.
fn assert_grads_close(what: &str, got: &[(String, Tensor)], want: &[(String, Tensor)], tol: f32) {
    for ((k, a), (_, b)) in got.iter().zip(want) {
        let err = max_abs(&(a - b).unwrap());
        assert!(
            err <= tol * (1.0 + max_abs(b)),
            "{what}: gradient of `{k}` differs by {err}"
        );
    }
}

/// Two rows packing sequences behind a shared prefix, as `hidden_states_grouped` takes them:
/// row 0 a 5-token prefix and sequences of 3, 1 and 4 tokens (then 2 pad tokens), row 1 a
/// 7-token prefix and sequences of 2 and 6. Returns (ids, positions, groups) of the packed rows
/// and, per sequence, its own row (prefix ++ sequence) with the packed flat index of each token.
#[allow(clippy::type_complexity)]
fn grouped_batch(vocab: usize) -> (Tensor, Tensor, Vec<u32>, Vec<(Vec<u32>, Vec<u32>)>) {
    // Rows of units (prefix length, sequence lengths); row 0 packs a second unit behind its first.
    let t = 16;
    let rows: [&[(usize, &[usize])]; 2] = [&[(5, &[3, 1, 4]), (1, &[1])], &[(7, &[2, 6])]];
    let tok = |i: usize| ((i as u32).wrapping_mul(2654435761) >> 9) % vocab as u32;
    let (mut ids, mut pos, mut groups, mut seqs) = (vec![], vec![], vec![], vec![]);
    for (r, units) in rows.iter().enumerate() {
        for (u, (prefix, lens)) in units.iter().enumerate() {
            let start = ids.len();
            for i in 0..*prefix {
                ids.push(tok(start + i));
                pos.push(i as u32);
                groups.push(attention_group(u as u32, 0));
            }
            for (g, &len) in lens.iter().enumerate() {
                let mut own: Vec<u32> = ids[start..start + prefix].to_vec();
                let mut at: Vec<u32> = (start..start + prefix).map(|i| i as u32).collect();
                for j in 0..len {
                    at.push(ids.len() as u32);
                    own.push(tok(1000 + ids.len()));
                    ids.push(*own.last().unwrap());
                    pos.push((prefix + j) as u32);
                    groups.push(attention_group(u as u32, g as u32 + 1));
                }
                seqs.push((own, at));
            }
        }
        while ids.len() < (r + 1) * t {
            ids.push(0);
            pos.push(0);
            groups.push(u32::MAX);
        }
    }
    let dev = Device::Cpu;
    (
        Tensor::from_vec(ids, (2, t), &dev).unwrap(),
        Tensor::from_vec(pos, (2, t), &dev).unwrap(),
        groups,
        seqs,
    )
}

#[test]
fn grouped_rows_compute_what_separate_rows_do_in_values_and_gradients() {
    for (name, cfg) in engine_configs() {
        let m = with(cfg, Precision::Fp32, Backend::Engine);
        let (ids, pos, groups, seqs) = grouped_batch(m.vocab_size());
        if name == "mistral" {
            // Its sliding window is checked on rows, which grouping lengthens: refused, not wrong.
            assert!(!m.attends_by_group());
            let err = m.hidden_states_grouped(&ids, &pos, &groups).unwrap_err();
            assert!(
                err.to_string().contains("run one row per sequence"),
                "{err}"
            );
            continue;
        }
        let packed = m.hidden_states_grouped(&ids, &pos, &groups).unwrap();
        let h = packed.dim(2).unwrap();
        let flat = packed.reshape((32, h)).unwrap();
        // The same function of both: every sequence's own tokens and each prefix once (from its
        // first sequence), projected on fixed random directions.
        let (mut picked_p, mut picked_s, mut seen) =
            (vec![], vec![], std::collections::HashSet::new());
        for (own, at) in &seqs {
            let row = Tensor::from_slice(own, (1, own.len()), &Device::Cpu).unwrap();
            let alone = m.hidden_states(&row, None).unwrap().squeeze(0).unwrap();
            for (j, &a) in at.iter().enumerate() {
                let shared = groups[a as usize] % (1 << GROUP_MEMBER_BITS) == 0;
                if shared && !seen.insert(a) {
                    continue;
                }
                let x = flat.get(a as usize).unwrap();
                let y = alone.get(j).unwrap();
                let err = max_abs(&(&x - &y).unwrap());
                assert!(
                    err < 1e-5,
                    "{name}: token {j} of a sequence differs by {err}"
                );
                picked_p.push(x);
                picked_s.push(y);
            }
        }
        assert_eq!(picked_p.len(), 5 + 8 + 1 + 1 + 7 + 8);
        let proj = uniform(&[picked_p.len(), h], 21);
        let lp = (Tensor::stack(&picked_p, 0).unwrap() * &proj)
            .unwrap()
            .sum_all()
            .unwrap();
        let ls = (Tensor::stack(&picked_s, 0).unwrap() * &proj)
            .unwrap()
            .sum_all()
            .unwrap();
        let (gp, gs) = (backward(&lp).unwrap(), backward(&ls).unwrap());
        for (k, v) in m.varmap().data().lock().unwrap().iter() {
            let (a, b) = match (gp.get(v), gs.get(v)) {
                (Some(a), Some(b)) => (a, b),
                // The LM head: not in this loss.
                (None, None) if k.contains("lm_head") => continue,
                other => panic!("{name}: `{k}` has a gradient on one side only: {other:?}"),
            };
            let err = max_abs(&(a - b).unwrap());
            assert!(
                err <= 1e-4 * (1.0 + max_abs(b)),
                "{name}: gradient of `{k}` differs by {err}"
            );
        }
        // The candle graph has no groups: refused with what to do instead.
        let graph = with(
            engine_configs().remove(0).1,
            Precision::Fp32,
            Backend::Candle,
        );
        let err = graph
            .hidden_states_grouped(&ids, &pos, &groups)
            .unwrap_err();
        assert!(err.to_string().contains("engine only"), "{err}");
    }
}

/// A bf16 pass after generation and an in-place weight write computes what a model built with the
/// written weights does: generation's converted weights (kept for the training forward) must not
/// outlive a change announced by `weights_changed`, even one the kept conversion's fingerprint
/// cannot see (a single element it does not sample).
#[test]
fn passes_use_generations_conversions_and_see_weight_writes_made_after_it() {
    use rlhf_model::generate::{generate, GenRequest};
    // Trainable (generation's conversions wait for the training forward) and frozen (every pass's
    // forward conversions are kept); bf16 conversions, and f32's transposed [in, out] copies.
    for (((name, cfg), trainable), precision) in engine_configs()
        .into_iter()
        .flat_map(|c| [(c.clone(), true), (c, false)])
        .flat_map(|c| [(c.clone(), Precision::Fp32), (c, Precision::Bf16)])
    {
        let mut m = with(cfg.clone(), precision, Backend::Engine);
        m.set_trainable(trainable).unwrap();
        let fresh = with(cfg, precision, Backend::Engine);
        let copy_weights = |fresh: &CausalLm, m: &CausalLm| {
            for ((_, a), (_, b)) in sorted_vars(m.varmap())
                .iter()
                .zip(sorted_vars(fresh.varmap()))
            {
                b.set(a.as_tensor()).unwrap();
            }
        };
        copy_weights(&fresh, &m);
        let req = GenRequest {
            prompt_ids: vec![1, 2, 3],
            max_new_tokens: 2,
            ..Default::default()
        };
        let (ids, _, pos) = batch(&m);
        let same_as_fresh = |m: &CausalLm, what: &str| {
            let h = m.hidden_states(&ids, Some(&pos)).unwrap();
            let want = fresh.hidden_states(&ids, Some(&pos)).unwrap();
            let diff = max_abs(&(h - want).unwrap());
            assert_eq!(
                diff, 0.0,
                "{name} ({precision:?}, trainable: {trainable}): {what}"
            );
        };
        generate(&m, std::slice::from_ref(&req), None).unwrap();
        same_as_fresh(&m, "the forward on generation's conversions differs");
        generate(&m, &[req], None).unwrap();
        // Element 1 of every matrix: no fingerprint samples it.
        for (_, v) in sorted_vars(m.varmap()) {
            let mut w: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            if w.len() < 2 {
                continue;
            }
            w[1] += 0.5;
            v.set(&Tensor::from_vec(w, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
            rlhf_model::weights_changed(v.as_tensor());
        }
        copy_weights(&fresh, &m);
        same_as_fresh(&m, "a pass used weights converted before the write");
    }
}

#[test]
fn picked_tokens_compute_what_the_full_pass_does_in_values_and_gradients() {
    // Unsorted, with a repeat: as the trainers' completion positions are in a grouped batch.
    let at = Tensor::new(&[17u32, 3, 5, 5, 30, 0, 9, 31], &Device::Cpu).unwrap();
    let mut configs = engine_configs();
    configs.push(("gpt2", common::gpt2_config()));
    for ((name, cfg), (precision, tol)) in configs.into_iter().flat_map(|c| {
        [
            (c.clone(), (Precision::Fp32, 1e-5)),
            (c, (Precision::Bf16, 1e-3)),
        ]
    }) {
        let m = with(cfg.clone(), precision, Backend::Engine);
        let (ids, pos, groups, _) = grouped_batch(m.vocab_size());
        let grouped = m.attends_by_group();
        let targets = common::ids(1, at.dim(0).unwrap(), m.vocab_size(), 12)
            .squeeze(0)
            .unwrap();
        let run = |m: &CausalLm, picked: bool| {
            let g = grouped.then_some((&pos, &groups[..]));
            let h = if picked {
                m.hidden_states_at(&ids, g.map(|g| g.0), g.map(|g| g.1), &at)
                    .unwrap()
            } else {
                let all = match g {
                    Some((p, g)) => m.hidden_states_grouped(&ids, p, g).unwrap(),
                    None => m.hidden_states(&ids, None).unwrap(),
                };
                let (b, t, h) = all.dims3().unwrap();
                all.reshape((b * t, h))
                    .unwrap()
                    .index_select(&at, 0)
                    .unwrap()
            };
            assert_eq!(h.dims(), [8, m.hidden_size()], "{name}");
            let lp = m
                .token_logprobs_from_hidden(&h, &targets)
                .unwrap()
                .mean_all()
                .unwrap();
            let proj = uniform(h.dims(), 13);
            let l = (lp + (&h * proj).unwrap().mean_all().unwrap()).unwrap();
            (h, named_grads(m, &l))
        };
        let ((hp, gp), (hf, gf)) = (run(&m, true), run(&m, false));
        let err = max_abs(&(&hp - &hf).unwrap());
        assert!(
            err <= tol * (1.0 + max_abs(&hf)),
            "{name} {precision:?}: states differ by {err}"
        );
        assert_grads_close(&format!("{name} {precision:?}"), &gp, &gf, tol);
        for (k, g) in &gf {
            assert!(max_abs(g) > 0.0, "{name}: `{k}` got a zero gradient");
        }
        // The candle graph picks the same tokens.
        let graph = with(cfg, precision, Backend::Candle);
        if !grouped {
            let hg = run(&graph, true).0;
            let err = max_abs(&(&hg - &hf).unwrap());
            assert!(
                err <= 10.0 * tol * (1.0 + max_abs(&hf)),
                "{name} graph: {err}"
            );
        }
    }
    let m = with(common::llama_config(), Precision::Fp32, Backend::Engine);
    let (ids, ..) = grouped_batch(m.vocab_size());
    let past_end = Tensor::new(&[40u32], &Device::Cpu).unwrap();
    assert!(m.hidden_states_at(&ids, None, None, &past_end).is_err());
    assert!(m.hidden_states_at(&ids, None, Some(&[0; 32]), &at).is_err());
}
