//! `cargo run --release -p rlhf-train --example bench_sft [tiny|smollm2] [steps]`: the SFT step benchmark
//! outside the CLI (profiling). Shapes as in ../shared/bench-trl.

use std::path::PathBuf;

use candle_core::Device;
use rlhf_model::{CausalLm, ModelConfig};
use rlhf_train::bench::{bench_sft, BenchData, SftBenchShape};
use serde_json::json;

fn main() {
    rlhf_model::tune_allocator();
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "tiny".into());
    let steps: usize = args.next().map(|s| s.parse().expect("steps")).unwrap_or(30);
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let (config, data, warmup_steps) = match which.as_str() {
        "tiny" => (
            json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 256,
                   "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 688,
                   "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
                   "tie_word_embeddings": false, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
            BenchData::Addition { tokenizer_dir: root.join("fixtures/tokenizer"), data_file: root.join("data/sft_train.jsonl") },
            5,
        ),
        "smollm2" => (
            json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                   "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "hidden_act": "silu",
                   "tie_word_embeddings": true, "initializer_range": 0.041666666666666664, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
            BenchData::Random { seq_len: 128, num_rows: 64 },
            2,
        ),
        other => panic!("unknown shape {other} (tiny | smollm2)"),
    };
    let model = CausalLm::init_random(ModelConfig::from_json(config, &which).unwrap(), 1234, &Device::Cpu).unwrap();
    let shape = SftBenchShape { name: which, model, data, batch_size: 8, warmup_steps, steps };
    println!("{}", bench_sft(shape).unwrap());
}
