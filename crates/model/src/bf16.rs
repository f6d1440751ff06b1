//! bf16 matrix products with f32 accumulation, the numerics of `torch.autocast("cpu", bfloat16)`:
//! both operands are rounded to bf16 (round to nearest even), products and sums are f32.
//!
//! The kernel is chosen at run time (the environment variable `RLHF_BF16_KERNEL=avx512-bf16` or
//! `=emulated` caps it, to compare kernels on one machine):
//! * AMX-BF16 (`tdpbf16ps`: a 16 × 16 f32 tile += 16 × 32 bf16 · 32 × 16 bf16 per instruction):
//!   `A` as bf16 rows and `B` as 32-column panels of bf16 pairs along `k` (both zero-padded to 16
//!   pairs), a 32 × 32 block of four accumulator tiles held over the whole `k`. Linux hands out the
//!   tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), made once at detection;
//! * AVX512-BF16 (`vdpbf16ps`: two multiply-adds per f32 lane per instruction, twice the f32 FMA
//!   rate): `A` is converted to bf16 rows, `B` packed into 48-column panels of bf16 pairs along `k`
//!   (the "VNNI" layout both instructions read), an 8 × 48 register tile accumulates in f32;
//! * elsewhere, an emulation that rounds both operands to bf16 and runs the f32 gemm: the same
//!   numbers on every machine, only not faster than f32.

use crate::matmul::{gemm_into, MatRef};
use std::sync::OnceLock;

/// Operand precision of the model's matrix products (master weights, optimizer state and every
/// other op stay f32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Fp32,
    /// bf16 operands, f32 accumulation.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" | "f32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!(
                "unknown precision `{other}` (expected fp32 or bf16)"
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The bf16 gemm implementation in use; declared fastest first (the order a cap compares by).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX-512 registers (`vdpbf16ps`).
    Avx512Bf16,
    /// Operands rounded to bf16, f32 gemm.
    Emulated,
}

/// Names `RLHF_BF16_KERNEL` accepts, fastest first.
const KERNEL_NAMES: [(&str, Kernel); 3] = [
    ("amx", Kernel::Amx),
    ("avx512-bf16", Kernel::Avx512Bf16),
    ("emulated", Kernel::Emulated),
];

impl Kernel {
    /// The fastest kernel this CPU runs, at most the one `RLHF_BF16_KERNEL` names (detected once).
    pub fn detect() -> Kernel {
        static K: OnceLock<Kernel> = OnceLock::new();
        *K.get_or_init(|| {
            let cap = match std::env::var("RLHF_BF16_KERNEL") {
                Ok(v) => match KERNEL_NAMES.iter().find(|(n, _)| *n == v) {
                    Some(&(_, k)) => k,
                    None => {
                        let names: Vec<&str> = KERNEL_NAMES.iter().map(|(n, _)| *n).collect();
                        eprintln!(
                            "warning: RLHF_BF16_KERNEL={v} is not one of {}; ignoring it",
                            names.join(", ")
                        );
                        Kernel::Amx
                    }
                },
                Err(_) => Kernel::Amx,
            };
            Kernel::available()
                .into_iter()
                .find(|&k| k >= cap)
                .unwrap_or(Kernel::Emulated)
        })
    }

    /// Every kernel this CPU runs, fastest first (the emulation always).
    pub fn available() -> Vec<Kernel> {
        let mut ks = vec![];
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if amx::enable() {
            ks.push(Kernel::Amx);
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
            ks.push(Kernel::Avx512Bf16);
        }
        ks.push(Kernel::Emulated);
        ks
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx-bf16",
            Kernel::Avx512Bf16 => "avx512-bf16",
            Kernel::Emulated => "emulated (bf16-rounded operands, f32 gemm)",
        }
    }

    /// How this kernel's packed operands are laid out: `(row padding of A, panel width of B, k-pair
    /// padding of both)`.
    fn geometry(self) -> (usize, usize, usize) {
        match self {
            Kernel::Amx => (AMX_MB, AMX_NB, AMX_KQ),
            _ => (MR, NR, 1),
        }
    }
}

