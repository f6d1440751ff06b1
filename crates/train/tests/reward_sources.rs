//! A reward model whose tokenizer differs from the policy's scores the *text* (re-encoded with its own
//! tokenizer, as TRL does), not the policy's token ids; one whose tokenizer does not fit its embedding is
//! refused with an error naming the directory.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rlhf_data::tokenizer::{train_bpe, BpeConfig};
use rlhf_data::Tokenizer;
use rlhf_train::ensemble::{mean_std, Ensemble};
use rlhf_train::reward::{RewardModel, RewardSource, Sample};
use serde_json::Map;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models"
    ))
    .join(name)
}

/// The fixture reward model with a freshly trained BPE tokenizer of `vocab` entries in place of its own.
fn rm_with_new_tokenizer(dir: &Path, vocab: usize) -> PathBuf {
    let rm = dir.join(format!("rm-{vocab}"));
    std::fs::create_dir_all(&rm).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("llama-rm").join(f), rm.join(f)).unwrap();
    }
    let corpus = dir.join("corpus.txt");
    // Varied enough for a few hundred merges.
    let text: String = (0u64..3000)
        .map(|i| {
            format!(
                "Q: {}+{}= {} apples, pears {:x} thanks!\n",
                i % 97,
                i % 13,
                i % 97 + i % 13,
                i.wrapping_mul(2654435761) % 1_000_003
            )
        })
        .collect();
    std::fs::write(&corpus, text).unwrap();
    train_bpe(
        &[corpus],
        &BpeConfig {
            vocab_size: vocab,
            ..Default::default()
        },
        &rm,
    )
    .unwrap();
    rm
}

fn score(rm: &mut RewardModel, policy: &Tokenizer, prompt: &str, completion: &str) -> f64 {
    let row = Map::new();
    let (p, c) = (
        policy.encode(prompt, true).unwrap(),
        policy.encode(completion, false).unwrap(),
    );
    let s = Sample {
        prompt,
        completion,
        prompt_ids: &p,
        completion_ids: &c,
        eos: true,
        row: &row,
    };
    rm.score(&[s]).unwrap()[0]
}

#[test]
fn a_reward_model_with_another_tokenizer_scores_the_text() {
    let tmp = tempfile::tempdir().unwrap();
    let rm_dir = rm_with_new_tokenizer(tmp.path(), 300);
    let policy = Tokenizer::from_dir(fixture("llama")).unwrap();
    let rm_tok = Tokenizer::from_dir(&rm_dir).unwrap();
    let (prompt, completion) = ("Q: 12+30=", " 42 apples");
    let (via_text, via_policy_ids) = (
        rm_tok
            .encode(&format!("{prompt}{completion}"), true)
            .unwrap(),
        {
            let mut ids = policy.encode(prompt, true).unwrap();
            ids.extend(policy.encode(completion, false).unwrap());
            ids
        },
    );
    assert_ne!(
        via_text, via_policy_ids,
        "the two tokenizers must differ for this test to mean anything"
    );

    let ens = Ensemble::load(std::slice::from_ref(&rm_dir), &Device::Cpu).unwrap();
    let direct = |ids: &[u32]| {
        let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
        f64::from(mean_std(&ens.scores(&t, &[ids.len()]).unwrap()).unwrap().0[0])
    };
    let mut rm = RewardModel::load(&[rm_dir], &policy, 128).unwrap();
    let got = score(&mut rm, &policy, prompt, completion);
    assert!(
        (got - direct(&via_text)).abs() < 1e-6,
        "scored {got}, the RM on its own tokens {}",
        direct(&via_text)
    );
    assert!(
        (got - direct(&via_policy_ids)).abs() > 1e-4,
        "the policy's ids were scored instead of the text"
    );
}

#[test]
fn a_reward_model_tokenizer_larger_than_its_embedding_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // The fixture's embedding has 512 rows; a 700-entry tokenizer would index past it.
    let rm_dir = rm_with_new_tokenizer(tmp.path(), 700);
    assert!(Tokenizer::from_dir(&rm_dir).unwrap().vocab_size() > 512);
    let policy = Tokenizer::from_dir(fixture("llama")).unwrap();
    let err = RewardModel::load(std::slice::from_ref(&rm_dir), &policy, 128)
        .err()
        .expect("must be refused")
        .to_string();
    assert!(
        err.contains(&rm_dir.display().to_string()) && err.contains("vocab"),
        "{err}"
    );
}
