//! Shared helpers for the SFT integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_model::CausalLm;
use rlhf_train::{SftArgs, SftConfig};

pub fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The tiny Llama fixture (vocab 512, hidden 64, 2 layers) with its tokenizer.
pub fn model_dir() -> PathBuf {
    root().join("fixtures/models/llama")
}

/// SFT settings on the addition data with the fixture model, writing to `out` (TRL bench settings:
/// constant lr 1e-3, batch 8, log every step).
pub fn addition_config(out: &Path) -> SftConfig {
    let mut cfg = SftConfig::with_defaults(
        model_dir(),
        root().join("data/sft_train.jsonl"),
        out.to_path_buf(),
    );
    cfg.eval_file = Some(root().join("data/sft_eval.jsonl"));
    cfg.max_length = 64;
    cfg.train.learning_rate = 1e-3;
    cfg.train.lr_scheduler_type = rlhf_train::schedule::ScheduleKind::Constant;
    cfg.train.logging_steps = 1;
    cfg.train.save_steps = 0;
    cfg
}

/// All parameters by name, as raw f32 data.
pub fn weights(model: &CausalLm) -> BTreeMap<String, Vec<f32>> {
    let data = model.varmap().data().lock().unwrap();
    data.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

pub fn load(dir: &Path) -> CausalLm {
    CausalLm::load(dir, &Device::Cpu).unwrap()
}

/// `rlhf sft FLAGS` as the CLI reads them (flags merged over `--config FILE`), resolved.
pub fn sft_flags<S: AsRef<str>>(flags: &[S]) -> rlhf_train::Result<SftConfig> {
    let flags: Vec<std::ffi::OsString> = flags.iter().map(|f| f.as_ref().into()).collect();
    rlhf_train::settings::load::<SftArgs>("sft", &flags)?.resolve()
}
