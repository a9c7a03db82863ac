//! The Gram engine of the multi-task gradient methods: two passes over a (T, P) float32
//! matrix of task gradients, each at the memory-traffic floor (the data is read once).
//!
//! Nearly every multi-task gradient method (PCGrad, MGDA, CAGrad, GradVac, IMTL-G,
//! Nash-MTL, Aligned-MTL) ends with `d = sum_k w_k g_k`, where the weights `w` depend only on
//! the T x T Gram matrix `G = g g^T` (and on small state). So the P-sized work is:
//!
//! 1. [`gram`]: one fused, parallel pass computes all `T(T+1)/2` dot products. Within a
//!    block of at most 1024 columns the products are summed in 32 float32 lanes (a lane
//!    sums at most 32 products), the lanes are folded by a tree, and the block sum is
//!    added to a float64 accumulator. Each parallel work item (a run of 16K-column chunks
//!    fixed by P alone) keeps its own float64 partials, summed in item order at the end, so
//!    the result is bit-for-bit independent of the thread count.
//! 2. [`combine_into`]: one parallel pass writes `out[p] = sum_k w_k g_k[p]` (float64
//!    accumulation per element, one rounding to float32).
//!
//! The T x T algebra between them belongs to each method (`crate::pcgrad` here, the rest in
//! Python's `mtbert.aggregation`).
//!
//! On x86_64 the kernels are explicit SIMD: AVX2+FMA when the CPU has them (checked at run
//! time), else SSE2, which every x86_64 CPU has; so the binary runs on any x86_64 machine.
//! Other CPUs run portable code with the same block and lane structure.

use rayon::prelude::*;
use std::fmt;

/// Columns per chunk, the unit of parallel work: T x 16K float32 (192 KiB for T = 3).
const CHUNK: usize = 16 * 1024;
/// At most this many Gram work items (each a run of chunks with its own partial sums).
const MAX_ITEMS: usize = 256;
/// float32 lanes of a block dot product (4 AVX registers, 8 SSE registers).
const LANES: usize = 32;
/// Columns per block of the portable combine: its float64 accumulator (2 KiB) stays in L1.
const COMBINE_BLOCK: usize = 256;
/// The most tasks the engine and its users accept. The T x T algebra of the methods costs
/// O(T^3) (PCGrad: 0.15-0.25 s at T = 512, one thread, measured on a shared, loaded 2-core
/// machine); beyond that the callers' numbers, not the data, would decide how long a call
/// runs, so larger T is refused with [`GradError::TooManyTasks`].
pub const MAX_TASKS: usize = 512;

/// Everything that can go wrong in the engine and its users; the binding turns each into a `ValueError`.
#[derive(Clone, Debug, PartialEq)]
pub enum GradError {
    NoTasks,
    /// More than [`MAX_TASKS`] tasks.
    TooManyTasks(usize),
    /// `grads.len()` is not a multiple of the task count.
    BadLength {
        len: usize,
        tasks: usize,
    },
    NonFinite {
        task: usize,
        index: usize,
        value: f32,
    },
    OutLength {
        expected: usize,
        got: usize,
    },
    OrderShape {
        expected: usize,
        got: usize,
    },
    OrderEntry {
        row: usize,
        col: usize,
        value: i64,
        tasks: usize,
    },
    /// Row `row` of the order names task `task` twice (so it is not a permutation).
    OrderRepeat {
        row: usize,
        task: usize,
        tasks: usize,
    },
    BadEps(f64),
    UnknownReduction(String),
    /// `weights` does not hold one value per task.
    WeightsLength {
        expected: usize,
        got: usize,
    },
    NonFiniteWeight {
        task: usize,
        value: f64,
    },
}