/// f32 → bf16 bits as AVX512-BF16's `vcvtne2ps2bf16` converts (so that every path gives the same
/// bits): round to nearest even, overflow to ±inf, a denormal to ±0 (AMX and `vdpbf16ps` read
/// denormal operands as zero anyway), NaN to a quiet NaN keeping its sign and top payload bits.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        (b >> 16) as u16 | 0x40
    } else if b & 0x7F80_0000 == 0 {
        (b >> 16) as u16 & 0x8000
    } else {
        (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// `x` rounded to the nearest bf16, as an f32.
#[inline(always)]
pub(crate) fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// Rows per parallel conversion task.
const CONVERT_ROWS: usize = 64;
/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 20;

/// `dst[i * ld + j] = f(src(i, j))` over all of `src` (columns `src.ncols()..ld` are left as they
/// are: the zero padding of the packed layouts).
fn convert<T: Send>(
    src: MatRef,
    dst: &mut [T],
    ld: usize,
    parallel: bool,
    f: impl Fn(f32) -> T + Sync,
) {
    let (m, n) = (src.nrows(), src.ncols());
    if m == 0 || n == 0 {
        return;
    }
    let block = |(bi, d): (usize, &mut [T])| {
        let r0 = bi * CONVERT_ROWS;
        let s = src.row_range(r0, (r0 + CONVERT_ROWS).min(m));
        if s.col(0).is_some() {
            // A transposed view: walk 16 rows at a time, reading 16 adjacent values of each
            // column (one cache line) per step.
            for i0 in (0..s.nrows()).step_by(16) {
                let i1 = (i0 + 16).min(s.nrows());
                for j in 0..n {
                    let col = &s.col(j).expect("column-major view")[i0..i1];
                    for (i, &x) in (i0..i1).zip(col) {
                        d[i * ld + j] = f(x);
                    }
                }
            }
        } else {
            for i in 0..s.nrows() {
                let di = &mut d[i * ld..i * ld + n];
                match s.row(i) {
                    Some(r) => di.iter_mut().zip(r).for_each(|(o, &x)| *o = f(x)),
                    None => di
                        .iter_mut()
                        .enumerate()
                        .for_each(|(j, o)| *o = f(s.at(i, j))),
                }
            }
        }
    };
    let dst = &mut dst[..m * ld];
    if parallel && m * n >= PAR_MIN_MACS >> 6 {
        crate::par::chunks_mut(dst, CONVERT_ROWS * ld, |i, d| block((i, d)));
    } else {
        dst.chunks_mut(CONVERT_ROWS * ld)
            .enumerate()
            .for_each(block);
    }
}

/// AVX-512 conversions into the pair layouts: both pair kernels run only where AVX-512F is, and the
/// scalar loops (transposing ones above all) cost a large part of a product otherwise. Compiled
/// twice ([`pair_kernels!`]): rounding in integer operations ([`simd::soft`], AVX-512F only) or by
/// AVX512-BF16's conversion instructions ([`simd::hw`], a third of the operations); same bits as
/// [`bf16_bits`] either way. [`simd!`] calls the one this CPU runs.
#[cfg(target_arch = "x86_64")]
mod simd {
    /// The pair conversions, for the target features `$features` and the 16-lane rounding `rne`
    /// and 32-value pairing `pairs32` defined before the macro is invoked in each module.
    macro_rules! pair_kernels {
        ($features:literal) => {
            fn pair(lo: f32, hi: f32) -> u32 {
                bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
            }

            /// `dst[p · stride] = (x[2p], x[2p+1])` for every pair of `x` (an odd tail pairs with 0).
            ///
            /// # Safety
            /// AVX-512F; `dst` valid for writes at every `p · stride`, `p < x.len().div_ceil(2)`.
            #[target_feature(enable = $features)]
            pub(in crate::bf16) unsafe fn row_pairs(x: &[f32], dst: *mut u32, stride: usize) {
                let full = x.len() / 32;
                let idx = _mm512_mullo_epi32(
                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                    _mm512_set1_epi32(stride as i32),
                );
                for q in 0..full {
                    let v = pairs32(x.as_ptr().add(32 * q));
                    if stride == 1 {
                        _mm512_storeu_si512(dst.add(16 * q).cast(), v);
                    } else {
                        _mm512_i32scatter_epi32::<4>(dst.add(16 * q * stride).cast(), idx, v);
                    }
                }
                for p in 16 * full..x.len().div_ceil(2) {
                    *dst.add(p * stride) = pair(x[2 * p], x.get(2 * p + 1).copied().unwrap_or(0.0));
                }
            }

            /// `dst[i · stride] = (lo[i], hi[i])` (`hi` absent: 0), for `i < lo.len()`.
            ///
            /// # Safety
            /// AVX-512F; `hi` at least as long as `lo`; `dst` valid for writes at every `i · stride`.
            #[target_feature(enable = $features)]
            pub(in crate::bf16) unsafe fn zip_pairs(
                lo: &[f32],
                hi: Option<&[f32]>,
                dst: *mut u32,
                stride: usize,
            ) {
                let n = lo.len();
                let idx = _mm512_mullo_epi32(
                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                    _mm512_set1_epi32(stride as i32),
                );
                for q in 0..n / 16 {
                    let l = rne(_mm512_loadu_ps(lo.as_ptr().add(16 * q)));
                    let h = match hi {
                        Some(h) => {
                            _mm512_slli_epi32::<16>(rne(_mm512_loadu_ps(h.as_ptr().add(16 * q))))
                        }
                        None => _mm512_setzero_si512(),
                    };
                    let v = _mm512_or_si512(l, h);
                    if stride == 1 {
                        _mm512_storeu_si512(dst.add(16 * q).cast(), v);
                    } else {
                        _mm512_i32scatter_epi32::<4>(dst.add(16 * q * stride).cast(), idx, v);
                    }
                }
                for i in n / 16 * 16..n {
                    *dst.add(i * stride) = pair(lo[i], hi.map_or(0.0, |h| h[i]));
                }
            }
            /// The 16 × 16 transpose of 32-bit lanes: `out[j]` lane i = `r[i]` lane j.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
                let z = _mm512_setzero_si512();
                let (mut t, mut u, mut v, mut out) = ([z; 16], [z; 16], [z; 16], [z; 16]);
                for i in 0..8 {
                    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
                    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
                }
                // u[4g + s], 128-bit lane L: column 4L + s of rows 4g..4g+4.
                for g in 0..4 {
                    u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
                    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
                    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
                    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
                }
                for h in [0, 8] {
                    for s in 0..4 {
                        v[h + s] = _mm512_shuffle_i32x4::<0x88>(u[h + s], u[h + 4 + s]);
                        v[h + 4 + s] = _mm512_shuffle_i32x4::<0xdd>(u[h + s], u[h + 4 + s]);
                    }
                }
                for s in 0..4 {
                    out[s] = _mm512_shuffle_i32x4::<0x88>(v[s], v[8 + s]);
                    out[8 + s] = _mm512_shuffle_i32x4::<0xdd>(v[s], v[8 + s]);
                    out[4 + s] = _mm512_shuffle_i32x4::<0x88>(v[4 + s], v[12 + s]);
                    out[12 + s] = _mm512_shuffle_i32x4::<0xdd>(v[4 + s], v[12 + s]);
                }
                out
            }

            /// Pairs of 16 sequences at once, transposed: `dst[p · stride + c] = (x_c[2p], x_c[2p+1])` for
            /// `c < 16` and every pair (an odd tail pairs with 0); `x_c = cols[c]`, all of one length.
            ///
            /// # Safety
            /// AVX-512F; `dst` valid for writes at every `p · stride + c`.
            #[target_feature(enable = $features)]
            pub(in crate::bf16) unsafe fn row_pairs16(
                cols: [&[f32]; 16],
                dst: *mut u32,
                stride: usize,
            ) {
                let len = cols[0].len();
                let full = len / 32;
                for q in 0..full {
                    let v = transpose16(std::array::from_fn(|c| {
                        pairs32(cols[c].as_ptr().add(32 * q))
                    }));
                    for (p, vp) in v.iter().enumerate() {
                        _mm512_storeu_si512(dst.add((16 * q + p) * stride).cast(), *vp);
                    }
                }
                for p in 16 * full..len.div_ceil(2) {
                    for (c, x) in cols.iter().enumerate() {
                        *dst.add(p * stride + c) =
                            pair(x[2 * p], x.get(2 * p + 1).copied().unwrap_or(0.0));
                    }
                }
            }

            /// 16 rows of pairs from columns: `dst[i · stride + p] = (col(2p)[i], col(2p+1)[i])` for `i < 16`
            /// and `p < pairs` (column `2p + 1 = k` absent: 0); every column has at least 16 values.
            ///
            /// # Safety
            /// AVX-512F; `dst` valid for writes at every `i · stride + p`.
            #[target_feature(enable = $features)]
            pub(in crate::bf16) unsafe fn col_pairs16<'a>(
                col: impl Fn(usize) -> Option<&'a [f32]>,
                pairs: usize,
                dst: *mut u32,
                stride: usize,
            ) {
                let zip = |p: usize| -> __m512i {
                    let lo = rne(_mm512_loadu_ps(
                        col(2 * p).expect("column 2p exists").as_ptr(),
                    ));
                    match col(2 * p + 1) {
                        Some(h) => _mm512_or_si512(
                            lo,
                            _mm512_slli_epi32::<16>(rne(_mm512_loadu_ps(h.as_ptr()))),
                        ),
                        None => lo,
                    }
                };
                for p0 in (0..pairs / 16 * 16).step_by(16) {
                    let v = transpose16(std::array::from_fn(|t| zip(p0 + t)));
                    for (i, vi) in v.iter().enumerate() {
                        _mm512_storeu_si512(dst.add(i * stride + p0).cast(), *vi);
                    }
                }
                for p in pairs / 16 * 16..pairs {
                    let v = zip(p);
                    let lanes: [u32; 16] = std::mem::transmute(v);
                    for (i, &x) in lanes.iter().enumerate() {
                        *dst.add(i * stride + p) = x;
                    }
                }
            }
        };
    }

    /// Rounding in integer operations (AVX-512F).
    pub(super) mod soft {
        use super::super::bf16_bits;
        use std::arch::x86_64::*;

        /// 16 f32 → their bf16 bit patterns, one per 32-bit lane.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn rne(x: __m512) -> __m512i {
            let b = _mm512_castps_si512(x);
            let top = _mm512_srli_epi32::<16>(b);
            let lsb = _mm512_and_si512(top, _mm512_set1_epi32(1));
            let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(
                b,
                _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)),
            ));
            let denormal = _mm512_testn_epi32_mask(b, _mm512_set1_epi32(0x7F80_0000));
            let r = _mm512_mask_mov_epi32(
                r,
                denormal,
                _mm512_and_si512(top, _mm512_set1_epi32(0x8000)),
            );
            _mm512_mask_mov_epi32(
                r,
                _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x),
                _mm512_or_si512(top, _mm512_set1_epi32(0x40)),
            )
        }

        /// Pairs of 32 consecutive values `x[0..32]`: lane p = (x[2p], x[2p+1]).
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn pairs32(x: *const f32) -> __m512i {
            let lo = _mm512_cvtepi32_epi16(rne(_mm512_loadu_ps(x)));
            let hi = _mm512_cvtepi32_epi16(rne(_mm512_loadu_ps(x.add(16))));
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
        }

        pair_kernels!("avx512f");
    }

    /// Rounding by `vcvtneps2bf16` / `vcvtne2ps2bf16` (AVX512-BF16).
    pub(super) mod hw {
        use super::super::bf16_bits;
        use std::arch::x86_64::*;

        /// 16 f32 → their bf16 bit patterns, one per 32-bit lane.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn rne(x: __m512) -> __m512i {
            _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                _mm512_cvtneps_pbh(x),
            ))
        }

        /// Pairs of 32 consecutive values `x[0..32]`: lane p = (x[2p], x[2p+1]).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn pairs32(x: *const f32) -> __m512i {
            let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x.add(16)), _mm512_loadu_ps(x));
            std::mem::transmute::<__m512bh, __m512i>(v)
        }

        pair_kernels!("avx512f,avx512bf16");
    }

    /// Whether this CPU converts with AVX512-BF16's instructions (checked once).
    pub(super) fn has_hw() -> bool {
        static HW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HW.get_or_init(|| is_x86_feature_detected!("avx512bf16"))
    }
}

