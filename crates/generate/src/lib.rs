//! Generation from a model directory: the model and its tokenizer loaded together, prompts encoded as
//! the trainers encode them, and batched sampling with EOS / stop-string handling. Used by `rlhf generate`,
//! the online-RL rollouts, evaluation, the sandbox and the server.

use std::path::Path;

use anyhow::Result;
use candle_core::Device;
use rlhf_data::{Text, Tokenizer};
use rlhf_model::{generate, CausalLm, GenOutput, GenRequest};

/// A loaded model and its tokenizer, with prompt encoding as training sees it.
pub struct Generator {
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
}

impl Generator {
    pub fn load(dir: &Path) -> Result<Self> {
        let model = CausalLm::load(dir, &Device::Cpu)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        Self::new(model, tokenizer, &dir.join("config.json"))
    }

    /// Pairs an already loaded model with its tokenizer; `config` names the model's config in errors.
    pub fn new(model: CausalLm, tokenizer: Tokenizer, config: &Path) -> Result<Self> {
        // Otherwise a prompt token past the embedding table fails deep in the forward pass with no file named.
        tokenizer.check_vocab(model.vocab_size(), config)?;
        Ok(Self { model, tokenizer })
    }

    /// Plain prompts are tokenized with special tokens (as `tokenizer(prompt)`); message lists through the
    /// chat template with the generation prompt (as `apply_chat_template(..., add_generation_prompt=True)`).
    pub fn encode_prompt(&self, prompt: &Text) -> Result<Vec<u32>> {
        Ok(match prompt {
            Text::Plain(s) => self.tokenizer.encode(s, true)?,
            Text::Messages(m) => {
                let rendered = self.tokenizer.apply_chat_template(m, true)?;
                self.tokenizer.encode(&rendered.text, false)?
            }
        })
    }

    /// Generates for `prompts` in batches of `batch_size`; request i samples with `seeds[i]` and stops at
    /// the model's EOS ids. Returns (completion text, output) per prompt, in order.
    pub fn run(
        &self,
        prompts: &[Vec<u32>],
        seeds: &[u64],
        template: &GenRequest,
        batch_size: usize,
    ) -> Result<Vec<(String, GenOutput)>> {
        anyhow::ensure!(
            prompts.len() == seeds.len(),
            "{} prompts but {} seeds",
            prompts.len(),
            seeds.len()
        );
        let eos = self.model.config().eos_token_ids();
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, true).unwrap_or_default();
        let mut out = Vec::with_capacity(prompts.len());
        for (chunk, seed_chunk) in prompts
            .chunks(batch_size.max(1))
            .zip(seeds.chunks(batch_size.max(1)))
        {
            let requests: Vec<GenRequest> = chunk
                .iter()
                .zip(seed_chunk)
                .map(|(ids, &seed)| GenRequest {
                    prompt_ids: ids.clone(),
                    seed,
                    stop_ids: eos.clone(),
                    ..template.clone()
                })
                .collect();
            for o in generate(&self.model, &requests, Some(&decode))? {
                out.push((self.tokenizer.decode(&o.tokens, true)?, o));
            }
        }
        Ok(out)
    }
}