impl fmt::Display for GradError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GradError::NoTasks => write!(f, "grads must have at least one task (T >= 1)"),
            GradError::TooManyTasks(tasks) => write!(
                f,
                "grads has {tasks} tasks; at most {MAX_TASKS} are supported (the T x T algebra grows as T^3)"
            ),
            GradError::BadLength { len, tasks } => {
                write!(
                    f,
                    "grads has {len} values, not a multiple of the {tasks} tasks"
                )
            }
            GradError::NonFinite { task, index, value } => write!(
                f,
                "grads contains a non-finite value ({value}) at task {task}, index {index}"
            ),
            GradError::OutLength { expected, got } => {
                write!(f, "out must have shape ({expected},), got {got} values")
            }
            GradError::OrderShape { expected, got } => write!(
                f,
                "order must have shape ({expected}, {expected}) ({} values), got {got} values",
                expected * expected
            ),
            GradError::OrderEntry {
                row,
                col,
                value,
                tasks,
            } => write!(
                f,
                "order[{row}, {col}] = {value} is not a task index in [0, {tasks})"
            ),
            GradError::OrderRepeat { row, task, tasks } => write!(
                f,
                "order row {row} is not a permutation of 0..{tasks}: task {task} appears more than once"
            ),
            GradError::BadEps(eps) => write!(f, "eps must be finite and >= 0, got {eps}"),
            GradError::UnknownReduction(name) => {
                write!(
                    f,
                    "unknown reduction {name:?}: expected \"mean\" or \"sum\""
                )
            }
            GradError::WeightsLength { expected, got } => {
                write!(f, "weights must have shape ({expected},), got {got} values")
            }
            GradError::NonFiniteWeight { task, value } => {
                write!(f, "weights[{task}] = {value} is not finite")
            }
        }
    }
}

impl std::error::Error for GradError {}

// ---------------------------------------------------------------------------------------
// Pass 1: the Gram matrix
// ---------------------------------------------------------------------------------------

/// Index of the pair (i, j), i <= j, in the packed upper triangle.
#[inline(always)]
fn pair_index(i: usize, j: usize, tasks: usize) -> usize {
    i * tasks - i * (i + 1) / 2 + j
}

/// float32 dot product of two short slices (a block: at most 1024 values), summed in 32
/// float32 lanes (so a lane sums at most 32 products) and folded by a tree. Portable code:
/// the fallback on CPUs other than x86_64.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn block_dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let mut ac = a.chunks_exact(LANES);
    let mut bc = b.chunks_exact(LANES);
    for (x, y) in (&mut ac).zip(&mut bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ac.remainder().iter().zip(bc.remainder()).enumerate() {
        acc[l] += x * y;
    }
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0]
}

/// `acc[i] = sum_k weights[k] * rows[k][i]` in float64, rounded once to float32.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn combine_block_portable(rows: &[&[f32]], weights: &[f64], out: &mut [f32]) {
    let mut acc = [0.0f64; COMBINE_BLOCK];
    for (base, dst) in (0..)
        .step_by(COMBINE_BLOCK)
        .zip(out.chunks_mut(COMBINE_BLOCK))
    {
        let acc = &mut acc[..dst.len()];
        acc.fill(0.0);
        for (row, &w) in rows.iter().zip(weights) {
            for (a, &x) in acc.iter_mut().zip(&row[base..base + dst.len()]) {
                *a += w * x as f64;
            }
        }
        for (d, &a) in dst.iter_mut().zip(acc.iter()) {
            *d = a as f32;
        }
    }
}