/// Calls the pair conversion `$f` of [`simd`] this CPU runs (AVX-512F is the caller's to check).
#[cfg(target_arch = "x86_64")]
macro_rules! simd {
    ($f:ident($($arg:expr),* $(,)?)) => {
        if simd::has_hw() {
            simd::hw::$f($($arg),*)
        } else {
            simd::soft::$f($($arg),*)
        }
    };
}

/// `A` into rows of `kp` pairs (`rows[i · kp + p]` = (a(i, 2p), a(i, 2p+1))), for the pair kernels.
fn pack_a_pairs(a: MatRef, rows: &mut [u32], kp: usize, parallel: bool) {
    let (m, k) = (a.nrows(), a.ncols());
    if m == 0 || k == 0 {
        return;
    }
    let block = |(bi, d): (usize, &mut [u32])| {
        let r0 = bi * CONVERT_ROWS;
        let s = a.row_range(r0, (r0 + CONVERT_ROWS).min(m));
        let dp = d.as_mut_ptr();
        // SAFETY: the pair kernels exist only where AVX-512F was detected; row i of the block owns
        // d[i·kp .. i·kp + kp] and k.div_ceil(2) ≤ kp pairs are written into it.
        unsafe {
            if s.col(0).is_some() {
                // A transposed view: columns 2p and 2p+1 give pair p of every row of the block;
                // 16 rows at a time are transposed in registers, a remainder scattered.
                let full = s.nrows() / 16 * 16;
                for i0 in (0..full).step_by(16) {
                    let col = |j: usize| {
                        (j < k).then(|| &s.col(j).expect("column-major view")[i0..i0 + 16])
                    };
                    simd!(col_pairs16(col, k.div_ceil(2), dp.add(i0 * kp), kp));
                }
                for p in 0..k.div_ceil(2) {
                    let lo = &s.col(2 * p).expect("column-major view")[full..];
                    let hi = (2 * p + 1 < k)
                        .then(|| &s.col(2 * p + 1).expect("column-major view")[full..]);
                    simd!(zip_pairs(lo, hi, dp.add(full * kp + p), kp));
                }
            } else {
                for i in 0..s.nrows() {
                    match s.row(i) {
                        Some(r) => simd!(row_pairs(r, dp.add(i * kp), 1)),
                        None => {
                            let r: Vec<f32> = (0..k).map(|j| s.at(i, j)).collect();
                            simd!(row_pairs(&r, dp.add(i * kp), 1))
                        }
                    }
                }
            }
        }
    };
    let rows = &mut rows[..m * kp];
    if parallel && m * k >= PAR_MIN_MACS >> 6 {
        crate::par::chunks_mut(rows, CONVERT_ROWS * kp, |i, d| block((i, d)));
    } else {
        rows.chunks_mut(CONVERT_ROWS * kp)
            .enumerate()
            .for_each(block);
    }
}

