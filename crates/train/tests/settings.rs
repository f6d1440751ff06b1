//! One settings style for all six trainers: the shared keys ([`TrainArgs`]) are the same flag and TOML key
//! everywhere and reach the resolved settings with the same meaning; unset ones take each trainer's own
//! (TRL's) defaults, which `--help` shows; bad keys and values name the file, line and key.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use rlhf_train::dpo::DpoArgs;
use rlhf_train::grpo::GrpoArgs;
use rlhf_train::ppo::PpoArgs;
use rlhf_train::rloo::RlooArgs;
use rlhf_train::rm::RmArgs;
use rlhf_train::settings::{load, LoadError};
use rlhf_train::{SftArgs, TrainConfig};

const TRAINERS: [&str; 6] = ["sft", "rm", "dpo", "grpo", "rloo", "ppo"];

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The flags each trainer requires (an existing model and data file), then `extra`.
fn flags(trainer: &str, out: &Path, extra: &[&str]) -> Vec<OsString> {
    let data = if ["grpo", "rloo", "ppo"].contains(&trainer) {
        "--prompts"
    } else {
        "--train-file"
    };
    let model = root().join("fixtures/models/llama");
    let file = root().join("data/sft_train.jsonl");
    let base: Vec<OsString> = vec![
        "--model".into(),
        model.into(),
        data.into(),
        file.into(),
        "--output-dir".into(),
        out.into(),
    ];
    base.into_iter()
        .chain(extra.iter().map(Into::into))
        .collect()
}

/// The shared settings as `trainer` resolves them from `flags` (the CLI's path: load, then resolve).
fn resolved(trainer: &str, flags: &[OsString]) -> rlhf_train::Result<TrainConfig> {
    Ok(match trainer {
        "sft" => load::<SftArgs>(trainer, flags)?.resolve()?.train,
        "rm" => load::<RmArgs>(trainer, flags)?.resolve()?.train,
        "dpo" => load::<DpoArgs>(trainer, flags)?.resolve()?.train,
        "grpo" => load::<GrpoArgs>(trainer, flags)?.online.train()?,
        "rloo" => load::<RlooArgs>(trainer, flags)?.online.train()?,
        "ppo" => load::<PpoArgs>(trainer, flags)?.online.train()?,
        other => panic!("no trainer {other}"),
    })
}

/// What `trainer --help` prints.
fn help(trainer: &str) -> String {
    let flags = [OsString::from("--help")];
    let e = match trainer {
        "sft" => load::<SftArgs>(trainer, &flags).err(),
        "rm" => load::<RmArgs>(trainer, &flags).err(),
        "dpo" => load::<DpoArgs>(trainer, &flags).err(),
        "grpo" => load::<GrpoArgs>(trainer, &flags).err(),
        "rloo" => load::<RlooArgs>(trainer, &flags).err(),
        "ppo" => load::<PpoArgs>(trainer, &flags).err(),
        other => panic!("no trainer {other}"),
    };
    match e {
        Some(LoadError::Cli(e)) => e.to_string(),
        _ => panic!("{trainer} --help printed no help"),
    }
}

#[test]
fn shared_keys_mean_the_same_as_flag_and_as_toml_key_for_every_trainer() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let toml = tmp.path().join("shared.toml");
    std::fs::write(
        &toml,
        "warmup_ratio = 0.1\nadam_beta2 = 0.95\nlora_r = 4\nseed = 7\nmax_steps = 3\nbackend = \"candle\"\n",
    )
    .unwrap();
    // Older files' `[lora]` section reads as the `lora_*` keys, for every trainer.
    let section = tmp.path().join("section.toml");
    std::fs::write(
        &section,
        "warmup_ratio = 0.1\nadam_beta2 = 0.95\nseed = 7\nmax_steps = 3\nbackend = \"candle\"\n[lora]\nr = 4\n",
    )
    .unwrap();
    let as_flags = [
        "--warmup-ratio",
        "0.1",
        "--adam-beta2",
        "0.95",
        "--lora-r",
        "4",
        "--seed",
        "7",
        "--max-steps",
        "3",
        "--backend",
        "candle",
    ];
    for t in TRAINERS {
        let from_flags = resolved(t, &flags(t, &out, &as_flags)).unwrap();
        let from_file =
            resolved(t, &flags(t, &out, &["--config", toml.to_str().unwrap()])).unwrap();
        let from_section =
            resolved(t, &flags(t, &out, &["--config", section.to_str().unwrap()])).unwrap();
        assert_eq!(from_flags.warmup_ratio, Some(0.1), "{t}");
        assert_eq!(
            (from_flags.adam_beta2, from_flags.adamw().beta2),
            (0.95, 0.95),
            "{t}"
        );
        assert_eq!(from_flags.lora.as_ref().map(|l| l.r), Some(4), "{t}");
        assert_eq!((from_flags.seed, from_flags.max_steps), (7, Some(3)), "{t}");
        assert_eq!(from_flags.backend, rlhf_model::Backend::Candle, "{t}");
        assert_eq!(
            from_file, from_flags,
            "{t}: the TOML keys mean what the flags mean"
        );
        assert_eq!(from_section, from_flags, "{t}: [lora] r means lora_r");
        // The loop reads the same values.
        let l = rlhf_train::trainer::LoopSettings::new(
            from_flags.clone(),
            None,
            1,
            serde_json::Value::Null,
            Vec::new(),
        );
        assert_eq!(
            (l.train.seed, l.train.max_steps, l.train.warmup()),
            (7, Some(3), rlhf_train::schedule::Warmup::Ratio(0.1)),
            "{t}"
        );
        // A flag overrides the file's key.
        let both = resolved(
            t,
            &flags(
                t,
                &out,
                &["--config", toml.to_str().unwrap(), "--adam-beta2", "0.9"],
            ),
        )
        .unwrap();
        assert_eq!((both.adam_beta2, both.seed), (0.9, 7), "{t}");
    }
}

