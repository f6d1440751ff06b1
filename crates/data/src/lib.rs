//! Datasets for the RLHF trainers and the feedback app: TRL's JSONL/Parquet formats (defined once, in
//! [`formats`]), validation with file:line:field errors, tokenizers, chat templates, SFT/preference
//! tokenization and batching.

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
