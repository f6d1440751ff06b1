//! The Llama-style decoder (pre-norm RMSNorm, RoPE, GQA, SwiGLU) shared by Llama, Qwen2 and
//! Mistral: their modules parse their own `config.json` fields into [`DecoderOptions`] and the rest
//! is here.

use crate::arch::{Arch, Dims, Network};
use crate::attention::{attention, KvCache};
use crate::linear::{Linear, WeightLayout};
use crate::{ops, Init, ParamSpec, Params, Positions};
use candle_core::{bail, Device, Result, Tensor};
use serde::Deserialize;

mod engine;

/// `rope_scaling` (transformers < 5) or `rope_parameters` (transformers ≥ 5).
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct RopeParameters {
    #[serde(default)]
    pub rope_type: Option<String>,
    /// Old spelling of `rope_type`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// The `config.json` fields shared by the decoder family (Llama, Qwen2, Mistral); each
/// architecture's module parses its own extra fields and passes them as [`DecoderOptions`]. Fields
/// not read here stay verbatim in [`crate::ModelConfig::raw`].
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct DecoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Absent: the architecture's default ([`DecoderOptions::default_max_positions`]).
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

/// What differs between the members of the decoder family.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecoderOptions {
    /// `max_position_embeddings` when config.json has none (the `transformers` config class default).
    pub default_max_positions: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// `sliding_window` of config.json: longer sequences are refused (see [`Decoder::hidden_states`]).
    pub sliding_window: Option<usize>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
pub(crate) fn default_act() -> String {
    "silu".into()
}
pub(crate) fn default_init_range() -> f64 {
    0.02
}

/// Rotary embedding frequencies, HF semantics (`default`, `linear`, `llama3`).
#[derive(Debug, Clone)]
pub(crate) struct RopeSpec {
    pub inv_freq: Vec<f32>,
}

impl RopeSpec {
    pub(crate) fn new(
        head_dim: usize,
        rope_theta: Option<f64>,
        scaling: Option<&RopeParameters>,
        file_field: &str,
    ) -> Result<Self> {
        let theta = rope_theta
            .or(scaling.and_then(|s| s.rope_theta))
            .unwrap_or(10_000.0);
        // Same f32 arithmetic as transformers' `_compute_default_rope_parameters`.
        let mut inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let kind = scaling.and_then(|s| s.rope_type.clone().or(s.type_.clone()));
        let need = |v: Option<f64>, name: &str| match v {
            Some(v) => Ok(v),
            None => bail!("{file_field}: rope type {kind:?} needs field \"{name}\""),
        };
        match (kind.as_deref(), scaling) {
            (None | Some("default"), _) => {}
            (Some("linear"), Some(s)) => {
                let f = need(s.factor, "factor")? as f32;
                inv_freq.iter_mut().for_each(|v| *v /= f);
            }
            (Some("llama3"), Some(s)) => {
                let factor = need(s.factor, "factor")?;
                let low = need(s.low_freq_factor, "low_freq_factor")?;
                let high = need(s.high_freq_factor, "high_freq_factor")?;
                let old = need(s.original_max_position_embeddings.map(|v| v as f64), "original_max_position_embeddings")?;
                let (low_wl, high_wl) = (old / low, old / high);
                for f in inv_freq.iter_mut() {
                    let wl = 2.0 * std::f64::consts::PI / *f as f64;
                    let fv = *f as f64;
                    let scaled = if wl > low_wl { fv / factor } else { fv };
                    let medium = (high_wl..=low_wl).contains(&wl);
                    *f = if medium {
                        let smooth = (old / wl - low) / (high - low);
                        ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                    } else {
                        scaled as f32
                    };
                }
            }
            (Some(other), _) => bail!(
                "{file_field}: unsupported rope type \"{other}\" (supported: default, linear, llama3)"
            ),
        }
        Ok(Self { inv_freq })
    }

    /// cos/sin tables `[rows, t, d/2]` for the given positions (row-major `[rows, t]`).
    pub(crate) fn tables(
        &self,
        pos: &[u32],
        rows: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let t = pos.len() / rows.max(1);
        let (c, s) = self.table_data(pos);
        Ok((
            Tensor::from_vec(c, (rows, t, half), device)?,
            Tensor::from_vec(s, (rows, t, half), device)?,
        ))
    }

    /// The data of [`RopeSpec::tables`].
    pub(crate) fn table_data(&self, pos: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut c = Vec::with_capacity(pos.len() * half);
        let mut s = Vec::with_capacity(pos.len() * half);
        for &p in pos {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                c.push(a.cos());
                s.push(a.sin());
            }
        }
        (c, s)
    }
}

/// Everything the shared decoder needs, independent of which config format it came from.
#[derive(Debug, Clone)]
pub(crate) struct DecoderSpec {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    pub rope: RopeSpec,
    pub tie: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub init_std: f64,
    pub max_positions: usize,
    pub sliding_window: Option<usize>,
}

impl DecoderSpec {
    pub(crate) fn check(&self, file: &str) -> Result<()> {
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            bail!(
                "{file}: num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.heads,
                self.kv_heads
            )
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "{file}: head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            )
        }
        Ok(())
    }
}

