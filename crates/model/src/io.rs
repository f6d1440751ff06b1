//! Reading and writing checkpoints in the layout `transformers` uses: `config.json`,
//! `model.safetensors` or `model.safetensors.index.json` + shards, `generation_config.json`.

use crate::{CausalLm, ModelConfig};
use candle_core::{bail, Device, Result, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
pub const GENERATION_CONFIG: &str = "generation_config.json";

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::Msg(format!("{}: cannot read: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| candle_core::Error::Msg(format!("{}: invalid JSON: {e}", path.display())))
}

/// Buffers/tensors that checkpoints may carry but that are not parameters: rotary caches of old
/// Llama exports, GPT-2's causal-mask buffers, and a duplicate `lm_head.weight` when tied.
pub(crate) fn ignorable_tensor(name: &str, cfg: &ModelConfig) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || (name == "lm_head.weight" && cfg.tie_word_embeddings())
}

fn to_f32(view: &TensorView, name: &str, file: &Path) -> Result<Vec<f32>> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32)
            .collect(),
        other => bail!(
            "{}: tensor `{name}` has dtype {other:?}; only F32, BF16, F16 and F64 weights are supported",
            file.display()
        ),
    })
}

/// Reads every tensor of one safetensors file as f32.
fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path)
        .map_err(|e| candle_core::Error::Msg(format!("{}: cannot read: {e}", path.display())))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        candle_core::Error::Msg(format!(
            "{}: not a valid safetensors file: {e}",
            path.display()
        ))
    })?;
    st.iter()
        .map(|(name, view)| {
            let data = to_f32(&view, name, path)?;
            Ok((
                name.to_string(),
                Tensor::from_vec(data, view.shape(), device)?,
            ))
        })
        .collect()
}

/// The weight files of a checkpoint directory: the single file if present (as `transformers`
/// prefers it), else the shards of the index.
/// A shard index: its path and its `weight_map` (tensor name → shard file).
type ShardIndex = (PathBuf, BTreeMap<String, String>);

fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<ShardIndex>)> {
    let single = dir.join(WEIGHTS);
    if single.is_file() {
        return Ok((vec![single], None));
    }
    let index = dir.join(WEIGHTS_INDEX);
    if !index.is_file() {
        bail!(
            "{}: found neither {WEIGHTS} nor {WEIGHTS_INDEX}",
            dir.display()
        )
    }
    let v = read_json(&index)?;
    let map = match v.get("weight_map").and_then(|m| m.as_object()) {
        Some(m) => m,
        None => bail!(
            "{}: field \"weight_map\": missing or not an object",
            index.display()
        ),
    };
    let mut weight_map = BTreeMap::new();
    for (k, f) in map {
        match f.as_str() {
            Some(f) => weight_map.insert(k.clone(), f.to_string()),
            None => bail!(
                "{}: field \"weight_map.{k}\": expected a file name, got {f}",
                index.display()
            ),
        };
    }
    let mut files: Vec<PathBuf> = weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        let name = missing
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let tensors = weight_map
            .iter()
            .filter(|(_, f)| f.as_str() == name)
            .count();
        bail!(
            "{}: shard {name} (listed in {} for {tensors} tensors) does not exist",
            missing.display(),
            index.display()
        )
    }
    Ok((files, Some((index, weight_map))))
}

pub(crate) fn load(dir: &Path, device: &Device) -> Result<CausalLm> {
    let config = ModelConfig::from_file(&dir.join(CONFIG))?;
    let gen_path = dir.join(GENERATION_CONFIG);
    let generation_config = if gen_path.is_file() {
        Some(read_json(&gen_path)?)
    } else {
        None
    };
    let (files, index) = weight_files(dir)?;
    let mut tensors = HashMap::new();
    for f in &files {
        for (name, t) in read_safetensors(f, device)? {
            if let Some((idx, map)) = &index {
                // A shard may only provide what the index assigns to it.
                if map.get(&name).map(|g| dir.join(g)) != Some(f.clone()) {
                    bail!(
                        "{}: tensor `{name}` is not assigned to this shard by {}",
                        f.display(),
                        idx.display()
                    )
                }
            }
            tensors.insert(name, t);
        }
    }
    if let Some((idx, map)) = &index {
        if let Some((name, file)) = map.iter().find(|(n, _)| !tensors.contains_key(*n)) {
            bail!(
                "missing tensor `{name}` in {} (listed in {})",
                dir.join(file).display(),
                idx.display()
            )
        }
    }
    let source = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    CausalLm::from_tensors(config, tensors, generation_config, device, &source)
}

/// Writes `bytes` to `path` via a temp file in the same directory + rename, so readers never see
/// a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let err = |e: std::io::Error| {
        candle_core::Error::Msg(format!("{}: cannot write: {e}", path.display()))
    };
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn json_bytes(v: &Value) -> Result<Vec<u8>> {
    let mut s = serde_json::to_string_pretty(v).map_err(candle_core::Error::wrap)?;
    s.push('\n');
    Ok(s.into_bytes())
}

pub(crate) fn save(model: &CausalLm, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        candle_core::Error::Msg(format!("{}: cannot create directory: {e}", dir.display()))
    })?;
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, var) in model
        .varmap()
        .data()
        .lock()
        .expect("VarMap lock poisoned")
        .iter()
    {
        let t = var.as_tensor();
        let data = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        named.push((name.clone(), t.dims().to_vec(), bytes));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let views = named
        .iter()
        .map(|(n, s, b)| {
            Ok((
                n.as_str(),
                TensorView::new(Dtype::F32, s.clone(), b).map_err(candle_core::Error::wrap)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    // transformers rejects safetensors files whose metadata lacks a known "format".
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::tensor::serialize(views, Some(meta)).map_err(candle_core::Error::wrap)?;
    write_atomic(&dir.join(WEIGHTS), &bytes)?;

    let mut cfg = model.config().raw.clone();
    if let Some(obj) = cfg.as_object_mut() {
        // The weights are written as f32 whatever they were loaded from.
        let key = if obj.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        obj.insert(key.into(), Value::String("float32".into()));
    }
    write_atomic(&dir.join(CONFIG), &json_bytes(&cfg)?)?;
    let generation = match model.generation_config() {
        Some(g) => g.clone(),
        None => generation_config_from(&cfg),
    };
    write_atomic(&dir.join(GENERATION_CONFIG), &json_bytes(&generation)?)
}

/// What `transformers` writes for a model without its own generation config
/// (`GenerationConfig.from_model_config`): the special-token ids of config.json.
fn generation_config_from(config: &Value) -> Value {
    let mut g = serde_json::Map::new();
    g.insert("_from_model_config".into(), Value::Bool(true));
    for key in [
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "transformers_version",
    ] {
        if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
            g.insert(key.into(), v.clone());
        }
    }
    Value::Object(g)
}
