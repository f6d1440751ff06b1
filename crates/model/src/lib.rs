//! Hugging Face–compatible causal language models on candle (CPU first): Llama, Qwen2, Mistral and
//! GPT-2 with fused differentiable CPU ops, safetensors load/save in the `transformers` layout, and
//! batched KV-cache generation.
//!
//! All parameters are f32 [`candle_core::Var`]s in a [`candle_nn::VarMap`] under their HF names.

pub mod arch;
pub mod attention;
pub mod bench;
pub mod bf16;
mod decoder;
pub mod engine;
pub mod generate;
pub mod io;
pub mod linear;
pub mod lora;
mod matmul;
pub mod ops;
mod pack_cache;
pub mod par;
pub mod seq_cls;

/// Declares the architecture modules and the one table that lists them ([`ARCHITECTURES`]).
macro_rules! architectures {
    ($($module:ident),* $(,)?) => {
        $(mod $module;)*
        /// Every supported architecture, in the order error messages list them. Adding one: a module
        /// defining `ARCH` and its name here (docs/architectures.md).
        pub static ARCHITECTURES: &[&ArchInfo] = &[$(&$module::ARCH),*];
    };
}
architectures!(llama, qwen2, mistral, gpt2);

pub use arch::ArchInfo;
pub use attention::KvCache;
pub use bf16::Precision;
pub use engine::{apart, backward, Backend};
pub use generate::{
    generate, Decode, Decoder, FinishReason, GenOutput, GenRequest, Sampling, SeqId, StepToken,
};
pub use linear::{Linear, LinearAdapter, LowRankAdapter, WeightLayout};
pub use ops::token_logprobs;
pub use pack_cache::weights_changed;

use arch::{Arch, Network};
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// A parsed `config.json`: its architecture's typed view plus the original JSON, which
/// [`CausalLm::save`] writes back (so fields this crate does not use survive a round trip).
#[derive(Debug, Clone)]
pub struct ModelConfig {
    info: &'static ArchInfo,
    arch: Arc<dyn Arch>,
    pub raw: Value,
}

/// Deserializes `raw` (a config.json) into `T`, naming the file and the field on error.
pub(crate) fn typed<T: serde::de::DeserializeOwned>(raw: &Value, file: &str) -> Result<T> {
    serde_path_to_error::deserialize(raw.clone()).map_err(|e| {
        candle_core::Error::Msg(format!("{file}: field \"{}\": {}", e.path(), e.inner()))
    })
}

impl ModelConfig {
    /// Parses a config; `file` names its origin in error messages.
    pub fn from_json(raw: Value, file: &str) -> Result<Self> {
        if !raw.is_object() {
            bail!("{file}: expected a JSON object")
        }
        check_values(&raw, file)?;
        let arch_field = raw
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str());
        let supported = |name: fn(&ArchInfo) -> &str| {
            ARCHITECTURES
                .iter()
                .map(|a| name(a))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let info = match (raw.get("model_type"), arch_field) {
            (Some(Value::String(t)), _) => match ARCHITECTURES.iter().find(|a| a.model_type == t) {
                Some(info) => *info,
                None => bail!(
                    "{file}: field \"model_type\": unsupported architecture \"{t}\" (supported: {})",
                    supported(|a| a.model_type)
                ),
            },
            (Some(other), _) => bail!("{file}: field \"model_type\": expected a string, got {other}"),
            (None, Some(a)) => match ARCHITECTURES.iter().find(|info| info.has_class(a)) {
                Some(info) => *info,
                None => bail!(
                    "{file}: field \"architectures\": unsupported architecture \"{a}\" (supported: {})",
                    supported(|a| a.causal_lm)
                ),
            },
            (None, None) => bail!("{file}: neither field \"model_type\" nor \"architectures\" is present"),
        };
        let arch = (info.parse)(&raw, file)?;
        let config = Self { info, arch, raw };
        config.check_size(file)?;
        Ok(config)
    }