/// Rows of the register tile.
const MR: usize = 8;
/// Rows and columns of the AMX accumulator block (2 × 2 tiles of 16 × 16 f32).
const AMX_MB: usize = 32;
const AMX_NB: usize = 32;
/// k pairs per AMX step: one 16-row × 64-byte tile of `A` or `B`.
const AMX_KQ: usize = 16;
/// Columns of the register tile and width of a packed `B` panel (three 16-lane vectors).
const NR: usize = 48;
/// `k` pairs per cache block: a 48-column panel block is 24 KiB, a 32-column one and a 32-row `A`
/// block 16 KiB each, within L1 (the whole `k` of a 1,536-wide product is not).
const KC: usize = 128;
/// Pairs of rows per task of a row-major `B` conversion (64 rows of up to a few KiB stay in L2
/// while their pairs go to every panel).
const ZIP_PAIRS: usize = 32;
/// Rows per parallel task (the `A` block of one task, `MC × 2·KC` bf16 = 64 KiB, stays in L2).
const MC: usize = 128;

enum Packed {
    /// bf16 pairs along `k` (low half = even `k`), zero-padded to the kernel's geometry
    /// ([`Kernel::geometry`]): for `A`, rows of `kp` pairs (`k.div_ceil(2)` rounded up to the k-pair
    /// padding; row count rounded up to the row padding); for `B`, `n.div_ceil(nr)` panels of
    /// `[kp][nr]` pairs (the layout `vdpbf16ps` and `tdpbf16ps` read).
    Pairs {
        kernel: Kernel,
        kp: usize,
        data: Vec<u32>,
    },
    /// bf16-rounded values, row-major f32 (emulated kernel).
    Rounded(Vec<f32>),
    /// Row-major f32 (an f32 product's right-hand side copied in the order the gemm reads it).
    F32(Vec<f32>),
}

/// The left operand of bf16 products, converted once (e.g. the hidden states the chunked LM head
/// multiplies by every vocabulary chunk).
pub(crate) struct PackedA {
    m: usize,
    k: usize,
    data: Packed,
}

impl PackedA {
    pub(crate) fn new(a: MatRef, parallel: bool) -> Self {
        Self::with_kernel(a, Kernel::detect(), parallel)
    }

    fn with_kernel(a: MatRef, kernel: Kernel, parallel: bool) -> Self {
        let (m, k) = (a.nrows(), a.ncols());
        let data = match kernel {
            Kernel::Emulated => {
                let mut r = vec![0f32; m * k];
                convert(a, &mut r, k, parallel, round_bf16);
                Packed::Rounded(r)
            }
            Kernel::Avx512Bf16 | Kernel::Amx => {
                let (mr, _, kq) = kernel.geometry();
                let kp = k.div_ceil(2).next_multiple_of(kq);
                // Only the padding (pairs past k, rows past m) is zeroed: the packing writes the rest.
                let mut rows = crate::ops::overwritten(m.div_ceil(mr) * mr * kp);
                if kp > k.div_ceil(2) {
                    rows[..m * kp]
                        .chunks_mut(kp)
                        .for_each(|r| r[k.div_ceil(2)..].fill(0));
                }
                rows[m * kp..].fill(0);
                pack_a_pairs(a, &mut rows, kp, parallel);
                Packed::Pairs {
                    kernel,
                    kp,
                    data: rows,
                }
            }
        };
        Self { m, k, data }
    }
}

/// The right-hand operand of products, converted once and reusable across calls (inference
/// weights are packed when the decoder is built, never per product): to bf16 for bf16 products,
/// or at f32 a row-major copy of a transposed view (the CPU gemm multiplies by `[in, out]` rows
/// faster than by the transposed view of `[out, in]`: about 2× at decode batch sizes, a quarter at
/// a training batch's).
pub(crate) struct PackedB {
    k: usize,
    n: usize,
    data: Packed,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB {{ k: {}, n: {} }}", self.k, self.n)
    }
}

impl PackedB {
    pub(crate) fn new(b: MatRef, parallel: bool) -> Self {
        Self::with_kernel(b, Kernel::detect(), parallel)
    }

    fn with_kernel(b: MatRef, kernel: Kernel, parallel: bool) -> Self {
        let (k, n) = (b.nrows(), b.ncols());
        let data = match kernel {
            Kernel::Emulated => {
                let mut r = vec![0f32; k * n];
                convert(b, &mut r, n, parallel, round_bf16);
                Packed::Rounded(r)
            }
            Kernel::Avx512Bf16 | Kernel::Amx => {
                let (_, nr, kq) = kernel.geometry();
                let kp = k.div_ceil(2).next_multiple_of(kq);
                let mut panels = crate::ops::overwritten(n.div_ceil(nr) * kp * nr);
                // Panel j holds B's columns n0..n0+nr: pair p of column c at p·nr + c; pairs past
                // k.div_ceil(2) and columns past n are zero.
                let kh = k.div_ceil(2);
                let zero_padding = |j: usize, panel: &mut [u32]| {
                    if nr.min(n - j * nr) < nr {
                        panel.fill(0);
                    } else {
                        panel[kh * nr..].fill(0);
                    }
                };
                let par = parallel && k * n >= PAR_MIN_MACS >> 6;
                if kp == 0 {
                } else if b.col(0).is_some() {
                    // The nn.Linear forward (B = Wᵀ): a column is a weight row, its pairs adjacent;
                    // 16 columns at a time are transposed in registers, a remainder scattered.
                    let pack = |(j, panel): (usize, &mut [u32])| {
                        zero_padding(j, panel);
                        let (n0, nc) = (j * nr, nr.min(n - j * nr));
                        let dp = panel.as_mut_ptr();
                        let col = |c: usize| b.col(n0 + c).expect("column-major view");
                        // SAFETY: the pair kernels exist only where AVX-512F was detected; the
                        // panel is kp · nr pairs and every write lands at p · nr + c with
                        // p < kh ≤ kp, c < nc ≤ nr.
                        unsafe {
                            for c0 in (0..nc / 16 * 16).step_by(16) {
                                simd!(row_pairs16(
                                    std::array::from_fn(|c| col(c0 + c)),
                                    dp.add(c0),
                                    nr,
                                ));
                            }
                            for c in nc / 16 * 16..nc {
                                simd!(row_pairs(col(c), dp.add(c), nr));
                            }
                        }
                    };
                    if par {
                        crate::par::chunks_mut(&mut panels, kp * nr, |j, p| pack((j, p)));
                    } else {
                        panels.chunks_mut(kp * nr).enumerate().for_each(pack);
                    }
                } else {
                    // Row-major B (the input gradient's W, a weight gradient's activations): a pair
                    // interleaves two rows. Each task takes a block of rows and writes their pairs
                    // into every panel, reading each row once, in order (a panel at a time read
                    // every row in nr-wide pieces: 18 % more time in the conversion, GRPO bench).
                    panels
                        .chunks_mut(kp * nr)
                        .enumerate()
                        .for_each(|(j, panel)| zero_padding(j, panel));
                    let dst = Dst(panels.as_mut_ptr());
                    let block = |q: usize| {
                        let row = |r: usize, n0: usize, nc: usize| -> std::borrow::Cow<[f32]> {
                            match b.row(r) {
                                Some(x) => std::borrow::Cow::Borrowed(&x[n0..n0 + nc]),
                                None => (n0..n0 + nc).map(|c| b.at(r, c)).collect(),
                            }
                        };
                        for j in 0..n.div_ceil(nr) {
                            let (n0, nc) = (j * nr, nr.min(n - j * nr));
                            for p in q * ZIP_PAIRS..((q + 1) * ZIP_PAIRS).min(kh) {
                                let lo = row(2 * p, n0, nc);
                                let hi = (2 * p + 1 < k).then(|| row(2 * p + 1, n0, nc));
                                // SAFETY: as above, and this task alone writes pairs
                                // q·ZIP_PAIRS.. of each panel.
                                unsafe {
                                    let dp = dst.ptr().add(j * kp * nr + p * nr);
                                    simd!(zip_pairs(&lo, hi.as_deref(), dp, 1))
                                }
                            }
                        }
                    };
                    if par {
                        crate::par::for_each(kh.div_ceil(ZIP_PAIRS), block);
                    } else {
                        (0..kh.div_ceil(ZIP_PAIRS)).for_each(block);
                    }
                }
                Packed::Pairs {
                    kernel,
                    kp,
                    data: panels,
                }
            }
        };
        Self { k, n, data }
    }

