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
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Below this many f32 elements a kernel runs on the calling thread: rayon's fork/join costs more
/// than it saves on the tiny tensors of the small models.
const PAR_MIN_ELEMS: usize = 1 << 15;

fn fused_ok(ts: &[&Tensor]) -> bool {
    ts.iter()
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
        out.par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        out.chunks_mut(row_len)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    }
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
        (0..nblocks)
            .into_par_iter()
            .map(run)
            .reduce(|| vec![0f32; len * k], add)
    } else {
        (0..nblocks).map(run).fold(vec![0f32; len * k], add)
    }
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
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, h, |i, o| {
            let xr = &x[i * h..(i + 1) * h];
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                *o = wv * (xv * r);
            }
        });
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
        let inv_rms = |xr: &[f32]| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
            1.0 / (ms + self.eps).sqrt()
        };
        let mut out = vec![0f32; (rows + 1) * h];
        let (gx, gw) = out.split_at_mut(rows * h);
        for_rows(gx, h, |i, o| {
            let xr = &x[i * h..(i + 1) * h];
            let gr = &g[i * h..(i + 1) * h];
            let r = inv_rms(xr);
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
                *o = r * (gv * wv - xv * r * dot);
            }
        });
        let acc = reduce_rows(rows, h, 1, |i, acc| {
            let xr = &x[i * h..(i + 1) * h];
            let gr = &g[i * h..(i + 1) * h];
            let r = inv_rms(xr);
            for ((a, &xv), &gv) in acc.iter_mut().zip(xr).zip(gr) {
                *a += gv * xv * r;
            }
        });
        gw.copy_from_slice(&acc);
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, h))))
    }
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
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, h, |i, o| {
            let xr = &x[i * h..(i + 1) * h];
            let (mu, r) = ln_stats(xr, self.eps);
            for (((o, &xv), &wv), &bv) in o.iter_mut().zip(xr).zip(w).zip(b) {
                *o = (xv - mu) * r * wv + bv;
            }
        });
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
        for_rows(gx, h, |i, o| {
            let xr = &x[i * h..(i + 1) * h];
            let gr = &g[i * h..(i + 1) * h];
            let (mu, r) = ln_stats(xr, self.eps);
            // grad_x = r * (gw - mean(gw) - n * mean(gw * n)), gw = g*w, n = (x-mu)*r.
            let (mut s_gw, mut s_gwn) = (0f32, 0f32);
            for ((&xv, &gv), &wv) in xr.iter().zip(gr).zip(w) {
                let gw = gv * wv;
                s_gw += gw;
                s_gwn += gw * (xv - mu) * r;
            }
            let (m_gw, m_gwn) = (s_gw / h as f32, s_gwn / h as f32);
            for (((o, &xv), &gv), &wv) in o.iter_mut().zip(xr).zip(gr).zip(w) {
                *o = r * (gv * wv - m_gw - (xv - mu) * r * m_gwn);
            }
        });
        let acc = reduce_rows(rows, h, 2, |i, acc| {
            let xr = &x[i * h..(i + 1) * h];
            let gr = &g[i * h..(i + 1) * h];
            let (mu, r) = ln_stats(xr, self.eps);
            let (aw, ab) = acc.split_at_mut(h);
            for (((aw, ab), &xv), &gv) in aw.iter_mut().zip(ab.iter_mut()).zip(xr).zip(gr) {
                *aw += gv * (xv - mu) * r;
                *ab += gv;
            }
        });
        gwb.copy_from_slice(&acc);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, h))))
    }
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
// Causal attention softmax

/// `softmax(scale * s)` over the last dim with a causal mask. `s` is `[.., rows, tk]`; row `r` of
/// each matrix is query position `r % tq + offset` (rows hold `rows / tq` query heads sharing a
/// key head, see the GQA layout in `llama.rs`), and sees keys `0..=position`.
struct CausalSoftmax {
    scale: f32,
    tq: usize,
    offset: usize,
}

