//! `cargo run -p rlhf-model --example bench -- [tiny|135m] [steps]`: generation throughput and
//! training-step (forward + backward) timings at the reference shapes, median of `steps` runs.

use candle_core::Device;
use rlhf_model::bench::{bench_generate, bench_train_step, smollm2_135m_config, tiny_llama_config};
use rlhf_model::CausalLm;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    rlhf_model::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let shape = args.get(1).map(String::as_str).unwrap_or("tiny");
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let (cfg, batch, seq) = match shape {
        "tiny" => (tiny_llama_config(), 8, 24),
        "135m" => (smollm2_135m_config(), 8, 128),
        other => panic!("unknown shape {other} (tiny | 135m)"),
    };
    let m = CausalLm::init_random(cfg, 0, &Device::Cpu)?;
    println!("{shape}: {} params", m.num_parameters());
    let mut fw = vec![];
    let mut bw = vec![];
    for i in 0..steps + 1 {
        let s = bench_train_step(&m, batch, seq, i as u64)?;
        if i > 0 {
            fw.push(s.forward_s);
            bw.push(s.backward_s);
        }
    }
    println!(
        "train step {batch}x{seq}: forward {:.1} ms, backward {:.1} ms (median of {steps})",
        median(fw.clone()) * 1e3,
        median(bw.clone()) * 1e3
    );
    let mut tps = vec![];
    for i in 0..steps.min(5) + 1 {
        let g = bench_generate(&m, 32, 8, 64, i as u64)?;
        if i > 0 {
            tps.push(g.new_tokens_per_sec);
        }
    }
    println!("generate 32 prompts x 8 -> 64 new tokens: {:.0} new tokens/s (median)", median(tps));
    Ok(())
}
