//! The SFT benchmark runs and reports every measurement.

mod common;

use rlhf_train::bench::{bench_sft, BenchData, SftBenchShape};

#[test]
fn bench_reports_timings_tokens_and_memory() {
    let data = BenchData::Addition {
        tokenizer_dir: common::model_dir(),
        data_file: common::root().join("data/sft_eval.jsonl"),
    };
    let shape = SftBenchShape {
        name: "fixture".into(),
        model: common::load(&common::model_dir()),
        data,
        batch_size: 8,
        warmup_steps: 1,
        steps: 3,
    };
    let r = bench_sft(shape).unwrap();
    for key in [
        "sec_per_step_median",
        "tokens_per_sec",
        "forward_s_median",
        "backward_s_median",
        "optimizer_s_median",
        "peak_rss_mb",
    ] {
        assert!(
            r[key].as_f64().is_some_and(|v| v > 0.0),
            "{key}: {}",
            r[key]
        );
    }
    assert_eq!(r["steps"], 3);
    assert!(r["final_loss"].as_f64().unwrap() < r["first_loss"].as_f64().unwrap());

    let random = SftBenchShape {
        name: "random".into(),
        model: common::load(&common::model_dir()),
        data: BenchData::Random {
            seq_len: 16,
            num_rows: 8,
        },
        batch_size: 4,
        warmup_steps: 0,
        steps: 2,
    };
    let r = bench_sft(random).unwrap();
    assert_eq!(r["tokens_per_step_mean"], 64.0);
}