    /// `b` copied row-major at f32 (transposed in tiles when `b` is a transposed view).
    pub(crate) fn f32_rows(b: MatRef, parallel: bool) -> Self {
        let (k, n) = (b.nrows(), b.ncols());
        let mut rows = crate::ops::overwritten(k * n);
        crate::ops::copy_rows(b, &mut rows, parallel);
        Self {
            k,
            n,
            data: Packed::F32(rows),
        }
    }

    /// `(k, n)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The precision of the products it serves.
    pub(crate) fn precision(&self) -> Precision {
        match self.data {
            Packed::F32(_) => Precision::Fp32,
            _ => Precision::Bf16,
        }
    }
}

/// A left operand at either precision.
pub(crate) enum Lhs<'a> {
    F32(MatRef<'a>),
    Bf16(PackedA),
}

/// A right operand at either precision.
pub(crate) enum Rhs<'a> {
    F32(MatRef<'a>),
    Bf16(PackedB),
    /// Packed ahead of time (an inference weight).
    Prepacked(&'a PackedB),
}

impl<'a> Lhs<'a> {
    pub(crate) fn new(precision: Precision, a: MatRef<'a>, parallel: bool) -> Self {
        match precision {
            Precision::Fp32 => Lhs::F32(a),
            Precision::Bf16 => Lhs::Bf16(PackedA::new(a, parallel)),
        }
    }
}

impl<'a> Rhs<'a> {
    pub(crate) fn new(precision: Precision, b: MatRef<'a>, parallel: bool) -> Self {
        match precision {
            Precision::Fp32 => Rhs::F32(b),
            Precision::Bf16 => Rhs::Bf16(PackedB::new(b, parallel)),
        }
    }
}

/// [`gemm_into`] with the operands at `precision` (bf16: rounded, f32 accumulation).
pub(crate) fn gemm_prec(
    precision: Precision,
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    a: MatRef,
    b: MatRef,
    parallel: bool,
) {
    gemm_ops(
        dst,
        ld,
        accumulate,
        &Lhs::new(precision, a, parallel),
        &Rhs::new(precision, b, parallel),
        parallel,
    )
}

/// `dst = a · b` (or `+=` when `accumulate`), `dst` row-major with row stride `ld`; both
/// operands must be at the same precision. Same contract as [`gemm_into`].
pub(crate) fn gemm_ops(
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    a: &Lhs,
    b: &Rhs,
    parallel: bool,
) {
    let (a, b) = match (a, b) {
        (Lhs::F32(a), Rhs::F32(b)) => return gemm_into(dst, ld, accumulate, *a, *b, parallel),
        (
            Lhs::F32(a),
            Rhs::Prepacked(PackedB {
                k,
                n,
                data: Packed::F32(rows),
            }),
        ) => {
            let b = MatRef::new(rows, *k, *n, *n);
            return gemm_into(dst, ld, accumulate, *a, b, parallel);
        }
        (Lhs::Bf16(a), Rhs::Bf16(b)) => (a, b),
        (Lhs::Bf16(a), Rhs::Prepacked(b)) => (a, *b),
        _ => panic!("gemm_ops: operands at different precisions"),
    };
    let (m, k, n) = (a.m, a.k, b.n);
    assert_eq!(k, b.k, "gemm_bf16: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ld >= n && dst.len() >= (m - 1) * ld + n,
        "gemm_bf16: destination too small"
    );
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| dst[i * ld..i * ld + n].fill(0.0));
        }
        return;
    }
    let parallel = parallel && m * n * k >= PAR_MIN_MACS;
    match (&a.data, &b.data) {
        (Packed::Rounded(ar), Packed::Rounded(br)) => gemm_into(
            dst,
            ld,
            accumulate,
            MatRef::new(ar, m, k, k),
            MatRef::new(br, k, n, n),
            parallel,
        ),
        #[cfg(target_arch = "x86_64")]
        (
            Packed::Pairs {
                kernel: ka,
                kp,
                data: rows,
            },
            Packed::Pairs {
                kernel: kb,
                data: panels,
                ..
            },
        ) if ka == kb => match ka {
            Kernel::Avx512Bf16 => {
                drive::<vnni::Vnni>(dst, ld, accumulate, rows, panels, m, *kp, n, parallel)
            }
            #[cfg(target_os = "linux")]
            Kernel::Amx => {
                drive::<amx::Amx>(dst, ld, accumulate, rows, panels, m, *kp, n, parallel)
            }
            _ => unreachable!("pairs are packed only for the AVX512-BF16 and AMX kernels"),
        },
        _ => panic!("gemm_ops: operands packed for different kernels"),
    }
}