    /// Refuses a model whose f32 parameters alone would not fit in the memory available now, before
    /// anything is allocated (otherwise the process aborts on a failed allocation or is OOM-killed).
    fn check_size(&self, file: &str) -> Result<()> {
        let params = self.param_specs().iter().try_fold(0u64, |acc, s| {
            s.shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
                .and_then(|n| acc.checked_add(n))
        });
        let bytes = params.and_then(|p| p.checked_mul(4));
        let available = available_memory_bytes();
        match (bytes, available) {
            (Some(b), Some(avail)) if b <= avail => Ok(()),
            (Some(_), None) => Ok(()),
            (b, avail) => bail!(
                "{file}: the model needs {} of memory for its f32 parameters alone, more than the {} available; check vocab_size, hidden_size, intermediate_size and num_hidden_layers",
                b.map_or("more than 2^64 bytes".to_string(), gib),
                avail.map_or("?".to_string(), gib)
            ),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let raw = io::read_json(path)?;
        Self::from_json(raw, &path.display().to_string())
    }

    /// The registration of this config's architecture (names, LoRA defaults).
    pub fn arch_info(&self) -> &'static ArchInfo {
        self.info
    }

    pub fn model_type(&self) -> &'static str {
        self.info.model_type
    }

    pub fn vocab_size(&self) -> usize {
        self.arch.dims().vocab
    }

    pub fn hidden_size(&self) -> usize {
        self.arch.dims().hidden
    }

    pub fn num_layers(&self) -> usize {
        self.arch.dims().layers
    }

    /// `max_position_embeddings` (GPT-2: `n_positions`), or the architecture's default when absent.
    pub fn max_position_embeddings(&self) -> usize {
        self.arch.dims().max_positions
    }

    pub fn tie_word_embeddings(&self) -> bool {
        self.arch.dims().tie_word_embeddings
    }

    fn token_ids(&self, field: &str) -> Vec<u32> {
        ids_field(&self.raw, field)
    }

    /// `eos_token_id` of config.json (an int or a list); empty when absent.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.token_ids("eos_token_id")
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.token_ids("bos_token_id").first().copied()
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.token_ids("pad_token_id").first().copied()
    }

    /// Every parameter of the model: HF name, shape and HF-style initialisation.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        self.arch.param_specs()
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// `MemAvailable` of /proc/meminfo (None where there is no such file).
fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Values that parse but can only produce NaN, a division by zero or an empty model: sizes of 0,
/// non-positive epsilons and RoPE bases. Checked on the raw JSON so every architecture's names are covered.
fn check_values(raw: &Value, file: &str) -> Result<()> {
    const SIZES: [&str; 13] = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "n_embd",
        "n_layer",
        "n_head",
        "n_positions",
        "n_inner",
    ];
    const POSITIVE: [&str; 3] = ["rms_norm_eps", "layer_norm_epsilon", "rope_theta"];
    for key in SIZES {
        if raw.get(key).and_then(Value::as_u64) == Some(0) {
            bail!("{file}: field \"{key}\": must be at least 1, got 0")
        }
    }
    // RoPE settings may also sit in a `rope_parameters` / `rope_scaling` object (transformers ≥ 4.56).
    let sections = [
        ("", Some(raw)),
        ("rope_parameters.", raw.get("rope_parameters")),
        ("rope_scaling.", raw.get("rope_scaling")),
    ];
    for (prefix, section) in sections {
        for key in POSITIVE {
            if let Some(v) = section.and_then(|o| o.get(key)).and_then(Value::as_f64) {
                if !(v.is_finite() && v > 0.0) {
                    bail!("{file}: field \"{prefix}{key}\": must be a finite number > 0, got {v}")
                }
            }
        }
    }
    if let Some(v) = raw.get("initializer_range").and_then(Value::as_f64) {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{file}: field \"initializer_range\": must be a finite number >= 0, got {v}")
        }
    }
    Ok(())
}

