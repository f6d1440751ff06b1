//! f32 matrix products straight into caller-owned buffers through the `gemm` crate: transposed
//! operands are read through their strides (never copied) and results can be accumulated in place.

/// A strided view of a matrix stored in a slice: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// Row-major `[rows, cols]` with row stride `ld` (≥ cols).
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        let m = Self {
            data,
            rows,
            cols,
            rs: ld,
            cs: 1,
        };
        m.check(data.len());
        m
    }

    /// Row-major and dense: `data.len() / cols` rows.
    pub(crate) fn rows_of(data: &'a [f32], cols: usize) -> Self {
        Self::new(data, data.len() / cols.max(1), cols, cols)
    }

    /// The transpose, as a view of the same memory.
    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    pub(crate) fn nrows(&self) -> usize {
        self.rows
    }

    pub(crate) fn ncols(&self) -> usize {
        self.cols
    }

    /// Element `(i, j)`.
    #[inline(always)]
    pub(crate) fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }

    /// Row `i` as a slice when the columns are contiguous (`None` for a transposed view).
    #[inline(always)]
    pub(crate) fn row(&self, i: usize) -> Option<&'a [f32]> {
        (self.cs == 1).then(|| &self.data[i * self.rs..i * self.rs + self.cols])
    }

    /// Column `j` as a slice when the rows are contiguous (a transposed row-major matrix).
    #[inline(always)]
    pub(crate) fn col(&self, j: usize) -> Option<&'a [f32]> {
        self.transposed_source()
            .map(|(data, ls)| &data[j * ls..j * ls + self.rows])
    }

    /// A transposed view of row-major data (`rs == 1`): that data and its row stride (the view's
    /// column stride).
    pub(crate) fn transposed_source(&self) -> Option<(&'a [f32], usize)> {
        (self.rs == 1 && self.cs != 1).then_some((self.data, self.cs))
    }

    /// Rows `r0..r1` (a view).
    pub(crate) fn row_range(self, r0: usize, r1: usize) -> Self {
        assert!(r0 <= r1 && r1 <= self.rows, "MatRef::rows out of range");
        let data = if r0 == r1 {
            &self.data[..0]
        } else {
            &self.data[r0 * self.rs..]
        };
        Self {
            data,
            rows: r1 - r0,
            ..self
        }
    }

    fn check(&self, len: usize) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < len, "MatRef out of bounds");
        }
    }
}

/// Multiply-adds below which a product runs on one thread (the `gemm` crate's own default
/// threshold for its rayon split).
const PAR_MIN_MACS: usize = 48 * 48 * 256;

/// `dst = a · b` (or `dst += a · b` when `accumulate`), `dst` row-major `[a.rows, b.cols]` with row
/// stride `ld`. `parallel`: split a large product over the [`crate::par`] pool, by columns (each task
/// reads all of `a`, its share of `b`: decode rows against a weight) or by rows when `a` is the
/// taller; pass `false` from code that already runs inside a parallel loop. Each part runs the
/// `gemm` crate single-threaded: its own rayon split woke parked threads per product (70–330 µs
/// here) and competed for the cores with this crate's spinning pool. Every element is summed in the
/// same order however the product is split, so the bits do not depend on the thread count.
pub(crate) fn gemm_into(
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    a: MatRef,
    b: MatRef,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm_into: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    MatRef::new(dst, m, n, ld).check(dst.len());
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| dst[i * ld..i * ld + n].fill(0.0));
        }
        return;
    }
    a.check(a.data.len());
    b.check(b.data.len());
    let threads = if parallel && m * n * k >= PAR_MIN_MACS {
        crate::par::threads()
    } else {
        1
    };
    let by_columns = n >= m;
    // Part boundaries: columns in whole 16-lane vectors, rows anywhere.
    let len = if by_columns { n } else { m };
    let step = if by_columns {
        len.div_ceil(threads).next_multiple_of(16)
    } else {
        len.div_ceil(threads)
    };
    let out = crate::par::Disjoint::new(dst);
    let part = |p: usize| {
        let (s, e) = (p * step, ((p + 1) * step).min(len));
        let ((r0, r1), (c0, c1)) = if by_columns {
            ((0, m), (s, e))
        } else {
            ((s, e), (0, n))
        };
        // SAFETY: the bounds of dst, a and b were checked above for these strides and sizes, and
        // rows r0..r1 × columns c0..c1 lie inside them; each part writes only its own block of dst.
        unsafe {
            gemm::gemm(
                r1 - r0,
                c1 - c0,
                k,
                out.at(r0 * ld + c0),
                1,
                ld as isize,
                accumulate,
                a.data.as_ptr().add(r0 * a.rs),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr().add(c0 * b.cs),
                b.cs as isize,
                b.rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    crate::par::for_each(len.div_ceil(step), part);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Split over the pool (by columns when `b` is the wider, else by rows), a product has the
    /// bits of the single-threaded one, through transposed views and accumulation too.
    #[test]
    fn split_products_equal_the_single_threaded_ones() {
        assert!(
            crate::par::threads() >= 2,
            "this test compares one thread with two: run it on 2+ cores"
        );
        // (m, k, n): decode rows against a weight (column split), a tall product (row split), one
        // below the split threshold, and widths that are no multiple of 16.
        for (m, k, n) in [(32, 256, 688), (300, 256, 40), (8, 16, 16), (50, 130, 333)] {
            let (a, b) = (data(m * k, 1), data(n * k, 2));
            let a_views = [MatRef::new(&a, m, k, k), MatRef::new(&a, k, m, m).t()];
            for (av, bt) in a_views.into_iter().zip([false, true]) {
                let bv = if bt {
                    MatRef::new(&b, n, k, k).t()
                } else {
                    MatRef::new(&b, k, n, n)
                };
                for accumulate in [false, true] {
                    let ld = n + 3;
                    let mut one = data(m * ld, 3);
                    let mut two = one.clone();
                    crate::par::serially(|| gemm_into(&mut one, ld, accumulate, av, bv, true));
                    gemm_into(&mut two, ld, accumulate, av, bv, true);
                    assert!(
                        one.iter()
                            .zip(&two)
                            .all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{m} x {k} x {n} (b transposed: {bt}, accumulate: {accumulate})"
                    );
                }
            }
        }
    }
}
