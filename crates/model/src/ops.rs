//! Differentiable building blocks of the models.
//!
//! candle 0.11's fused `candle_nn::ops::{softmax_last_dim, rms_norm, layer_norm}` and
//! `rotary_emb::rope*` have no backward pass: their outputs are silently detached, so a model built
//! from them would only train `lm_head`. Every op here therefore has
//! * a fused f32 CPU kernel (`CustomOp*` with `bwd` implemented by a second fused kernel), and
//! * a plain composition of differentiable candle ops (`*_ref`), used on other devices/dtypes and
//!   as the oracle in tests.
//!
//! Fused kernels require contiguous inputs; the public wrappers make them contiguous (a no-op when
//! they already are) and upstream gradients are made contiguous inside `bwd`.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};
use std::cell::Cell;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

use crate::bf16::{gemm_ops, gemm_prec, Lhs, PackedB, Precision, Rhs};
use crate::matmul::{gemm_into, MatRef};

/// Below this many f32 elements a kernel runs on the calling thread: handing out the work costs more
/// than it saves on the tiny tensors of the small models.
const PAR_MIN_ELEMS: usize = 1 << 15;

thread_local! {
    static REFERENCE_OPS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every op of this module built from its plain candle composition (`*_ref`) on
/// this thread: the oracle the fused kernels are tested against, whole models included.
pub fn with_reference_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            REFERENCE_OPS.set(self.0);
        }
    }
    let _restore = Restore(REFERENCE_OPS.replace(true));
    f()
}

/// Whether the fused kernels are in use on this thread (not inside [`with_reference_ops`]).
pub(crate) fn fused_enabled() -> bool {
    !REFERENCE_OPS.get()
}

pub(crate) fn fused_ok(ts: &[&Tensor]) -> bool {
    !REFERENCE_OPS.get()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

fn f32_in<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => bail!("{op}: expected an f32 tensor, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

fn u32_in(s: &CpuStorage, l: &Layout, op: &str) -> Result<Vec<u32>> {
    let (a, b) = match l.contiguous_offsets() {
        Some(o) => o,
        None => bail!("{op}: targets must be contiguous"),
    };
    Ok(match s {
        CpuStorage::U32(v) => v[a..b].to_vec(),
        CpuStorage::I64(v) => v[a..b].iter().map(|&x| x as u32).collect(),
        other => bail!("{op}: targets must be u32 or i64, got {:?}", other.dtype()),
    })
}

/// Runs `f(row_index, row)` over the rows of `out`, in parallel when the tensor is large.
fn for_rows(out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let parallel = out.len() >= PAR_MIN_ELEMS;
    for_rows_with(out, row_len, parallel, f)
}

fn for_rows_with(
    out: &mut [f32],
    row_len: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    if row_len == 0 {
        return;
    }
    if parallel {
        crate::par::chunks_mut(out, row_len, f);
    } else {
        out.chunks_mut(row_len)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    }
}

/// Groups of [`fold_groups`]: enough to keep every core busy, few enough that per-group state stays small.
const FOLD_GROUPS: usize = 8;

/// A parallel fold whose float results do not depend on thread scheduling: `items` are cut into at most
/// [`FOLD_GROUPS`] contiguous groups fixed by their count alone, each folded in order on some thread, and the
/// group results merged in order. (Grouping by which thread took which item would make sums differ in the last
/// bits between runs, and training would not reproduce.)
fn fold_groups<I: Send, A: Send>(
    items: Vec<I>,
    init: impl Fn() -> A + Sync + Send,
    step: impl Fn(A, I) -> A + Sync + Send,
    merge: impl Fn(A, A) -> A,
) -> A {
    let per = items.len().div_ceil(FOLD_GROUPS).max(1);
    let mut groups: Vec<Vec<I>> = Vec::new();
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        groups.push(it.by_ref().take(per).collect());
    }
    let parts: Vec<A> = crate::par::map_mut(&mut groups, |_, g| {
        std::mem::take(g).into_iter().fold(init(), &step)
    });
    parts.into_iter().reduce(merge).unwrap_or_else(init)
}

/// Sums per-row contributions `f(row_index, acc)` into `k` accumulators of length `len`
/// (parallel over row blocks, then reduced).
fn reduce_rows(
    rows: usize,
    len: usize,
    k: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let block = 64;
    let run = |b: usize| {
        let mut acc = vec![0f32; len * k];
        for r in b * block..((b + 1) * block).min(rows) {
            f(r, &mut acc);
        }
        acc
    };
    let nblocks = rows.div_ceil(block);
    let add = |mut a: Vec<f32>, b: Vec<f32>| {
        a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
        a
    };
    if rows * len >= PAR_MIN_ELEMS {
        // Collected, then summed in block order: a reduce as threads finish would add in a scheduling-dependent
        // order and make training differ in the last bits from run to run.
        let parts: Vec<Vec<f32>> = crate::par::map(nblocks, run);
        parts.into_iter().fold(vec![0f32; len * k], add)
    } else {
        (0..nblocks).map(run).fold(vec![0f32; len * k], add)
    }
}

/// Defines a kernel compiled twice: for baseline x86-64 (the crate's target: 4-lane SSE) and for
/// AVX-512, chosen at run time. The kernels' loops are written in independent lanes the compiler
/// widens; both builds run the same IEEE operations in the same order, so the same bits. Rayon
/// closures do not inherit a function's target features: apply it to what runs per row.
macro_rules! avx512_kernel {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { $name::wide($($arg),*) };
            }
            $name::imp($($arg),*)
        }

        /// The two builds of the kernel of the same name.
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            pub(super) fn imp($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn wide($($arg: $ty),*) {
                imp($($arg),*)
            }
        }
    };
}

/// exp(x) for f32 without a libm call, so that loops over it vectorise. Cephes-style range
/// reduction + degree-6 polynomial; relative error ≈ 2e-7 on the range that does not under/overflow.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    let bits = (t.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
    y * f32::from_bits(bits as u32)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rlhf-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_in(s1, l1, self.name())?;
        let w = f32_in(s2, l2, self.name())?;
        let mut out = vec![0f32; x.len()];
        rms_norm_rows(x, w, self.eps, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let rows = x.elem_count() / h;
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let gx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let gw = packed.narrow(0, rows, 1)?.reshape(w.shape())?;
        Ok((Some(gx), Some(gw)))
    }
}

/// Returns `[rows + 1, h]`: grad wrt x, then grad wrt the weight.
struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rlhf-rms-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_in(s1, l1, self.name())?;
        let w = f32_in(s2, l2, self.name())?;
        let g = f32_in(s3, l3, self.name())?;
        let h = w.len();
        let rows = x.len() / h;
        let mut out = vec![0f32; (rows + 1) * h];
        let (gx, gw) = out.split_at_mut(rows * h);
        gw.copy_from_slice(&rms_norm_bwd_rows(x, w, g, self.eps, gx, false));
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, h))))
    }
}

/// `out = w * x / sqrt(mean(x²) + eps)` row by row (rows of `w.len()`).
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for_rows(out, h, |i, o| {
        let xr = &x[i * h..(i + 1) * h];
        let r = inv_rms(xr, eps);
        for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
            *o = wv * (xv * r);
        }
    });
}

fn inv_rms(xr: &[f32], eps: f32) -> f32 {
    let ms = xr.iter().map(|v| v * v).sum::<f32>() / xr.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// Backward of [`rms_norm_rows`] for the upstream gradient `g`: the gradient wrt `x` is written to
/// `gx` (added to what it holds when `accumulate`: the residual stream's gradient), the one wrt the
/// weight returned.
pub(crate) fn rms_norm_bwd_rows(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    gx: &mut [f32],
    accumulate: bool,
) -> Vec<f32> {
    let h = w.len();
    let rows = x.len() / h;
    for_rows(gx, h, |i, o| {
        let xr = &x[i * h..(i + 1) * h];
        let gr = &g[i * h..(i + 1) * h];
        let r = inv_rms(xr, eps);
        // d/dx of w*x*r: r*(g*w - n*mean(g*w*n)) with n = x*r.
        let dot = xr
            .iter()
            .zip(gr)
            .zip(w)
            .map(|((&xv, &gv), &wv)| gv * wv * xv)
            .sum::<f32>()
            * r
            / h as f32;
        for (((o, &xv), &gv), &wv) in o.iter_mut().zip(xr).zip(gr).zip(w) {
            let d = r * (gv * wv - xv * r * dot);
            *o = if accumulate { *o + d } else { d };
        }
    });
    reduce_rows(rows, h, 1, |i, acc| {
        let xr = &x[i * h..(i + 1) * h];
        let gr = &g[i * h..(i + 1) * h];
        let r = inv_rms(xr, eps);
        for ((a, &xv), &gv) in acc.iter_mut().zip(xr).zip(gr) {
            *a += gv * xv * r;
        }
    })
}

/// RMSNorm over the last dim: `w * x / sqrt(mean(x²) + eps)` (Llama/Qwen2).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(&[x, w]) {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
    } else {
        rms_norm_ref(x, w, eps)
    }
}