/// Explicit SIMD kernels: AVX2+FMA when the CPU has them (checked at run time), else SSE2
/// (part of every x86_64 CPU). Same block and lane structure as the portable code.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    pub fn has_avx2_fma() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// 4 x 8 float32 lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA (see [`has_avx2_fma`]). Reads `a[..n]` and
    /// `b[..n]` only, `n = min(a.len(), b.len())`, so any two slices are in bounds.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (l, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(pa.add(i + 8 * l));
                let y = _mm256_loadu_ps(pb.add(i + 8 * l));
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            let x = _mm256_loadu_ps(pa.add(i));
            let y = _mm256_loadu_ps(pb.add(i));
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        let mut total = _mm_cvtss_f32(s);
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }

    /// 8 x 4 float32 lanes.
    ///
    /// # Safety
    /// The CPU must support SSE2 (every x86_64 CPU does). Reads `a[..n]` and `b[..n]`
    /// only, `n = min(a.len(), b.len())`, so any two slices are in bounds.
    #[target_feature(enable = "sse2")]
    pub unsafe fn block_dot_sse2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm_setzero_ps(); 8];
        let mut i = 0;
        while i + 32 <= n {
            for (l, acc) in acc.iter_mut().enumerate() {
                let x = _mm_loadu_ps(pa.add(i + 4 * l));
                let y = _mm_loadu_ps(pb.add(i + 4 * l));
                *acc = _mm_add_ps(*acc, _mm_mul_ps(x, y));
            }
            i += 32;
        }
        while i + 4 <= n {
            let x = _mm_loadu_ps(pa.add(i));
            let y = _mm_loadu_ps(pb.add(i));
            acc[0] = _mm_add_ps(acc[0], _mm_mul_ps(x, y));
            i += 4;
        }
        let s0 = _mm_add_ps(_mm_add_ps(acc[0], acc[1]), _mm_add_ps(acc[2], acc[3]));
        let s1 = _mm_add_ps(_mm_add_ps(acc[4], acc[5]), _mm_add_ps(acc[6], acc[7]));
        let s = _mm_add_ps(s0, s1);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        let mut total = _mm_cvtss_f32(s);
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }

    /// One column in float64 (the tails of the vector loops).
    ///
    /// # Safety
    /// `i < rows[k].len()` for every `k` (unchecked reads).
    #[inline(always)]
    unsafe fn combine_column(rows: &[&[f32]], weights: &[f64], i: usize) -> f32 {
        let mut a = 0.0f64;
        for (row, &w) in rows.iter().zip(weights) {
            a += w * *row.get_unchecked(i) as f64;
        }
        a as f32
    }

    /// `out[i] = sum_k weights[k] * rows[k][i]`: 8 columns at a time, float64 accumulation
    /// (two 4-lane registers), one rounding to float32.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and every `rows[k]` must hold at least
    /// `out.len()` values (`Kernels::combine` asserts it): rows are read unchecked.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn combine_avx2(rows: &[&[f32]], weights: &[f64], out: &mut [f32]) {
        let n = out.len();
        let po = out.as_mut_ptr();
        let mut i = 0;
        while i + 8 <= n {
            let mut lo = _mm256_setzero_pd();
            let mut hi = _mm256_setzero_pd();
            for (row, &w) in rows.iter().zip(weights) {
                let x = _mm256_loadu_ps(row.as_ptr().add(i));
                let w = _mm256_set1_pd(w);
                lo = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm256_castps256_ps128(x)), lo);
                hi = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)), hi);
            }
            let r = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
            _mm256_storeu_ps(po.add(i), r);
            i += 8;
        }
        while i < n {
            *po.add(i) = combine_column(rows, weights, i);
            i += 1;
        }
    }

    /// SSE2: 4 columns at a time, float64 accumulation.
    ///
    /// # Safety
    /// The CPU must support SSE2, and every `rows[k]` must hold at least `out.len()`
    /// values (`Kernels::combine` asserts it): rows are read unchecked.
    #[target_feature(enable = "sse2")]
    pub unsafe fn combine_sse2(rows: &[&[f32]], weights: &[f64], out: &mut [f32]) {
        let n = out.len();
        let po = out.as_mut_ptr();
        let mut i = 0;
        while i + 4 <= n {
            let mut lo = _mm_setzero_pd();
            let mut hi = _mm_setzero_pd();
            for (row, &w) in rows.iter().zip(weights) {
                let x = _mm_loadu_ps(row.as_ptr().add(i));
                let w = _mm_set1_pd(w);
                lo = _mm_add_pd(lo, _mm_mul_pd(w, _mm_cvtps_pd(x)));
                hi = _mm_add_pd(hi, _mm_mul_pd(w, _mm_cvtps_pd(_mm_movehl_ps(x, x))));
            }
            let r = _mm_movelh_ps(_mm_cvtpd_ps(lo), _mm_cvtpd_ps(hi));
            _mm_storeu_ps(po.add(i), r);
            i += 4;
        }
        while i < n {
            *po.add(i) = combine_column(rows, weights, i);
            i += 1;
        }
    }
}