/// A buffer shared by tasks that write disjoint blocks of it (a product's destination, packed
/// panels).
#[cfg(target_arch = "x86_64")]
struct Dst<T>(*mut T);
#[cfg(target_arch = "x86_64")]
impl<T> Clone for Dst<T> {
    fn clone(&self) -> Self {
        *self
    }
}
#[cfg(target_arch = "x86_64")]
impl<T> Copy for Dst<T> {}
// SAFETY: every task of `drive` writes only its own rows × panels block, every task of a row-major
// `PackedB` conversion only its own pairs of each panel.
#[cfg(target_arch = "x86_64")]
unsafe impl<T> Send for Dst<T> {}
#[cfg(target_arch = "x86_64")]
unsafe impl<T> Sync for Dst<T> {}

#[cfg(target_arch = "x86_64")]
impl<T> Dst<T> {
    /// (A method, so that closures capture the whole `Send + Sync` wrapper, not its field.)
    fn ptr(self) -> *mut T {
        self.0
    }
}

/// A pair kernel's innermost product, which [`drive`] blocks and parallelises (a trait, so that each
/// kernel's driver is compiled with its product inlined).
#[cfg(target_arch = "x86_64")]
trait Micro {
    /// Rows and columns of one block of `C` (`B`'s panel width).
    const MB: usize;
    const NB: usize;
    /// The k-pair count of every call is a multiple of this.
    const KQ: usize;
    /// `c[MB × NB] (+)= a · b` over `kc` pairs: `a` rows `lda` pairs apart, `b` one panel (`NB` pairs
    /// per k pair), `c` rows `ldc` floats apart; reads `c` only when `load_c`.
    ///
    /// # Safety
    /// The CPU runs this kernel, [`Micro::enter`] ran on this thread, and the pointers cover the block.
    unsafe fn block(
        kc: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    );
    /// Run by each task before its first and after its last block (AMX: load and release the tiles).
    ///
    /// # Safety
    /// The CPU runs this kernel.
    unsafe fn enter() {}
    /// # Safety
    /// As [`Micro::enter`], after it.
    unsafe fn leave() {}
}

/// `dst[m × n] (+)= a · b` for `a` bf16 rows (padded to `K::MB` rows of `kp` pairs) and `b` packed
/// `K::NB`-column panels. `K` must be a kernel this CPU runs (pairs are packed only then).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn drive<K: Micro>(
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    ap: &[u32],
    panels: &[u32],
    m: usize,
    kp: usize,
    n: usize,
    parallel: bool,
) {
    let (mb, nb) = (K::MB, K::NB);
    assert!(
        kp.is_multiple_of(K::KQ)
            && ap.len() >= m.div_ceil(mb) * mb * kp
            && panels.len() >= n.div_ceil(nb) * kp * nb
    );
    let np = n.div_ceil(nb);
    // Tasks are MC rows × a group of panels; enough groups that both cores get work when M is a
    // single block (decoding, small batches).
    let mblocks = m.div_ceil(MC);
    let groups = if parallel {
        (2 * crate::par::threads()).div_ceil(mblocks).clamp(1, np)
    } else {
        1
    };
    let per_group = np.div_ceil(groups);
    let out = Dst(dst.as_mut_ptr());
    let task = |t: usize| {
        let (g0, g) = (t / groups, t % groups);
        let (i0, i1) = (g0 * MC, ((g0 + 1) * MC).min(m));
        let (j0, j1) = (g * per_group, ((g + 1) * per_group).min(np));
        let mut edge = vec![0f32; mb * nb];
        // SAFETY: the micro-kernel runs on this CPU (see above); `enter`/`leave` bracket its blocks on
        // this thread.
        unsafe { K::enter() };
        for pc in (0..kp).step_by(KC) {
            let kc = KC.min(kp - pc);
            let load = accumulate || pc > 0;
            for j in j0..j1 {
                let (n0, nc) = (j * nb, nb.min(n - j * nb));
                let bp = panels[(j * kp + pc) * nb..].as_ptr();
                for i in (i0..i1).step_by(mb) {
                    let mr = mb.min(m - i);
                    let apt = ap[i * kp + pc..].as_ptr();
                    // SAFETY: `ap` holds `mb` rows of `kp` pairs from row `i` and the panel `kp` × `nb`
                    // pairs (lengths asserted above; `kc` pairs from `pc` lie inside both, `kc` a
                    // multiple of `KQ` as KC and `kp` are); full blocks lie inside `dst` (`(m-1)·ld + n
                    // ≤ len`, checked by the caller), edge blocks go through `edge`, and no other task
                    // touches rows i0..i1 × panels j0..j1.
                    unsafe {
                        let c = out.ptr().add(i * ld + n0);
                        if mr == mb && nc == nb {
                            K::block(kc, apt, kp, bp, c, ld, load);
                        } else {
                            for r in 0..mr {
                                for col in 0..nc {
                                    edge[r * nb + col] =
                                        if load { *c.add(r * ld + col) } else { 0.0 };
                                }
                            }
                            K::block(kc, apt, kp, bp, edge.as_mut_ptr(), nb, true);
                            for r in 0..mr {
                                for col in 0..nc {
                                    *c.add(r * ld + col) = edge[r * nb + col];
                                }
                            }
                        }
                    }
                }
            }
        }
        // SAFETY: as `enter`.
        unsafe { K::leave() };
    };
    let tasks = mblocks * groups;
    if parallel && tasks > 1 {
        crate::par::for_each(tasks, task);
    } else {
        (0..tasks).for_each(task);
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Micro, MR, NR};
    use std::arch::x86_64::*;

    /// `c[MR × NR] (+)= a · b` over `kc` pairs: `a` rows `lda` pairs apart, `b` one packed panel
    /// (`NR` pairs per step). Reads `c` only when `load_c`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile(
        kc: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 3]; MR];
        for p in 0..kc {
            let bp = b.add(p * NR);
            let bv: [__m512bh; 3] = std::array::from_fn(|v| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(16 * v).cast()))
            });
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let ar = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *a.add(r * lda + p) as i32,
                ));
                for (v, acc_rv) in acc_r.iter_mut().enumerate() {
                    *acc_rv = _mm512_dpbf16_ps(*acc_rv, ar, bv[v]);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (v, acc_rv) in acc_r.iter().enumerate() {
                let cp = c.add(r * ldc + 16 * v);
                let x = if load_c {
                    _mm512_add_ps(*acc_rv, _mm512_loadu_ps(cp))
                } else {
                    *acc_rv
                };
                _mm512_storeu_ps(cp, x);
            }
        }
    }

    /// The AVX512-BF16 micro-kernel for [`super::drive`].
    pub(super) struct Vnni;

    impl Micro for Vnni {
        const MB: usize = MR;
        const NB: usize = NR;
        const KQ: usize = 1;
        unsafe fn block(
            kc: usize,
            a: *const u32,
            lda: usize,
            b: *const u32,
            c: *mut f32,
            ldc: usize,
            load_c: bool,
        ) {
            tile(kc, a, lda, b, c, ldc, load_c)
        }
    }
}

