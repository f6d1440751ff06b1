//! `cargo run --release -p rlhf-train --example bench_sft [tiny|smollm2] [steps]`: the SFT step benchmark
//! outside the CLI (profiling). Shapes as in ../shared/bench-trl.

use std::path::PathBuf;

use candle_core::Device;
use rlhf_model::{bench, CausalLm};
use rlhf_train::bench::{bench_sft, BenchData, SftBenchShape};

fn main() {
    rlhf_model::tune_allocator();
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "tiny".into());
    let steps: usize = args.next().map(|s| s.parse().expect("steps")).unwrap_or(30);
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let (config, data, warmup_steps) = match which.as_str() {
        "tiny" => (
            bench::tiny_llama_config(),
            BenchData::Addition {
                tokenizer_dir: root.join("fixtures/tokenizer"),
                data_file: root.join("data/sft_train.jsonl"),
            },
            5,
        ),
        "smollm2" => (
            bench::smollm2_135m_config(),
            BenchData::Random {
                seq_len: 128,
                num_rows: 64,
            },
            2,
        ),
        other => panic!("unknown shape {other} (tiny | smollm2)"),
    };
    let model = CausalLm::init_random(config, 1234, &Device::Cpu).unwrap();
    let shape = SftBenchShape {
        name: which,
        model,
        data,
        batch_size: 8,
        warmup_steps,
        steps,
    };
    println!("{}", bench_sft(shape).unwrap());
}
