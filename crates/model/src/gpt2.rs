//! `GPT2LMHeadModel`: learned positions, pre-norm LayerNorm, fused `c_attn`, `Conv1D` weights
//! stored `[in, out]`, tanh-approximated GELU, tied `lm_head`. The stack also runs on the engine
//! ([`engine`]).

mod engine;

use crate::arch::{Arch, ArchInfo, Dims, Network};
use crate::attention::{attention, KvCache};
use crate::linear::{Linear, WeightLayout};
use crate::ops::Activation;
use crate::{ops, Init, ParamSpec, Params, Positions};
use candle_core::{bail, Result, Tensor};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

pub(crate) const ARCH: ArchInfo = ArchInfo {
    model_type: "gpt2",
    causal_lm: "GPT2LMHeadModel",
    sequence_classification: "GPT2ForSequenceClassification",
    lora_targets: &["c_attn"],
    parse,
};

fn parse(raw: &Value, file: &str) -> Result<Arc<dyn Arch>> {
    let c: Gpt2Config = crate::typed(raw, file)?;
    c.check(file)?;
    Ok(Arc::new(c))
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Gpt2Config {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_positions")]
    pub n_positions: usize,
    #[serde(default = "d_embd")]
    pub n_embd: usize,
    #[serde(default = "d_layer")]
    pub n_layer: usize,
    #[serde(default = "d_head")]
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "d_act")]
    pub activation_function: String,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "crate::decoder::default_init_range")]
    pub initializer_range: f64,
    #[serde(default = "d_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub add_cross_attention: bool,
}

fn d_vocab() -> usize {
    50257
}
fn d_positions() -> usize {
    1024
}
fn d_embd() -> usize {
    768
}
fn d_layer() -> usize {
    12
}
fn d_head() -> usize {
    12
}
fn d_act() -> String {
    "gelu_new".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}

impl Gpt2Config {
    fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    fn act(&self, file: &str) -> Result<Activation> {
        Ok(match self.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            other => bail!(
                "{file}: field \"activation_function\": unsupported \"{other}\" (supported: gelu_new, gelu_pytorch_tanh, gelu, relu, silu)"
            ),
        })
    }

    fn check(&self, file: &str) -> Result<()> {
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            bail!(
                "{file}: n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd,
                self.n_head
            )
        }
        if self.add_cross_attention {
            bail!("{file}: field \"add_cross_attention\": cross-attention is not supported")
        }
        self.act(file).map(|_| ())
    }
}

