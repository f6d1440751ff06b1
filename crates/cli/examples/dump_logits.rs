//! Reference logits computed by the Rust model, for `tools/check_reload.py MODEL_DIR REF`:
//!
//! `cargo run -p rlhf --example dump_logits -- MODEL_DIR OUT.safetensors [RESAVE_DIR]`
//!
//! Loads MODEL_DIR (with RESAVE_DIR, causal LMs only: saves it there with its tokenizer files and reloads it from there, the
//! Rust round trip), runs two right-padded prompts through it and writes `input_ids`, `attention_mask` and
//! `logits` (or, for a `*ForSequenceClassification` reward model, `scores` [B]) to OUT.safetensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rlhf_data::Tokenizer;
use rlhf_model::seq_cls::SeqCls;
use rlhf_model::CausalLm;

/// Different lengths so that the batch has padding; addition prompts like data/.
const PROMPTS: [&str; 2] = ["Q: 60+62= 122", "Q: 7+5="];
const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (src, out, resave) = match args.as_slice() {
        [src, out] => (src, out, None),
        [src, out, resave] => (src, out, Some(resave)),
        _ => bail!("usage: dump_logits MODEL_DIR OUT.safetensors [RESAVE_DIR]"),
    };
    let dir = match resave {
        Some(dst) => {
            resave_dir(src, dst)?;
            dst
        }
        None => src,
    };
    let tokenizer = Tokenizer::from_dir(dir)?;
    let pad = tokenizer.pad_id()?;
    let rows = PROMPTS
        .iter()
        .map(|p| tokenizer.encode(p, true))
        .collect::<rlhf_data::Result<Vec<_>>>()?;
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for r in &rows {
        ids.extend(r.iter().copied().chain(std::iter::repeat(pad)).take(t));
        mask.extend((0..t).map(|i| i64::from(i < r.len())));
    }
    let ids = Tensor::from_vec(ids, (rows.len(), t), &Device::Cpu)?;
    // Right padding under a causal mask leaves the real positions' logits unchanged; check_reload zeroes the rest.
    let output = if is_classifier(dir)? {
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        let rm = SeqCls::load(dir, 1, None, 0, &Device::Cpu)?;
        ("scores", rm.forward(&ids, &lengths)?.squeeze(1)?)
    } else {
        ("logits", CausalLm::load(dir, &Device::Cpu)?.forward(&ids)?)
    };
    let tensors = HashMap::from([
        (
            "input_ids".to_string(),
            ids.to_dtype(candle_core::DType::I64)?,
        ),
        (
            "attention_mask".to_string(),
            Tensor::from_vec(mask, (rows.len(), t), &Device::Cpu)?,
        ),
        (output.0.to_string(), output.1),
    ]);
    candle_core::safetensors::save(&tensors, out)
        .with_context(|| format!("{}: cannot write", out.display()))?;
    eprintln!(
        "wrote {} ({} rows x {t} tokens) from {}",
        out.display(),
        rows.len(),
        dir.display()
    );
    Ok(())
}

/// Load + save through the Rust model (weights, config.json, generation_config.json) plus the tokenizer files.
fn resave_dir(src: &Path, dst: &Path) -> Result<()> {
    let model = CausalLm::load(src, &Device::Cpu)?;
    std::fs::create_dir_all(dst).with_context(|| format!("{}: cannot create", dst.display()))?;
    model.save(dst)?;
    for f in TOKENIZER_FILES {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), dst.join(f))
                .with_context(|| format!("{}: cannot copy", src.join(f).display()))?;
        }
    }
    Ok(())
}

/// As transformers' Auto classes: the config's first architecture says whether this is a classifier.
fn is_classifier(dir: &Path) -> Result<bool> {
    let path = dir.join("config.json");
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", path.display()))?;
    Ok(config["architectures"][0]
        .as_str()
        .is_some_and(|a| a.ends_with("ForSequenceClassification")))
}