/// Which kernels this CPU runs; decided once per call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernels {
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Sse2,
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    Portable,
}

impl Kernels {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if simd::has_avx2_fma() {
                Kernels::Avx2Fma
            } else {
                Kernels::Sse2
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Kernels::Portable
        }
    }

    #[inline]
    fn block_dot(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            // SAFETY: `detect` saw AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2Fma => unsafe { simd::block_dot_avx2(a, b) },
            // SAFETY: every x86_64 CPU has SSE2.
            #[cfg(target_arch = "x86_64")]
            Kernels::Sse2 => unsafe { simd::block_dot_sse2(a, b) },
            Kernels::Portable => block_dot_portable(a, b),
        }
    }

    fn combine(self, rows: &[&[f32]], weights: &[f64], out: &mut [f32]) {
        assert!(rows.iter().all(|r| r.len() >= out.len()) && weights.len() == rows.len());
        match self {
            // SAFETY: as in `block_dot`; the kernels read `rows[k][..out.len()]` only
            // (checked just above) and write `out[..out.len()]`.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2Fma => unsafe { simd::combine_avx2(rows, weights, out) },
            #[cfg(target_arch = "x86_64")]
            Kernels::Sse2 => unsafe { simd::combine_sse2(rows, weights, out) },
            Kernels::Portable => combine_block_portable(rows, weights, out),
        }
    }

    /// Every kernel this CPU can run (for tests).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut all = vec![Kernels::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            all.push(Kernels::Sse2);
            if simd::has_avx2_fma() {
                all.push(Kernels::Avx2Fma);
            }
        }
        all
    }
}

/// Adds the packed Gram of columns `[start, end)` to `partial` (length T(T+1)/2).
fn gram_chunk(
    kernels: Kernels,
    grads: &[f32],
    tasks: usize,
    p: usize,
    start: usize,
    end: usize,
    partial: &mut [f64],
) {
    // Keep the T rows of one block in L1 (about 16 KiB) while all pairs read them.
    let block = ((4096 / tasks) / LANES * LANES).clamp(LANES, 1024);
    let mut b0 = start;
    while b0 < end {
        let b1 = (b0 + block).min(end);
        for i in 0..tasks {
            let ri = &grads[i * p + b0..i * p + b1];
            for j in i..tasks {
                let rj = &grads[j * p + b0..j * p + b1];
                partial[pair_index(i, j, tasks)] += kernels.block_dot(ri, rj) as f64;
            }
        }
        b0 = b1;
    }
}

/// The task count is supported: `1 <= tasks <= MAX_TASKS`.
pub fn check_tasks(tasks: usize) -> Result<(), GradError> {
    match tasks {
        0 => Err(GradError::NoTasks),
        t if t > MAX_TASKS => Err(GradError::TooManyTasks(t)),
        _ => Ok(()),
    }
}

/// The columns P of the (T, P) row-major `grads`, once T is supported and divides the length.
pub(crate) fn rows_of(grads: &[f32], tasks: usize) -> Result<usize, GradError> {
    check_tasks(tasks)?;
    if !grads.len().is_multiple_of(tasks) {
        return Err(GradError::BadLength {
            len: grads.len(),
            tasks,
        });
    }
    Ok(grads.len() / tasks)
}

/// The first non-finite value, scanning task by task.
fn find_non_finite(grads: &[f32], p: usize) -> Option<GradError> {
    grads
        .iter()
        .position(|v| !v.is_finite())
        .map(|n| GradError::NonFinite {
            task: n / p.max(1),
            index: n % p.max(1),
            value: grads[n],
        })
}

