use candle_core::{Device, Tensor, Var};
use rlhf_data::SamplerState;
use rlhf_train::checkpoint::{
    latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint, TrainerState,
};
use rlhf_train::optim::{AdamW, AdamWConfig};

fn state(step: u64) -> TrainerState {
    TrainerState {
        global_step: step,
        data: SamplerState {
            epoch: 0,
            index: step as usize * 8,
        },
        shuffle_seed: 7,
        num_tokens: step * 80,
        lora_dropout: vec![step, step],
    }
}

#[test]
fn incomplete_checkpoints_are_ignored_and_state_round_trips() {
    let out = tempfile::tempdir().unwrap();
    let w = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()).unwrap();
    let opt = AdamW::new(vec![("w".into(), w)], AdamWConfig::default()).unwrap();
    let model = |d: &std::path::Path| -> rlhf_train::Result<()> {
        std::fs::write(d.join("model.safetensors"), b"weights").map_err(|e| {
            rlhf_train::TrainError::Io {
                path: d.into(),
                source: e,
            }
        })
    };
    let cfg = serde_json::json!({"learning_rate": 1e-3});

    save_checkpoint(out.path(), model, &opt, &state(2), &cfg, None).unwrap();
    // A writer killed mid-save leaves its temporary directory, and a directory without trainer_state.json
    // is not a checkpoint either.
    std::fs::create_dir(out.path().join(".tmp-checkpoint-4")).unwrap();
    std::fs::create_dir(out.path().join("checkpoint-3")).unwrap();
    assert_eq!(
        latest_checkpoint(out.path()).unwrap(),
        Some(out.path().join("checkpoint-2"))
    );

    let mut opt2 = AdamW::new(
        vec![("w".into(), Var::new(&[0f32, 0.0], &Device::Cpu).unwrap())],
        AdamWConfig::default(),
    )
    .unwrap();
    let loaded = load_checkpoint(&out.path().join("checkpoint-2"), &mut opt2).unwrap();
    assert_eq!(loaded, state(2));

    // Saving step 4 replaces the stale temporary directory.
    save_checkpoint(out.path(), model, &opt, &state(4), &cfg, Some(1)).unwrap();
    let steps: Vec<u64> = list_checkpoints(out.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, [4]);
    assert!(!out.path().join(".tmp-checkpoint-4").exists());
}
