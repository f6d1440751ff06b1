//! Loading: sharded and reduced-precision checkpoints, and error messages for bad ones.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use rlhf_model::{CausalLm, ModelConfig};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

fn tensors(m: &CausalLm) -> HashMap<String, Tensor> {
    m.varmap()
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect()
}

fn write_st(path: &Path, ts: &HashMap<String, Tensor>, bf16: bool) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = ts
        .iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let b = if bf16 {
                v.iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect()
            } else {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            };
            (k.clone(), t.dims().to_vec(), b)
        })
        .collect();
    let dt = if bf16 { Dtype::BF16 } else { Dtype::F32 };
    let views: Vec<(&str, TensorView)> = bytes
        .iter()
        .map(|(k, s, b)| (k.as_str(), TensorView::new(dt, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

fn write_config(dir: &Path, cfg: &ModelConfig) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg.raw).unwrap(),
    )
    .unwrap();
}

#[test]
fn bf16_weights_load_as_f32() {
    let m = model(qwen2_config(), 1);
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), m.config());
    let ts = tensors(&m);
    write_st(&dir.path().join("model.safetensors"), &ts, true);
    let loaded = CausalLm::load(dir.path(), &Device::Cpu).unwrap();
    // Same as building from the bf16-rounded tensors directly.
    let rounded = ts
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
        })
        .collect();
    let expect =
        CausalLm::from_tensors(m.config().clone(), rounded, None, &Device::Cpu, "test").unwrap();
    let x = ids(1, 6, m.vocab_size(), 2);
    assert_eq!(
        max_abs_diff(&loaded.forward(&x).unwrap(), &expect.forward(&x).unwrap()).unwrap(),
        0.0
    );
    for v in loaded.varmap().all_vars() {
        assert_eq!(v.dtype(), DType::F32);
    }
}

#[test]
fn sharded_checkpoint_loads_and_reports_missing_tensors() {
    let m = model(llama_config(), 2);
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), m.config());
    let ts = tensors(&m);
    let mut names: Vec<&String> = ts.keys().collect();
    names.sort();
    let (a, b): (Vec<_>, Vec<_>) = names.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let sub: HashMap<String, Tensor> = part
            .iter()
            .map(|(_, n)| ((**n).clone(), ts[**n].clone()))
            .collect();
        write_st(&dir.path().join(file), &sub, false);
        for n in sub.keys() {
            map.insert(n.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let loaded = CausalLm::load(dir.path(), &Device::Cpu).unwrap();
    let x = ids(2, 5, m.vocab_size(), 1);
    assert_eq!(
        max_abs_diff(&loaded.forward(&x).unwrap(), &m.forward(&x).unwrap()).unwrap(),
        0.0
    );

    // Drop one tensor from its shard: the error names it and the shard.
    let victim = "model.layers.1.mlp.up_proj.weight";
    let file = map[victim].as_str().unwrap().to_string();
    let sub: HashMap<String, Tensor> = map
        .iter()
        .filter(|(n, f)| f.as_str() == Some(file.as_str()) && n.as_str() != victim)
        .map(|(n, _)| (n.clone(), ts[n].clone()))
        .collect();
    write_st(&dir.path().join(&file), &sub, false);
    let err = CausalLm::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains(victim) && err.contains(&file), "{err}");
}

#[test]
fn bad_checkpoints_give_errors_naming_file_and_field() {
    let m = model(gpt2_config(), 3);
    let dir = tempfile::tempdir().unwrap();
    m.save(dir.path()).unwrap();
    let cfg_path = dir.path().join("config.json");

    // Shape mismatch: config says more positions than the checkpoint has.
    let mut raw = m.config().raw.clone();
    raw["n_positions"] = json!(65);
    std::fs::write(&cfg_path, raw.to_string()).unwrap();
    let err = CausalLm::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("transformer.wpe.weight")
            && err.contains("model.safetensors")
            && err.contains("[64, 32]"),
        "{err}"
    );

    // Unknown architecture.
    raw["n_positions"] = json!(64);
    raw["model_type"] = json!("mamba");
    std::fs::write(&cfg_path, raw.to_string()).unwrap();
    let err = CausalLm::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("model_type") && err.contains("mamba"),
        "{err}"
    );

    // Wrong type of a field.
    raw["model_type"] = json!("gpt2");
    raw["n_embd"] = json!("wide");
    std::fs::write(&cfg_path, raw.to_string()).unwrap();
    let err = CausalLm::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("n_embd"),
        "{err}"
    );

    // Not JSON at all.
    std::fs::write(&cfg_path, "{ nope").unwrap();
    let err = CausalLm::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("line 1"),
        "{err}"
    );

    // No weights.
    std::fs::write(&cfg_path, m.config().raw.to_string()).unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = CausalLm::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn save_keeps_unknown_config_fields_and_generation_config() {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/models/llama");
    let m = CausalLm::load(Path::new(src), &Device::Cpu).unwrap();
    assert_eq!(m.eos_token_ids(), vec![2]);
    let dir = tempfile::tempdir().unwrap();
    m.save(dir.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["pretraining_tp"], json!(1));
    assert_eq!(cfg["rope_parameters"]["rope_theta"], json!(10000.0));
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(g["eos_token_id"], json!(2));
    // No temp files are left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn architectures_are_found_by_model_type_or_class_name_in_one_table() {
    for (name, cfg) in all_configs() {
        let mut raw = cfg.raw.clone();
        raw.as_object_mut().unwrap().remove("model_type");
        let info = cfg.arch_info();
        for class in [info.causal_lm, info.sequence_classification] {
            raw["architectures"] = json!([class]);
            let parsed = ModelConfig::from_json(raw.clone(), "config.json").unwrap();
            assert_eq!(parsed.model_type(), name, "{class}");
        }
    }
    let err = ModelConfig::from_json(json!({"model_type": "mamba"}), "config.json")
        .unwrap_err()
        .to_string();
    assert!(
        rlhf_model::ARCHITECTURES
            .iter()
            .all(|a| err.contains(a.model_type)),
        "{err}"
    );
    let err = ModelConfig::from_json(
        json!({"architectures": ["MambaForCausalLM"]}),
        "config.json",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("architectures") && err.contains("MistralForCausalLM"),
        "{err}"
    );
}

/// `sliding_window`: 0 is refused when parsed; absent means MistralConfig's default 4096 (a longer sequence is
/// refused before any work); null means full attention.
#[test]
fn mistral_sliding_window_is_validated_and_defaults_like_transformers() {
    let mut raw = mistral_config().raw.clone();
    raw["sliding_window"] = json!(0);
    let err = ModelConfig::from_json(raw.clone(), "config.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("sliding_window"),
        "{err}"
    );

    raw.as_object_mut().unwrap().remove("sliding_window");
    let m = model(
        ModelConfig::from_json(raw.clone(), "config.json").unwrap(),
        1,
    );
    let err = m
        .forward(&ids(1, 4097, m.vocab_size(), 1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sliding_window") && err.contains("4096"),
        "{err}"
    );
    assert_eq!(
        m.forward(&ids(1, 80, m.vocab_size(), 1)).unwrap().dims(),
        &[1, 80, m.vocab_size()]
    );

    raw["sliding_window"] = json!(null);
    let m = model(ModelConfig::from_json(raw, "config.json").unwrap(), 1);
    assert_eq!(
        m.forward(&ids(1, 80, m.vocab_size(), 1)).unwrap().dims(),
        &[1, 80, m.vocab_size()]
    );
}
