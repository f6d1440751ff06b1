//! `rlhf sft`: supervised fine-tuning on demonstrations (settings from `--config sft.toml` and/or flags).

use anyhow::Result;
use rlhf_train::{run_sft, SftArgs};

use super::settings::{settings, Raw};

pub fn run(raw: Raw) -> Result<()> {
    let cfg = settings::<SftArgs>("rlhf sft", &raw)?.resolve()?;
    let summary = run_sft(&cfg)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