/// Plain differentiable RMSNorm (reference / non-CPU path).
pub fn rms_norm_ref(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.broadcast_mul(w)
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

struct LayerNorm {
    eps: f32,
}

fn ln_stats(xr: &[f32], eps: f32) -> (f32, f32) {
    let h = xr.len() as f32;
    let mu = xr.iter().sum::<f32>() / h;
    let var = xr.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / h;
    (mu, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "rlhf-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_in(s1, l1, self.name())?;
        let w = f32_in(s2, l2, self.name())?;
        let b = f32_in(s3, l3, self.name())?;
        let mut out = vec![0f32; x.len()];
        layer_norm_rows(x, w, b, self.eps, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let rows = x.elem_count() / h;
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let gx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let gw = packed.narrow(0, rows, 1)?.reshape(w.shape())?;
        let gb = packed.narrow(0, rows + 1, 1)?.reshape(b.shape())?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// Returns `[rows + 2, h]`: grad wrt x, then wrt weight, then wrt bias.
struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "rlhf-layer-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_in(s1, l1, self.name())?;
        let w = f32_in(s2, l2, self.name())?;
        let g = f32_in(s3, l3, self.name())?;
        let h = w.len();
        let rows = x.len() / h;
        let mut out = vec![0f32; (rows + 2) * h];
        let (gx, gwb) = out.split_at_mut(rows * h);
        let (gw, gb) = layer_norm_bwd_rows(x, w, g, self.eps, gx, false);
        gwb[..h].copy_from_slice(&gw);
        gwb[h..].copy_from_slice(&gb);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, h))))
    }
}

/// `out = (x - mean) / sqrt(var + eps) * w + b` row by row (rows of `w.len()`).
pub(crate) fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for_rows(out, h, |i, o| {
        let xr = &x[i * h..(i + 1) * h];
        let (mu, r) = ln_stats(xr, eps);
        for (((o, &xv), &wv), &bv) in o.iter_mut().zip(xr).zip(w).zip(b) {
            *o = (xv - mu) * r * wv + bv;
        }
    });
}

/// Backward of [`layer_norm_rows`] for the upstream gradient `g`: the gradient wrt `x` is written
/// to `gx` (added to what it holds when `accumulate`: the residual stream's gradient), the ones
/// wrt the weight and the bias returned.
pub(crate) fn layer_norm_bwd_rows(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    gx: &mut [f32],
    accumulate: bool,
) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    let rows = x.len() / h.max(1);
    for_rows(gx, h, |i, o| {
        let xr = &x[i * h..(i + 1) * h];
        let gr = &g[i * h..(i + 1) * h];
        let (mu, r) = ln_stats(xr, eps);
        // grad_x = r * (gw - mean(gw) - n * mean(gw * n)), gw = g*w, n = (x-mu)*r.
        let (mut s_gw, mut s_gwn) = (0f32, 0f32);
        for ((&xv, &gv), &wv) in xr.iter().zip(gr).zip(w) {
            let gw = gv * wv;
            s_gw += gw;
            s_gwn += gw * (xv - mu) * r;
        }
        let (m_gw, m_gwn) = (s_gw / h as f32, s_gwn / h as f32);
        for (((o, &xv), &gv), &wv) in o.iter_mut().zip(xr).zip(gr).zip(w) {
            let d = r * (gv * wv - m_gw - (xv - mu) * r * m_gwn);
            *o = if accumulate { *o + d } else { d };
        }
    });
    let mut gw = reduce_rows(rows, h, 2, |i, acc| {
        let xr = &x[i * h..(i + 1) * h];
        let gr = &g[i * h..(i + 1) * h];
        let (mu, r) = ln_stats(xr, eps);
        let (aw, ab) = acc.split_at_mut(h);
        for (((aw, ab), &xv), &gv) in aw.iter_mut().zip(ab.iter_mut()).zip(xr).zip(gr) {
            *aw += gv * (xv - mu) * r;
            *ab += gv;
        }
    });
    let gb = gw.split_off(h);
    (gw, gb)
}

/// LayerNorm over the last dim with affine weight and bias (GPT-2).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(&[x, w, b]) {
        x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            LayerNorm { eps: eps as f32 },
        )
    } else {
        layer_norm_ref(x, w, b, eps)
    }
}

/// Plain differentiable LayerNorm (reference / non-CPU path).
pub fn layer_norm_ref(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let r = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    xc.broadcast_mul(&r)?.broadcast_mul(w)?.broadcast_add(b)
}

// ---------------------------------------------------------------------------------------------
// Causal self-attention over a whole sequence (training and scoring)

/// Query rows per tile: the queries `r0..r1` are multiplied only by keys `0..r1`, so most of the
/// masked upper triangle is never computed.
const ATTN_TILE: usize = 32;

/// `softmax(scale · q kᵀ + causal mask) v` for `q [b, nh, t, d]`, `k, v [b, nkv, t, d]`
/// (query heads `g*rep..(g+1)*rep` share key head `g`), returning `[b, t, nh*d]`, the layout the
/// output projection reads. Forward keeps only each row's log-sum-exp; the backward pass
/// recomputes the probabilities tile by tile (as FlashAttention does), so the `[t, t]` matrices
/// exist one tile at a time.
struct CausalAttention {
    scale: f32,
    lse: OnceLock<Vec<f32>>,
}

#[derive(Clone, Copy)]
pub(crate) struct AttnDims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    d: usize,
}

impl AttnDims {
    pub(crate) fn of(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        match (q, k) {
            (&[b, nh, t, d], &[kb, nkv, kt, kd])
                if kb == b && kt == t && kd == d && k == v && nkv > 0 && nh % nkv == 0 =>
            {
                Ok(Self { b, nh, nkv, t, d })
            }
            _ => bail!("causal attention: q {q:?}, k {k:?}, v {v:?} do not fit [b, nh, t, d] / [b, nkv, t, d]"),
        }
    }
    fn rep(&self) -> usize {
        self.nh / self.nkv
    }
    /// Positions per row.
    pub(crate) fn t(&self) -> usize {
        self.t
    }
    /// Groups (batch row, key head) are independent; parallel when there is enough work.
    fn parallel(&self) -> bool {
        self.b * self.nkv > 1 && self.b * self.nh * self.t * self.t * self.d >= 1 << 18
    }
}

/// `b` row-major into `dst` (`b.nrows() · b.ncols()` values): a transposed view of row-major data
/// (a linear layer's `[out, in]` weight read as `[in, out]`) is transposed in tiles
/// ([`transpose_into`]), anything else copied row by row.
pub(crate) fn copy_rows(b: MatRef, dst: &mut [f32], parallel: bool) {
    let (k, n) = (b.nrows(), b.ncols());
    assert_eq!(dst.len(), k * n, "copy_rows: destination size");
    if let Some((src, ls)) = b.transposed_source() {
        return transpose_into(src, n, k, ls, dst, parallel);
    }
    for (i, row) in dst.chunks_mut(n.max(1)).enumerate() {
        match b.row(i) {
            Some(src) => row.copy_from_slice(src),
            None => row
                .iter_mut()
                .enumerate()
                .for_each(|(j, d)| *d = b.at(i, j)),
        }
    }
}

/// The `[r, c]` matrix `src` (row stride `ls`) transposed into the row-major `[c, r]` `dst`, in
/// blocks of 32 source columns (on the pool when `parallel`), 8 × 8 tiles at a time in AVX
/// registers where the CPU has AVX: a column-at-a-time copy (candle's strided copy) or a scalar
/// blocked one made the transposes of an f32 generation's inference copy a fifth of its time on
/// the tiny model.
pub(crate) fn transpose_into(
    src: &[f32],
    r: usize,
    c: usize,
    ls: usize,
    dst: &mut [f32],
    parallel: bool,
) {
    const B: usize = 32;
    assert!(
        dst.len() == r * c && (r == 0 || c == 0 || (r - 1) * ls + c <= src.len()),
        "transpose_into: sizes"
    );
    if r == 0 || c == 0 {
        return;
    }
    let block = |jb: usize, out: &mut [f32]| transpose_columns(src, ls, jb * B, out, r);
    if parallel && dst.len() >= PAR_MIN_ELEMS {
        crate::par::chunks_mut(dst, B * r, block);
    } else {
        dst.chunks_mut(B * r)
            .enumerate()
            .for_each(|(jb, out)| block(jb, out));
    }
}

