//! `rlhf sft`: supervised fine-tuning on demonstrations (settings from `--config sft.toml` and/or flags).

use anyhow::Result;
use rlhf_train::{run_sft, SftArgs};

pub fn run(args: SftArgs) -> Result<()> {
    let cfg = args.resolve()?;
    let summary = run_sft(&cfg)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
