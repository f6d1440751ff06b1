//! `rlhf init`: a new model directory — a byte-level BPE tokenizer trained on a corpus and a randomly
//! initialised model of a preset shape or a given config.json (no model hub is reachable).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args as ClapArgs, ValueEnum};
use rlhf_data::tokenizer::{train_bpe, BpeConfig};
use rlhf_model::{bench, CausalLm, ModelConfig};
use serde_json::{json, Value};

#[derive(Clone, Copy, ValueEnum)]
pub enum Preset {
    /// The tiny Llama of ../shared/bench-trl: hidden 256, 4 layers, 4 heads, MLP 688, untied (3.4 M at vocab 512).
    TinyLlama,
    /// SmolLM2-135M's shape: hidden 576, 30 layers, 9/3 heads, MLP 1536, tied.
    Smollm2_135m,
}

#[derive(ClapArgs)]
pub struct Args {
    /// Output model directory (must not already hold a model).
    #[arg(long)]
    pub out: PathBuf,
    /// Shape of the new model.
    #[arg(long, value_enum, conflicts_with = "config")]
    pub preset: Option<Preset>,
    /// A config.json to initialise instead of a preset (vocab_size and special-token ids are set from the tokenizer).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Corpus to train the tokenizer on: text files, or JSONL/Parquet datasets (all their text fields). Repeatable.
    #[arg(long, required = true)]
    pub corpus: Vec<PathBuf>,
    #[arg(long, default_value_t = 512)]
    pub vocab_size: usize,
    /// Prepend the BOS token when encoding with special tokens.
    #[arg(long)]
    pub add_bos: bool,
    /// Split numbers into single digits before BPE (Llama 3 / Qwen2 style), so small models can learn arithmetic.
    #[arg(long)]
    pub split_digits: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    let model = init(&a)?;
    eprintln!(
        "initialised {} ({} parameters, vocab {}) in {}",
        model.config().model_type(),
        model.num_parameters(),
        model.vocab_size(),
        a.out.display()
    );
    Ok(())
}

/// Every file init writes: an existing tokenizer alone must not be overwritten either.
const OUTPUTS: [&str; 6] = [
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

pub fn init(a: &Args) -> Result<CausalLm> {
    if let Some(f) = OUTPUTS.iter().find(|f| a.out.join(f).exists()) {
        bail!(
            "{}: already holds a model ({f}); choose a new --out directory",
            a.out.display()
        );
    }
    let created = !a.out.exists();
    let result = create(a);
    if result.is_err() {
        // No half-made model (e.g. a tokenizer without weights) that the next attempt would refuse to overwrite;
        // these files were all absent before.
        let corpus_files = (0..a.corpus.len()).map(corpus_file_name);
        for f in OUTPUTS.map(String::from).into_iter().chain(corpus_files) {
            let _ = std::fs::remove_file(a.out.join(f));
        }
        if created {
            let _ = std::fs::remove_dir(&a.out);
        }
    }
    result
}

fn create(a: &Args) -> Result<CausalLm> {
    let mut raw = match (&a.preset, &a.config) {
        (_, Some(path)) => ModelConfig::from_file(path)?.raw,
        (Some(Preset::Smollm2_135m), None) => bench::smollm2_135m_config().raw,
        (Some(Preset::TinyLlama), None) | (None, None) => bench::tiny_llama_config().raw,
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let corpus = corpus_text_files(&a.corpus, &a.out)?;
    let bpe = BpeConfig {
        vocab_size: a.vocab_size,
        add_bos: a.add_bos,
        split_digits: a.split_digits,
        ..Default::default()
    };
    let trained = train_bpe(&corpus, &bpe, &a.out);
    // The extracted-text files were only tokenizer input.
    for f in corpus.iter().filter(|f| f.starts_with(&a.out)) {
        let _ = std::fs::remove_file(f);
    }
    let tokenizer = trained?;
    let obj = raw
        .as_object_mut()
        .context("config.json must be a JSON object")?;
    obj.insert("vocab_size".into(), json!(tokenizer.vocab_size()));
    for (key, tok) in [
        ("bos_token_id", &tokenizer.bos),
        ("eos_token_id", &tokenizer.eos),
        ("pad_token_id", &tokenizer.pad),
    ] {
        if let Some(t) = tok {
            obj.insert(key.into(), json!(t.id));
        }
    }
    let config = ModelConfig::from_json(raw, "config.json")?;
    let model = CausalLm::init_random(config, a.seed, &Device::Cpu)?;
    model.save(&a.out)?;
    Ok(model)
}

/// Text files pass through; datasets are flattened into one text file of their string values.
fn corpus_text_files(inputs: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for (i, path) in inputs.iter().enumerate() {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !matches!(ext, "jsonl" | "json" | "parquet") {
            files.push(path.clone());
            continue;
        }
        let data = rlhf_data::load_dataset(path)?;
        let mut text = String::new();
        for row in &data.rows {
            collect_strings(&Value::Object(row.record.to_json()), &mut text);
        }
        let flat = out.join(corpus_file_name(i));
        std::fs::write(&flat, text).with_context(|| format!("{}: cannot write", flat.display()))?;
        files.push(flat);
    }
    Ok(files)
}

/// The text extracted from the i-th corpus dataset, in the output directory while the tokenizer trains.
fn corpus_file_name(i: usize) -> String {
    format!(".corpus-{i}.txt")
}

fn collect_strings(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(m) => m
            .iter()
            .filter(|(k, _)| k.as_str() != "role")
            .for_each(|(_, x)| collect_strings(x, out)),
        _ => {}
    }
}