impl CausalSoftmax {
    fn visible(&self, row: usize, rows: usize, tk: usize) -> usize {
        ((row % rows) % self.tq + self.offset + 1).min(tk)
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "rlhf-causal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_in(s, l, self.name())?;
        let dims = l.dims();
        if dims.len() < 2 {
            bail!("{}: expected at least 2 dims, got {:?}", self.name(), dims)
        }
        let (rows, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, tk, |i, o| {
            let n = self.visible(i, rows, tk);
            let xr = &x[i * tk..i * tk + n];
            let m = xr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * self.scale;
            let mut sum = 0f32;
            for (o, &v) in o[..n].iter_mut().zip(xr) {
                *o = fast_exp(v * self.scale - m);
                sum += *o;
            }
            let inv = 1.0 / sum;
            o[..n].iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g =
            res.apply_op2_no_bwd(&grad.contiguous()?, &CausalSoftmaxBwd { scale: self.scale })?;
        Ok(Some(g))
    }
}

/// grad_s = scale * y * (g - Σ g·y); masked entries have y = 0 and get no gradient.
struct CausalSoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "rlhf-causal-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_in(s1, l1, self.name())?;
        let g = f32_in(s2, l2, self.name())?;
        let tk = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; y.len()];
        for_rows(&mut out, tk, |i, o| {
            let yr = &y[i * tk..(i + 1) * tk];
            let gr = &g[i * tk..(i + 1) * tk];
            let dot = yr.iter().zip(gr).map(|(a, b)| a * b).sum::<f32>();
            for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
                *o = self.scale * yv * (gv - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Causally masked, scaled softmax of attention scores `[.., rows, tk]` (see `CausalSoftmax`).
pub fn causal_softmax(s: &Tensor, scale: f64, tq: usize, offset: usize) -> Result<Tensor> {
    if fused_ok(&[s]) {
        s.contiguous()?.apply_op1(CausalSoftmax {
            scale: scale as f32,
            tq,
            offset,
        })
    } else {
        causal_softmax_ref(s, scale, tq, offset)
    }
}

/// Plain differentiable causal softmax (reference / non-CPU path).
pub fn causal_softmax_ref(s: &Tensor, scale: f64, tq: usize, offset: usize) -> Result<Tensor> {
    let dims = s.dims();
    let (rows, tk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    // A large finite negative instead of -inf keeps 0 * mask out of the backward pass.
    let mask: Vec<f32> = (0..rows * tk)
        .map(|i| {
            if i % tk < ((i / tk) % tq + offset + 1) {
                0.0
            } else {
                -1e30
            }
        })
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
fn rope_kernel(
    src: &[f32],
    cos: &[f32],
    sin: &[f32],
    (_b, t, h, d): (usize, usize, usize, usize),
    bc: usize,
    fwd: bool,
) -> Vec<f32> {
    let half = d / 2;
    let sign = if fwd { 1.0 } else { -1.0 };
    let mut dst = vec![0f32; src.len()];
    // dst rows are contiguous d-vectors; index them in dst order and find the source row.
    for_rows(&mut dst, d, |row, o| {
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
    dst
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
        let out = rope_kernel(x, cos, sin, (b, t, h, d), bc, true);
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
        let out = rope_kernel(g, cos, sin, (b, t, h, d), bc, false);
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
        let row = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; a.len()];
        for_rows(&mut out, row, |i, o| {
            let (ar, br) = (&a[i * row..(i + 1) * row], &b[i * row..(i + 1) * row]);
            for ((o, &av), &bv) in o.iter_mut().zip(ar).zip(br) {
                *o = av * sigmoid(av) * bv;
            }
        });
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
        let row = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; 2 * n];
        let (ga, gb) = out.split_at_mut(n);
        let kernel = |i: usize, oa: &mut [f32], ob: &mut [f32]| {
            let r = i * row..(i + 1) * row;
            for (((oa, ob), &av), (&bv, &gv)) in oa
                .iter_mut()
                .zip(ob.iter_mut())
                .zip(&a[r.clone()])
                .zip(b[r.clone()].iter().zip(&g[r]))
            {
                let s = sigmoid(av);
                *oa = gv * bv * s * (1.0 + av * (1.0 - s));
                *ob = gv * av * s;
            }
        };
        if n >= PAR_MIN_ELEMS {
            ga.par_chunks_mut(row)
                .zip(gb.par_chunks_mut(row))
                .enumerate()
                .for_each(|(i, (oa, ob))| kernel(i, oa, ob));
        } else {
            ga.chunks_mut(row)
                .zip(gb.chunks_mut(row))
                .enumerate()
                .for_each(|(i, (oa, ob))| kernel(i, oa, ob));
        }
        Ok((CpuStorage::F32(out), Shape::from((2, n))))
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
            x.par_chunks(v).map(row_lse).collect()
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
        let rep = nh / nkv;
        let mut out = vec![0f32; b * tq * nh * d];
        let work = b * nh * tq * (self.offset + tq) * d;
        // One output block [tq, nh, d] per batch row.
        for_rows_with(
            &mut out,
            tq * nh * d,
            b > 1 && work >= PAR_MIN_ELEMS,
            |bi, o| {
                let mut p = vec![0f32; self.offset + tq];
                for h in 0..nh {
                    let g = h / rep;
                    let kb = &k[(bi * nkv + g) * cap * d..];
                    let vb = &v[(bi * nkv + g) * cap * d..];
                    for qi in 0..tq {
                        let qr = &q[((bi * nh + h) * tq + qi) * d..][..d];
                        let (lo, hi) = (self.starts[bi][qi], self.offset + qi + 1);
                        let p = &mut p[lo..hi];
                        let mut m = f32::NEG_INFINITY;
                        for (j, pj) in (lo..hi).zip(p.iter_mut()) {
                            *pj = dot(qr, &kb[j * d..(j + 1) * d]) * self.scale;
                            m = m.max(*pj);
                        }
                        let mut sum = 0f32;
                        for pj in p.iter_mut() {
                            *pj = fast_exp(*pj - m);
                            sum += *pj;
                        }
                        let orow = &mut o[(qi * nh + h) * d..][..d];
                        let inv = 1.0 / sum;
                        for (j, &pj) in (lo..hi).zip(p.iter()) {
                            let w = pj * inv;
                            for (ov, &vv) in orow.iter_mut().zip(&vb[j * d..(j + 1) * d]) {
                                *ov += w * vv;
                            }
                        }
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, tq, nh, d))))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear layer matmul

/// `y = x · Wᵀ` (`W` `[out, in]`, `transposed`) or `y = x · W` (`W` `[in, out]`) as one graph node.
/// Through candle ops this is a reshape, a transpose, a matmul and a reshape, and every one of
/// them costs the backward pass a zero-filled buffer plus an addition — for the transpose, of
/// the weight's size, strided.
struct LinearMatmul {
    transposed: bool,
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
        let (n, k) = match (l2.dims(), self.transposed) {
            (&[o, i], true) => (o, i),
            (&[i, o], false) => (o, i),
            (other, _) => bail!("linear: weight must be 2-D, got {other:?}"),
        };
        let xd = l1.dims();
        if xd.last() != Some(&k) {
            bail!("linear: input {xd:?} does not end in the weight's input size {k}")
        }
        let m = x.len() / k;
        let mut y = vec![0f32; m * n];
        // Strides of the [k, n] right-hand side: Wᵀ of a row-major [n, k] or a row-major [k, n].
        let (rhs_cs, rhs_rs) = if self.transposed {
            (k as isize, 1)
        } else {
            (1, n as isize)
        };
        let threads = rayon::current_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: x is [m, k], w holds k*n elements with the strides above, y is [m, n]; all
        // row-major and in bounds.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                rhs_cs,
                rhs_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
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
        let k = *x.dims().last().unwrap_or(&1);
        let n = *grad.dims().last().unwrap_or(&1);
        let m = x.elem_count() / k.max(1);
        let (x2, g2, w) = (
            x.detach().reshape((m, k))?,
            grad.detach().reshape((m, n))?,
            w.detach(),
        );
        let (gx, gw) = if self.transposed {
            (g2.matmul(&w)?, g2.t()?.matmul(&x2)?)
        } else {
            (g2.matmul(&w.t()?)?, x2.t()?.matmul(&g2)?)
        };
        Ok((Some(gx.reshape(x.shape())?), Some(gw)))
    }
}

/// `x [.., in]` times a linear weight: `[out, in]` when `transposed` (torch `nn.Linear`), else
/// `[in, out]` (GPT-2 `Conv1D`). Returns `[.., out]`; differentiable wrt both.
pub fn linear_matmul(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    if fused_ok(&[x, w]) {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, LinearMatmul { transposed })
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
