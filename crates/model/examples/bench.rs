//! `cargo run -p rlhf-model --example bench -- [tiny|135m] [steps] [all|train|gen] [engine|candle]`:
//! generation throughput and training-step (forward + backward) timings at the reference shapes,
//! median of `steps` runs, on the given backend (default: the engine).

use candle_core::Device;
use rlhf_model::bench::{bench_generate, bench_train_step, smollm2_135m_config, tiny_llama_config};
use rlhf_model::{Backend, CausalLm};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The best run: on a shared machine the fastest run is the least disturbed one.
fn best(v: &[f64], higher_is_better: bool) -> f64 {
    let it = v.iter().copied();
    if higher_is_better {
        it.fold(f64::MIN, f64::max)
    } else {
        it.fold(f64::MAX, f64::min)
    }
}

fn main() -> candle_core::Result<()> {
    rlhf_model::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let shape = args.get(1).map(String::as_str).unwrap_or("tiny");
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let what = args.get(3).map(String::as_str).unwrap_or("all");
    let (cfg, batch, seq) = match shape {
        "tiny" => (tiny_llama_config(), 8, 24),
        "135m" => (smollm2_135m_config(), 8, 128),
        other => panic!("unknown shape {other} (tiny | 135m)"),
    };
    let backend: Backend = match args.get(4) {
        Some(b) => b.parse().map_err(candle_core::Error::msg)?,
        None => Backend::Engine,
    };
    let mut m = CausalLm::init_random(cfg, 0, &Device::Cpu)?;
    m.set_backend(backend);
    println!(
        "{shape}: {} params, {} backend",
        m.num_parameters(),
        backend.name()
    );
    if what != "gen" {
        train(&m, batch, seq, steps)?;
    }
    if what != "train" {
        gen(&m, steps)?;
    }
    Ok(())
}

fn train(m: &CausalLm, batch: usize, seq: usize, steps: usize) -> candle_core::Result<()> {
    let mut fw = vec![];
    let mut bw = vec![];
    for i in 0..steps + 1 {
        let s = bench_train_step(m, batch, seq, i as u64)?;
        if i > 0 {
            fw.push(s.forward_s);
            bw.push(s.backward_s);
        }
    }
    println!(
        "train step {batch}x{seq}: forward {:.1} ms, backward {:.1} ms (median of {steps}; best {:.1} / {:.1})",
        median(fw.clone()) * 1e3,
        median(bw.clone()) * 1e3,
        best(&fw, false) * 1e3,
        best(&bw, false) * 1e3
    );
    Ok(())
}

fn gen(m: &CausalLm, steps: usize) -> candle_core::Result<()> {
    let mut tps = vec![];
    for i in 0..steps.min(5) + 1 {
        let g = bench_generate(m, 32, 8, 64, i as u64)?;
        if i > 0 {
            tps.push(g.new_tokens_per_sec);
        }
    }
    println!(
        "generate 32 prompts x 8 -> 64 new tokens: {:.0} new tokens/s (median; best {:.0})",
        median(tps.clone()),
        best(&tps, true)
    );
    Ok(())
}