/// Source columns `j0..j0 + out.len() / r` of `src` (`r` rows, row stride `ls`) into the rows of
/// `out`.
fn transpose_columns(src: &[f32], ls: usize, j0: usize, out: &mut [f32], r: usize) {
    let nj = out.len() / r;
    let (r8, nj8) = (r / 8 * 8, nj / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        for i in (0..r8).step_by(8) {
            for j in (0..nj8).step_by(8) {
                // SAFETY: the CPU has AVX (checked above); rows i..i+8 of src hold columns
                // j0+j..j0+j+8 (i + 8 <= r, j0 + j + 8 <= the column count, checked by
                // transpose_into), and rows j..j+8 of out hold columns i..i+8 (j + 8 <= nj).
                unsafe {
                    transpose8(
                        src[i * ls + j0 + j..].as_ptr(),
                        ls,
                        out[j * r + i..].as_mut_ptr(),
                        r,
                    )
                }
            }
        }
    } else {
        scalar_transpose(src, ls, j0, out, r, 0..r8, 0..nj8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    scalar_transpose(src, ls, j0, out, r, 0..r8, 0..nj8);
    // What the 8 × 8 tiles left: the last r % 8 rows, then the last nj % 8 columns.
    scalar_transpose(src, ls, j0, out, r, r8..r, 0..nj);
    scalar_transpose(src, ls, j0, out, r, 0..r8, nj8..nj);
}

fn scalar_transpose(
    src: &[f32],
    ls: usize,
    j0: usize,
    out: &mut [f32],
    r: usize,
    rows: Range<usize>,
    cols: Range<usize>,
) {
    for j in cols {
        for i in rows.clone() {
            out[j * r + i] = src[i * ls + j0 + j];
        }
    }
}

/// The 8 × 8 tile at `src` (row stride `ls`) transposed into `dst` (row stride `ld`): interleave
/// pairs of rows, then pairs of pairs, then swap 128-bit halves. Written out: closures would not
/// inherit the AVX target feature (the intrinsics would not inline), and the same steps over arrays
/// of registers measured up to 40 % slower (512 × 256).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8(src: *const f32, ls: usize, dst: *mut f32, ld: usize) {
    use std::arch::x86_64::*;
    let r0 = _mm256_loadu_ps(src);
    let r1 = _mm256_loadu_ps(src.add(ls));
    let r2 = _mm256_loadu_ps(src.add(2 * ls));
    let r3 = _mm256_loadu_ps(src.add(3 * ls));
    let r4 = _mm256_loadu_ps(src.add(4 * ls));
    let r5 = _mm256_loadu_ps(src.add(5 * ls));
    let r6 = _mm256_loadu_ps(src.add(6 * ls));
    let r7 = _mm256_loadu_ps(src.add(7 * ls));
    let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
    let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
    let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
    let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
    let (s0, s1) = (
        _mm256_shuffle_ps::<0x44>(t0, t2),
        _mm256_shuffle_ps::<0xEE>(t0, t2),
    );
    let (s2, s3) = (
        _mm256_shuffle_ps::<0x44>(t1, t3),
        _mm256_shuffle_ps::<0xEE>(t1, t3),
    );
    let (s4, s5) = (
        _mm256_shuffle_ps::<0x44>(t4, t6),
        _mm256_shuffle_ps::<0xEE>(t4, t6),
    );
    let (s6, s7) = (
        _mm256_shuffle_ps::<0x44>(t5, t7),
        _mm256_shuffle_ps::<0xEE>(t5, t7),
    );
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps::<0x20>(s0, s4));
    _mm256_storeu_ps(dst.add(ld), _mm256_permute2f128_ps::<0x20>(s1, s5));
    _mm256_storeu_ps(dst.add(2 * ld), _mm256_permute2f128_ps::<0x20>(s2, s6));
    _mm256_storeu_ps(dst.add(3 * ld), _mm256_permute2f128_ps::<0x20>(s3, s7));
    _mm256_storeu_ps(dst.add(4 * ld), _mm256_permute2f128_ps::<0x31>(s0, s4));
    _mm256_storeu_ps(dst.add(5 * ld), _mm256_permute2f128_ps::<0x31>(s1, s5));
    _mm256_storeu_ps(dst.add(6 * ld), _mm256_permute2f128_ps::<0x31>(s2, s6));
    _mm256_storeu_ps(dst.add(7 * ld), _mm256_permute2f128_ps::<0x31>(s3, s7));
}

/// A value no kernel writes: debug builds fill [`overwritten`] buffers with it.
pub(crate) trait Poison: Copy {
    const POISON: Self;
}

impl Poison for f32 {
    const POISON: f32 = f32::NAN;
}

/// Two bf16 NaNs (a packed pair).
impl Poison for u32 {
    const POISON: u32 = u32::MAX;
}

/// `n` elements for a kernel that writes every one of them before anything reads them.
/// `vec![0.0; n]` would cost a pass over memory about to be overwritten: these buffers mostly
/// reuse freed ones, which the allocator must clear.
#[allow(clippy::uninit_vec)]
pub(crate) fn overwritten<T: Poison>(n: usize) -> Vec<T> {
    if cfg!(debug_assertions) {
        // Debug builds (the test suite in the dev profile) make a kernel that leaves an element
        // unwritten show as NaN.
        return vec![T::POISON; n];
    }
    let mut v = Vec::with_capacity(n);
    // SAFETY: every caller hands the whole buffer to a kernel that stores each element (an
    // overwriting gemm, a row-wise norm or activation, a permutation, a packing) before any is
    // loaded.
    unsafe { v.set_len(n) };
    v
}

/// `f(group)` for every group, in parallel or not.
fn map_groups<T: Send>(n: usize, parallel: bool, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if parallel {
        crate::par::map(n, f)
    } else {
        (0..n).map(f).collect()
    }
}

/// Scores of the query tile `r0..r1` against keys `0..r1` into `s [r1 - r0, r1]`, then each row
/// turned into probabilities in place (masked entries 0): with `lse` given, `exp(scale·s - lse)`;
/// otherwise a softmax whose log-sum-exp is returned per row. `groups`: the row's group ids.
#[allow(clippy::too_many_arguments)]
fn attn_tile_probs(
    s: &mut [f32],
    q: MatRef,
    k: MatRef,
    (r0, r1): (usize, usize),
    scale: f32,
    lse: Option<&[f32]>,
    groups: Option<&[u32]>,
) -> Vec<f32> {
    gemm_into(
        s,
        r1,
        false,
        q.row_range(r0, r1),
        k.row_range(0, r1).t(),
        false,
    );
    let mut out = Vec::new();
    for (i, row) in s.chunks_mut(r1).take(r1 - r0).enumerate() {
        let (vis, hidden) = row.split_at_mut(r0 + i + 1);
        hidden.fill(0.0);
        let l = lse.map(|l| l[r0 + i]);
        let row_lse = match groups {
            // Keys of another group are masked like future ones; the query's own key never is.
            Some(g) => probs_row(vis, scale, l, |j| crate::group_sees(g[r0 + i], g[j])),
            None => probs_row(vis, scale, l, |_| true),
        };
        out.extend(row_lse);
    }
    out
}

/// One row of [`attn_tile_probs`] over the keys `sees` keeps (the others 0): `exp(scale·x - lse)`
/// when `lse` is given, else the softmax, returning its log-sum-exp. Inlined so that the
/// unmasked case compiles to the plain vector loops.
#[inline(always)]
fn probs_row(
    vis: &mut [f32],
    scale: f32,
    lse: Option<f32>,
    sees: impl Fn(usize) -> bool,
) -> Option<f32> {
    match lse {
        Some(l) => {
            for (j, x) in vis.iter_mut().enumerate() {
                *x = if sees(j) {
                    fast_exp(*x * scale - l)
                } else {
                    0.0
                };
            }
            None
        }
        None => {
            let m = (0..vis.len())
                .filter(|&j| sees(j))
                .fold(f32::NEG_INFINITY, |a, j| a.max(vis[j] * scale));
            let mut sum = 0f32;
            for (j, x) in vis.iter_mut().enumerate() {
                *x = if sees(j) {
                    fast_exp(*x * scale - m)
                } else {
                    0.0
                };
                sum += *x;
            }
            let inv = 1.0 / sum;
            vis.iter_mut().for_each(|x| *x *= inv);
            Some(m + sum.ln())
        }
    }
}

/// The causal attention forward into `out` `[b, t, nh*d]`; returns each row's log-sum-exp `[b, nh, t]`.
/// `groups` (`[b, t]`, as [`crate::CausalLm::hidden_states_grouped`] takes them) masks keys of
/// other groups.
pub(crate) fn attention_fwd(
    dm: AttnDims,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    groups: Option<&[u32]>,
) -> Vec<f32> {
    let AttnDims { b, nh, nkv, t, d } = dm;
    let rep = dm.rep();
    // Per group: outputs [rep, t, d] and log-sum-exps [rep, t].
    let parts = map_groups(b * nkv, dm.parallel(), |bg| {
        let row_groups = groups.map(|g| &g[bg / nkv * t..][..t]);
        let kk = MatRef::new(&k[bg * t * d..], t, d, d);
        let vv = MatRef::new(&v[bg * t * d..], t, d, d);
        let mut o = vec![0f32; rep * t * d];
        let mut lse = Vec::with_capacity(rep * t);
        let mut s = vec![0f32; ATTN_TILE.min(t) * t];
        for r in 0..rep {
            let qh = MatRef::new(&q[(bg * rep + r) * t * d..], t, d, d);
            for r0 in (0..t).step_by(ATTN_TILE) {
                let r1 = (r0 + ATTN_TILE).min(t);
                let s = &mut s[..(r1 - r0) * r1];
                lse.extend(attn_tile_probs(
                    s,
                    qh,
                    kk,
                    (r0, r1),
                    scale,
                    None,
                    row_groups,
                ));
                let p = MatRef::new(s, r1 - r0, r1, r1);
                gemm_into(
                    &mut o[(r * t + r0) * d..],
                    d,
                    false,
                    p,
                    vv.row_range(0, r1),
                    false,
                );
            }
        }
        (o, lse)
    });
    let mut lse_all = vec![0f32; b * nh * t];
    for (bg, (o, lse)) in parts.into_iter().enumerate() {
        let (bi, g) = (bg / nkv, bg % nkv);
        lse_all[bg * rep * t..(bg + 1) * rep * t].copy_from_slice(&lse);
        for r in 0..rep {
            let h = g * rep + r;
            for ti in 0..t {
                out[((bi * t + ti) * nh + h) * d..][..d]
                    .copy_from_slice(&o[(r * t + ti) * d..][..d]);
            }
        }
    }
    lse_all
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "rlhf-causal-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = f32_in(s1, l1, self.name())?;
        let k = f32_in(s2, l2, self.name())?;
        let v = f32_in(s3, l3, self.name())?;
        let dm = AttnDims::of(l1.dims(), l2.dims(), l3.dims())?;
        let AttnDims { b, nh, t, d, .. } = dm;
        let mut out = vec![0f32; b * t * nh * d];
        let lse_all = attention_fwd(dm, self.scale, q, k, v, &mut out, None);
        // Each op instance is applied exactly once (apply_op3 takes it by value).
        let _ = self.lse.set(lse_all);
        Ok((CpuStorage::F32(out), Shape::from((b, t, nh * d))))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = match self.lse.get() {
            Some(l) => l.as_slice(),
            None => bail!("causal attention: backward before forward"),
        };
        let dm = AttnDims::of(q.dims(), k.dims(), v.dims())?;
        let AttnDims { b, nh, nkv, t, d } = dm;
        let grad = grad.contiguous()?;
        let (dq, dk, dv) = with_f32_slices(&[q, k, v, res, &grad], self.name(), |s| {
            Ok(attention_bwd(
                dm, self.scale, lse, s[0], s[1], s[2], s[3], s[4], None,
            ))
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, nh, t, d), dev)?),
            Some(Tensor::from_vec(dk, (b, nkv, t, d), dev)?),
            Some(Tensor::from_vec(dv, (b, nkv, t, d), dev)?),
        ))
    }
}