#[test]
fn unset_shared_keys_take_each_trainers_defaults_and_help_shows_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // (learning_rate, num_train_epochs, logging_steps, save_steps): TRL's SFTConfig, RewardConfig, DPOConfig;
    // the online trainers log every step and save no checkpoints unless asked.
    let want = [
        ("sft", 2e-5, 3.0, 10, 500),
        ("rm", 1e-4, 1.0, 10, 500),
        ("dpo", 1e-6, 1.0, 10, 500),
        ("grpo", 1e-6, 1.0, 1, 0),
        ("rloo", 1e-6, 1.0, 1, 0),
        ("ppo", 1e-6, 1.0, 1, 0),
    ];
    for (t, lr, epochs, logging, save) in want {
        let c = resolved(t, &flags(t, &out, &[])).unwrap();
        assert_eq!(
            (
                c.learning_rate,
                c.num_train_epochs,
                c.logging_steps,
                c.save_steps
            ),
            (lr, epochs, logging, save),
            "{t}"
        );
        assert_eq!(
            (
                c.adam_beta1,
                c.adam_beta2,
                c.adam_epsilon,
                c.weight_decay,
                c.max_grad_norm
            ),
            (0.9, 0.999, 1e-8, 0.0, 1.0),
            "{t}"
        );
        assert_eq!(
            (
                c.warmup_ratio,
                c.lora.is_none(),
                c.seed,
                c.resume,
                c.bf16,
                c.backend
            ),
            (None, true, 42, false, false, rlhf_model::Backend::Engine),
            "{t}"
        );
        let h = help(t);
        for shown in [
            format!("[default: {lr:e}]"),
            format!("[default: {save}]"),
            "--lora-r".to_string(),
            "--adam-beta2".to_string(),
        ] {
            assert!(h.contains(&shown), "{t} --help lacks {shown}:\n{h}");
        }
    }
}

#[test]
fn bad_shared_keys_and_values_name_file_line_and_key_for_every_trainer() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let toml = tmp.path().join("bad.toml");
    let with_file = |t: &str, body: &str| {
        std::fs::write(&toml, body).unwrap();
        resolved(t, &flags(t, &out, &["--config", toml.to_str().unwrap()]))
            .unwrap_err()
            .to_string()
    };
    for t in TRAINERS {
        let e = with_file(t, "seed = 1\nlora_rank = 4\n");
        assert!(
            e.contains("bad.toml:2")
                && e.contains("\"lora_rank\"")
                && e.contains("unknown key")
                && e.contains("lora_r,"),
            "{t}: {e}"
        );
        let e = with_file(t, "seed = 1\n\nwarmup_ratio = \"a tenth\"\n");
        assert!(
            e.contains("bad.toml:3")
                && e.contains("\"warmup_ratio\"")
                && e.contains("invalid type"),
            "{t}: {e}"
        );
        let e = with_file(t, "[lora]\nalpha = 16.0\nrank = 4\n");
        assert!(
            e.contains("bad.toml:3") && e.contains("\"lora.rank\"") && e.contains("unknown key"),
            "{t}: {e}"
        );
        let e = with_file(t, "seed = 1\nbackend = \"torch\"\n");
        assert!(
            e.contains("bad.toml:2")
                && e.contains("\"backend\"")
                && e.contains("`engine` or `candle`"),
            "{t}: {e}"
        );
        let e = with_file(t, "learning_rate = nan\n");
        assert!(
            e.contains("bad.toml:1") && e.contains("\"learning_rate\"") && e.contains("finite"),
            "{t}: {e}"
        );
        // Values of the right type but out of range name the key and the file (a flag may have set it).
        let e = with_file(t, "max_steps = 10\nadam_beta2 = 1.5\n");
        assert!(
            e.contains("bad.toml:2 (or the command line)")
                && e.contains("\"adam_beta2\"")
                && e.contains("[0, 1)"),
            "{t}: {e}"
        );
        let e = resolved(
            t,
            &flags(t, &out, &["--warmup-ratio", "0.1", "--warmup-steps", "3"]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("command line") && e.contains("\"warmup_ratio\""),
            "{t}: {e}"
        );
        assert!(
            resolved(t, &flags(t, &out, &["--learning-rate", "nan"])).is_err(),
            "{t}: NaN flag accepted"
        );
    }
}
