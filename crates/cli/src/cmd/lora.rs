//! `rlhf lora merge`: a PEFT LoRA adapter folded into its base model, written as a complete model directory.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args as ClapArgs, Subcommand};

#[derive(Subcommand)]
pub enum LoraCommand {
    /// Fold a LoRA adapter (PEFT layout: adapter_config.json + adapter_model.safetensors) into its base model.
    Merge(MergeArgs),
}

#[derive(ClapArgs)]
pub struct MergeArgs {
    /// Adapter directory (e.g. a LoRA run's `output_dir/adapter`, or a checkpoint's adapter).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Base model directory [default: the adapter's `base_model_name_or_path`].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output directory for the merged model (must not be the base nor hold a model).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(c: LoraCommand) -> Result<()> {
    match c {
        LoraCommand::Merge(a) => {
            let base = rlhf_train::lora::merge_adapter(&a.adapter, a.model.as_deref(), &a.out)?;
            eprintln!(
                "merged {} into {} → {}",
                a.adapter.display(),
                base.display(),
                a.out.display()
            );
        }
    }
    Ok(())
}
