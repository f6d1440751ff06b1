//! AdamW with PyTorch semantics as one fused pass per parameter, plus global-norm gradient clipping.
//!
//! Parameters are kept sorted by name: a `VarMap` is a `HashMap`, and any order that leaks from it into
//! the norm reduction or the state file would make runs (and resumed runs) differ bit for bit.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Storage, Tensor, Var};

use crate::error::{io_err, Result, TrainError};

/// Elements per parallel work item: large enough that handing it out is noise, small enough that both
/// cores get work on the 256×688 MLP matrices of the tiny model.
const PAR_CHUNK: usize = 1 << 15;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// `torch.optim.AdamW` / transformers `adamw_torch` defaults, except weight decay which the
    /// Trainer defaults to 0.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// transformers' Trainer exempts biases and normalisation weights from weight decay
/// (`get_decay_parameter_names`); HF names make this a name test.
pub fn decays(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    !(n.ends_with("bias") || n.contains("norm"))
}

/// Parameters of a `VarMap`, sorted by name (see the module comment).
pub fn sorted_params(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("VarMap mutex poisoned");
    let mut params: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// Gradients aligned with the optimizer's parameter order; `None` for a parameter that got no gradient
/// (PyTorch's `p.grad is None`: the parameter is skipped by the update).
#[derive(Debug, Clone)]
pub struct Grads {
    grads: Vec<Option<Tensor>>,
}

impl Grads {
    /// Per-parameter gradients in optimizer order.
    pub fn as_slice(&self) -> &[Option<Tensor>] {
        &self.grads
    }

    /// L2 norm over all gradients, accumulated in f64 in parameter-name order (deterministic).
    pub fn global_norm(&self) -> Result<f64> {
        // One parallel pass over the parameters (not one per parameter); each parameter's sum in fixed
        // chunks, the sums added in parameter order → the same bits however the work is spread.
        let grads: Vec<&Tensor> = self.grads.iter().flatten().collect();
        let sums = rlhf_model::par::map(grads.len(), |i| {
            let (storage, layout) = grads[i].storage_and_layout();
            let data = cpu_f32(&storage, layout, "gradient")?;
            Ok(data
                .chunks(PAR_CHUNK)
                .map(sum_squares)
                .collect::<Vec<f64>>()
                .into_iter()
                .sum::<f64>())
        })
        .into_iter()
        .collect::<Result<Vec<f64>>>()?;
        Ok(sums.into_iter().sum::<f64>().sqrt())
    }
}

/// Σx² in f64 (compiled for AVX-512 where the CPU has it, as [`Coefs::update`]; same sums either way).
fn sum_squares(xs: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { sum_squares_avx512(xs) };
    }
    sum_squares_lanes(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_squares_avx512(xs: &[f32]) -> f64 {
    sum_squares_lanes(xs)
}

/// With 8 independent accumulators: one serial chain of f64 adds is latency-bound (~4× slower).
#[inline(always)]
fn sum_squares_lanes(xs: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += (x as f64) * (x as f64);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The contiguous f32 CPU data behind a tensor.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(CpuStorage::F32(data)) => match layout.contiguous_offsets() {
            Some((start, end)) => Ok(&data[start..end]),
            None => Err(candle_core::Error::Msg(format!("{what} is not contiguous")).into()),
        },
        _ => Err(candle_core::Error::Msg(format!("{what} must be an f32 CPU tensor")).into()),
    }
}

struct ParamState {
    name: String,
    var: Var,
    decay: bool,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Per-parameter step count, as PyTorch keeps it (a parameter without a gradient does not advance).
    step: u64,
}

/// AdamW over a fixed, name-sorted parameter list.
pub struct AdamW {
    params: Vec<ParamState>,
    cfg: AdamWConfig,
}

impl AdamW {
    /// `params` may come in any order; they are sorted by name. Every parameter must be a contiguous
    /// f32 CPU tensor (the fused update works on its storage directly).
    pub fn new(mut params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = params.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(
                candle_core::Error::Msg(format!("duplicate parameter name {}", w[0].0)).into(),
            );
        }
        let params = params
            .into_iter()
            .map(|(name, var)| {
                let (storage, layout) = var.as_tensor().storage_and_layout();
                cpu_f32(&storage, layout, &format!("parameter {name}"))?;
                drop(storage);
                let n = var.as_tensor().elem_count();
                Ok(ParamState {
                    decay: decays(&name),
                    name,
                    var,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    step: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { params, cfg })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Names and variables in optimizer order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// Number of optimizer steps taken (the maximum over parameters; equal for all in normal training).
    pub fn step_count(&self) -> u64 {
        self.params.iter().map(|p| p.step).max().unwrap_or(0)
    }

    /// First and second moments and step count of a parameter (inspection, tests).
    pub fn state_of(&self, name: &str) -> Option<(&[f32], &[f32], u64)> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| (p.m.as_slice(), p.v.as_slice(), p.step))
    }

    /// Gradients of one backward pass, in optimizer order.
    pub fn collect_grads(&self, store: &GradStore) -> Result<Grads> {
        let grads = self
            .params
            .iter()
            .map(|p| {
                store
                    .get(p.var.as_tensor())
                    .map(|g| g.contiguous())
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Grads { grads })
    }

    /// Add the gradients of another backward pass (gradient accumulation).
    pub fn accumulate_grads(&self, acc: &mut Grads, store: &GradStore) -> Result<()> {
        for (slot, p) in acc.grads.iter_mut().zip(&self.params) {
            if let Some(g) = store.get(p.var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(prev) => prev.add(g)?,
                    None => g.contiguous()?,
                });
            }
        }
        Ok(())
    }

    /// Clip to `max_grad_norm` (if any) and apply one AdamW update with learning rate `lr`.
    /// Returns the pre-clip global gradient norm (TRL's `grad_norm`).
    pub fn step(&mut self, grads: &Grads, lr: f64, max_grad_norm: Option<f64>) -> Result<f64> {
        let norm = grads.global_norm()?;
        self.step_with_norm(grads, lr, max_grad_norm, norm)?;
        Ok(norm)
    }

    /// [`AdamW::step`] for a caller that already has `grads.global_norm()` (e.g. to check it is finite).
    pub fn step_with_norm(
        &mut self,
        grads: &Grads,
        lr: f64,
        max_grad_norm: Option<f64>,
        norm: f64,
    ) -> Result<()> {
        if grads.grads.len() != self.params.len() {
            return Err(candle_core::Error::Msg(
                "gradients do not match the optimizer's parameters".into(),
            )
            .into());
        }
        // torch.nn.utils.clip_grad_norm_: coef = max/(norm+1e-6) clamped to 1, computed in f32 and
        // multiplied into every gradient (a no-op ×1.0 when not clipping). Folded into the fused update.
        let scale = match max_grad_norm {
            Some(max) => ((max as f32) / (norm as f32 + 1e-6)).min(1.0),
            None => 1.0,
        };
        // One parallel pass over the parameters (each update is elementwise: the same bits in any order).
        let cfg = self.cfg;
        let update = |(p, g): (&mut ParamState, &Option<Tensor>)| -> Result<()> {
            let Some(g) = g else { return Ok(()) };
            p.step += 1;
            let c = &cfg;
            let t = p.step as i32;
            // Scalars in f64 then cast to f32, as PyTorch's single-tensor AdamW does with Python floats.
            let bias_c1 = 1.0 - c.beta1.powi(t);
            let bias_c2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
            let wd = if p.decay { c.weight_decay } else { 0.0 };
            let k = Coefs {
                decay_factor: (1.0 - lr * wd) as f32,
                one_minus_beta1: (1.0 - c.beta1) as f32,
                beta2: c.beta2 as f32,
                one_minus_beta2: (1.0 - c.beta2) as f32,
                neg_step_size: (-(lr / bias_c1)) as f32,
                bias_c2_sqrt: bias_c2_sqrt as f32,
                eps: c.eps as f32,
                grad_scale: scale,
                apply_decay: wd != 0.0,
            };
            let op = FusedAdamW {
                m: RefCell::new(&mut p.m),
                v: RefCell::new(&mut p.v),
                k,
            };
            p.var.as_tensor().inplace_op2(g, &op)?;
            rlhf_model::weights_changed(p.var.as_tensor());
            Ok(())
        };
        let mut pairs: Vec<_> = self.params.iter_mut().zip(&grads.grads).collect();
        rlhf_model::par::map_mut(&mut pairs, |_, (p, g)| update((p, g)))
            .into_iter()
            .collect()
    }

    /// Write m, v and per-parameter step counts to a safetensors file (`exp_avg.<name>`,
    /// `exp_avg_sq.<name>`, metadata `steps` = JSON {name: step}).
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut views: Vec<(String, F32View)> = Vec::with_capacity(2 * self.params.len());
        let mut steps = BTreeMap::new();
        for p in &self.params {
            let shape = p.var.as_tensor().dims().to_vec();
            views.push((
                format!("exp_avg.{}", p.name),
                F32View {
                    data: &p.m,
                    shape: shape.clone(),
                },
            ));
            views.push((
                format!("exp_avg_sq.{}", p.name),
                F32View { data: &p.v, shape },
            ));
            steps.insert(p.name.clone(), p.step);
        }
        let meta = HashMap::from([(
            "steps".to_string(),
            serde_json::to_string(&steps).expect("map of ints"),
        )]);
        safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| {
            TrainError::Checkpoint {
                path: path.to_path_buf(),
                msg: e.to_string(),
            }
        })
    }

    /// Restore state written by [`AdamW::save_state`]; the parameter set must match exactly.
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let bad = |msg: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let steps_json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("steps"))
            .ok_or_else(|| bad("missing metadata \"steps\"".into()))?;
        let steps: BTreeMap<String, u64> = serde_json::from_str(steps_json)
            .map_err(|e| bad(format!("metadata \"steps\": {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        if st.len() != 2 * self.params.len() || steps.len() != self.params.len() {
            return Err(bad(format!(
                "holds state for {} parameters, the model has {}",
                steps.len(),
                self.params.len()
            )));
        }
        for p in &mut self.params {
            p.step = *steps
                .get(&p.name)
                .ok_or_else(|| bad(format!("no state for parameter {}", p.name)))?;
            for (prefix, dst) in [("exp_avg", &mut p.m), ("exp_avg_sq", &mut p.v)] {
                let key = format!("{prefix}.{}", p.name);
                let view = st.tensor(&key).map_err(|e| bad(format!("{key}: {e}")))?;
                if view.dtype() != safetensors::Dtype::F32
                    || view.shape() != p.var.as_tensor().dims()
                {
                    return Err(bad(format!(
                        "{key}: {:?} {:?}, expected F32 {:?}",
                        view.dtype(),
                        view.shape(),
                        p.var.as_tensor().dims()
                    )));
                }
                for (d, b) in dst.iter_mut().zip(view.data().chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
        Ok(())
    }
}

struct F32View<'a> {
    data: &'a [f32],
    shape: Vec<usize>,
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// One AdamW update of a parameter, reading the gradient and updating p, m, v in a single pass.
struct FusedAdamW<'a> {
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    k: Coefs,
}

/// Per-step scalars of the update (Copy, so the parallel workers can share them).
#[derive(Clone, Copy)]
struct Coefs {
    decay_factor: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    neg_step_size: f32,
    bias_c2_sqrt: f32,
    eps: f32,
    grad_scale: f32,
    apply_decay: bool,
}

impl Coefs {
    /// Same operation order as torch's `_single_tensor_adamw`:
    /// p *= 1-lr·wd; m.lerp_(g, 1-β1); v = v·β2 + (1-β2)·g²; p += (-lr/bc1 · m) / (sqrt(v)/sqrt(bc2) + eps).
    fn update(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { self.update_avx512(p, g, m, v) };
        }
        self.update_lanes(p, g, m, v)
    }

    /// [`Coefs::update`] compiled for AVX-512: the crate targets baseline x86-64, whose 4-lane square roots
    /// and divisions made the update compute-bound (3× slower than the memory traffic allows). Same IEEE
    /// operations per element, so the same bits.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn update_avx512(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        self.update_lanes(p, g, m, v)
    }

    #[inline(always)]
    fn update_lanes(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g * self.grad_scale;
            if self.apply_decay {
                *p *= self.decay_factor;
            }
            *m += (g - *m) * self.one_minus_beta1;
            *v = *v * self.beta2 + self.one_minus_beta2 * g * g;
            let denom = v.sqrt() / self.bias_c2_sqrt + self.eps;
            *p += self.neg_step_size * *m / denom;
        }
    }
}

impl InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("fused-adamw: parameter and gradient must be f32");
        };
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("fused-adamw: parameter and gradient must be contiguous");
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        let k = self.k;
        if p.len() != g.len() || p.len() != m.len() {
            candle_core::bail!(
                "fused-adamw: size mismatch (param {}, grad {}, state {})",
                p.len(),
                g.len(),
                m.len()
            );
        }
        let mut chunks: Vec<_> = p
            .chunks_mut(PAR_CHUNK)
            .zip(g.chunks(PAR_CHUNK))
            .zip(m.chunks_mut(PAR_CHUNK).zip(v.chunks_mut(PAR_CHUNK)))
            .collect();
        rlhf_model::par::for_each_mut(&mut chunks, |_, ((p, g), (m, v))| k.update(p, g, m, v));
        Ok(())
    }
}
