//! Linear layers shared by all architectures, with the seam where LoRA (or any other adapter)
//! plugs in.

use crate::bf16::{PackedB, Precision};
use crate::lora::DropoutMask;
use crate::pack_cache::PackCache;
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// How the weight is stored on disk / in the `VarMap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `torch.nn.Linear`: `[out, in]`.
    OutIn,
    /// GPT-2 `Conv1D`: `[in, out]`.
    InOut,
}

/// Something that adds a learned delta to a linear layer's output, e.g. a LoRA pair
/// `scale * B(A(dropout(x)))`. Its own parameters live wherever the adapter keeps them (they are
/// not part of [`crate::CausalLm::varmap`]).
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// `x`: the layer input `[.., in]`; returns the delta `[.., out]` added to the base output.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// The adapter as a low-rank product, for hand-written passes ([`crate::engine`]). `None` (the
    /// default): it has no such form, and a stack containing it runs on candle's graph.
    fn low_rank(&self) -> Option<&dyn LowRankAdapter> {
        None
    }
}

/// An adapter whose delta is `scale · (x ⊙ mask) Aᵀ Bᵀ` (LoRA): what the engine computes in place
/// of [`LinearAdapter::forward`], with the same parameters and the same dropout masks.
pub trait LowRankAdapter {
    /// A `[r, in]` and B `[out, r]` (f32), and the scale.
    fn factors(&self) -> (&Tensor, &Tensor, f64);
    /// Starts one forward pass: `None` when the adapter adds nothing this pass (disabled), else the
    /// dropout mask of its input (`None`: no dropout). Advances the state [`LinearAdapter::forward`]
    /// advances (the dropout stream), so call it exactly once where `forward` would be called.
    fn begin_pass(&self) -> Option<Option<DropoutMask>>;
}

/// `y = x W^T + b (+ adapter(x))`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The `VarMap` variable's tensor (shares storage with it, so optimizer updates are seen).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub layout: WeightLayout,
    pub adapter: Option<Arc<dyn LinearAdapter>>,
    /// Of the base layer's matrix products (set model-wide by [`crate::CausalLm::set_precision`]);
    /// adapters compute in f32.
    pub precision: Precision,
    /// The weight converted once for its products, in inference copies.
    packed: Option<Arc<PackedB>>,
    /// The weight's conversions (bf16 packs, an f32 inference copy's transpose), kept until it
    /// changes (shared with clones and inference copies).
    pub(crate) packs: Arc<PackCache>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>, layout: WeightLayout) -> Self {
        Self {
            packs: PackCache::registered(&weight),
            weight,
            bias,
            layout,
            adapter: None,
            precision: Precision::Fp32,
            packed: None,
        }
    }

    pub fn in_features(&self) -> usize {
        match self.layout {
            WeightLayout::OutIn => self.weight.dims()[1],
            WeightLayout::InOut => self.weight.dims()[0],
        }
    }

    pub fn out_features(&self) -> usize {
        match self.layout {
            WeightLayout::OutIn => self.weight.dims()[0],
            WeightLayout::InOut => self.weight.dims()[1],
        }
    }

    /// A detached copy for decoding, holding the weight converted once for its products: at bf16
    /// packed from its stored layout (decoding multiplies a few rows by it, so converting it per
    /// product would cost as much as the product), at f32 an `[out, in]` weight copied to `[in, out]`
    /// rows (at decode batch sizes the CPU gemm multiplies by them about twice as fast as by the
    /// transposed view). The conversion is the layer's kept one ([`PackCache`]), which the training
    /// forward then reuses.
    pub fn inference_copy(&self) -> Result<Linear> {
        self.inference_copy_keeping(true)
    }

    /// [`Linear::inference_copy`]; `keep`: leave its conversion for the layer's next training forward
    /// (false for the LM head: no training forward takes its conversion).
    pub(crate) fn inference_copy_keeping(&self, keep: bool) -> Result<Linear> {
        let converts = self.precision == Precision::Bf16 || self.layout == WeightLayout::OutIn;
        let packed = if converts {
            crate::engine::cached_forward_pack(self, keep)?
        } else {
            None
        };
        Ok(Linear {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            layout: self.layout,
            adapter: self.adapter.clone(),
            precision: self.precision,
            packed,
            packs: self.packs.clone(),
        })
    }

    /// The weight converted once (inference copies), for the engine's products.
    pub(crate) fn packed(&self) -> Option<&PackedB> {
        self.packed.as_deref()
    }

    /// The low-rank form of the adapter, if there is one and it has that form.
    pub fn low_rank(&self) -> Option<&dyn LowRankAdapter> {
        self.adapter.as_deref().and_then(|a| a.low_rank())
    }

    /// Output of the frozen base layer only (no adapter).
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let transposed = self.layout == WeightLayout::OutIn;
        let y = crate::ops::linear_matmul_packed(
            x,
            &self.weight,
            transposed,
            self.precision,
            self.packed.clone(),
        )?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        match &self.adapter {
            Some(a) => y + a.forward(x)?,
            None => Ok(y),
        }
    }
}
