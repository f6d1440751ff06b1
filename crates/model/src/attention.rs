//! Scaled dot-product attention shared by all architectures, with and without a KV cache.

use crate::ops::{self, CacheDims};
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Result, Tensor};
use std::ops::Range;

/// Preallocated key/value cache for incremental decoding: one `[b, kv_heads, capacity, head_dim]`
/// pair per layer, written in place (`slice_set` on the graph, [`KvCache::store`] on the engine),
/// so decoding never re-allocates or concatenates.
///
/// Row `b` attends to cache positions `row_start[b]..` (earlier ones are left padding) up to and
/// including the query's own position.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    /// Number of positions already written.
    len: usize,
    capacity: usize,
    row_start: Vec<usize>,
    /// Tokens in the step being computed.
    step: usize,
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
        Ok(Self {
            layers,
            len: 0,
            capacity,
            row_start: vec![0; batch],
            step: 0,
        })
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

    /// Sets the first valid cache position of every row (its left padding ends there).
    pub fn set_row_start(&mut self, row_start: &[usize]) -> Result<()> {
        if row_start.len() != self.row_start.len() {
            candle_core::bail!(
                "KvCache: {} row starts for a batch of {}",
                row_start.len(),
                self.row_start.len()
            )
        }
        self.row_start = row_start.to_vec();
        Ok(())
    }

    /// Declares that the next forward pass appends `tq` positions.
    pub fn begin_step(&mut self, tq: usize) -> Result<()> {
        if self.len + tq > self.capacity {
            candle_core::bail!(
                "KV cache overflow: {} positions > capacity {}",
                self.len + tq,
                self.capacity
            )
        }
        self.step = tq;
        Ok(())
    }

    /// Marks the positions of the current step as written.
    pub fn end_step(&mut self) {
        self.len += self.step;
        self.step = 0;
    }

    /// The most keys any real query of a step of `tq` new positions attends to (its row's tokens
    /// from the row start up to the step's last position).
    pub(crate) fn longest_span(&self, tq: usize) -> usize {
        let first = self.row_start.iter().copied().min().unwrap_or(0);
        (self.len + tq).saturating_sub(first)
    }

    /// Number of batch rows.
    pub fn rows(&self) -> usize {
        self.row_start.len()
    }

    /// A new cache made of the given rows of several caches (in order), for continuous batching:
    /// finished rows are dropped and joining requests' prefilled rows appended. Every row keeps
    /// exactly its valid keys and values in the same order, right-aligned at the new length (the
    /// longest kept row), so padding that no kept row needs any more is trimmed away; `extra` free
    /// positions are reserved after the new length.
    pub fn regroup(parts: &[(&KvCache, &[usize])], extra: usize) -> Result<KvCache> {
        let parts: Vec<&(&KvCache, &[usize])> =
            parts.iter().filter(|(_, r)| !r.is_empty()).collect();
        let Some(((first, _), _)) = parts.split_first() else {
            candle_core::bail!("KvCache::regroup: no rows to keep")
        };
        for (c, rows) in &parts {
            if c.step != 0 {
                candle_core::bail!("KvCache::regroup: a step is in progress")
            }
            if let Some(&r) = rows.iter().find(|&&r| r >= c.rows()) {
                candle_core::bail!("KvCache::regroup: row {r} of a {}-row cache", c.rows())
            }
        }
        // Valid positions of a row are row_start..len; the new length fits the longest.
        let used = |c: &KvCache, rows: &[usize]| {
            c.len - rows.iter().map(|&r| c.row_start[r]).min().unwrap_or(c.len)
        };
        let len = parts
            .iter()
            .map(|(c, rows)| used(c, rows))
            .max()
            .unwrap_or(0);
        // Old position j of a part moves to j + len - c.len.
        let shift = |c: &KvCache| (c.len.saturating_sub(len), len.saturating_sub(c.len));
        let row_start = parts
            .iter()
            .flat_map(|(c, rows)| {
                rows.iter()
                    .map(|&r| c.row_start[r] + shift(c).1 - shift(c).0)
            })
            .collect();
        // Copied slice by slice (rows leave the batch at most decode steps; a graph of index_select,
        // narrow, pad and cat per tensor cost more than the copy).
        let total: usize = parts.iter().map(|(_, rows)| rows.len()).sum();
        let (heads, d) = {
            let dims = first
                .layers
                .first()
                .map(|(k, _)| k.dims().to_vec())
                .unwrap_or_default();
            (
                dims.get(1).copied().unwrap_or(0),
                dims.get(3).copied().unwrap_or(0),
            )
        };
        let cap = len + extra;
        let regroup_tensor = |pick: &dyn Fn(&KvCache) -> &Tensor| -> Result<Tensor> {
            let mut out = vec![0f32; total * heads * cap * d];
            let mut i = 0;
            for (c, rows) in &parts {
                let (cut, pad) = shift(c);
                let (st, l) = pick(c).storage_and_layout();
                let src = crate::engine::cpu_f32(&st, l, "KvCache::regroup")?;
                let kept = (c.len - cut) * d;
                for &r in rows.iter() {
                    for h in 0..heads {
                        let from = ((r * heads + h) * c.capacity + cut) * d;
                        let to = ((i * heads + h) * cap + pad) * d;
                        out[to..to + kept].copy_from_slice(&src[from..from + kept]);
                    }
                    i += 1;
                }
            }
            Tensor::from_vec(out, (total, heads, cap, d), first.device())
        };
        let layers = (0..first.layers.len())
            .map(|layer| {
                Ok((
                    regroup_tensor(&|c: &KvCache| &c.layers[layer].0)?,
                    regroup_tensor(&|c: &KvCache| &c.layers[layer].1)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len,
            capacity: len + extra,
            row_start,
            step: 0,
        })
    }

    fn device(&self) -> &Device {
        self.layers
            .first()
            .map_or(&Device::Cpu, |(k, _)| k.device())
    }

    /// Keys visible to the query at absolute position `a` of row `b`: `lo..=a`. A padding query
    /// (before its row's start) sees only itself, which keeps its unused output finite — a NaN in
    /// the cache would poison `0 * v` for every row.
    fn visible_from(&self, b: usize, a: usize) -> usize {
        if a >= self.row_start[b] {
            self.row_start[b]
        } else {
            a
        }
    }

    /// For every row of `rows` and query of a step of `tq` new positions, its first visible key.
    fn starts(&self, rows: Range<usize>, tq: usize) -> Vec<Vec<usize>> {
        rows.map(|bi| {
            (0..tq)
                .map(|qi| self.visible_from(bi, self.len + qi))
                .collect()
        })
        .collect()
    }

    /// Fails unless the cache has exactly `b` rows (a pass over another batch would read or write
    /// rows that are not its own).
    pub(crate) fn check_rows(&self, b: usize) -> Result<()> {
        if b != self.rows() {
            candle_core::bail!(
                "KvCache: a batch of {b} rows through a cache of {} rows (make the cache with CausalLm::new_kv_cache for this batch)",
                self.rows()
            )
        }
        Ok(())
    }

    /// Fails unless a step of `tq` positions was begun ([`KvCache::begin_step`]).
    fn check_step(&self, tq: usize) -> Result<()> {
        if self.step != tq {
            candle_core::bail!("KvCache::begin_step({tq}) was not called before the forward pass")
        }
        Ok(())
    }

    /// The tensors of `layer`, whose batch rows `rows` a pass reads or writes (checked).
    fn rows_of(&self, layer: usize, rows: &Range<usize>) -> Result<&(Tensor, Tensor)> {
        if rows.end > self.rows() {
            candle_core::bail!("KvCache: rows {rows:?} of a {}-row cache", self.rows())
        }
        match self.layers.get(layer) {
            Some(kv) => Ok(kv),
            None => candle_core::bail!(
                "KvCache: no layer {layer} in a {}-layer cache (made for another model?)",
                self.layers.len()
            ),
        }
    }

    /// The engine's [`attention`] write: the keys and values `[rows, nkv, tq, d]` (row-major
    /// slices) of a step of `tq` positions of the batch rows `rows`, stored in `layer` at the
    /// step's positions, in place. Passes over disjoint rows may store side by side.
    pub(crate) fn store(
        &self,
        layer: usize,
        tq: usize,
        rows: Range<usize>,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        self.check_step(tq)?;
        let (kc, vc) = self.rows_of(layer, &rows)?;
        for (cache, src) in [(kc, k), (vc, v)] {
            cache.inplace_op1(&StoreStep {
                src,
                row: rows.start,
                rows: rows.len(),
                offset: self.len,
                tq,
            })?;
        }
        Ok(())
    }

    /// The engine's [`attention`] read: `q [rows, nh, tq, d]` (the rotated queries of a step of
    /// `tq` positions of the batch rows `rows`) against `layer`'s cache after [`KvCache::store`],
    /// into `out [rows, tq, nh * d]`.
    pub(crate) fn attend(
        &self,
        layer: usize,
        tq: usize,
        rows: Range<usize>,
        scale: f32,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        self.check_step(tq)?;
        let (kc, vc) = self.rows_of(layer, &rows)?;
        let (_, nkv, cap, d) = kc.dims4()?;
        let b = rows.len();
        let nh = q.len() / (b * tq * d).max(1);
        if nkv == 0 || !nh.is_multiple_of(nkv) || q.len() != b * nh * tq * d || out.len() != q.len()
        {
            candle_core::bail!(
                "KvCache::attend: {} query values do not fit {b} rows of {nkv} kv heads of {d} and a step of {tq}",
                q.len()
            )
        }
        let (ks, kl) = kc.storage_and_layout();
        let (vs, vl) = vc.storage_and_layout();
        let row = nkv * cap * d;
        let k = &crate::engine::cpu_f32(&ks, kl, "KvCache::attend")?[rows.start * row..][..b * row];
        let v = &crate::engine::cpu_f32(&vs, vl, "KvCache::attend")?[rows.start * row..][..b * row];
        let dims = CacheDims {
            b,
            nh,
            nkv,
            tq,
            d,
            cap,
        };
        let starts = self.starts(rows, tq);
        ops::cached_attention_fwd(dims, scale, self.len, &starts, q, k, v, out);
        Ok(())
    }

    /// Additive mask `[b, 1, 1, tq, len + tq]` (0 or -inf) for the generic (non-CPU) path.
    fn mask(&self, tq: usize, device: &Device) -> Result<Tensor> {
        let total = self.len + tq;
        let b = self.row_start.len();
        let mut m = vec![f32::NEG_INFINITY; b * tq * total];
        for bi in 0..b {
            for qi in 0..tq {
                let a = self.len + qi;
                let row = &mut m[(bi * tq + qi) * total..(bi * tq + qi + 1) * total];
                row[self.visible_from(bi, a)..=a]
                    .iter_mut()
                    .for_each(|v| *v = 0.0);
            }
        }
        Tensor::from_vec(m, (b, 1, 1, tq, total), device)
    }
}

/// Attention over `q: [b, nh, tq, d]`, `k, v: [b, nkv, tq, d]` (contiguous), returning
/// `[b, tq, nh*d]`. Without a cache the mask is plain causal (right-padded training batches).
///
/// GQA without copies: query heads `g*rep .. (g+1)*rep` share key head `g`; on the generic path
/// `q` is viewed as `[b, nkv, rep*tq, d]` and multiplied by the un-repeated keys.
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
    let Some(cache) = cache else {
        return ops::causal_attention(q, k, v, scale);
    };
    cache.check_step(tq)?;
    let offset = cache.len;
    let (kc, vc) = &cache.layers[layer];
    kc.slice_set(k, 2, offset)?;
    vc.slice_set(v, 2, offset)?;
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        let op = ops::CachedAttention {
            scale: scale as f32,
            offset,
            starts: cache.starts(0..b, tq),
        };
        return q
            .contiguous()?
            .apply_op3_no_bwd(kc, vc, &op)?
            .reshape((b, tq, nh * d));
    }
    let total = offset + tq;
    let q = q.reshape((b, nkv, rep * tq, d))?;
    let k = kc.narrow(2, 0, total)?;
    let v = vc.narrow(2, 0, total)?;
    let s = (q.matmul(&k.t()?)? * scale)?
        .reshape((b, nkv, rep, tq, total))?
        .broadcast_add(&cache.mask(tq, q.device())?)?;
    // Generation needs no gradient, so candle's fused (forward-only) softmax is fine here.
    let p = candle_nn::ops::softmax_last_dim(&s)?.reshape((b, nkv, rep * tq, total))?;
    p.matmul(&v)?
        .reshape((b, nh, tq, d))?
        .transpose(1, 2)?
        .reshape((b, tq, nh * d))
}