/// Gradients wrt q, k, v of [`attention_fwd`] given its inputs, its output `o`, the row
/// log-sum-exps it returned and the upstream `go`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_bwd(
    dm: AttnDims,
    scale: f32,
    lse: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    go: &[f32],
    groups: Option<&[u32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnDims { b, nh, nkv, t, d } = dm;
    let (rep, row) = (dm.rep(), nh * d);
    // Per group: dq [rep, t, d], dk [t, d], dv [t, d].
    let parts = map_groups(b * nkv, dm.parallel(), |bg| {
        let (bi, g) = (bg / nkv, bg % nkv);
        let row_groups = groups.map(|gs| &gs[bi * t..][..t]);
        let kk = MatRef::new(&k[bg * t * d..], t, d, d);
        let vv = MatRef::new(&v[bg * t * d..], t, d, d);
        let mut dq = vec![0f32; rep * t * d];
        let (mut dk, mut dv) = (vec![0f32; t * d], vec![0f32; t * d]);
        let n = ATTN_TILE.min(t) * t;
        let (mut s, mut dp) = (vec![0f32; n], vec![0f32; n]);
        for r in 0..rep {
            let h = g * rep + r;
            let qh = MatRef::new(&q[(bg * rep + r) * t * d..], t, d, d);
            let base = bi * t * row + h * d;
            let goh = MatRef::new(&go[base..], t, d, row);
            let lse_h = &lse[(bi * nh + h) * t..][..t];
            // Σ_j dP_ij P_ij = dO_i · O_i.
            let delta: Vec<f32> = (0..t)
                .map(|i| dot(&go[base + i * row..][..d], &o[base + i * row..][..d]))
                .collect();
            for r0 in (0..t).step_by(ATTN_TILE) {
                let r1 = (r0 + ATTN_TILE).min(t);
                let rows = r1 - r0;
                let s = &mut s[..rows * r1];
                attn_tile_probs(s, qh, kk, (r0, r1), scale, Some(lse_h), row_groups);
                let go_tile = goh.row_range(r0, r1);
                gemm_into(
                    &mut dv,
                    d,
                    true,
                    MatRef::new(s, rows, r1, r1).t(),
                    go_tile,
                    false,
                );
                let dp = &mut dp[..rows * r1];
                gemm_into(dp, r1, false, go_tile, vv.row_range(0, r1).t(), false);
                for (i, (sr, dr)) in s.chunks_mut(r1).zip(dp.chunks(r1)).enumerate() {
                    let di = delta[r0 + i];
                    for (sv, &dpv) in sr.iter_mut().zip(dr) {
                        *sv *= (dpv - di) * scale;
                    }
                }
                let ds = MatRef::new(s, rows, r1, r1);
                gemm_into(
                    &mut dq[(r * t + r0) * d..],
                    d,
                    false,
                    ds,
                    kk.row_range(0, r1),
                    false,
                );
                gemm_into(&mut dk, d, true, ds.t(), qh.row_range(r0, r1), false);
            }
        }
        (dq, dk, dv)
    });
    let mut dq_all = Vec::with_capacity(b * nh * t * d);
    let (mut dk_all, mut dv_all) = (
        Vec::with_capacity(b * nkv * t * d),
        Vec::with_capacity(b * nkv * t * d),
    );
    for (dq, dk, dv) in parts {
        dq_all.extend_from_slice(&dq);
        dk_all.extend_from_slice(&dk);
        dv_all.extend_from_slice(&dv);
    }
    (dq_all, dk_all, dv_all)
}

/// Causal self-attention `softmax(scale · q kᵀ + mask) v` with grouped key/value heads: `q`
/// `[b, nh, t, d]`, `k, v` `[b, nkv, t, d]` → `[b, t, nh*d]`. Differentiable wrt q, k, v.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if fused_ok(&[q, k, v]) {
        q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            CausalAttention {
                scale: scale as f32,
                lse: OnceLock::new(),
            },
        )
    } else {
        causal_attention_ref(q, k, v, scale)
    }
}

/// Plain differentiable causal attention (reference / non-CPU path): GQA without copies by
/// viewing `q` as `[b, nkv, rep*t, d]` against the un-repeated keys.
pub fn causal_attention_ref(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    let q = q.reshape((b, nkv, nh / nkv * t, d))?;
    let s = q.matmul(&k.t()?)?;
    let p = causal_softmax_ref(&s, scale, t)?;
    p.matmul(v)?
        .reshape((b, nh, t, d))?
        .transpose(1, 2)?
        .reshape((b, t, nh * d))
}

/// Causally masked, scaled softmax of attention scores `[.., rows, tk]`: row `r` of each matrix
/// is query position `r % tq` and sees keys `0..=r % tq`.
fn causal_softmax_ref(s: &Tensor, scale: f64, tq: usize) -> Result<Tensor> {
    let dims = s.dims();
    let (rows, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    // A large finite negative instead of -inf keeps 0 * mask out of the backward pass.
    let mask: Vec<f32> = (0..rows * tk)
        .map(|i| if i % tk <= (i / tk) % tq { 0.0 } else { -1e30 })
        .collect();
    let mask = Tensor::from_vec(mask, (rows, tk), s.device())?.to_dtype(s.dtype())?;
    candle_nn::ops::softmax(&(s * scale)?.broadcast_add(&mask)?, D::Minus1)
}

// ---------------------------------------------------------------------------------------------
// Rotary position embedding (HF "rotate_half" layout), fused with the [b,t,h,d] -> [b,h,t,d]
// transpose that attention needs anyway.

struct Rope;

/// Rotates `src` into `dst`. `fwd`: src `[b,t,h,d]` → dst `[b,h,t,d]` with angle +θ;
/// otherwise src `[b,h,t,d]` → dst `[b,t,h,d]` with −θ (the transpose of the rotation = its
/// backward). cos/sin are `[bc,t,d/2]`, `bc` ∈ {1, b}.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_kernel(
    src: &[f32],
    cos: &[f32],
    sin: &[f32],
    (_b, t, h, d): (usize, usize, usize, usize),
    bc: usize,
    fwd: bool,
    dst: &mut [f32],
) {
    let half = d / 2;
    let sign = if fwd { 1.0 } else { -1.0 };
    // dst rows are contiguous d-vectors; index them in dst order and find the source row.
    for_rows(dst, d, |row, o| {
        let (bi, ti, si) = if fwd {
            // dst [b,h,t,d]
            let bi = row / (h * t);
            let hi = (row / t) % h;
            let ti = row % t;
            (bi, ti, (bi * t + ti) * h + hi)
        } else {
            // dst [b,t,h,d]
            let bi = row / (t * h);
            let ti = (row / h) % t;
            let hi = row % h;
            (bi, ti, (bi * h + hi) * t + ti)
        };
        let x = &src[si * d..(si + 1) * d];
        let cb = if bc == 1 { 0 } else { bi };
        let c = &cos[(cb * t + ti) * half..(cb * t + ti + 1) * half];
        let s = &sin[(cb * t + ti) * half..(cb * t + ti + 1) * half];
        let (o1, o2) = o.split_at_mut(half);
        let (x1, x2) = x.split_at(half);
        for i in 0..half {
            let sv = sign * s[i];
            o1[i] = x1[i] * c[i] - x2[i] * sv;
            o2[i] = x2[i] * c[i] + x1[i] * sv;
        }
    });
}

fn rope_dims(xl: &Layout, cl: &Layout, fwd: bool) -> Result<((usize, usize, usize, usize), usize)> {
    let (b, t, h, d) = match xl.dims() {
        &[b, t, h, d] if fwd => (b, t, h, d),
        &[b, h, t, d] => (b, t, h, d),
        other => bail!("rope: expected a rank-4 input, got {other:?}"),
    };
    let bc = match cl.dims() {
        &[bc, tc, hd] if (bc == 1 || bc == b) && tc == t && 2 * hd == d => bc,
        other => bail!(
            "rope: cos/sin must be [1 or {b}, {t}, {}], got {other:?}",
            d / 2
        ),
    };
    Ok(((b, t, h, d), bc))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rlhf-rope"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((b, t, h, d), bc) = rope_dims(l1, l2, true)?;
        let x = f32_in(s1, l1, self.name())?;
        let cos = f32_in(s2, l2, self.name())?;
        let sin = f32_in(s3, l3, self.name())?;
        let mut out = vec![0f32; x.len()];
        rope_kernel(x, cos, sin, (b, t, h, d), bc, true, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((b, h, t, d))))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &RopeBwd)?;
        Ok((Some(g), None, None))
    }
}

