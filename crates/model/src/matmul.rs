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
        (self.rs == 1 && self.cs != 1).then(|| &self.data[j * self.cs..j * self.cs + self.rows])
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

/// `dst = a · b` (or `dst += a · b` when `accumulate`), `dst` row-major `[a.rows, b.cols]` with row
/// stride `ld`. `parallel` lets gemm use the rayon pool (it still stays on one thread for small
/// products); pass `false` from code that already runs inside a parallel loop.
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
    let threads = if parallel { crate::par::threads() } else { 1 };
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the bounds of dst, a and b were checked above for exactly these strides and sizes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}