impl DecoderConfig {
    /// Validates the config and resolves it into the decoder's spec (`file` names config.json in errors).
    pub(crate) fn spec(&self, options: DecoderOptions, file: &str) -> Result<DecoderSpec> {
        if self.hidden_act != "silu" {
            bail!(
                "{file}: field \"hidden_act\": only \"silu\" is supported, got \"{}\"",
                self.hidden_act
            )
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let scaling = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let spec = DecoderSpec {
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            inter: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            eps: self.rms_norm_eps,
            rope: RopeSpec::new(head_dim, self.rope_theta, scaling, file)?,
            tie: self.tie_word_embeddings,
            qkv_bias: options.qkv_bias,
            o_bias: options.o_bias,
            mlp_bias: options.mlp_bias,
            init_std: self.initializer_range,
            max_positions: self
                .max_position_embeddings
                .unwrap_or(options.default_max_positions),
            sliding_window: options.sliding_window,
        };
        spec.check(file)?;
        Ok(spec)
    }
}

impl Arch for DecoderSpec {
    fn dims(&self) -> Dims {
        Dims {
            vocab: self.vocab,
            hidden: self.hidden,
            layers: self.layers,
            max_positions: self.max_positions,
            tie_word_embeddings: self.tie,
        }
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        let (h, d) = (self.hidden, self.head_dim);
        let normal = Init::Normal(self.init_std);
        let mut v = vec![ParamSpec::new(
            "model.embed_tokens.weight",
            &[self.vocab, h],
            normal,
        )];
        let lin = |v: &mut Vec<ParamSpec>, name: String, out: usize, inp: usize, bias: bool| {
            v.push(ParamSpec::new(
                &format!("{name}.weight"),
                &[out, inp],
                normal,
            ));
            if bias {
                v.push(ParamSpec::new(&format!("{name}.bias"), &[out], Init::Zeros));
            }
        };
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            v.push(ParamSpec::new(
                &format!("{p}.input_layernorm.weight"),
                &[h],
                Init::Ones,
            ));
            lin(
                &mut v,
                format!("{p}.self_attn.q_proj"),
                self.heads * d,
                h,
                self.qkv_bias,
            );
            lin(
                &mut v,
                format!("{p}.self_attn.k_proj"),
                self.kv_heads * d,
                h,
                self.qkv_bias,
            );
            lin(
                &mut v,
                format!("{p}.self_attn.v_proj"),
                self.kv_heads * d,
                h,
                self.qkv_bias,
            );
            lin(
                &mut v,
                format!("{p}.self_attn.o_proj"),
                h,
                self.heads * d,
                self.o_bias,
            );
            v.push(ParamSpec::new(
                &format!("{p}.post_attention_layernorm.weight"),
                &[h],
                Init::Ones,
            ));
            lin(
                &mut v,
                format!("{p}.mlp.gate_proj"),
                self.inter,
                h,
                self.mlp_bias,
            );
            lin(
                &mut v,
                format!("{p}.mlp.up_proj"),
                self.inter,
                h,
                self.mlp_bias,
            );
            lin(
                &mut v,
                format!("{p}.mlp.down_proj"),
                h,
                self.inter,
                self.mlp_bias,
            );
        }
        v.push(ParamSpec::new("model.norm.weight", &[h], Init::Ones));
        if !self.tie {
            v.push(ParamSpec::new("lm_head.weight", &[self.vocab, h], normal));
        }
        v
    }

    fn build(&self, params: &Params) -> Result<Box<dyn Network>> {
        Ok(Box::new(Decoder::new(self.clone(), params)?))
    }
}

