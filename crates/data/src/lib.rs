//! Datasets for the RLHF trainers and the feedback app: TRL's JSONL/Parquet formats (defined once, in
//! [`formats`]), validation with `file:line: field "x": ...` errors ([`DataError`]), Hugging Face tokenizer
//! directories and chat templates (transformers-exact), SFT / preference / prompt tokenization as TRL 1.16 does
//! it, packing, right-padded batches as plain vectors, and a resumable shuffling sampler.
//!
//! ```
//! use rlhf_data::{collate, load_dataset, tokenize_sft, EpochSampler, SftConfig, Tokenizer};
//!
//! let tokenizer = Tokenizer::from_dir("../../fixtures/tokenizer")?;
//! let dataset = load_dataset("../../data/sft_train.jsonl")?; // prompt/completion rows
//! let sft = tokenize_sft(&dataset, &tokenizer, &SftConfig::default())?;
//! let mut sampler = EpochSampler::new(sft.rows.len(), 1234, true);
//! let rows: Vec<_> = sampler.next_batch(8, false).into_iter().map(|i| &sft.rows[i]).collect();
//! let batch = collate(&rows, tokenizer.pad_id()?, None);
//! assert_eq!(batch.batch_size, 8);
//! assert!(batch.num_loss_tokens >= 16); // " c</s>" of each row: at least 2 trained tokens
//! # Ok::<(), rlhf_data::DataError>(())
//! ```

pub mod batch;
pub mod chat_template;
pub mod dataset;
pub mod error;
pub mod formats;
pub mod jsonl;
pub mod parquet;
pub mod preference;
pub mod prompts;
pub mod sft;
pub mod tokenizer;

pub use batch::{
    collate, collate_preference, EpochSampler, PreferenceBatch, SamplerState, TokenBatch,
};
pub use chat_template::{ChatTemplate, Rendered};
pub use dataset::{load_dataset, load_dataset_with, Dataset};
pub use error::{DataError, Position, Result};
pub use formats::{
    Conversational, Correction, Format, ImplicitPreference, LanguageModeling, LoadOptions, Message,
    Preference, PromptCompletion, PromptOnly, Rating, Record, Row, ScoreScale, Text, Unpaired,
};
pub use preference::{
    tokenize_completion, tokenize_pair, tokenize_preferences, CompletionExample, PreferenceExample,
};
pub use prompts::{tokenize_prompt, tokenize_prompts};
pub use sft::{
    tokenize_sft, tokenize_sft_record, Packing, SftConfig, SftData, TokenizedSequence, Truncation,
    IGNORE,
};
pub use tokenizer::{
    train_bpe, BpeConfig, ChatTokens, SpecialToken, Tokenizer, DEFAULT_CHAT_TEMPLATE,
};