/// Writes a step's keys or values `[rows, nkv, tq, d]` into the rows `row..row + rows` of a cache
/// tensor `[b, nkv, capacity, d]` at positions `offset..offset + tq` (what `slice_set` does, from a
/// slice).
struct StoreStep<'a> {
    src: &'a [f32],
    row: usize,
    rows: usize,
    offset: usize,
    tq: usize,
}

impl InplaceOp1 for StoreStep<'_> {
    fn name(&self) -> &'static str {
        "rlhf-kv-store"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (b, nkv, cap, d) = match layout.dims() {
            &[b, nkv, cap, d] => (b, nkv, cap, d),
            other => candle_core::bail!("KvCache: a cache tensor of shape {other:?}"),
        };
        let (CpuStorage::F32(data), Some((lo, hi))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("KvCache: the engine writes contiguous f32 caches only")
        };
        let (tq, d_step) = (self.tq, self.tq * d);
        if self.src.len() != self.rows * nkv * d_step
            || self.row + self.rows > b
            || self.offset + tq > cap
        {
            candle_core::bail!(
                "KvCache: {} values for rows {}..{} and positions {}..{} of a [{b}, {nkv}, {cap}, {d}] cache",
                self.src.len(),
                self.row,
                self.row + self.rows,
                self.offset,
                self.offset + tq
            )
        }
        let dst = &mut data[lo..hi];
        for (i, src) in self.src.chunks(d_step.max(1)).enumerate() {
            let at = ((self.row * nkv + i) * cap + self.offset) * d;
            dst[at..at + d_step].copy_from_slice(src);
        }
        Ok(())
    }
}