struct RopeBwd;

impl CustomOp3 for RopeBwd {
    fn name(&self) -> &'static str {
        "rlhf-rope-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((b, t, h, d), bc) = rope_dims(l1, l2, false)?;
        let g = f32_in(s1, l1, self.name())?;
        let cos = f32_in(s2, l2, self.name())?;
        let sin = f32_in(s3, l3, self.name())?;
        let mut out = vec![0f32; g.len()];
        rope_kernel(g, cos, sin, (b, t, h, d), bc, false, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((b, t, h, d))))
    }
}

/// Applies rotary embeddings to `x: [b,t,h,d]` and returns `[b,h,t,d]`. `cos`/`sin` are
/// `[1 or b, t, d/2]` (per-row tables when every row has its own positions). Not differentiable
/// wrt cos/sin (they are constants of the positions).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_ok(&[x, cos, sin]) {
        x.contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
    } else {
        rope_ref(x, cos, sin)
    }
}

/// Plain differentiable RoPE (reference / non-CPU path); same contract as [`rope`].
pub fn rope_ref(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.transpose(1, 2)?;
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let c = cos.unsqueeze(1)?;
    let s = sin.unsqueeze(1)?;
    let o1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let o2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
    Tensor::cat(&[o1, o2], D::Minus1)
}

// ---------------------------------------------------------------------------------------------
// SiLU(gate) * up

struct SiluMul;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "rlhf-silu-mul"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!(
                "silu_mul: shape mismatch {:?} vs {:?}",
                l1.shape(),
                l2.shape()
            )
        }
        let a = f32_in(s1, l1, self.name())?;
        let b = f32_in(s2, l2, self.name())?;
        let mut out = vec![0f32; a.len()];
        silu_mul_rows(a, b, *l1.dims().last().unwrap_or(&1), &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = a.apply_op3_no_bwd(b, &grad.contiguous()?, &SiluMulBwd)?;
        let ga = packed.get(0)?.reshape(a.shape())?;
        let gb = packed.get(1)?.reshape(b.shape())?;
        Ok((Some(ga), Some(gb)))
    }
}

/// Returns `[2, n]`: grad wrt gate, then wrt up.
struct SiluMulBwd;

impl CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "rlhf-silu-mul-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = f32_in(s1, l1, self.name())?;
        let b = f32_in(s2, l2, self.name())?;
        let g = f32_in(s3, l3, self.name())?;
        let n = a.len();
        let mut out = vec![0f32; 2 * n];
        let (ga, gb) = out.split_at_mut(n);
        silu_mul_bwd_rows(a, b, g, *l1.dims().last().unwrap_or(&1), ga, gb);
        Ok((CpuStorage::F32(out), Shape::from((2, n))))
    }
}

/// `out = silu(a) * b` over rows of `row` elements.
pub(crate) fn silu_mul_rows(a: &[f32], b: &[f32], row: usize, out: &mut [f32]) {
    for_rows(out, row, |i, o| {
        silu_mul_row(&a[i * row..(i + 1) * row], &b[i * row..(i + 1) * row], o)
    });
}

avx512_kernel! {
    fn silu_mul_row(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, &av), &bv) in out.iter_mut().zip(a).zip(b) {
            *o = av * sigmoid(av) * bv;
        }
    }
}

avx512_kernel! {
    /// One row of [`silu_mul_bwd_rows`].
    fn silu_mul_bwd_row(a: &[f32], b: &[f32], g: &[f32], ga: &mut [f32], gb: &mut [f32]) {
        for (((oa, ob), &av), (&bv, &gv)) in ga
            .iter_mut()
            .zip(gb.iter_mut())
            .zip(a)
            .zip(b.iter().zip(g))
        {
            let s = sigmoid(av);
            *oa = gv * bv * s * (1.0 + av * (1.0 - s));
            *ob = gv * av * s;
        }
    }
}

/// Backward of [`silu_mul_rows`] for the upstream gradient `g`: gradients wrt `a` and `b`.
pub(crate) fn silu_mul_bwd_rows(
    a: &[f32],
    b: &[f32],
    g: &[f32],
    row: usize,
    ga: &mut [f32],
    gb: &mut [f32],
) {
    let n = a.len();
    let kernel = |i: usize, oa: &mut [f32], ob: &mut [f32]| {
        let r = i * row..(i + 1) * row;
        silu_mul_bwd_row(&a[r.clone()], &b[r.clone()], &g[r], oa, ob)
    };
    if n >= PAR_MIN_ELEMS {
        let mut rows: Vec<_> = ga.chunks_mut(row).zip(gb.chunks_mut(row)).collect();
        crate::par::for_each_mut(&mut rows, |i, (oa, ob)| kernel(i, oa, ob));
    } else {
        ga.chunks_mut(row)
            .zip(gb.chunks_mut(row))
            .enumerate()
            .for_each(|(i, (oa, ob))| kernel(i, oa, ob));
    }
}

/// `silu(gate) * up`, the SwiGLU gate of Llama/Qwen2 MLPs.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_ok(&[gate, up]) {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
    } else {
        silu_mul_ref(gate, up)
    }
}

/// Plain differentiable SwiGLU gate (reference / non-CPU path).
pub fn silu_mul_ref(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

// ---------------------------------------------------------------------------------------------
// Elementwise MLP activations (GPT-2's `activation_function`)

/// An elementwise activation. The candle graph path applies candle's own ops
/// ([`Activation::apply`]); the engine applies [`activation_rows`] and [`activation_bwd_rows`],
/// which follow the same formulas (candle 0.11's `gelu` is the tanh approximation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `0.5 x (1 + erf(x / √2))` (torch's exact `gelu`).
    GeluErf,
    Relu,
    Silu,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;
/// `1 / √(2π)`: the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

impl Activation {
    /// The activation as a differentiable candle op.
    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::GeluTanh => x.gelu(),
            Activation::GeluErf => x.gelu_erf(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }

    #[inline(always)]
    fn value(self, x: f32) -> f32 {
        match self {
            Activation::GeluTanh => {
                0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_CUBIC * x * x)).tanh())
            }
            Activation::GeluErf => {
                0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
            }
            Activation::Relu => x.max(0.0),
            Activation::Silu => x * sigmoid(x),
        }
    }

    #[inline(always)]
    fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::GeluTanh => {
                let th = (SQRT_2_OVER_PI * x * (1.0 + GELU_CUBIC * x * x)).tanh();
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
                0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du
            }
            Activation::GeluErf => {
                0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
                    + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
            }
            // candle's relu gradient is 1 at 0 (the mask is `x >= 0`).
            Activation::Relu => {
                if x >= 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
        }
    }
}

/// `out = act(x)` elementwise (rows of `row` elements, for the parallel split).
pub(crate) fn activation_rows(act: Activation, x: &[f32], row: usize, out: &mut [f32]) {
    for_rows(out, row, |i, o| {
        for (o, &xv) in o.iter_mut().zip(&x[i * row..(i + 1) * row]) {
            *o = act.value(xv);
        }
    });
}