/// Exact-range fallback: products in float64, used only when float32 products overflow.
fn gram_f64(grads: &[f32], tasks: usize, p: usize) -> Vec<f64> {
    let mut gram = vec![0.0f64; tasks * tasks];
    for i in 0..tasks {
        for j in i..tasks {
            let ri = &grads[i * p..(i + 1) * p];
            let rj = &grads[j * p..(j + 1) * p];
            let s: f64 = ri.iter().zip(rj).map(|(&x, &y)| x as f64 * y as f64).sum();
            gram[i * tasks + j] = s;
            gram[j * tasks + i] = s;
        }
    }
    gram
}

/// Row-major (T, T) Gram matrix `G[i,j] = g_i · g_j` of the (T, P) row-major `grads`, in
/// float64. One pass over the data, parallel over column chunks with `threads` workers
/// (0: the default count); `1 <= T <= MAX_TASKS`. NaN or inf in `grads` is an error: it
/// shows up as a non-finite Gram entry, and only then is the data scanned to report where it is.
pub fn gram(grads: &[f32], tasks: usize, threads: usize) -> Result<Vec<f64>, GradError> {
    let p = rows_of(grads, tasks)?;
    let pairs = tasks * (tasks + 1) / 2;
    // Work items of whole chunks, at most MAX_ITEMS of them (so the partials stay small
    // for large T); the split depends on P only, never on the thread count.
    let chunks = p.div_ceil(CHUNK);
    let item = chunks.div_ceil(MAX_ITEMS).max(1) * CHUNK; // columns per work item
    let items = p.div_ceil(item);
    let mut partials = vec![0.0f64; items * pairs];
    let kernels = Kernels::detect();
    if items > 0 {
        crate::pool::pool(threads).install(|| {
            partials
                .par_chunks_mut(pairs)
                .enumerate()
                .for_each(|(n, partial)| {
                    let end = ((n + 1) * item).min(p);
                    let mut start = n * item;
                    while start < end {
                        let stop = (start + CHUNK).min(end);
                        gram_chunk(kernels, grads, tasks, p, start, stop, partial);
                        start = stop;
                    }
                });
        });
    }
    // Sum the items in order: the result does not depend on the scheduling.
    let mut packed = vec![0.0f64; pairs];
    for partial in partials.chunks_exact(pairs) {
        for (acc, v) in packed.iter_mut().zip(partial) {
            *acc += v;
        }
    }
    let mut gram = vec![0.0f64; tasks * tasks];
    for i in 0..tasks {
        for j in i..tasks {
            let v = packed[pair_index(i, j, tasks)];
            gram[i * tasks + j] = v;
            gram[j * tasks + i] = v;
        }
    }
    if gram.iter().all(|v| v.is_finite()) {
        return Ok(gram);
    }
    if let Some(err) = find_non_finite(grads, p) {
        return Err(err);
    }
    // Finite input whose float32 products overflow (|g| > ~1e19): redo it in float64.
    Ok(gram_f64(grads, tasks, p))
}

/// Row-major (T, T) cosine similarities from a Gram matrix; 0 where a gradient is zero.
pub fn cosine(gram: &[f64], tasks: usize) -> Vec<f64> {
    let norms: Vec<f64> = (0..tasks)
        .map(|i| gram[i * tasks + i].max(0.0).sqrt())
        .collect();
    let mut cos = vec![0.0f64; tasks * tasks];
    for i in 0..tasks {
        for j in 0..tasks {
            let d = norms[i] * norms[j];
            if d > 0.0 {
                cos[i * tasks + j] = (gram[i * tasks + j] / d).clamp(-1.0, 1.0);
            }
        }
    }
    cos
}

// ---------------------------------------------------------------------------------------
// Pass 2: the combination
// ---------------------------------------------------------------------------------------