/// A token-id field that may be an int or a list of ints (negative ids, e.g. -1 = "none", are dropped).
fn ids_field(v: &Value, field: &str) -> Vec<u32> {
    match v.get(field) {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        _ => vec![],
    }
}

/// How a parameter is initialised by [`CausalLm::init_random`] (as `transformers`' `_init_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    pub(crate) fn new(name: &str, shape: &[usize], init: Init) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            init,
        }
    }
}

/// Parameter tensors by name, for building a model.
pub(crate) struct Params(HashMap<String, Tensor>);

impl Params {
    pub(crate) fn get(&self, name: &str) -> Result<Tensor> {
        match self.0.get(name) {
            Some(t) => Ok(t.clone()),
            None => bail!("internal error: parameter `{name}` missing from the VarMap"),
        }
    }
}

/// Token positions of a forward pass.
pub(crate) enum Positions<'a> {
    /// `start, start+1, ...` for every row.
    Range(usize),
    /// Explicit `[b, t]` ids (u32 or i64).
    Ids(&'a Tensor),
}

impl Positions<'_> {
    /// Row-major positions and the number of distinct rows (1 when shared by the batch).
    pub(crate) fn resolve(&self, b: usize, t: usize) -> Result<(Vec<u32>, usize)> {
        match self {
            Positions::Range(s) => Ok(((*s as u32..(*s + t) as u32).collect(), 1)),
            Positions::Ids(p) => {
                if p.dims() != [b, t] {
                    bail!(
                        "position_ids has shape {:?}, expected [{b}, {t}] like input_ids",
                        p.dims()
                    )
                }
                Ok((p.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?, b))
            }
        }
    }
}

/// Hidden states of `net` (a model's network or its [`CausalLm::inference_copy`]) on the engine
/// where `backend` asks for it and the network has a stack that runs the pass (with or without a
/// cache), else on the candle graph.
pub(crate) fn network_hidden(
    net: &dyn Network,
    backend: Backend,
    input_ids: &Tensor,
    pos: &Positions,
    mut cache: Option<&mut KvCache>,
) -> Result<Tensor> {
    if backend == Backend::Engine && ops::fused_enabled() {
        let engine = match cache.as_deref_mut() {
            None => net.hidden_engine(input_ids, pos, None, None),
            Some(c) => net.hidden_engine_cached(input_ids, pos, c),
        };
        if let Some(hidden) = engine {
            return hidden;
        }
    }
    net.hidden(input_ids, pos, cache)
}

/// Low bits of an attention group id ([`CausalLm::hidden_states_grouped`]) that number a
/// member of its unit; the bits above number the unit in its row.
pub const GROUP_MEMBER_BITS: u32 = 16;

/// The attention group id of `member` (0: the prefix; g > 0: the g-th sequence behind it) of
/// the `unit`-th unit of a row ([`CausalLm::hidden_states_grouped`]).
pub fn attention_group(unit: u32, member: u32) -> u32 {
    debug_assert!(member < 1 << GROUP_MEMBER_BITS && unit < 1 << (32 - GROUP_MEMBER_BITS));
    (unit << GROUP_MEMBER_BITS) | member
}

/// Whether a token of group `query` sees (earlier) tokens of group `key`: its own group's and
/// its unit's prefix (member 0).
pub(crate) fn group_sees(query: u32, key: u32) -> bool {
    key == query || key == query >> GROUP_MEMBER_BITS << GROUP_MEMBER_BITS
}

/// A causal LM (`*ForCausalLM` / `GPT2LMHeadModel`) whose parameters live in a `VarMap`.
pub struct CausalLm {
    config: ModelConfig,
    varmap: VarMap,
    inner: Box<dyn Network>,
    device: Device,
    generation_config: Option<Value>,
    precision: Precision,
    backend: Backend,
}

