//! LoRA (Hu et al. 2021) adapters on named linear layers, stored in PEFT's layout.
//!
//! `y = W x + (alpha / r) · B A dropout(x)` with `A` `[r, in]` (Kaiming-uniform, as PEFT) and `B` `[out, r]`
//! (zeros, so an attached adapter starts as the identity). The base model is frozen; only the adapters'
//! own [`VarMap`] is handed to the optimizer. Files: `adapter_config.json` (`peft_type` `LORA`) and
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`.

use crate::linear::{LinearAdapter, LowRankAdapter, WeightLayout};
use crate::{io, CausalLm, Linear};
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT prefixes every adapter tensor with the wrapper path of the base model.
const PEFT_PREFIX: &str = "base_model.model.";

/// Adapter hyper-parameters (the `lora` config section / `--lora-*` flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r of the update.
    pub r: usize,
    /// Scaling numerator: the update is multiplied by `alpha / r`.
    pub alpha: f64,
    /// Dropout on the adapter input while training.
    pub dropout: f64,
    /// Module-name suffixes to adapt (PEFT matching: the full name or its last components), e.g. `q_proj`.
    /// Empty: the architecture's default, as PEFT's `target_modules=None` (`q_proj`, `v_proj` for the
    /// Llama family, `c_attn` for GPT-2; [`crate::arch::ArchInfo::lora_targets`]).
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: vec![],
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// PEFT's rule: a target matches the whole module name or a dotted suffix of it.
    pub fn matches(&self, module: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| module == t || module.ends_with(&format!(".{t}")))
    }

    fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("lora: key \"r\": must be at least 1")
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!(
                "lora: key \"dropout\": must be in [0, 1), got {}",
                self.dropout
            )
        }
        Ok(())
    }

    /// This config with empty `target_modules` replaced by `model`'s architecture default.
    fn for_model(&self, model: &CausalLm) -> LoraConfig {
        let mut c = self.clone();
        if c.target_modules.is_empty() {
            c.target_modules = model
                .config()
                .arch_info()
                .lora_targets
                .iter()
                .map(|t| t.to_string())
                .collect();
        }
        c
    }
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of `x`.
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The dropout masks of one adapted layer, reproducible from a seed: the k-th mask the layer draws is a pure
/// function of (seed, layer, k), so the layer's whole RNG state is the counter k, which checkpoints store and
/// resume restores. Keying by layer (not by a shared call order) keeps masks fixed however layers are scheduled.
#[derive(Debug)]
struct DropoutStream {
    key: u64,
    calls: Arc<AtomicU64>,
}

impl DropoutStream {
    /// The next mask of the stream for dropout probability `p`.
    fn next(&self, p: f64) -> DropoutMask {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        DropoutMask {
            key: mix64(self.key ^ mix64(call)),
            p,
        }
    }

    /// Inverted dropout of `x` with probability `p` (kept values scaled by 1/(1-p)), as a product with a
    /// constant mask so the gradient flows through the kept elements only.
    fn apply(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let mut mask = vec![0f32; x.elem_count()];
        self.next(p).fill(&mut mask);
        let mask = Tensor::from_vec(mask, x.dims(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

/// One draw of a layer's dropout stream: the mask of an input, element `i` (row-major) kept (as
/// `1/(1-p)`) or dropped (0) by a hash of `i`, so the candle graph and the engine multiply by the same
/// mask.
#[derive(Debug, Clone, Copy)]
pub struct DropoutMask {
    key: u64,
    p: f64,
}

impl DropoutMask {
    /// Writes the mask of an input of `mask.len()` elements.
    pub fn fill(&self, mask: &mut [f32]) {
        const CHUNK: usize = 4096;
        // Keep element i when the top 32 bits of its hash are at or above p·2³².
        let threshold = (self.p * 4_294_967_296.0) as u64;
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let key = self.key;
        crate::par::chunks_mut(mask, CHUNK, |c, chunk| {
            for (j, m) in chunk.iter_mut().enumerate() {
                let h = mix64(key ^ ((c * CHUNK + j) as u64)) >> 32;
                *m = if h >= threshold { keep } else { 0.0 };
            }
        });
    }
}

/// One adapted layer: the adapter forward that [`Linear`] calls.
#[derive(Debug)]
struct LoraLinear {
    a: Linear,
    b: Linear,
    scale: f64,
    dropout: f64,
    training: Arc<AtomicBool>,
    enabled: Arc<AtomicBool>,
    masks: DropoutStream,
}

impl LinearAdapter for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.enabled.load(Ordering::Relaxed) {
            let mut dims = x.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = self.b.out_features();
            }
            return Tensor::zeros(dims, x.dtype(), x.device());
        }
        let x = if self.dropping() {
            self.masks.apply(x, self.dropout)?
        } else {
            x.clone()
        };
        self.b.forward_base(&self.a.forward_base(&x)?)? * self.scale
    }

    fn low_rank(&self) -> Option<&dyn LowRankAdapter> {
        Some(self)
    }
}

impl LoraLinear {
    /// Whether this pass drops adapter inputs.
    fn dropping(&self) -> bool {
        self.dropout > 0.0 && self.training.load(Ordering::Relaxed)
    }
}

impl LowRankAdapter for LoraLinear {
    fn factors(&self) -> (&Tensor, &Tensor, f64) {
        (&self.a.weight, &self.b.weight, self.scale)
    }

    fn begin_pass(&self) -> Option<Option<DropoutMask>> {
        if !self.enabled.load(Ordering::Relaxed) {
            return None;
        }
        Some(self.dropping().then(|| self.masks.next(self.dropout)))
    }
}

/// The adapters attached to one model.
// Not Debug: candle_nn::VarMap is not.
pub struct Lora {
    config: LoraConfig,
    /// Adapter parameters only, under their PEFT names (without the `base_model.model.` prefix).
    varmap: VarMap,
    /// Adapted module names, in model order.
    modules: Vec<String>,
    training: Arc<AtomicBool>,
    enabled: Arc<AtomicBool>,
    /// Each adapted layer's dropout-mask counter (see [`DropoutStream`]).
    dropout_calls: Vec<Arc<AtomicU64>>,
}

impl Lora {
    /// Freezes `model` and attaches fresh adapters (A Kaiming-uniform from `seed`, B zero) to every linear
    /// layer matching `config.target_modules`. Dropout masks are drawn from `seed` too (see
    /// [`Lora::dropout_state`]), so a run is reproducible. Errors when a target matches nothing.
    pub fn attach(model: &mut CausalLm, config: &LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let config = &config.for_model(model);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = model.device().clone();
        let mut tensors = HashMap::new();
        model.set_trainable(false)?;
        for (name, lin) in model.linears_mut() {
            if !config.matches(&name) {
                continue;
            }
            let (inp, out) = (lin.in_features(), lin.out_features());
            // PEFT: kaiming_uniform_(a=√5) on [r, in] = U(−1/√in, 1/√in).
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..config.r * inp)
                .map(|_| rng.gen_range(-bound..bound) as f32)
                .collect();
            tensors.insert(
                format!("{name}.lora_A.weight"),
                Tensor::from_vec(a, (config.r, inp), &device)?,
            );
            tensors.insert(
                format!("{name}.lora_B.weight"),
                Tensor::zeros((out, config.r), DType::F32, &device)?,
            );
        }
        Self::install(model, config.clone(), tensors, "lora", seed)
    }

    /// Loads a PEFT LoRA directory onto `model` (frozen). The adapter's `r`, `lora_alpha`, `lora_dropout`
    /// and `target_modules` are taken from its `adapter_config.json`.
    pub fn load(model: &mut CausalLm, dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let raw = io::read_json(&cfg_path)?;
        let file = cfg_path.display().to_string();
        let config = config_from_peft(&raw, &file)?;
        config
            .validate()
            .map_err(|e| candle_core::Error::Msg(format!("{file}: {e}")))?;
        let weights = dir.join(ADAPTER_WEIGHTS);
        let mut tensors = HashMap::new();
        for (name, t) in read_safetensors(&weights, model.device())? {
            match name.strip_prefix(PEFT_PREFIX) {
                Some(n) if n.contains(".lora_A.") || n.contains(".lora_B.") => {
                    tensors.insert(n.replace(".default.", "."), t);
                }
                // Heads saved next to the adapters (`modules_to_save`) belong to the caller.
                Some(_) => {}
                None => bail!(
                    "{}: tensor `{name}` does not start with `{PEFT_PREFIX}`",
                    weights.display()
                ),
            }
        }
        model.set_trainable(false)?;
        // A loaded adapter is for inference; its (unused) dropout stream still needs a seed.
        Self::install(model, config, tensors, &weights.display().to_string(), 0)
    }

    /// Attaches `tensors` (`<module>.lora_A.weight` / `.lora_B.weight`) to the matching layers of `model`.
    fn install(
        model: &mut CausalLm,
        config: LoraConfig,
        mut tensors: HashMap<String, Tensor>,
        source: &str,
        seed: u64,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let training = Arc::new(AtomicBool::new(true));
        let enabled = Arc::new(AtomicBool::new(true));
        // Its own stream, independent of the A initialisation drawn from the same seed.
        let dropout_seed = mix64(seed ^ 0x6c6f_7261_5f64_726f);
        let mut dropout_calls = Vec::new();
        let mut modules = Vec::new();
        for (name, lin) in model.linears_mut() {
            if !config.matches(&name) {
                continue;
            }
            let (inp, out) = (lin.in_features(), lin.out_features());
            let mut take = |k: &str, shape: [usize; 2]| -> Result<Tensor> {
                let key = format!("{name}.{k}.weight");
                let t = match tensors.remove(&key) {
                    Some(t) => t,
                    None => bail!("{source}: missing adapter tensor `{PEFT_PREFIX}{key}`"),
                };
                if t.dims() != shape {
                    bail!(
                        "{source}: tensor `{PEFT_PREFIX}{key}` has shape {:?}, expected {shape:?}",
                        t.dims()
                    )
                }
                let var = Var::from_tensor(&t)?;
                let tensor = var.as_tensor().clone();
                varmap
                    .data()
                    .lock()
                    .expect("VarMap lock poisoned")
                    .insert(key, var);
                Ok(tensor)
            };
            let a = take("lora_A", [config.r, inp])?;
            let b = take("lora_B", [out, config.r])?;
            let calls = Arc::new(AtomicU64::new(0));
            dropout_calls.push(calls.clone());
            let masks = DropoutStream {
                key: mix64(dropout_seed ^ mix64(modules.len() as u64)),
                calls,
            };
            lin.adapter = Some(Arc::new(LoraLinear {
                a: Linear::new(a, None, WeightLayout::OutIn),
                b: Linear::new(b, None, WeightLayout::OutIn),
                scale: config.scale(),
                dropout: config.dropout,
                training: training.clone(),
                enabled: enabled.clone(),
                masks,
            }));
            modules.push(name);
        }
        if modules.is_empty() {
            let info = model.config().arch_info();
            bail!(
                "lora: key \"target_modules\": {:?} matches no linear layer of this {} model (PEFT's default for {} is {:?})",
                config.target_modules,
                info.model_type,
                info.model_type,
                info.lora_targets
            )
        }
        if let Some(extra) = tensors.keys().next() {
            bail!("{source}: adapter tensor `{PEFT_PREFIX}{extra}` matches no target module of this model")
        }
        Ok(Self {
            config,
            varmap,
            modules,
            training,
            enabled,
            dropout_calls,
        })
    }

    /// Dropout masks drawn so far per adapted layer: the whole state of the (seeded) dropout RNG, for
    /// checkpoints. Every training forward draws one mask per layer, so the counters are normally equal.
    pub fn dropout_state(&self) -> Vec<u64> {
        self.dropout_calls
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Continue the dropout streams from a saved [`Lora::dropout_state`] (a resumed run then draws the masks
    /// the original run would have). Errors when the number of layers differs.
    pub fn set_dropout_state(&self, state: &[u64]) -> Result<()> {
        if state.len() != self.dropout_calls.len() {
            bail!(
                "lora: dropout state has {} layers, this adapter has {}",
                state.len(),
                self.dropout_calls.len()
            )
        }
        for (c, &v) in self.dropout_calls.iter().zip(state) {
            c.store(v, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The adapter parameters (what the optimizer trains).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    pub fn modules(&self) -> &[String] {
        &self.modules
    }

    pub fn num_parameters(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Dropout is applied only in training mode (the default).
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    /// With `false` the model computes as its frozen base (e.g. the DPO reference without a second copy).
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    /// Folds every adapter into its base weight (`W += scale·B·A`, transposed for `[in, out]` layouts) and
    /// rebuilds `model` without adapters and trainable again: a plain model that saves in the HF layout.
    pub fn merge_into(self, model: &mut CausalLm) -> Result<()> {
        let layouts: HashMap<String, WeightLayout> = model
            .linears_mut()
            .into_iter()
            .map(|(n, l)| (n, l.layout))
            .collect();
        let data = self.varmap.data().lock().expect("VarMap lock poisoned");
        let base = model.varmap().data().lock().expect("VarMap lock poisoned");
        for m in &self.modules {
            let (a, b) = (
                &data[&format!("{m}.lora_A.weight")],
                &data[&format!("{m}.lora_B.weight")],
            );
            let delta = (b.as_tensor().matmul(a.as_tensor())? * self.config.scale())?;
            let delta = match layouts.get(m) {
                Some(WeightLayout::InOut) => delta.t()?,
                _ => delta,
            };
            let w = match base.get(&format!("{m}.weight")) {
                Some(w) => w,
                None => bail!(
                    "merge: module `{m}` has no weight `{m}.weight` in the model (tied lm_head?)"
                ),
            };
            w.set(&(w.as_tensor() + delta)?)?;
            crate::weights_changed(w.as_tensor());
        }
        drop((data, base));
        model.set_trainable(true)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (PEFT layout) to `dir`. `extra` are
    /// fully trained modules stored beside the adapters (PEFT `modules_to_save`, e.g. a reward head
    /// `("score", weight)`), saved as `base_model.model.<module>.weight`.
    pub fn save(
        &self,
        dir: &Path,
        base_model_name_or_path: &str,
        task_type: &str,
        extra: &[(&str, &Tensor)],
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| {
            candle_core::Error::Msg(format!("{}: cannot create directory: {e}", dir.display()))
        })?;
        let mut named: Vec<(String, Tensor)> = self
            .varmap
            .data()
            .lock()
            .expect("VarMap lock poisoned")
            .iter()
            .map(|(k, v)| (format!("{PEFT_PREFIX}{k}"), v.as_tensor().clone()))
            .collect();
        for (m, t) in extra {
            named.push((format!("{PEFT_PREFIX}{m}.weight"), (*t).clone()));
        }
        write_safetensors(&dir.join(ADAPTER_WEIGHTS), &named)?;
        let modules_to_save: Value = if extra.is_empty() {
            Value::Null
        } else {
            json!(extra.iter().map(|(m, _)| m).collect::<Vec<_>>())
        };
        let cfg = json!({
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": self.config.target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "modules_to_save": modules_to_save,
        });
        let text = serde_json::to_string_pretty(&cfg).map_err(candle_core::Error::wrap)?;
        io::write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
    }
}

/// Reads the fields of a PEFT `adapter_config.json` this crate uses; `file` labels errors.
fn config_from_peft(raw: &Value, file: &str) -> Result<LoraConfig> {
    match raw.get("peft_type").and_then(|v| v.as_str()) {
        Some("LORA") => {}
        other => bail!("{file}: field \"peft_type\": expected \"LORA\", got {other:?}"),
    }
    let num = |k: &str| -> Result<f64> {
        match raw.get(k).and_then(|v| v.as_f64()) {
            Some(v) => Ok(v),
            None => bail!("{file}: field \"{k}\": missing or not a number"),
        }
    };
    let target_modules = match raw.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{file}: field \"target_modules\": expected strings"
                ))
            })?,
        Some(Value::String(s)) => vec![s.clone()],
        _ => bail!("{file}: field \"target_modules\": missing (expected a list of module names)"),
    };
    if raw.get("use_rslora").and_then(|v| v.as_bool()) == Some(true) {
        bail!("{file}: field \"use_rslora\": rank-stabilised LoRA is not supported")
    }
    Ok(LoraConfig {
        r: num("r")? as usize,
        alpha: num("lora_alpha")?,
        dropout: raw
            .get("lora_dropout")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0),
        target_modules,
    })
}

/// Writes f32 tensors to a safetensors file atomically, with the `format: pt` metadata `transformers`/PEFT
/// require.
pub fn write_safetensors(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .iter()
        .map(|(n, t)| {
            let data = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            Ok((
                n.clone(),
                t.dims().to_vec(),
                data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ))
        })
        .collect::<Result<_>>()?;
    owned.sort_by(|a, b| a.0.cmp(&b.0));
    let views = owned
        .iter()
        .map(|(n, s, b)| {
            Ok((
                n.as_str(),
                TensorView::new(Dtype::F32, s.clone(), b).map_err(candle_core::Error::wrap)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::tensor::serialize(views, Some(meta)).map_err(candle_core::Error::wrap)?;
    io::write_atomic(path, &bytes)
}

/// Reads every tensor of a safetensors file as f32 on `device` (errors name the file).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect()
}