/// Backward of [`activation_rows`]: `gx = g · act'(x)`.
pub(crate) fn activation_bwd_rows(
    act: Activation,
    x: &[f32],
    g: &[f32],
    row: usize,
    gx: &mut [f32],
) {
    for_rows(gx, row, |i, o| {
        let r = i * row..(i + 1) * row;
        for ((o, &xv), &gv) in o.iter_mut().zip(&x[r.clone()]).zip(&g[r]) {
            *o = gv * act.derivative(xv);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// log_softmax gathered at targets

/// Forward stores each row's log-sum-exp so that the backward pass needs one sweep over the
/// logits instead of re-deriving max and sum.
struct TokenLogprobs {
    lse: OnceLock<Vec<f32>>,
}

fn row_lse(xr: &[f32]) -> f32 {
    let m = xr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let s = xr.iter().map(|&v| fast_exp(v - m)).sum::<f32>();
    m + s.ln()
}

fn check_targets(t: &[u32], v: usize) -> Result<()> {
    if let Some((i, &bad)) = t.iter().enumerate().find(|(_, &x)| x as usize >= v) {
        bail!("token_logprobs: target id {bad} at flat position {i} is out of range for vocab size {v}")
    }
    Ok(())
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "rlhf-token-logprobs"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_in(s1, l1, self.name())?;
        let t = u32_in(s2, l2, self.name())?;
        let v = *l1.dims().last().unwrap_or(&1);
        check_targets(&t, v)?;
        let rows = t.len();
        let lse: Vec<f32> = if x.len() >= PAR_MIN_ELEMS {
            crate::par::map(x.len() / v, |i| row_lse(&x[i * v..(i + 1) * v]))
        } else {
            x.chunks(v).map(row_lse).collect()
        };
        let out = (0..rows)
            .map(|i| x[i * v + t[i] as usize] - lse[i])
            .collect();
        // Each op instance is applied exactly once (apply_op2 takes it by value).
        let _ = self.lse.set(lse);
        Ok((CpuStorage::F32(out), l2.shape().clone()))
    }
    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = match self.lse.get() {
            Some(l) => l.clone(),
            None => bail!("token_logprobs: backward before forward"),
        };
        let g = logits.apply_op3_no_bwd(targets, &grad.contiguous()?, &TokenLogprobsBwd { lse })?;
        Ok((Some(g), None))
    }
}

/// grad_logits[j] = g * (1{j = target} - softmax_j).
struct TokenLogprobsBwd {
    lse: Vec<f32>,
}

impl CustomOp3 for TokenLogprobsBwd {
    fn name(&self) -> &'static str {
        "rlhf-token-logprobs-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_in(s1, l1, self.name())?;
        let t = u32_in(s2, l2, self.name())?;
        let g = f32_in(s3, l3, self.name())?;
        let v = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, v, |i, o| {
            let (gi, lse) = (g[i], self.lse[i]);
            if gi == 0.0 {
                return; // masked positions (padding) cost nothing
            }
            for (o, &xv) in o.iter_mut().zip(&x[i * v..(i + 1) * v]) {
                *o = -gi * fast_exp(xv - lse);
            }
            o[t[i] as usize] += gi;
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `log_softmax(logits)[.., targets]`: logits `[.., v]` (f32), targets u32 `[..]` → `[..]`.
/// Differentiable wrt logits; the fused CPU kernel never materialises the log-softmax.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let ld = logits.dims();
    if ld.is_empty() || &ld[..ld.len() - 1] != targets.dims() {
        bail!(
            "token_logprobs: logits {:?} and targets {:?} must agree on all but the last dim",
            logits.shape(),
            targets.shape()
        )
    }
    if fused_ok(&[logits]) {
        logits.contiguous()?.apply_op2(
            &targets.contiguous()?,
            TokenLogprobs {
                lse: OnceLock::new(),
            },
        )
    } else {
        token_logprobs_ref(logits, targets)
    }
}

/// Plain differentiable log-softmax + gather (reference / non-CPU path).
pub fn token_logprobs_ref(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lsm = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = targets
        .to_dtype(DType::U32)?
        .unsqueeze(D::Minus1)?
        .contiguous()?;
    lsm.gather(&idx, D::Minus1)?.squeeze(D::Minus1)
}

// ---------------------------------------------------------------------------------------------
// LM head and log_softmax gathered at targets, in vocabulary chunks

/// Vocabulary rows of the head weight per chunk: the `[rows, chunk]` block of logits stays in
/// cache, and the `[rows, vocab]` logits and their gradient never exist.
const VOCAB_CHUNK: usize = 256;

/// Below this many multiply-adds the chunked head runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 22;

/// Per-row log-sum-exp and argmax of the logits, filled by the forward pass.
type HeadStats = Arc<OnceLock<(Vec<f32>, Vec<u32>)>>;

/// `log_softmax(x Wᵀ)[targets]` for `x [m, h]` and a head weight `W [vocab, h]` (`nn.Linear`
/// layout, no bias). Forward keeps each row's log-sum-exp; backward recomputes the logits one
/// chunk at a time, writes that chunk's rows of the weight gradient and accumulates the input
/// gradient, so the pass costs one extra head matmul instead of two `[m, vocab]` buffers.
struct LmHeadLogprobs {
    targets: Vec<u32>,
    out_shape: Shape,
    stats: HeadStats,
    precision: Precision,
}

/// Running per-row statistics over vocabulary chunks (online log-sum-exp).
struct RowStats {
    max: Vec<f32>,
    sum: Vec<f32>,
    target: Vec<f32>,
    best: Vec<(f32, u32)>,
}

impl RowStats {
    fn new(m: usize) -> Self {
        Self {
            max: vec![f32::NEG_INFINITY; m],
            sum: vec![0.0; m],
            target: vec![0.0; m],
            best: vec![(f32::NEG_INFINITY, u32::MAX); m],
        }
    }

    /// Folds in row `i`'s logits for vocabulary ids `v0..`.
    fn add_row(&mut self, i: usize, row: &[f32], v0: usize, target: u32) {
        let (mut cm, mut ci) = (f32::NEG_INFINITY, 0);
        for (j, &x) in row.iter().enumerate() {
            if x > cm {
                (cm, ci) = (x, j);
            }
        }
        let s = row.iter().map(|&x| fast_exp(x - cm)).sum::<f32>();
        self.fold(i, cm, s, (cm, (v0 + ci) as u32));
        if let Some(tv) = (target as usize).checked_sub(v0).and_then(|j| row.get(j)) {
            self.target[i] = *tv;
        }
    }

    fn fold(&mut self, i: usize, m: f32, s: f32, best: (f32, u32)) {
        let mx = self.max[i].max(m);
        if mx == f32::NEG_INFINITY {
            return;
        }
        self.sum[i] = self.sum[i] * fast_exp(self.max[i] - mx) + s * fast_exp(m - mx);
        self.max[i] = mx;
        let b = &mut self.best[i];
        // Ties go to the lowest id, as torch's argmax.
        if best.0 > b.0 || (best.0 == b.0 && best.1 < b.1) {
            *b = best;
        }
    }

    fn merge(mut self, o: Self) -> Self {
        for i in 0..self.max.len() {
            self.fold(i, o.max[i], o.sum[i], o.best[i]);
            self.target[i] += o.target[i];
        }
        self
    }
}

/// Reads the f32 CPU data of contiguous tensors (backward passes that need more operands than a
/// `CustomOp3` takes) and calls `f` with them.
fn with_f32_slices<R>(
    ts: &[&Tensor],
    op: &str,
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (st, l) in &guards {
        match &**st {
            Storage::Cpu(c) => slices.push(f32_in(c, l, op)?),
            _ => bail!("{op}: backward on a non-CPU tensor"),
        }
    }
    f(&slices)
}

impl CustomOp2 for LmHeadLogprobs {
    fn name(&self) -> &'static str {
        "rlhf-lm-head-logprobs"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_in(s1, l1, self.name())?;
        let w = f32_in(s2, l2, self.name())?;
        let (vocab, h) = linear_dims(l2.dims(), true)?;
        let t = &self.targets;
        let m = t.len();
        if x.len() != m * h {
            bail!(
                "lm head log-probs: hidden {:?} does not hold {m} rows of {h}",
                l1.dims()
            )
        }
        check_targets(t, vocab)?;
        // Converted once for every vocabulary chunk (bf16).
        let xa = Lhs::new(self.precision, MatRef::new(x, m, h, h), true);
        let step = |(mut acc, mut buf): (RowStats, Vec<f32>), c: usize| {
            let (v0, v1) = (c * VOCAB_CHUNK, ((c + 1) * VOCAB_CHUNK).min(vocab));
            let n = v1 - v0;
            buf.resize(m * n, 0.0);
            let wc = MatRef::new(&w[v0 * h..v1 * h], n, h, h);
            gemm_ops(
                &mut buf,
                n,
                false,
                &xa,
                &Rhs::new(self.precision, wc.t(), false),
                false,
            );
            for (i, row) in buf.chunks(n).enumerate() {
                acc.add_row(i, row, v0, t[i]);
            }
            (acc, buf)
        };
        let chunks = vocab.div_ceil(VOCAB_CHUNK);
        let init = || (RowStats::new(m), Vec::new());
        let acc = if m * vocab * h >= PAR_MIN_MACS {
            fold_groups((0..chunks).collect(), init, step, |(a, buf), (b, _)| {
                (a.merge(b), buf)
            })
            .0
        } else {
            (0..chunks).fold(init(), step).0
        };
        let lse: Vec<f32> = acc
            .max
            .iter()
            .zip(&acc.sum)
            .map(|(mx, s)| mx + s.ln())
            .collect();
        let out = acc.target.iter().zip(&lse).map(|(tv, l)| tv - l).collect();
        let argmax = acc.best.iter().map(|b| b.1).collect();
        // Each op instance is applied exactly once (apply_op2 takes it by value).
        let _ = self.stats.set((lse, argmax));
        Ok((CpuStorage::F32(out), self.out_shape.clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = match self.stats.get() {
            Some((l, _)) => l.as_slice(),
            None => bail!("lm head log-probs: backward before forward"),
        };
        let (vocab, h) = linear_dims(w.dims(), true)?;
        let t = &self.targets;
        let m = t.len();
        let want_w = w.track_op();
        let grad = grad.contiguous()?;
        let (gx, gw) = with_f32_slices(&[x, w, &grad], self.name(), |s| {
            let (x, w, g) = (s[0], s[1], s[2]);
            let xm = MatRef::new(x, m, h, h);
            // The hidden states in both operand roles, converted once for every chunk (bf16).
            let prec = self.precision;
            let (xa, xb) = (Lhs::new(prec, xm, true), Rhs::new(prec, xm, true));
            // A frozen head (reference model, LoRA base) gets no weight gradient.
            let mut gw = vec![0f32; if want_w { vocab * h } else { 0 }];
            let chunks = vocab.div_ceil(VOCAB_CHUNK);
            let parts: Vec<Option<&mut [f32]>> = if want_w {
                gw.chunks_mut(VOCAB_CHUNK * h).map(Some).collect()
            } else {
                (0..chunks).map(|_| None).collect()
            };
            let step = |(mut gx, mut buf): (Vec<f32>, Vec<f32>),
                        (c, gw_c): (usize, Option<&mut [f32]>)| {
                let (v0, v1) = (c * VOCAB_CHUNK, ((c + 1) * VOCAB_CHUNK).min(vocab));
                let n = v1 - v0;
                buf.resize(m * n, 0.0);
                let wc = MatRef::new(&w[v0 * h..v1 * h], n, h, h);
                gemm_ops(
                    &mut buf,
                    n,
                    false,
                    &xa,
                    &Rhs::new(prec, wc.t(), false),
                    false,
                );
                // d logprob_i / d logit_ij = 1{j = target_i} - softmax_ij, times the upstream g_i.
                for (i, row) in buf.chunks_mut(n).enumerate() {
                    let (gi, l) = (g[i], lse[i]);
                    row.iter_mut().for_each(|z| *z = -gi * fast_exp(*z - l));
                    if let Some(z) = (t[i] as usize).checked_sub(v0).and_then(|j| row.get_mut(j)) {
                        *z += gi;
                    }
                }
                let gl = MatRef::new(&buf, m, n, n);
                if let Some(gw_c) = gw_c {
                    gemm_ops(gw_c, h, false, &Lhs::new(prec, gl.t(), false), &xb, false);
                }
                gemm_prec(prec, &mut gx, h, true, gl, wc, false);
                (gx, buf)
            };
            let init = || (vec![0f32; m * h], Vec::new());
            let gx = if m * vocab * h >= PAR_MIN_MACS {
                let add = |(mut a, buf): (Vec<f32>, Vec<f32>), (b, _): (Vec<f32>, Vec<f32>)| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    (a, buf)
                };
                fold_groups(parts.into_iter().enumerate().collect(), init, step, add).0
            } else {
                parts.into_iter().enumerate().fold(init(), step).0
            };
            Ok((gx, gw))
        })?;
        let dev = x.device();
        let gw = if want_w {
            Some(Tensor::from_vec(gw, w.shape(), dev)?)
        } else {
            None
        };
        Ok((Some(Tensor::from_vec(gx, x.shape(), dev)?), gw))
    }
}

/// `log_softmax(hidden · weightᵀ)` gathered at `targets`, and the argmax over the vocabulary:
/// `hidden [.., h]`, an LM head `weight [vocab, h]` (no bias), u32/i64 `targets [..]` →
/// (f32 `[..]`, u32 `[..]`). Differentiable wrt `hidden` and `weight`; the fused CPU kernel works in
/// vocabulary chunks and never materialises the logits. `precision` is that of the head's matrix
/// products (forward and backward); the log-softmax is f32.
pub fn lm_head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    precision: Precision,
) -> Result<(Tensor, Tensor)> {
    let hd = hidden.dims();
    if hd.is_empty() || &hd[..hd.len() - 1] != targets.dims() {
        bail!(
            "lm head log-probs: hidden {:?} and targets {:?} must agree on all but the last dim",
            hidden.shape(),
            targets.shape()
        )
    }
    if !fused_ok(&[hidden, weight]) {
        return lm_head_logprobs_ref(hidden, weight, targets);
    }
    let ids = {
        let tc = targets.contiguous()?;
        let (st, l) = tc.storage_and_layout();
        match &*st {
            Storage::Cpu(c) => u32_in(c, l, "lm head log-probs")?,
            _ => bail!("lm head log-probs: targets must be on the CPU like hidden"),
        }
    };
    let stats = HeadStats::default();
    let op = LmHeadLogprobs {
        targets: ids,
        out_shape: targets.shape().clone(),
        stats: stats.clone(),
        precision,
    };
    let lp = hidden.contiguous()?.apply_op2(&weight.contiguous()?, op)?;
    let argmax = match stats.get() {
        Some((_, a)) => a.clone(),
        None => bail!("lm head log-probs: forward produced no statistics"),
    };
    Ok((
        lp,
        Tensor::from_vec(argmax, targets.shape(), hidden.device())?,
    ))
}

/// Plain composition of [`lm_head_logprobs`] (reference / non-CPU path).
pub fn lm_head_logprobs_ref(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let logits = linear_matmul_ref(hidden, weight, true)?;
    Ok((
        token_logprobs_ref(&logits, targets)?,
        logits.argmax(D::Minus1)?,
    ))
}

// ---------------------------------------------------------------------------------------------
// Attention over a KV cache (inference only)

/// `Σ a_i b_i` with independent accumulators so that it vectorises (f32 sums are not reassociated
/// by the compiler).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Fused decode-time attention: `q [b, nh, tq, d]` against the first `offset + tq` positions of
/// the caches `k, v [b, nkv, capacity, d]`; query `qi` of row `bi` sees keys
/// `starts[bi][qi] ..= offset + qi`. Returns `[b, tq, nh, d]`. One pass per query instead of
/// `b·nkv` tiny gemms.
pub(crate) struct CachedAttention {
    pub scale: f32,
    pub offset: usize,
    pub starts: Vec<Vec<usize>>,
}

/// Shapes of [`cached_attention_fwd`]: `b` rows, `nh` query and `nkv` key heads, `tq` new
/// positions, head size `d`, cache capacity `cap`.
#[derive(Clone, Copy)]
pub(crate) struct CacheDims {
    pub b: usize,
    pub nh: usize,
    pub nkv: usize,
    pub tq: usize,
    pub d: usize,
    pub cap: usize,
}

/// The kernel of [`CachedAttention`] on slices: `q [b, nh, tq, d]`, caches `k, v [b, nkv, cap, d]`,
/// into `out [b, tq, nh, d]` (every element written: stale contents are fine). Shared by the graph
/// op and the engine's decoding ([`crate::KvCache::attend`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn cached_attention_fwd(
    dims: CacheDims,
    scale: f32,
    offset: usize,
    starts: &[Vec<usize>],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) {
    let CacheDims {
        b,
        nh,
        nkv,
        tq,
        d,
        cap,
    } = dims;
    let work = b * nh * tq * (offset + tq) * d;
    // One output block [tq, nh, d] per batch row.
    for_rows_with(out, tq * nh * d, b > 1 && work >= PAR_MIN_ELEMS, |bi, o| {
        let kv = (bi * nkv * cap * d)..((bi + 1) * nkv * cap * d);
        let qb = &q[bi * nh * tq * d..(bi + 1) * nh * tq * d];
        cached_attention_row(
            dims,
            scale,
            offset,
            &starts[bi],
            qb,
            &k[kv.clone()],
            &v[kv],
            o,
        )
    });
}

avx512_kernel! {
    /// One batch row of [`cached_attention_fwd`]: `q [nh, tq, d]`, caches `k, v [nkv, cap, d]`,
    /// into `out [tq, nh, d]`.
    #[allow(clippy::too_many_arguments)]
    fn cached_attention_row(
        dims: CacheDims,
        scale: f32,
        offset: usize,
        starts: &[usize],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
    ) {
        let CacheDims { nh, nkv, tq, d, cap, .. } = dims;
        let rep = nh / nkv;
        out.fill(0.0);
        let mut p = vec![0f32; offset + tq];
        for h in 0..nh {
            let g = h / rep;
            let kb = &k[g * cap * d..];
            let vb = &v[g * cap * d..];
            for qi in 0..tq {
                let qr = &q[(h * tq + qi) * d..][..d];
                let (lo, hi) = (starts[qi], offset + qi + 1);
                let p = &mut p[lo..hi];
                let mut m = f32::NEG_INFINITY;
                for (j, pj) in (lo..hi).zip(p.iter_mut()) {
                    *pj = dot(qr, &kb[j * d..(j + 1) * d]) * scale;
                    m = m.max(*pj);
                }
                let mut sum = 0f32;
                for pj in p.iter_mut() {
                    *pj = fast_exp(*pj - m);
                    sum += *pj;
                }
                let orow = &mut out[(qi * nh + h) * d..][..d];
                let inv = 1.0 / sum;
                for (j, &pj) in (lo..hi).zip(p.iter()) {
                    let w = pj * inv;
                    for (ov, &vv) in orow.iter_mut().zip(&vb[j * d..(j + 1) * d]) {
                        *ov += w * vv;
                    }
                }
            }
        }
    }
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "rlhf-cached-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = f32_in(s1, l1, self.name())?;
        let k = f32_in(s2, l2, self.name())?;
        let v = f32_in(s3, l3, self.name())?;
        let (b, nh, tq, d) = match l1.dims() {
            &[b, nh, tq, d] => (b, nh, tq, d),
            other => bail!("cached attention: q must be [b, nh, tq, d], got {other:?}"),
        };
        let (nkv, cap) = match l2.dims() {
            &[kb, nkv, cap, kd] if kb == b && kd == d && nh % nkv == 0 => (nkv, cap),
            other => bail!(
                "cached attention: cache {other:?} does not match q {:?}",
                l1.dims()
            ),
        };
        let mut out = vec![0f32; b * tq * nh * d];
        let dims = CacheDims {
            b,
            nh,
            nkv,
            tq,
            d,
            cap,
        };
        cached_attention_fwd(
            dims,
            self.scale,
            self.offset,
            &self.starts,
            q,
            k,
            v,
            &mut out,
        );
        Ok((CpuStorage::F32(out), Shape::from((b, tq, nh, d))))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear layer matmul

/// `y = x · Wᵀ` (`W` `[out, in]`, `transposed`) or `y = x · W` (`W` `[in, out]`) as one graph node.
/// Through candle ops this is a reshape, a transpose, a matmul and a reshape, and every one of
/// them costs the backward pass a zero-filled buffer plus an addition — for the transpose, of
/// the weight's size, strided. Forward and backward are direct gemm calls that read the
/// transposed operands through their strides.
struct LinearMatmul {
    transposed: bool,
    precision: Precision,
    /// The weight already converted to bf16 (inference copies), used instead of `w` forward.
    packed: Option<Arc<PackedB>>,
}

/// `(out, in)` of a linear weight stored `[out, in]` (`transposed`) or `[in, out]`.
fn linear_dims(w: &[usize], transposed: bool) -> Result<(usize, usize)> {
    match (w, transposed) {
        (&[o, i], true) | (&[i, o], false) => Ok((o, i)),
        (other, _) => bail!("linear: weight must be 2-D, got {other:?}"),
    }
}

/// The weight as the `[in, out]` right-hand side of `x · W`.
fn linear_rhs<'a>(w: &'a [f32], n: usize, k: usize, transposed: bool) -> MatRef<'a> {
    if transposed {
        MatRef::new(w, n, k, k).t()
    } else {
        MatRef::new(w, k, n, n)
    }
}