impl CausalLm {
    /// Loads `dir/config.json` and `dir/model.safetensors` (or the shards listed in
    /// `dir/model.safetensors.index.json`), plus `generation_config.json` when present.
    /// Weights stored as bf16/f16/f64 are converted to f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        io::load(dir, device)
    }

    /// Randomly initialised model for the config at `path` (HF-style init, see [`Init`]).
    pub fn from_config_file(path: &Path, seed: u64, device: &Device) -> Result<Self> {
        Self::init_random(ModelConfig::from_file(path)?, seed, device)
    }

    /// Randomly initialised model: normal(0, initializer_range) for matrices and embeddings,
    /// zeros for biases, ones for norm weights (GPT-2 residual projections scaled by
    /// 1/sqrt(2·n_layer)). Deterministic in `seed`.
    pub fn init_random(config: ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for spec in config.param_specs() {
            let n: usize = spec.shape.iter().product();
            let data: Vec<f32> = match spec.init {
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
                Init::Normal(std) => (0..n).map(|_| (normal(&mut rng) * std) as f32).collect(),
            };
            tensors.insert(
                spec.name.clone(),
                Tensor::from_vec(data, spec.shape.clone(), device)?,
            );
        }
        Self::from_tensors(config, tensors, None, device, "init_random")
    }

    /// Builds a model from f32 tensors named as in HF checkpoints. Every parameter of
    /// `config.param_specs()` must be present with the right shape; `source` names where the
    /// tensors came from in error messages.
    pub fn from_tensors(
        config: ModelConfig,
        mut tensors: HashMap<String, Tensor>,
        generation_config: Option<Value>,
        device: &Device,
        source: &str,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("VarMap lock poisoned");
            for spec in config.param_specs() {
                let t = match tensors.remove(&spec.name) {
                    Some(t) => t,
                    None => bail!("missing tensor `{}` in {source}", spec.name),
                };
                if t.dims() != spec.shape.as_slice() {
                    bail!(
                        "{source}: tensor `{}` has shape {:?}, but config.json implies {:?}",
                        spec.name,
                        t.dims(),
                        spec.shape
                    )
                }
                let t = t.to_dtype(DType::F32)?.to_device(device)?;
                data.insert(spec.name, Var::from_tensor(&t)?);
            }
        }
        if let Some(extra) = tensors.keys().find(|k| !io::ignorable_tensor(k, &config)) {
            bail!(
                "{source}: unexpected tensor `{extra}` (not a parameter of a {} model with this config.json)",
                config.model_type()
            )
        }
        let inner = build_inner(&config, &varmap, true)?;
        Ok(Self {
            config,
            varmap,
            inner,
            device: device.clone(),
            generation_config,
            precision: Precision::Fp32,
            backend: Backend::default(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size()
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// All parameters (f32 `Var`s) under their HF safetensors names; a tied `lm_head` is not a
    /// separate entry.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    pub fn num_parameters(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    pub fn generation_config(&self) -> Option<&Value> {
        self.generation_config.as_ref()
    }

    /// End-of-sequence ids for [`GenRequest::stop_ids`]: `eos_token_id` of
    /// generation_config.json (as `transformers.generate` uses) or else of config.json.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let from_gen = self
            .generation_config
            .as_ref()
            .map(|g| ids_field(g, "eos_token_id"))
            .unwrap_or_default();
        if from_gen.is_empty() {
            self.config.eos_token_ids()
        } else {
            from_gen
        }
    }

    /// Hidden states after the final norm, `[b, t, hidden]`. `input_ids`: u32 `[b, t]`.
    /// Attention is plain causal (right-padded batches are correct for their real tokens);
    /// `position_ids` (`[b, t]`, u32 or i64) only changes the positions (e.g. packing restarts).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        position_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let pos = match position_ids {
            Some(p) => Positions::Ids(p),
            None => Positions::Range(0),
        };
        self.hidden_with_cache(input_ids, &pos, None)
    }

    /// Hidden states `[b, t, hidden]` of rows that each pack units, a unit being a prefix with
    /// sequences behind it, so that each prefix runs once and short units share a row: `groups`
    /// (`[b, t]` row-major) gives each token's [`attention_group`]`(unit, member)`, member 0 for
    /// the unit's prefix (every token of the unit sees it, causally) and g > 0 for one sequence
    /// (its tokens see their prefix and their own earlier tokens only); `position_ids` continue
    /// each sequence from its prefix. Each sequence's hidden states are those of running
    /// prefix ++ sequence as a row of its own. Engine only ([`CausalLm::attends_by_group`]).
    pub fn hidden_states_grouped(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        groups: &[u32],
    ) -> Result<Tensor> {
        let refuse = || {
            candle_core::Error::Msg(format!(
                "attention groups (shared prompts packed in one row) run on the engine only, not on this model's {} backend / architecture: run one row per sequence (hidden_states) instead",
                self.backend.name()
            ))
        };
        if !self.attends_by_group() {
            return Err(refuse());
        }
        self.inner
            .hidden_engine(input_ids, &Positions::Ids(position_ids), Some(groups), None)
            .unwrap_or_else(|| Err(refuse()))
    }

    /// The hidden states `[n, hidden]` of the `n` tokens `at` picks (flat indices into the
    /// `[b, t]` batch, any order, repeats allowed): what an LM head or value head reads when only
    /// some positions carry a loss. The states are those of [`CausalLm::hidden_states`] (or of
    /// [`CausalLm::hidden_states_grouped`] with `groups`, which need `position_ids`); on the
    /// engine the last block runs its output projection and MLP on the picked tokens alone.
    pub fn hidden_states_at(
        &self,
        input_ids: &Tensor,
        position_ids: Option<&Tensor>,
        groups: Option<&[u32]>,
        at: &Tensor,
    ) -> Result<Tensor> {
        let want: Vec<u32> = at.to_dtype(candle_core::DType::U32)?.to_vec1()?;
        let mut rows = want.clone();
        rows.sort_unstable();
        rows.dedup();
        let pos = match position_ids {
            Some(p) => Positions::Ids(p),
            None => Positions::Range(0),
        };
        let engine = match (groups, position_ids) {
            (Some(_), None) => bail!("hidden_states_at: attention groups need position ids"),
            (Some(g), Some(_)) if self.attends_by_group() => {
                self.inner
                    .hidden_engine(input_ids, &pos, Some(g), Some(&rows))
            }
            (None, _) if self.backend == Backend::Engine && ops::fused_enabled() => {
                self.inner.hidden_engine(input_ids, &pos, None, Some(&rows))
            }
            _ => None,
        };
        let Some(picked) = engine else {
            let all = match (groups, position_ids) {
                (Some(g), Some(p)) => self.hidden_states_grouped(input_ids, p, g)?,
                _ => self.hidden_states(input_ids, position_ids)?,
            };
            let (b, t, h) = all.dims3()?;
            return all.reshape((b * t, h))?.index_select(at, 0);
        };
        let picked = picked?;
        if rows == want {
            return Ok(picked);
        }
        // Each wanted token's place among the distinct ascending ones.
        let place: Vec<u32> = want
            .iter()
            .map(|w| rows.partition_point(|r| r < w) as u32)
            .collect();
        picked.index_select(&Tensor::new(place, at.device())?, 0)
    }

    /// Whether [`CausalLm::hidden_states_grouped`] runs on this model: the engine backend and an
    /// architecture whose stack it runs (no sliding window).
    pub fn attends_by_group(&self) -> bool {
        self.backend == Backend::Engine && ops::fused_enabled() && self.inner.attends_by_group()
    }

    /// Incremental forward for custom decoding loops ([`generate`] is the ready-made one):
    /// hidden states of `input_ids` `[b, t]` at `position_ids` `[b, t]`, attending to what
    /// `cache` (from [`CausalLm::new_kv_cache`]) already holds. Call `cache.begin_step(t)` before
    /// and `cache.end_step()` after. Not differentiable through the cache.
    pub fn hidden_states_cached(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.hidden_with_cache(input_ids, &Positions::Ids(position_ids), Some(cache))
    }

    pub(crate) fn hidden_with_cache(
        &self,
        input_ids: &Tensor,
        pos: &Positions,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        network_hidden(&*self.inner, self.backend, input_ids, pos, cache)
    }

    fn lm_head(&self) -> &Linear {
        self.inner.lm_head()
    }

    /// The network with every linear layer replaced by its [`Linear::inference_copy`] (used by
    /// generation; no gradients flow through it).
    pub(crate) fn inference_copy(&self) -> Result<Box<dyn Network>> {
        let mut inner = self.inner.clone();
        // Across layers at once: at bf16 each copy converts its weight, and one small weight
        // alone does not keep both cores busy.
        let mut linears = inner.linears_mut();
        // No training forward takes the LM head's conversion (the head's log-prob op converts its
        // weight a vocabulary chunk at a time): keeping it would hold memory.
        let copies = crate::par::map(linears.len(), |i| {
            let (name, l) = &linears[i];
            l.inference_copy_keeping(name != "lm_head")
        });
        for ((_, l), c) in linears.iter_mut().zip(copies) {
            **l = c?;
        }
        Ok(inner)
    }

    /// Logits `[.., vocab]` of hidden states `[.., hidden]` (tied or separate `lm_head`).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head().forward(hidden)
    }

    /// Per-token log-probabilities `log_softmax(lm_head(hidden))[targets]`: `hidden` `[.., hidden]`
    /// (from [`CausalLm::hidden_states`]), u32/i64 `targets` `[..]` → f32 `[..]`, differentiable wrt
    /// the hidden states and the head weight. This is the trainers' seam: on CPU the head and the
    /// log-softmax run in vocabulary chunks forward and backward ([`ops::lm_head_logprobs`]), so
    /// the `[.., vocab]` logits and their gradient never exist. A head with a bias or an adapter
    /// (LoRA on `lm_head`) goes through the full logits.
    pub fn token_logprobs_from_hidden(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Ok(self.token_logprobs_and_argmax(hidden, targets)?.0)
    }

    /// [`CausalLm::token_logprobs_from_hidden`] and the most likely token at every position (u32
    /// `[..]`, not differentiable; e.g. for token accuracy), from the same pass over the head.
    pub fn token_logprobs_and_argmax(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let head = self.lm_head();
        if head.bias.is_none() && head.adapter.is_none() && head.layout == WeightLayout::OutIn {
            return ops::lm_head_logprobs(hidden, &head.weight, targets, head.precision);
        }
        let logits = self.logits(hidden)?;
        Ok((
            ops::token_logprobs(&logits, targets)?,
            logits.argmax(candle_core::D::Minus1)?,
        ))
    }

    /// Logits `[b, t, vocab]` of u32 `input_ids` `[b, t]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.logits(&self.hidden_states(input_ids, None)?)
    }

    /// A preallocated KV cache for `batch` rows of up to `capacity` positions.
    pub fn new_kv_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let (layers, kv_heads, head_dim) = self.inner.kv_shape();
        KvCache::new(layers, batch, kv_heads, head_dim, capacity, &self.device)
    }

    /// Writes `config.json`, `model.safetensors` (f32) and `generation_config.json` (the loaded one, or the
    /// special-token ids of config.json as `transformers` derives it) to `dir`, each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        io::save(self, dir)
    }

    /// An independent copy (new `Var`s), e.g. a frozen reference model.
    pub fn duplicate(&self) -> Result<Self> {
        let tensors = self
            .varmap
            .data()
            .lock()
            .expect("VarMap lock poisoned")
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let mut copy = Self::from_tensors(
            self.config.clone(),
            tensors,
            self.generation_config.clone(),
            &self.device,
            "duplicate",
        )?;
        copy.set_precision(self.precision);
        copy.backend = self.backend;
        Ok(copy)
    }

    /// Precision of every linear layer's matrix products, LM head included, forward and backward
    /// (`torch.autocast("cpu", bfloat16)`'s scope): bf16 operands with f32 accumulation, while the
    /// parameters, their gradients, the optimizer and all other ops stay f32. Generation
    /// ([`generate`], [`Decoder`]) converts the weights to bf16 once when it starts.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
        for (_, l) in self.inner.linears_mut() {
            l.precision = precision;
        }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// How [`CausalLm::hidden_states`] is computed: the engine's hand-written passes (default,
    /// where the architecture has them) or candle's graph. Losses of a model on the engine are
    /// differentiated with [`backward`].
    pub fn set_backend(&mut self, backend: Backend) {
        self.backend = backend;
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// With `false`, the forward pass uses detached views of the parameters, so no gradient is
    /// computed for them (frozen base under an adapter, reference models). Rebuilds the layers:
    /// call it before attaching adapters.
    pub fn set_trainable(&mut self, trainable: bool) -> Result<()> {
        self.inner = build_inner(&self.config, &self.varmap, trainable)?;
        self.set_precision(self.precision);
        Ok(())
    }

    /// The LoRA seam: every linear layer (HF module name, e.g.
    /// `model.layers.0.self_attn.q_proj`, and `lm_head`) for attaching a [`LinearAdapter`].
    /// When embeddings are tied, `lm_head` shares the embedding weight.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.inner.linears_mut()
    }
}

