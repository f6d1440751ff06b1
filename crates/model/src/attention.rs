//! Scaled dot-product attention shared by all architectures, with and without a KV cache.

use crate::ops;
use candle_core::{DType, Device, Result, Tensor};

/// Preallocated key/value cache for incremental decoding: one `[b, kv_heads, capacity, head_dim]`
/// pair per layer, written in place (`slice_set`), so decoding never re-allocates or concatenates.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    /// Number of positions already written.
    len: usize,
    capacity: usize,
    /// Additive mask `[b, 1, 1, tq, len + tq]` for the step being computed (0 or -inf).
    mask: Option<Tensor>,
}

impl KvCache {
    pub fn new(
        layers: usize,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        device: &Device,
    ) -> Result<Self> {
        let layers = (0..layers)
            .map(|_| {
                let z = || Tensor::zeros((batch, kv_heads, capacity, head_dim), DType::F32, device);
                Ok((z()?, z()?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, len: 0, capacity, mask: None })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the mask of the next step: `key_valid[b][j]` says whether row `b` may attend to cache
    /// position `j` (for `j < len + tq`); causality within the step is added here.
    pub fn begin_step(&mut self, key_valid: &[Vec<bool>], tq: usize, device: &Device) -> Result<()> {
        let total = self.len + tq;
        if total > self.capacity {
            candle_core::bail!("KV cache overflow: {total} positions > capacity {}", self.capacity)
        }
        let b = key_valid.len();
        let mut m = vec![f32::NEG_INFINITY; b * tq * total];
        for (bi, valid) in key_valid.iter().enumerate() {
            for qi in 0..tq {
                let row = &mut m[(bi * tq + qi) * total..(bi * tq + qi + 1) * total];
                for (j, v) in row.iter_mut().enumerate().take(self.len + qi + 1) {
                    if valid[j] {
                        *v = 0.0;
                    }
                }
                // A padding query sees no valid key; letting it see itself keeps its (unused)
                // output finite, since a NaN in the cache would poison `0 * v` for every row.
                row[self.len + qi] = 0.0;
            }
        }
        self.mask = Some(Tensor::from_vec(m, (b, 1, 1, tq, total), device)?);
        Ok(())
    }

    /// Marks the `tq` positions of the current step as written.
    pub fn end_step(&mut self, tq: usize) {
        self.len += tq;
        self.mask = None;
    }
}

/// Attention over `q: [b, nh, tq, d]`, `k, v: [b, nkv, tq, d]` (contiguous), returning
/// `[b, tq, nh*d]`. Without a cache the mask is plain causal (right-padded training batches).
///
/// GQA without copies: query heads `g*rep .. (g+1)*rep` share key head `g`, so `q` is viewed as
/// `[b, nkv, rep*tq, d]` and multiplied by the un-repeated keys.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    layer: usize,
    cache: Option<&mut KvCache>,
) -> Result<Tensor> {
    let (b, nh, tq, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    let rep = nh / nkv;
    let q = q.reshape((b, nkv, rep * tq, d))?;
    let out = match cache {
        None => {
            let s = q.matmul(&k.t()?)?;
            let p = ops::causal_softmax(&s, scale, tq, 0)?;
            p.matmul(v)?
        }
        Some(cache) => {
            let offset = cache.len;
            let (kc, vc) = &cache.layers[layer];
            kc.slice_set(k, 2, offset)?;
            vc.slice_set(v, 2, offset)?;
            let total = offset + tq;
            let k = kc.narrow(2, 0, total)?;
            let v = vc.narrow(2, 0, total)?;
            let mask = match &cache.mask {
                Some(m) => m,
                None => candle_core::bail!("KvCache::begin_step was not called before the forward pass"),
            };
            let s = (q.matmul(&k.t()?)? * scale)?
                .reshape((b, nkv, rep, tq, total))?
                .broadcast_add(mask)?;
            // Generation needs no gradient, so candle's fused (forward-only) softmax is fine here.
            let p = candle_nn::ops::softmax_last_dim(&s)?.reshape((b, nkv, rep * tq, total))?;
            p.matmul(&v)?
        }
    };
    out.reshape((b, nh, tq, d))?.transpose(1, 2)?.reshape((b, tq, nh * d))
}
