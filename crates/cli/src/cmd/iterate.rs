//! `rlhf iterate --config iterate.toml`: rounds of sample → label → DPO → evaluate (library: `rlhf-iterate`).

use anyhow::Result;
use rlhf_iterate::IterateArgs;

use super::settings::{settings, Raw};

pub fn run(raw: Raw) -> Result<()> {
    let s = rlhf_iterate::run(&settings::<IterateArgs>("rlhf iterate", &raw)?)?;
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}