impl Arch for Gpt2Config {
    fn dims(&self) -> Dims {
        Dims {
            vocab: self.vocab_size,
            hidden: self.n_embd,
            layers: self.n_layer,
            max_positions: self.n_positions,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        let (h, inner) = (self.n_embd, self.inner());
        let normal = Init::Normal(self.initializer_range);
        // GPT-2 scales residual projections by 1/sqrt(2 * n_layer) at init.
        let proj = Init::Normal(self.initializer_range / (2.0 * self.n_layer as f64).sqrt());
        let mut v = vec![
            ParamSpec::new("transformer.wte.weight", &[self.vocab_size, h], normal),
            ParamSpec::new("transformer.wpe.weight", &[self.n_positions, h], normal),
        ];
        let ln = |v: &mut Vec<ParamSpec>, name: String| {
            v.push(ParamSpec::new(&format!("{name}.weight"), &[h], Init::Ones));
            v.push(ParamSpec::new(&format!("{name}.bias"), &[h], Init::Zeros));
        };
        let conv = |v: &mut Vec<ParamSpec>, name: String, inp: usize, out: usize, init: Init| {
            v.push(ParamSpec::new(&format!("{name}.weight"), &[inp, out], init));
            v.push(ParamSpec::new(&format!("{name}.bias"), &[out], Init::Zeros));
        };
        for i in 0..self.n_layer {
            let p = format!("transformer.h.{i}");
            ln(&mut v, format!("{p}.ln_1"));
            conv(&mut v, format!("{p}.attn.c_attn"), h, 3 * h, normal);
            conv(&mut v, format!("{p}.attn.c_proj"), h, h, proj);
            ln(&mut v, format!("{p}.ln_2"));
            conv(&mut v, format!("{p}.mlp.c_fc"), h, inner, normal);
            conv(&mut v, format!("{p}.mlp.c_proj"), inner, h, proj);
        }
        ln(&mut v, "transformer.ln_f".into());
        if !self.tie_word_embeddings {
            v.push(ParamSpec::new(
                "lm_head.weight",
                &[self.vocab_size, h],
                normal,
            ));
        }
        v
    }

    fn build(&self, params: &Params) -> Result<Box<dyn Network>> {
        Ok(Box::new(Gpt2::new(self.clone(), params, "config.json")?))
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln1: (Tensor, Tensor),
    c_attn: Linear,
    c_proj: Linear,
    ln2: (Tensor, Tensor),
    c_fc: Linear,
    mlp_proj: Linear,
}

#[derive(Debug, Clone)]
struct Gpt2 {
    cfg: Gpt2Config,
    act: Activation,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: (Tensor, Tensor),
    lm_head: Linear,
}

impl Gpt2 {
    fn new(cfg: Gpt2Config, p: &Params, file: &str) -> Result<Self> {
        let conv = |name: &str| -> Result<Linear> {
            Ok(Linear::new(
                p.get(&format!("{name}.weight"))?,
                Some(p.get(&format!("{name}.bias"))?),
                WeightLayout::InOut,
            ))
        };
        let ln = |name: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                p.get(&format!("{name}.weight"))?,
                p.get(&format!("{name}.bias"))?,
            ))
        };
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let b = format!("transformer.h.{i}");
                Ok(Block {
                    ln1: ln(&format!("{b}.ln_1"))?,
                    c_attn: conv(&format!("{b}.attn.c_attn"))?,
                    c_proj: conv(&format!("{b}.attn.c_proj"))?,
                    ln2: ln(&format!("{b}.ln_2"))?,
                    c_fc: conv(&format!("{b}.mlp.c_fc"))?,
                    mlp_proj: conv(&format!("{b}.mlp.c_proj"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let wte = p.get("transformer.wte.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(wte.clone(), None, WeightLayout::OutIn)
        } else {
            Linear::new(p.get("lm_head.weight")?, None, WeightLayout::OutIn)
        };
        Ok(Self {
            act: cfg.act(file)?,
            wpe: p.get("transformer.wpe.weight")?,
            ln_f: ln("transformer.ln_f")?,
            wte,
            blocks,
            lm_head,
            cfg,
        })
    }

    /// `transformers`' learned positions end at `n_positions`: a later one is refused.
    fn check_positions(&self, pos: &[u32]) -> Result<()> {
        if let Some(&p) = pos.iter().max() {
            if p as usize >= self.cfg.n_positions {
                bail!(
                    "gpt2: position {p} is beyond n_positions = {}",
                    self.cfg.n_positions
                )
            }
        }
        Ok(())
    }

    /// The attention logits' scale in block `li`.
    fn attn_scale(&self, li: usize) -> f64 {
        let d = self.cfg.n_embd / self.cfg.n_head;
        let mut scale = if self.cfg.scale_attn_weights {
            1.0 / (d as f64).sqrt()
        } else {
            1.0
        };
        if self.cfg.scale_attn_by_inverse_layer_idx {
            scale /= (li + 1) as f64;
        }
        scale
    }
}

impl Network for Gpt2 {
    fn kv_shape(&self) -> (usize, usize, usize) {
        (
            self.cfg.n_layer,
            self.cfg.n_head,
            self.cfg.n_embd / self.cfg.n_head,
        )
    }

    fn hidden(
        &self,
        ids: &Tensor,
        pos: &Positions,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (h, nh) = (self.cfg.n_embd, self.cfg.n_head);
        let d = h / nh;
        let (pos_vec, rows) = pos.resolve(b, t)?;
        self.check_positions(&pos_vec)?;
        let pos_ids = Tensor::from_vec(pos_vec, rows * t, ids.device())?;
        let pe = self.wpe.index_select(&pos_ids, 0)?.reshape((rows, t, h))?;
        let te = self
            .wte
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let mut x = te.broadcast_add(&pe)?;
        let eps = self.cfg.layer_norm_epsilon;
        for (li, blk) in self.blocks.iter().enumerate() {
            let scale = self.attn_scale(li);
            let a = ops::layer_norm(&x, &blk.ln1.0, &blk.ln1.1, eps)?;
            // [b,t,3h] -> [3,b,nh,t,d] in one copy, then free views of q, k, v.
            let qkv = blk
                .c_attn
                .forward(&a)?
                .reshape((b, t, 3, nh, d))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()?;
            let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
            let a = attention(&q, &k, &v, scale, li, cache.as_deref_mut())?;
            x = (x + blk.c_proj.forward(&a)?)?;
            let m = ops::layer_norm(&x, &blk.ln2.0, &blk.ln2.1, eps)?;
            let m = self.act.apply(&blk.c_fc.forward(&m)?)?;
            x = (x + blk.mlp_proj.forward(&m)?)?;
        }
        ops::layer_norm(&x, &self.ln_f.0, &self.ln_f.1, eps)
    }

    fn hidden_engine(
        &self,
        ids: &Tensor,
        pos: &Positions,
        groups: Option<&[u32]>,
        at: Option<&[u32]>,
    ) -> Option<Result<Tensor>> {
        // GPT-2's stack does not pick tokens: the caller runs the full pass and selects.
        if !crate::engine::on_engine(self) || at.is_some() {
            return None;
        }
        let run = || {
            let (b, t) = ids.dims2()?;
            let (pos, rows) = pos.resolve(b, t)?;
            // `Body::forward` checks the positions against n_positions.
            crate::engine::hidden(self, ids, &pos, rows, groups, at)
        };
        Some(run())
    }

    fn attends_by_group(&self) -> bool {
        crate::engine::on_engine(self)
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
            let (pos, rows) = pos.resolve(b, t)?;
            // `Body::forward` checks the positions against n_positions.
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
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("transformer.h.{i}");
            v.push((format!("{p}.attn.c_attn"), &mut b.c_attn));
            v.push((format!("{p}.attn.c_proj"), &mut b.c_proj));
            v.push((format!("{p}.mlp.c_fc"), &mut b.c_fc));
            v.push((format!("{p}.mlp.c_proj"), &mut b.mlp_proj));
        }
        v.push(("lm_head".into(), &mut self.lm_head));
        v
    }
}