/// The AMX-BF16 kernel (Linux: the tile state must be requested from the kernel).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use super::{Micro, AMX_KQ, AMX_MB, AMX_NB};
    use std::arch::asm;

    /// `arch_prctl` requests of Linux's `asm/prctl.h`, and the xstate component of the tile data.
    const ARCH_GET_XCOMP_PERM: libc::c_ulong = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_ulong = 18;

    /// True when the CPU has AMX-TILE and AMX-BF16 and Linux granted this process the tile state.
    pub(super) fn enable() -> bool {
        // CPUID.(EAX=7, ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
        // CPUID leaf 7 exists on every x86-64 CPU that has AVX-512 (checked first).
        let has_cpu = is_x86_feature_detected!("avx512f") && {
            let r = std::arch::x86_64::__cpuid_count(7, 0);
            r.edx & (1 << 22) != 0 && r.edx & (1 << 24) != 0
        };
        if !has_cpu {
            return false;
        }
        let mut granted: libc::c_ulong = 0;
        // SAFETY: plain syscalls; the second writes one u64 through a valid pointer.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
                && libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_GET_XCOMP_PERM,
                    &mut granted as *mut libc::c_ulong,
                ) == 0
                && granted & (1 << XFEATURE_XTILEDATA) != 0
        }
    }

    /// `ldtilecfg`'s 64-byte operand: palette 1, tiles 0–7 all 16 rows × 64 bytes
    /// (0–3: C blocks of 16 × 16 f32; 4–5: A, 16 rows × 16 pairs; 6–7: B, 16 pairs × 16 columns).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// `c[32 × 32] (+)= a · b` over `kp` pairs (a multiple of 16): `a` 32 rows `lda` pairs apart,
    /// `b` one 32-column panel, `c` rows `ldc` floats apart. Reads `c` only when `load_c`. The tile
    /// configuration must be loaded ([`Micro::enter`]).
    unsafe fn block(
        kp: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) {
        // Tile loads and stores take strides in bytes.
        let (lda, ldb, ldc) = (4 * lda, 4 * AMX_NB, 4 * ldc);
        let (c0, c1, c2, c3) = (
            c,
            c.add(16),
            c.byte_add(16 * ldc),
            c.byte_add(16 * ldc).add(16),
        );
        if load_c {
            asm!(
                "tileloadd tmm0, [{c0} + {s}]", "tileloadd tmm1, [{c1} + {s}]",
                "tileloadd tmm2, [{c2} + {s}]", "tileloadd tmm3, [{c3} + {s}]",
                c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, s = in(reg) ldc,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        for q in (0..kp).step_by(AMX_KQ) {
            let (a0, b0) = (a.add(q), b.add(q * AMX_NB));
            asm!(
                "tileloadd tmm4, [{a0} + {sa}]", "tileloadd tmm5, [{a1} + {sa}]",
                "tileloadd tmm6, [{b0} + {sb}]", "tileloadd tmm7, [{b1} + {sb}]",
                "tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a0.byte_add(16 * lda), sa = in(reg) lda,
                b0 = in(reg) b0, b1 = in(reg) b0.add(16), sb = in(reg) ldb,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c0} + {s}], tmm0", "tilestored [{c1} + {s}], tmm1",
            "tilestored [{c2} + {s}], tmm2", "tilestored [{c3} + {s}], tmm3",
            c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, s = in(reg) ldc,
            options(nostack),
        );
    }

    /// The AMX micro-kernel for [`super::drive`].
    pub(super) struct Amx;

    impl Micro for Amx {
        const MB: usize = AMX_MB;
        const NB: usize = AMX_NB;
        const KQ: usize = AMX_KQ;
        unsafe fn block(
            kc: usize,
            a: *const u32,
            lda: usize,
            b: *const u32,
            c: *mut f32,
            ldc: usize,
            load_c: bool,
        ) {
            block(kc, a, lda, b, c, ldc, load_c)
        }
        /// Loads the tile configuration on this thread.
        unsafe fn enter() {
            asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
        }
        /// Releases this thread's tile state (the next task loads the configuration again).
        unsafe fn leave() {
            asm!("tilerelease", options(nostack, nomem));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        let h = 2f32.powi(-8); // half a bf16 ulp at 1.0
        assert_eq!(round_bf16(1.0 + h), 1.0); // tie → even (1.0)
        assert_eq!(round_bf16(1.0 + 3.0 * h), 1.0 + 4.0 * h); // tie → even (1 + 2^-6)
        assert_eq!(round_bf16(1.0 + 1.5 * h), 1.0 + 2.0 * h);
        assert_eq!(round_bf16(-1.0 - 0.5 * h), -1.0);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_bf16(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(bf16_bits(1.0), 0x3F80);
        // As vcvtne2ps2bf16: denormals to signed zero, NaN quiet with its sign and top payload.
        assert_eq!(bf16_bits(f32::from_bits(0x007F_FFFF)), 0x0000);
        assert_eq!(bf16_bits(f32::from_bits(0x8001_16C2)), 0x8000);
        assert_eq!(bf16_bits(f32::from_bits(0xFF81_2345)), 0xFFC1);
        assert_eq!(bf16_bits(f32::from_bits(0x7F80_0001)), 0x7FC0);
    }

    /// Values that exercise every rounding rule: ties both ways, overflow, infinities, denormals,
    /// NaNs of both signs with payloads, zeros, and pseudo-random bit patterns.
    #[cfg(target_arch = "x86_64")]
    fn awkward_values(n: usize) -> Vec<f32> {
        let special = [
            0x3F80_8000,
            0x3F81_8000,
            0x7F7F_FFFF,
            0x7F80_0000,
            0xFF80_0000,
            0x007F_FFFF,
            0x8000_0001,
            0x0080_0000,
            0x7FC0_0000,
            0xFFC0_0000,
            0xFF81_2345,
            0x7F80_0001,
            0x0000_0000,
            0x8000_0000,
        ];
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                f32::from_bits(special.get(i % 40).copied().unwrap_or((s >> 32) as u32))
            })
            .collect()
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_conversions_give_the_scalar_bits() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("SKIP: no AVX-512F here; the pair conversions are not used on this CPU");
            return;
        }
        let want = |lo: &[f32], hi: &[f32]| -> Vec<u32> {
            lo.iter()
                .zip(hi)
                .map(|(&l, &h)| bf16_bits(l) as u32 | (bf16_bits(h) as u32) << 16)
                .collect()
        };
        let x = awkward_values(4096 + 38); // a tail past the 32-value blocks
        let (lo, hi): (Vec<f32>, Vec<f32>) = x.chunks(2).map(|p| (p[0], p[1])).unzip();
        let pairs = want(&lo, &hi);
        let run = |hw: bool| {
            let (mut rows, mut zipped) = (vec![0u32; pairs.len()], vec![0u32; lo.len()]);
            let even = &x[..2 * lo.len()];
            // SAFETY: AVX-512F (and for `hw` AVX512-BF16) checked; every write lies inside the
            // destinations, one pair per index.
            unsafe {
                if hw {
                    simd::hw::row_pairs(even, rows.as_mut_ptr(), 1);
                    simd::hw::zip_pairs(&lo, Some(&hi), zipped.as_mut_ptr(), 1);
                } else {
                    simd::soft::row_pairs(even, rows.as_mut_ptr(), 1);
                    simd::soft::zip_pairs(&lo, Some(&hi), zipped.as_mut_ptr(), 1);
                }
            }
            for (name, got) in [("row_pairs", &rows), ("zip_pairs", &zipped)] {
                if let Some(i) = (0..pairs.len()).find(|&i| got[i] != pairs[i]) {
                    panic!(
                        "{name} (hw: {hw}) pair {i} of ({:#010x}, {:#010x}): {:#010x}, want {:#010x}",
                        lo[i].to_bits(),
                        hi[i].to_bits(),
                        got[i],
                        pairs[i]
                    );
                }
            }
        };
        run(false);
        if simd::has_hw() {
            run(true);
        } else {
            eprintln!("SKIP: no AVX512-BF16 here; its conversions are not tested");
        }
    }

    fn kernels() -> Vec<Kernel> {
        let ks = Kernel::available();
        for k in [Kernel::Amx, Kernel::Avx512Bf16] {
            if !ks.contains(&k) {
                eprintln!(
                    "SKIP: this CPU (or OS) has no {}; that kernel is not tested here",
                    k.name()
                );
            }
        }
        ks
    }

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 20_001) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    /// One product through `kernel` against f64 sums of the bf16-rounded operands. f32
    /// accumulation of k products errs by at most ~k·2⁻²⁴ of Σ|a·b| (plus the f32 rounding of the
    /// old value of C), so 1e-5 of Σ|a·b| + |c₀| holds for every k here (≤ 300) with room to spare.
    #[allow(clippy::too_many_arguments)]
    fn check(
        kernel: Kernel,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
        accumulate: bool,
        parallel: bool,
    ) {
        let (av, bv) = (data(m * k, 1 + m as u64), data(k * n, 2 + n as u64));
        // Stored transposed when `ta` / `tb`, and read back through transposed views.
        let a = if ta {
            MatRef::new(&av, k, m, m).t()
        } else {
            MatRef::new(&av, m, k, k)
        };
        let b = if tb {
            MatRef::new(&bv, n, k, k).t()
        } else {
            MatRef::new(&bv, k, n, n)
        };
        let ld = n + 3;
        let c0 = data(m * ld, 3);
        let mut c = c0.clone();
        let (pa, pb) = (
            PackedA::with_kernel(a, kernel, parallel),
            PackedB::with_kernel(b, kernel, parallel),
        );
        gemm_ops(
            &mut c,
            ld,
            accumulate,
            &Lhs::Bf16(pa),
            &Rhs::Bf16(pb),
            parallel,
        );
        for i in 0..m {
            for j in 0..n {
                let (mut want, mut scale) = (0f64, 0f64);
                for kk in 0..k {
                    let p = round_bf16(a.at(i, kk)) as f64 * round_bf16(b.at(kk, j)) as f64;
                    want += p;
                    scale += p.abs();
                }
                if accumulate {
                    want += c0[i * ld + j] as f64;
                    scale += (c0[i * ld + j] as f64).abs();
                }
                let got = c[i * ld + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * scale + 1e-30,
                    "{kernel:?} {m}x{k}x{n} ta={ta} tb={tb} acc={accumulate}: c[{i},{j}] = {got}, want {want}"
                );
            }
            // Padding columns of the destination are never written.
            assert_eq!(
                &c[i * ld + n..(i * ld + ld).min(c.len())],
                &c0[i * ld + n..(i * ld + ld).min(c.len())]
            );
        }
    }

    #[test]
    fn bf16_gemm_matches_f64_of_rounded_operands() {
        for kernel in kernels() {
            for &(m, k, n) in &[
                (1, 1, 1),
                (17, 33, 65),
                (8, 2, 48),
                (3, 300, 5),
                (130, 300, 100),
            ] {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    for accumulate in [false, true] {
                        check(kernel, m, k, n, ta, tb, accumulate, m > 100);
                    }
                }
            }
        }
    }

    #[test]
    fn operands_are_rounded_to_bf16() {
        // 1 + 2⁻¹⁰ is not a bf16: it rounds to 1, so 4 of them times 1 gives exactly 4 (f32: 4.0039).
        for kernel in kernels() {
            let a = [1.0 + 2f32.powi(-10); 4];
            let b = [1.0f32; 4];
            let mut c = [0f32];
            let pa = PackedA::with_kernel(MatRef::new(&a, 1, 4, 4), kernel, false);
            let pb = PackedB::with_kernel(MatRef::new(&b, 4, 1, 1), kernel, false);
            gemm_ops(&mut c, 1, false, &Lhs::Bf16(pa), &Rhs::Bf16(pb), false);
            assert_eq!(c[0], 4.0, "{kernel:?}");
        }
    }

    #[test]
    fn precision_parses() {
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!("fp32".parse::<Precision>(), Ok(Precision::Fp32));
        assert!("fp16".parse::<Precision>().unwrap_err().contains("fp16"));
    }
}