/// `y = x · W` (`+=` when `accumulate`) for a linear layer's `[in, out]` right-hand side `rhs` at
/// `precision`, by `packed` (the weight converted once, [`PackedB`]) when it is given and fits: the
/// product of [`LinearMatmul`] and of the engine's [`crate::engine::Lin`].
pub(crate) fn linear_gemm(
    precision: Precision,
    packed: Option<&PackedB>,
    y: &mut [f32],
    n: usize,
    accumulate: bool,
    x: MatRef,
    rhs: MatRef,
) {
    match packed {
        Some(p) if p.dims() == (x.ncols(), n) && p.precision() == precision => {
            let lhs = Lhs::new(precision, x, true);
            gemm_ops(y, n, accumulate, &lhs, &Rhs::Prepacked(p), true)
        }
        _ => gemm_prec(precision, y, n, accumulate, x, rhs, true),
    }
}

impl CustomOp2 for LinearMatmul {
    fn name(&self) -> &'static str {
        "rlhf-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_in(s1, l1, self.name())?;
        let w = f32_in(s2, l2, self.name())?;
        let (n, k) = linear_dims(l2.dims(), self.transposed)?;
        let xd = l1.dims();
        if xd.last() != Some(&k) {
            bail!("linear: input {xd:?} does not end in the weight's input size {k}")
        }
        let mut y = vec![0f32; x.len() / k.max(1) * n];
        let rhs = linear_rhs(w, n, k, self.transposed);
        let x = MatRef::rows_of(x, k);
        linear_gemm(
            self.precision,
            self.packed.as_deref(),
            &mut y,
            n,
            false,
            x,
            rhs,
        );
        let mut out = xd.to_vec();
        *out.last_mut().expect("non-empty dims") = n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let grad_of = |wrt_weight, other: &Tensor| {
            g.apply_op2_no_bwd(
                other,
                &LinearGrad {
                    transposed: self.transposed,
                    wrt_weight,
                    precision: self.precision,
                },
            )
        };
        // Frozen weights (LoRA base, reference models) and constant inputs get no gradient.
        let gx = if x.track_op() {
            Some(grad_of(false, w)?.reshape(x.shape())?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(grad_of(true, x)?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// Backward of [`LinearMatmul`], applied to the upstream gradient `g [.., out]` and the weight
/// (grad of the input `[.., in]`: `g · W`) or, `wrt_weight`, the input `x` (grad of the weight in
/// its own layout: `gᵀ · x` or `xᵀ · g`).
struct LinearGrad {
    transposed: bool,
    wrt_weight: bool,
    precision: Precision,
}

impl CustomOp2 for LinearGrad {
    fn name(&self) -> &'static str {
        "rlhf-linear-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_in(s1, l1, self.name())?;
        let o = f32_in(s2, l2, self.name())?;
        let n = *l1.dims().last().unwrap_or(&1);
        let m = g.len() / n.max(1);
        let g = MatRef::rows_of(g, n);
        if self.wrt_weight {
            let k = *l2.dims().last().unwrap_or(&1);
            let x = MatRef::rows_of(o, k);
            if x.nrows() != m {
                bail!(
                    "linear backward: input {:?} vs gradient {:?}",
                    l2.dims(),
                    l1.dims()
                )
            }
            let mut gw = vec![0f32; n * k];
            let shape = if self.transposed {
                gemm_prec(self.precision, &mut gw, k, false, g.t(), x, true);
                Shape::from((n, k))
            } else {
                gemm_prec(self.precision, &mut gw, n, false, x.t(), g, true);
                Shape::from((k, n))
            };
            Ok((CpuStorage::F32(gw), shape))
        } else {
            let (wn, k) = linear_dims(l2.dims(), self.transposed)?;
            if wn != n {
                bail!(
                    "linear backward: weight {:?} vs gradient {:?}",
                    l2.dims(),
                    l1.dims()
                )
            }
            let mut gx = vec![0f32; m * k];
            let rhs = linear_rhs(o, n, k, self.transposed).t();
            gemm_prec(self.precision, &mut gx, k, false, g, rhs, true);
            Ok((CpuStorage::F32(gx), Shape::from((m, k))))
        }
    }
}

/// `x [.., in]` times a linear weight: `[out, in]` when `transposed` (torch `nn.Linear`), else
/// `[in, out]` (GPT-2 `Conv1D`). Returns `[.., out]`; differentiable wrt both. `precision` is that
/// of the three matrix products (forward, both gradients); inputs and outputs are f32 either way.
pub fn linear_matmul(
    x: &Tensor,
    w: &Tensor,
    transposed: bool,
    precision: Precision,
) -> Result<Tensor> {
    linear_matmul_packed(x, w, transposed, precision, None)
}

/// [`linear_matmul`] whose forward product uses `packed` (the weight already converted to bf16)
/// when `precision` is bf16.
pub(crate) fn linear_matmul_packed(
    x: &Tensor,
    w: &Tensor,
    transposed: bool,
    precision: Precision,
    packed: Option<Arc<PackedB>>,
) -> Result<Tensor> {
    if fused_ok(&[x, w]) {
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            LinearMatmul {
                transposed,
                precision,
                packed,
            },
        )
    } else {
        linear_matmul_ref(x, w, transposed)
    }
}

/// Plain candle composition of [`linear_matmul`] (reference / non-CPU path).
pub fn linear_matmul_ref(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().unwrap_or(&0);
    let x2 = x.reshape((x.elem_count() / k.max(1), k))?;
    let y = if transposed {
        x2.matmul(&w.t()?)?
    } else {
        x2.matmul(w)?
    };
    let mut out = dims.to_vec();
    if let Some(l) = out.last_mut() {
        *l = y.dim(1)?;
    }
    y.reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiled_transposes_match_candle() {
        for (r, c) in [
            (1, 1),
            (8, 8),
            (17, 9),
            (33, 70),
            (70, 33),
            (256, 688),
            (5, 0),
        ] {
            let w = data(r * c, 3);
            let want: Vec<f32> = Tensor::from_vec(w.clone(), (r, c), &candle_core::Device::Cpu)
                .unwrap()
                .t()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for parallel in [false, true] {
                // The [c, r] transposed view of w, copied row-major.
                let mut got = vec![f32::NAN; r * c];
                copy_rows(MatRef::new(&w, r, c, c).t(), &mut got, parallel);
                assert_eq!(got, want, "{r} x {c}");
            }
            // A row-major matrix is copied as it is.
            let mut same = vec![f32::NAN; r * c];
            copy_rows(MatRef::new(&w, r, c, c), &mut same, false);
            assert_eq!(same, w);
        }
        // Rows of a wider buffer (row stride > columns).
        let w = data(6 * 20, 5);
        let mut got = vec![0.0; 6 * 16];
        transpose_into(&w, 6, 16, 20, &mut got, false);
        for (j, row) in got.chunks(6).enumerate() {
            for (i, &x) in row.iter().enumerate() {
                assert_eq!(x, w[i * 20 + j]);
            }
        }
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
            })
            .collect()
    }