#[derive(Debug, Clone)]
struct Layer {
    ln1: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Llama-style decoder-only transformer (pre-norm RMSNorm, RoPE, GQA, SwiGLU).
#[derive(Debug, Clone)]
struct Decoder {
    spec: DecoderSpec,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
}

impl Decoder {
    fn new(spec: DecoderSpec, p: &Params) -> Result<Self> {
        let lin = |name: &str, bias: bool| -> Result<Linear> {
            let b = if bias {
                Some(p.get(&format!("{name}.bias"))?)
            } else {
                None
            };
            Ok(Linear::new(
                p.get(&format!("{name}.weight"))?,
                b,
                WeightLayout::OutIn,
            ))
        };
        let layers = (0..spec.layers)
            .map(|i| {
                let a = format!("model.layers.{i}.self_attn");
                let m = format!("model.layers.{i}.mlp");
                Ok(Layer {
                    ln1: p.get(&format!("model.layers.{i}.input_layernorm.weight"))?,
                    q: lin(&format!("{a}.q_proj"), spec.qkv_bias)?,
                    k: lin(&format!("{a}.k_proj"), spec.qkv_bias)?,
                    v: lin(&format!("{a}.v_proj"), spec.qkv_bias)?,
                    o: lin(&format!("{a}.o_proj"), spec.o_bias)?,
                    ln2: p.get(&format!("model.layers.{i}.post_attention_layernorm.weight"))?,
                    gate: lin(&format!("{m}.gate_proj"), spec.mlp_bias)?,
                    up: lin(&format!("{m}.up_proj"), spec.mlp_bias)?,
                    down: lin(&format!("{m}.down_proj"), spec.mlp_bias)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = p.get("model.embed_tokens.weight")?;
        let lm_head = if spec.tie {
            Linear::new(embed.clone(), None, WeightLayout::OutIn)
        } else {
            lin("lm_head", false)?
        };
        Ok(Self {
            embed,
            layers,
            norm: p.get("model.norm.weight")?,
            lm_head,
            spec,
        })
    }

    /// Our attention has no window: a model trained with one (Mistral's `sliding_window`) computes
    /// the same as full causal attention only while no query sees more than `window` keys, so a
    /// longer sequence is refused rather than silently attended differently from `transformers`.
    fn check_window(&self, t: usize, cache: Option<&KvCache>) -> Result<()> {
        let Some(window) = self.spec.sliding_window else {
            return Ok(());
        };
        let span = cache.map_or(t, |c| c.longest_span(t));
        if span > window {
            bail!(
                "a sequence of {span} tokens exceeds config.json's \"sliding_window\" ({window}): sliding-window attention is not implemented, so this model runs sequences of at most {window} tokens; shorten the prompt or max_new_tokens / max_length"
            )
        }
        Ok(())
    }
}

impl Network for Decoder {
    fn kv_shape(&self) -> (usize, usize, usize) {
        (self.spec.layers, self.spec.kv_heads, self.spec.head_dim)
    }

    fn hidden(
        &self,
        ids: &Tensor,
        pos: &Positions,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.check_window(t, cache.as_deref())?;
        let s = &self.spec;
        let (pos_vec, rows) = pos.resolve(b, t)?;
        let (cos, sin) = s.rope.tables(&pos_vec, rows, ids.device())?;
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, s.hidden))?;
        for (li, l) in self.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &l.ln1, s.eps)?;
            let q = l.q.forward(&h)?.reshape((b, t, s.heads, s.head_dim))?;
            let k = l.k.forward(&h)?.reshape((b, t, s.kv_heads, s.head_dim))?;
            let v = l.v.forward(&h)?.reshape((b, t, s.kv_heads, s.head_dim))?;
            let q = ops::rope(&q, &cos, &sin)?;
            let k = ops::rope(&k, &cos, &sin)?;
            let v = v.transpose(1, 2)?.contiguous()?;
            let a = attention(&q, &k, &v, scale, li, cache.as_deref_mut())?;
            x = (x + l.o.forward(&a)?)?;
            let h = ops::rms_norm(&x, &l.ln2, s.eps)?;
            let m = ops::silu_mul(&l.gate.forward(&h)?, &l.up.forward(&h)?)?;
            x = (x + l.down.forward(&m)?)?;
        }
        ops::rms_norm(&x, &self.norm, s.eps)
    }

    fn hidden_engine(
        &self,
        ids: &Tensor,
        pos: &Positions,
        groups: Option<&[u32]>,
        at: Option<&[u32]>,
    ) -> Option<Result<Tensor>> {
        // Picking tokens where the stack cannot: the caller runs the full pass and selects.
        if !crate::engine::on_engine(self)
            || at.is_some() && !crate::engine::Body::selects_rows(self)
        {
            return None;
        }
        let run = || {
            let (b, t) = ids.dims2()?;
            self.check_window(t, None)?;
            let (pos, rows) = pos.resolve(b, t)?;
            crate::engine::hidden(self, ids, &pos, rows, groups, at)
        };
        Some(run())
    }

    /// Not with a sliding window: a grouped row is longer than its sequences, and the window is
    /// checked on rows.
    fn attends_by_group(&self) -> bool {
        crate::engine::on_engine(self) && self.spec.sliding_window.is_none()
    }

    fn hidden_engine_cached(
        &self,
        ids: &Tensor,
        pos: &Positions,
        cache: &mut KvCache,
    ) -> Option<Result<Tensor>> {
        if !crate::engine::decodes(self) {
            return None;
        }
        let mut run = || {
            let (b, t) = ids.dims2()?;
            self.check_window(t, Some(cache))?;
            let (pos, rows) = pos.resolve(b, t)?;
            crate::engine::hidden_cached(self, ids, &pos, rows, cache)
        };
        Some(run())
    }

    fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    fn clone_box(&self) -> Box<dyn Network> {
        Box::new(self.clone())
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = format!("model.layers.{i}.self_attn");
            let m = format!("model.layers.{i}.mlp");
            v.push((format!("{a}.q_proj"), &mut l.q));
            v.push((format!("{a}.k_proj"), &mut l.k));
            v.push((format!("{a}.v_proj"), &mut l.v));
            v.push((format!("{a}.o_proj"), &mut l.o));
            v.push((format!("{m}.gate_proj"), &mut l.gate));
            v.push((format!("{m}.up_proj"), &mut l.up));
            v.push((format!("{m}.down_proj"), &mut l.down));
        }
        v.push(("lm_head".into(), &mut self.lm_head));
        v
    }
}