/// `out[p] = sum_k weights[k] * grads[k, p]` for the (T, P) row-major `grads`: one parallel
/// pass over the data (float64 accumulation per element, one rounding to float32), with
/// `threads` workers (0: the default count). `weights` holds T finite values,
/// `1 <= T <= MAX_TASKS`.
pub fn combine_into(
    grads: &[f32],
    tasks: usize,
    weights: &[f64],
    out: &mut [f32],
    threads: usize,
) -> Result<(), GradError> {
    let p = rows_of(grads, tasks)?;
    if out.len() != p {
        return Err(GradError::OutLength {
            expected: p,
            got: out.len(),
        });
    }
    if weights.len() != tasks {
        return Err(GradError::WeightsLength {
            expected: tasks,
            got: weights.len(),
        });
    }
    if let Some(task) = weights.iter().position(|w| !w.is_finite()) {
        return Err(GradError::NonFiniteWeight {
            task,
            value: weights[task],
        });
    }
    let kernels = Kernels::detect();
    crate::pool::pool(threads).install(|| {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, dst)| {
            let start = c * CHUNK;
            let rows: Vec<&[f32]> = (0..tasks)
                .map(|k| &grads[k * p + start..k * p + start + dst.len()])
                .collect();
            kernels.combine(&rows, weights, dst);
        });
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pcgrad::SplitMix64;

    /// Deterministic pseudo-random values in [-1, 1), plus `shift`.
    fn random_grads(tasks: usize, p: usize, seed: u64, shift: f32) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..tasks * p)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + shift)
            .collect()
    }

    #[test]
    fn gram_matches_f64_and_is_thread_independent() {
        let (tasks, p) = (5, 3 * CHUNK + 123);
        let grads = random_grads(tasks, p, 23, 0.1);
        let exact = gram_f64(&grads, tasks, p);
        let one = gram(&grads, tasks, 1).unwrap();
        let two = gram(&grads, tasks, 2).unwrap();
        assert_eq!(one, two);
        for (a, b) in one.iter().zip(&exact) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
        for kernels in Kernels::available() {
            let mut partial = vec![0.0; tasks * (tasks + 1) / 2];
            gram_chunk(kernels, &grads, tasks, p, 0, p, &mut partial);
            for i in 0..tasks {
                for j in i..tasks {
                    let (a, b) = (partial[pair_index(i, j, tasks)], exact[i * tasks + j]);
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{kernels:?}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_kernel_combines_alike() {
        let (tasks, p) = (3, 1000 + 7);
        let grads = random_grads(tasks, p, 37, 0.0);
        let rows: Vec<&[f32]> = grads.chunks_exact(p).collect();
        let weights = [0.25, -1.5, 3.0];
        let want: Vec<f64> = (0..p)
            .map(|k| (0..tasks).map(|t| weights[t] * rows[t][k] as f64).sum())
            .collect();
        for kernels in Kernels::available() {
            let mut out = vec![0.0f32; p];
            kernels.combine(&rows, &weights, &mut out);
            // An unaligned start.
            let mut shifted = vec![0.0f32; p];
            let short: Vec<&[f32]> = rows.iter().map(|r| &r[1..]).collect();
            kernels.combine(&short, &weights, &mut shifted[1..]);
            for (a, b) in shifted[1..].iter().zip(&want[1..]) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-7 * b.abs().max(1e-3),
                    "{kernels:?}"
                );
            }
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-7 * b.abs().max(1e-3),
                    "{kernels:?}"
                );
            }
            // Short, odd lengths hit the scalar tails.
            for n in [0, 1, 3, 9, 17] {
                let short: Vec<&[f32]> = rows.iter().map(|r| &r[..n]).collect();
                let mut out = vec![0.0f32; n];
                kernels.combine(&short, &weights, &mut out);
                for (a, b) in out.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-7 * b.abs().max(1e-3),
                        "{kernels:?}"
                    );
                }
                let d = kernels.block_dot(&rows[0][..n], &rows[1][..n]) as f64;
                let e: f64 = (0..n).map(|k| rows[0][k] as f64 * rows[1][k] as f64).sum();
                assert!((d - e).abs() <= 1e-6, "{kernels:?}");
            }
        }
    }

    #[test]
    fn combine_matches_f64_for_any_weights() {
        for tasks in [1usize, 2, 3, 8, 16] {
            for p in [0usize, 1, 31, CHUNK + 5, 3 * CHUNK + 123] {
                let grads = random_grads(tasks, p, 41 + tasks as u64 + p as u64, 0.0);
                let weights: Vec<f64> = (0..tasks).map(|k| 0.3 - 0.7 * k as f64).collect();
                let mut out = vec![f32::NAN; p];
                combine_into(&grads, tasks, &weights, &mut out, 2).unwrap();
                for c in 0..p {
                    let want: f64 = (0..tasks)
                        .map(|k| weights[k] * grads[k * p + c] as f64)
                        .sum();
                    // One rounding to float32 from the float64 sum (FMA may move the float64
                    // sum by an ulp, so the float32 result by at most one ulp).
                    let err = (out[c] as f64 - want).abs();
                    assert!(
                        err <= 1.2e-7 * want.abs() + 1e-30,
                        "tasks {tasks}, p {p}, column {c}: {} vs {want}",
                        out[c]
                    );
                }
                let mut again = vec![0.0f32; p];
                combine_into(&grads, tasks, &weights, &mut again, 1).unwrap();
                assert_eq!(out, again, "thread count changed the result");
            }
        }
    }

    #[test]
    fn gram_is_symmetric_and_matches_f64_for_many_tasks() {
        for tasks in [1usize, 2, 7, 16] {
            let p = 2 * CHUNK + 77;
            let grads = random_grads(tasks, p, 5 + tasks as u64, 0.0);
            let g = gram(&grads, tasks, 2).unwrap();
            let exact = gram_f64(&grads, tasks, p);
            for i in 0..tasks {
                for j in 0..tasks {
                    assert_eq!(g[i * tasks + j], g[j * tasks + i]);
                    let (a, b) = (g[i * tasks + j], exact[i * tasks + j]);
                    // Off-diagonal sums of random signs are ~sqrt(P): compare to the norms.
                    let scale = (exact[i * tasks + i] * exact[j * tasks + j]).sqrt();
                    assert!(
                        (a - b).abs() <= 1e-6 * scale,
                        "{tasks}: ({i}, {j}) {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn engine_argument_errors() {
        let grads = [1.0f32; 6];
        let mut out = [0.0f32; 3];
        assert_eq!(
            combine_into(&grads, 2, &[1.0], &mut out, 1).unwrap_err(),
            GradError::WeightsLength {
                expected: 2,
                got: 1
            }
        );
        let err = combine_into(&grads, 2, &[1.0, f64::NAN], &mut out, 1).unwrap_err();
        assert!(matches!(err, GradError::NonFiniteWeight { task: 1, .. }));
        assert!(err.to_string().contains("weights[1]"));
        assert!(matches!(
            combine_into(&grads, 2, &[1.0, 1.0], &mut [0.0; 2], 1),
            Err(GradError::OutLength { .. })
        ));
        assert_eq!(
            combine_into(&grads, 0, &[], &mut out, 1).unwrap_err(),
            GradError::NoTasks
        );
        assert!(matches!(
            combine_into(&grads, 4, &[0.0; 4], &mut out, 1),
            Err(GradError::BadLength { .. })
        ));
        // The task bound holds for the engine too, before anything is allocated or read.
        let too_many = MAX_TASKS + 1;
        assert_eq!(
            combine_into(&[], too_many, &vec![1.0; too_many], &mut [], 1).unwrap_err(),
            GradError::TooManyTasks(too_many)
        );
        assert_eq!(
            combine_into(&[], usize::MAX, &[], &mut [], 1).unwrap_err(),
            GradError::TooManyTasks(usize::MAX)
        );
        assert_eq!(
            gram(&[], too_many, 1).unwrap_err(),
            GradError::TooManyTasks(too_many)
        );
        assert_eq!(
            gram(&[], MAX_TASKS, 1).unwrap(),
            vec![0.0; MAX_TASKS * MAX_TASKS]
        );
    }
}