    /// The AVX-512 build of each kernel gives the baseline build's bits (where the CPU has AVX-512;
    /// elsewhere there is only one build).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_kernels_give_the_baseline_bits() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // 77: full 16-lane blocks and a remainder.
        let (a, b, g) = (data(77, 1), data(77, 2), data(77, 3));
        let (mut o1, mut o2) = (vec![0f32; 77], vec![0f32; 77]);
        silu_mul_row::imp(&a, &b, &mut o1);
        unsafe { silu_mul_row::wide(&a, &b, &mut o2) };
        assert_eq!(bits(&o1), bits(&o2), "silu_mul_row");
        let (mut ga1, mut gb1, mut ga2, mut gb2) = (
            vec![0f32; 77],
            vec![0f32; 77],
            vec![0f32; 77],
            vec![0f32; 77],
        );
        silu_mul_bwd_row::imp(&a, &b, &g, &mut ga1, &mut gb1);
        unsafe { silu_mul_bwd_row::wide(&a, &b, &g, &mut ga2, &mut gb2) };
        assert_eq!(
            (bits(&ga1), bits(&gb1)),
            (bits(&ga2), bits(&gb2)),
            "silu_mul_bwd_row"
        );
        let dims = CacheDims {
            b: 1,
            nh: 4,
            nkv: 2,
            tq: 3,
            d: 40,
            cap: 16,
        };
        let (q, k, v) = (
            data(4 * 3 * 40, 4),
            data(2 * 16 * 40, 5),
            data(2 * 16 * 40, 6),
        );
        let starts = [2, 2, 3];
        let (mut o1, mut o2) = (vec![0f32; 3 * 4 * 40], vec![0f32; 3 * 4 * 40]);
        cached_attention_row::imp(dims, 0.125, 9, &starts, &q, &k, &v, &mut o1);
        unsafe { cached_attention_row::wide(dims, 0.125, 9, &starts, &q, &k, &v, &mut o2) };
        assert_eq!(bits(&o1), bits(&o2), "cached_attention_row");
        assert!(o1.iter().all(|x| x.is_finite()) && o1.iter().any(|&x| x != 0.0));
    }
}