impl std::fmt::Debug for CausalLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLm")
            .field("model_type", &self.config.model_type())
            .field("num_parameters", &self.num_parameters())
            .field("device", &self.device)
            .finish()
    }
}

fn build_inner(config: &ModelConfig, varmap: &VarMap, trainable: bool) -> Result<Box<dyn Network>> {
    let params = Params(
        varmap
            .data()
            .lock()
            .expect("VarMap lock poisoned")
            .iter()
            .map(|(k, v)| {
                let t = if trainable {
                    v.as_tensor().clone()
                } else {
                    v.as_detached_tensor()
                };
                (k.clone(), t)
            })
            .collect(),
    );
    config.arch.build(&params)
}

/// Standard normal sample (Box–Muller), so initialisation needs no extra crate.
fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Call once at program start, before any other thread exists (it sets environment variables).
///
/// * Raises glibc malloc's mmap/trim thresholds so that candle's per-op buffers are recycled from
///   the heap instead of being mmap'ed and unmapped on every op (with the defaults this took about
///   half of an AdamW step).
/// * Caps malloc at two arenas (unless `MALLOC_ARENA_MAX` is set): each engine thread otherwise
///   grows an arena of its own that, under the raised trim threshold, never shrinks; measured on
///   `rlhf bench ppo` (tiny): peak RSS 264 MB with the default arenas, 249 MB with two.
/// * Sets `RAYON_NUM_THREADS` (when unset) to the available parallelism: candle looks the thread
///   count up on every matmul and otherwise derives it by parsing `/proc/cpuinfo` each time.
/// * Sets `CANDLE_NUM_THREADS=1` (when unset): candle's own gemms still use all cores through
///   rayon, but candle's element-wise ops stay on the calling thread. Its spin-waiting worker pool made the
///   backward pass (mostly gradient additions) 2-3x slower whenever another process competed for
///   the cores, and memory-bound element-wise ops gain little from a second thread.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters.
    unsafe {
        // 32 MiB is glibc's upper limit for the mmap threshold on 64-bit targets.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
