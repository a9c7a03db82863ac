//! Batched PCGrad gradient surgery (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning").
//!
//! For each task `i`, for each task `j` in `order[i]`: if `g_i · g_j < 0` then
//! `g_i <- g_i - (g_i · g_j / (||g_j||^2 + eps)) g_j`, where `g_i` is the running projected
//! gradient and `g_j` is always the *original* gradient of task `j` (as the reference
//! implementations do). The projected gradients are then combined by mean or sum.
//!
//! Every projected gradient is a linear combination of the originals,
//! `p_i = sum_k C[i,k] g_k`, and `p_i · g_j = sum_k C[i,k] G[k,j]` with the Gram matrix
//! `G = g g^T`. So the P-sized data is touched exactly twice:
//!
//! 1. [`gram`]: one fused, parallel pass computes all `T(T+1)/2` dot products. Within a
//!    block of at most 1024 columns the products are summed in 32 float32 lanes (a lane
//!    sums at most 32 products), the lanes are folded by a tree, and the block sum is
//!    added to a float64 accumulator. Each parallel work item (a run of 16K-column chunks
//!    fixed by P alone) keeps its own float64 partials, summed in item order at the end, so
//!    the result is bit-for-bit independent of the thread count.
//! 2. [`coefficients`]: the T x T algebra in float64 (no P-sized work).
//! 3. [`combine_into`]: one parallel pass writes `out[p] = sum_k w_k g_k[p]` (float64
//!    accumulation per element, one rounding to float32), `w` = column sums of `C`
//!    (divided by T for the mean).
//!
//! On x86_64 the kernels are explicit SIMD: AVX2+FMA when the CPU has them (checked at run
//! time), else SSE2, which every x86_64 CPU has; so the binary runs on any x86_64 machine.
//! Other CPUs run portable code with the same block and lane structure.
//!
//! Random orders: [`random_orders`] draws row `i` (a permutation of all T tasks, `i`
//! included) with a Fisher-Yates shuffle from one splitmix64 stream seeded with `seed`,
//! rows in order 0..T; `mtbert.pcgrad.random_orders` in Python repeats the same steps, so
//! the native and the PyTorch paths use identical orders for the same seed.

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
/// The most tasks a surgery accepts. The T x T algebra costs O(T^3) (0.15-0.25 s at
/// T = 512, one thread, measured on a shared, loaded 2-core machine); beyond that the callers' numbers, not the data, would
/// decide how long a call runs, so larger T is refused with [`PcgradError::TooManyTasks`].
pub const MAX_TASKS: usize = 512;

/// How the projected task gradients are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    Mean,
    Sum,
}

impl Reduction {
    pub fn parse(name: &str) -> Result<Self, PcgradError> {
        match name {
            "mean" => Ok(Reduction::Mean),
            "sum" => Ok(Reduction::Sum),
            other => Err(PcgradError::UnknownReduction(other.to_string())),
        }
    }
}

/// Everything that can go wrong; the binding turns each into a `ValueError`.
#[derive(Clone, Debug, PartialEq)]
pub enum PcgradError {
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
}

impl fmt::Display for PcgradError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PcgradError::NoTasks => write!(f, "grads must have at least one task (T >= 1)"),
            PcgradError::TooManyTasks(tasks) => write!(
                f,
                "grads has {tasks} tasks; at most {MAX_TASKS} are supported (the T x T algebra grows as T^3)"
            ),
            PcgradError::BadLength { len, tasks } => {
                write!(
                    f,
                    "grads has {len} values, not a multiple of the {tasks} tasks"
                )
            }
            PcgradError::NonFinite { task, index, value } => write!(
                f,
                "grads contains a non-finite value ({value}) at task {task}, index {index}"
            ),
            PcgradError::OutLength { expected, got } => {
                write!(f, "out must have shape ({expected},), got {got} values")
            }
            PcgradError::OrderShape { expected, got } => write!(
                f,
                "order must have shape ({expected}, {expected}) ({} values), got {got} values",
                expected * expected
            ),
            PcgradError::OrderEntry {
                row,
                col,
                value,
                tasks,
            } => write!(
                f,
                "order[{row}, {col}] = {value} is not a task index in [0, {tasks})"
            ),
            PcgradError::OrderRepeat { row, task, tasks } => write!(
                f,
                "order row {row} is not a permutation of 0..{tasks}: task {task} appears more than once"
            ),
            PcgradError::BadEps(eps) => write!(f, "eps must be finite and >= 0, got {eps}"),
            PcgradError::UnknownReduction(name) => {
                write!(
                    f,
                    "unknown reduction {name:?}: expected \"mean\" or \"sum\""
                )
            }
        }
    }
}

impl std::error::Error for PcgradError {}

// ---------------------------------------------------------------------------------------
// Random orders
// ---------------------------------------------------------------------------------------

/// splitmix64 (Steele, Lea and Flood 2014): tiny, and easy to repeat exactly in Python.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `[0, n)` by the multiply-high method: `(x * n) >> 64`.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// Row-major (T, T) orders: row `i` is a Fisher-Yates shuffle of `0..T` (for `k` from
/// `T-1` down to 1, swap `k` with `below(k+1)`), rows drawn in order from one stream.
pub fn random_orders(tasks: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut orders = Vec::with_capacity(tasks * tasks);
    for _ in 0..tasks {
        let start = orders.len();
        orders.extend(0..tasks);
        let row = &mut orders[start..];
        for k in (1..tasks).rev() {
            let j = rng.below(k + 1);
            row.swap(k, j);
        }
    }
    orders
}

/// The task count is supported: `1 <= tasks <= MAX_TASKS`.
pub fn check_tasks(tasks: usize) -> Result<(), PcgradError> {
    match tasks {
        0 => Err(PcgradError::NoTasks),
        t if t > MAX_TASKS => Err(PcgradError::TooManyTasks(t)),
        _ => Ok(()),
    }
}

/// Checks a row-major (T, T) order given as signed integers and converts it.
pub fn checked_orders(order: &[i64], tasks: usize) -> Result<Vec<usize>, PcgradError> {
    check_tasks(tasks)?;
    if order.len() != tasks * tasks {
        return Err(PcgradError::OrderShape {
            expected: tasks,
            got: order.len(),
        });
    }
    let orders = order
        .iter()
        .enumerate()
        .map(|(n, &v)| match usize::try_from(v) {
            Ok(u) if u < tasks => Ok(u),
            _ => Err(PcgradError::OrderEntry {
                row: n / tasks,
                col: n % tasks,
                value: v,
                tasks,
            }),
        })
        .collect::<Result<Vec<usize>, _>>()?;
    check_orders(&orders, tasks)?;
    Ok(orders)
}

/// Checks that the row-major `orders` are (T, T) and that each row is a permutation of
/// `0..T` (a repeated task would project twice onto one gradient and skip another).
pub fn check_orders(orders: &[usize], tasks: usize) -> Result<(), PcgradError> {
    check_tasks(tasks)?;
    if orders.len() != tasks * tasks {
        return Err(PcgradError::OrderShape {
            expected: tasks,
            got: orders.len(),
        });
    }
    let mut seen = vec![false; tasks];
    for (row, entries) in orders.chunks_exact(tasks).enumerate() {
        seen.fill(false);
        for (col, &task) in entries.iter().enumerate() {
            if task >= tasks {
                return Err(PcgradError::OrderEntry {
                    row,
                    col,
                    value: i64::try_from(task).unwrap_or(i64::MAX),
                    tasks,
                });
            }
            if std::mem::replace(&mut seen[task], true) {
                return Err(PcgradError::OrderRepeat { row, task, tasks });
            }
        }
    }
    Ok(())
}

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

fn rows_of(grads: &[f32], tasks: usize) -> Result<usize, PcgradError> {
    check_tasks(tasks)?;
    if !grads.len().is_multiple_of(tasks) {
        return Err(PcgradError::BadLength {
            len: grads.len(),
            tasks,
        });
    }
    Ok(grads.len() / tasks)
}

/// The first non-finite value, scanning task by task.
fn find_non_finite(grads: &[f32], p: usize) -> Option<PcgradError> {
    grads
        .iter()
        .position(|v| !v.is_finite())
        .map(|n| PcgradError::NonFinite {
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
/// (0: the default count). NaN or inf in `grads` is an error: it shows up as a non-finite
/// Gram entry, and only then is the data scanned to report where it is.
pub fn gram(grads: &[f32], tasks: usize, threads: usize) -> Result<Vec<f64>, PcgradError> {
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
// The T x T algebra
// ---------------------------------------------------------------------------------------

/// Row-major (T, T) coefficients `C`: projected `p_i = sum_k C[i,k] g_k`.
///
/// Starting from `p_i = g_i`, for each `j` in `orders[i]`: `d = p_i · g_j = C[i,:] · G[:,j]`;
/// if `d < 0`, `C[i,j] -= d / (G[j,j] + eps)`. A zero `g_j` gives `d = 0`: no projection,
/// so no division by zero whatever `eps` is (and a zero denominator is skipped).
/// `gram` must be symmetric (as [`gram`] returns it): row `j` is read for column `j`.
pub fn coefficients(gram: &[f64], tasks: usize, orders: &[usize], eps: f64) -> Vec<f64> {
    let mut c = vec![0.0f64; tasks * tasks];
    for i in 0..tasks {
        let row = &mut c[i * tasks..(i + 1) * tasks];
        row[i] = 1.0;
        for &j in &orders[i * tasks..(i + 1) * tasks] {
            // G is symmetric: read row j (contiguous) rather than column j; same values.
            let d: f64 = (0..tasks).map(|k| row[k] * gram[j * tasks + k]).sum();
            let denom = gram[j * tasks + j] + eps;
            if d < 0.0 && denom > 0.0 {
                row[j] -= d / denom;
            }
        }
    }
    c
}

/// Combination weights: the column sums of `C`, divided by T for the mean.
pub fn combination_weights(coeffs: &[f64], tasks: usize, reduction: Reduction) -> Vec<f64> {
    let scale = match reduction {
        Reduction::Mean => 1.0 / tasks as f64,
        Reduction::Sum => 1.0,
    };
    (0..tasks)
        .map(|k| (0..tasks).map(|i| coeffs[i * tasks + k]).sum::<f64>() * scale)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Pass 2: the combination
// ---------------------------------------------------------------------------------------

/// `out[p] = sum_k weights[k] * grads[k, p]`, one parallel pass over the data.
pub fn combine_into(
    grads: &[f32],
    tasks: usize,
    weights: &[f64],
    out: &mut [f32],
    threads: usize,
) -> Result<(), PcgradError> {
    let p = rows_of(grads, tasks)?;
    if out.len() != p {
        return Err(PcgradError::OutLength {
            expected: p,
            got: out.len(),
        });
    }
    assert_eq!(weights.len(), tasks, "one weight per task");
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

// ---------------------------------------------------------------------------------------
// The whole surgery
// ---------------------------------------------------------------------------------------

/// What one surgery computed besides the output (all row-major T x T or T).
#[derive(Clone, Debug)]
pub struct Surgery {
    pub gram: Vec<f64>,
    pub coeffs: Vec<f64>,
    pub weights: Vec<f64>,
}

/// PCGrad of the (T, P) row-major float32 `grads` into `out` (length P).
///
/// `orders` is row-major (T, T), each row a permutation of `0..T` (see [`checked_orders`]
/// and [`random_orders`]); `1 <= T <= MAX_TASKS`. `eps` (finite, >= 0) is added to `||g_j||^2` in each projection.
pub fn pcgrad_into(
    grads: &[f32],
    tasks: usize,
    orders: &[usize],
    reduction: Reduction,
    eps: f64,
    out: &mut [f32],
    threads: usize,
) -> Result<Surgery, PcgradError> {
    let p = rows_of(grads, tasks)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(PcgradError::BadEps(eps));
    }
    check_orders(orders, tasks)?;
    if out.len() != p {
        return Err(PcgradError::OutLength {
            expected: p,
            got: out.len(),
        });
    }
    let gram = gram(grads, tasks, threads)?;
    let coeffs = coefficients(&gram, tasks, orders, eps);
    let weights = combination_weights(&coeffs, tasks, reduction);
    combine_into(grads, tasks, &weights, out, threads)?;
    Ok(Surgery {
        gram,
        coeffs,
        weights,
    })
}

/// [`pcgrad_into`] returning a new vector.
pub fn pcgrad(
    grads: &[f32],
    tasks: usize,
    orders: &[usize],
    reduction: Reduction,
    eps: f64,
    threads: usize,
) -> Result<Vec<f32>, PcgradError> {
    let p = rows_of(grads, tasks)?;
    let mut out = vec![0.0f32; p];
    pcgrad_into(grads, tasks, orders, reduction, eps, &mut out, threads)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-pair loop, in float64: the oracle.
    fn naive(
        grads: &[f32],
        tasks: usize,
        orders: &[usize],
        reduction: Reduction,
        eps: f64,
    ) -> Vec<f64> {
        let p = grads.len() / tasks;
        let g: Vec<Vec<f64>> = (0..tasks)
            .map(|k| {
                grads[k * p..(k + 1) * p]
                    .iter()
                    .map(|&x| x as f64)
                    .collect()
            })
            .collect();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let mut total = vec![0.0f64; p];
        for i in 0..tasks {
            let mut gi = g[i].clone();
            for &j in &orders[i * tasks..(i + 1) * tasks] {
                let d = dot(&gi, &g[j]);
                if d < 0.0 {
                    let s = d / (dot(&g[j], &g[j]) + eps);
                    for (x, y) in gi.iter_mut().zip(&g[j]) {
                        *x -= s * y;
                    }
                }
            }
            for (t, x) in total.iter_mut().zip(&gi) {
                *t += x;
            }
        }
        if reduction == Reduction::Mean {
            for t in &mut total {
                *t /= tasks as f64;
            }
        }
        total
    }

    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(&a, &b)| (a as f64 - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let den: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
        if den == 0.0 {
            num
        } else {
            num / den
        }
    }

    /// Deterministic pseudo-random gradients in [-1, 1), plus `shift` (> 0 avoids conflicts).
    fn random_grads(tasks: usize, p: usize, seed: u64, shift: f32) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..tasks * p)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + shift)
            .collect()
    }

    fn check(grads: &[f32], tasks: usize, orders: &[usize], reduction: Reduction) {
        let got = pcgrad(grads, tasks, orders, reduction, 1e-12, 2).unwrap();
        let want = naive(grads, tasks, orders, reduction, 1e-12);
        let err = rel_err(&got, &want);
        assert!(
            err <= 1e-5,
            "tasks {tasks}, p {}: relative error {err}",
            grads.len() / tasks
        );
    }

    #[test]
    fn matches_naive_loop_random() {
        for tasks in 1..=8 {
            for (n, &p) in [31usize, 1000, 40_000, 70_001].iter().enumerate() {
                let grads = random_grads(tasks, p, 7 * tasks as u64 + n as u64, 0.0);
                let orders = random_orders(tasks, 100 + n as u64);
                check(&grads, tasks, &orders, Reduction::Mean);
                check(&grads, tasks, &orders, Reduction::Sum);
            }
        }
    }

    #[test]
    fn scalar_gradients() {
        // With P = 1 every conflict projects a task to (almost) zero: compare absolutely.
        for tasks in 1..=8 {
            let grads = random_grads(tasks, 1, 31 + tasks as u64, 0.0);
            let orders = random_orders(tasks, 3);
            let got = pcgrad(&grads, tasks, &orders, Reduction::Sum, 1e-12, 1).unwrap();
            let want = naive(&grads, tasks, &orders, Reduction::Sum, 1e-12);
            assert!(
                (got[0] as f64 - want[0]).abs() <= 1e-6,
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn no_conflicts_is_plain_mean() {
        let (tasks, p) = (3, 5000);
        let grads = random_grads(tasks, p, 3, 2.0); // all positive: every dot > 0
        let g = gram(&grads, tasks, 1).unwrap();
        assert!(g.iter().all(|&v| v > 0.0));
        let out = pcgrad(
            &grads,
            tasks,
            &random_orders(tasks, 1),
            Reduction::Mean,
            1e-12,
            2,
        )
        .unwrap();
        for k in 0..p {
            let mean = (grads[k] as f64 + grads[p + k] as f64 + grads[2 * p + k] as f64) / 3.0;
            assert!((out[k] as f64 - mean).abs() <= 1e-6 * mean.abs().max(1.0));
        }
    }

    #[test]
    fn conflicting_pair_is_projected() {
        // g0 = (1, 0), g1 = (-1, 1): g0·g1 = -1.
        let grads = [1.0f32, 0.0, -1.0, 1.0];
        let orders = [0, 1, 1, 0];
        let out = pcgrad(&grads, 2, &orders, Reduction::Sum, 0.0, 1).unwrap();
        // p0 = g0 - (-1/2) g1 = (0.5, 0.5); p1 = g1 - (-1/1) g0 = (0, 1).
        assert_eq!(out, vec![0.5, 1.5]);
        let mean = pcgrad(&grads, 2, &orders, Reduction::Mean, 0.0, 1).unwrap();
        assert_eq!(mean, vec![0.25, 0.75]);
    }

    #[test]
    fn projection_uses_original_gradients() {
        // Task 0 is projected onto g1 and then g2, each time the original vector.
        let grads = [1.0f32, 0.0, -1.0, 1.0, -1.0, -1.0];
        let orders = [1, 2, 0, 0, 1, 2, 0, 1, 2];
        let got = pcgrad(&grads, 3, &orders, Reduction::Sum, 0.0, 1).unwrap();
        let want = naive(&grads, 3, &orders, Reduction::Sum, 0.0);
        assert!(rel_err(&got, &want) <= 1e-7, "{got:?} vs {want:?}");
    }

    #[test]
    fn identical_gradients_are_unchanged() {
        let row = random_grads(1, 10_000, 9, 0.0);
        let grads: Vec<f32> = row.iter().chain(&row).chain(&row).copied().collect();
        let out = pcgrad(&grads, 3, &random_orders(3, 5), Reduction::Mean, 1e-12, 2).unwrap();
        for (a, b) in out.iter().zip(&row) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3));
        }
    }

    #[test]
    fn opposite_gradients_cancel_to_zero() {
        let row = random_grads(1, 10_000, 11, 0.0);
        let grads: Vec<f32> = row.iter().copied().chain(row.iter().map(|x| -x)).collect();
        let out = pcgrad(&grads, 2, &random_orders(2, 5), Reduction::Mean, 1e-12, 2).unwrap();
        // Each projects to zero: p0 = g0 - (-|g|^2/|g|^2)(-g0) = 0.
        let norm: f32 = out.iter().map(|x| x * x).sum::<f32>().sqrt();
        let scale: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(norm <= 1e-6 * scale, "{norm}");
    }

    #[test]
    fn zero_gradients_never_give_nan() {
        let mut grads = random_grads(3, 1000, 13, 0.0);
        grads[1000..2000].fill(0.0);
        for eps in [0.0, 1e-12] {
            let orders = random_orders(3, 2);
            let out = pcgrad(&grads, 3, &orders, Reduction::Mean, eps, 1).unwrap();
            assert!(out.iter().all(|v| v.is_finite()));
            let want = naive(&grads, 3, &orders, Reduction::Mean, eps);
            assert!(rel_err(&out, &want) <= 1e-6);
        }
        let zeros = vec![0.0f32; 4 * 100];
        let out = pcgrad(&zeros, 4, &random_orders(4, 1), Reduction::Sum, 0.0, 1).unwrap();
        assert!(out.iter().all(|&v| v == 0.0));
        assert!(cosine(&gram(&zeros, 4, 1).unwrap(), 4)
            .iter()
            .all(|&v| v == 0.0));
    }

    #[test]
    fn explicit_orders_and_self_in_order() {
        let grads = random_grads(4, 3000, 17, 0.0);
        // Any permutation is legal, the task itself anywhere in its row.
        let orders = [0, 1, 2, 3, 3, 1, 2, 0, 2, 0, 3, 1, 1, 0, 3, 2];
        check(&grads, 4, &orders, Reduction::Mean);
    }

    #[test]
    fn orders_must_be_permutations() {
        let grads = random_grads(2, 100, 17, 0.0);
        let mut out = vec![0.0f32; 100];
        for bad in [[0, 0, 1, 0], [1, 0, 1, 1]] {
            let err = pcgrad_into(&grads, 2, &bad, Reduction::Sum, 0.0, &mut out, 1).unwrap_err();
            assert!(matches!(err, PcgradError::OrderRepeat { .. }), "{err:?}");
            assert!(err.to_string().contains("not a permutation"), "{err}");
        }
        let err = checked_orders(&[0, 1, 1, 1], 2).unwrap_err();
        assert_eq!(
            err,
            PcgradError::OrderRepeat {
                row: 1,
                task: 1,
                tasks: 2
            }
        );
        assert!(matches!(
            checked_orders(&[0, 1, i64::MAX, 0], 2),
            Err(PcgradError::OrderEntry {
                row: 1,
                col: 0,
                value: i64::MAX,
                ..
            })
        ));
        assert!(matches!(
            checked_orders(&[0, 1, i64::MIN, 0], 2),
            Err(PcgradError::OrderEntry {
                value: i64::MIN,
                ..
            })
        ));
        assert!(matches!(
            check_orders(&[0, 1, usize::MAX, 0], 2),
            Err(PcgradError::OrderEntry {
                value: i64::MAX,
                ..
            })
        ));
    }

    #[test]
    fn task_count_is_bounded_before_any_allocation() {
        // No columns, so nothing but the task count could make these calls big.
        let too_many = MAX_TASKS + 1;
        assert_eq!(
            gram(&[], too_many, 1).unwrap_err(),
            PcgradError::TooManyTasks(too_many)
        );
        assert_eq!(
            gram(&[], usize::MAX, 1).unwrap_err(),
            PcgradError::TooManyTasks(usize::MAX)
        );
        assert!(matches!(
            pcgrad(&[], usize::MAX, &[], Reduction::Mean, 0.0, 1),
            Err(PcgradError::TooManyTasks(_))
        ));
        assert!(matches!(
            checked_orders(&[], usize::MAX),
            Err(PcgradError::TooManyTasks(_))
        ));
        assert!(check_tasks(MAX_TASKS).is_ok());
        assert!(PcgradError::TooManyTasks(too_many)
            .to_string()
            .contains("at most"));
    }

    #[test]
    fn single_task_is_identity() {
        let grads = random_grads(1, 777, 19, 0.0);
        let out = pcgrad(&grads, 1, &[0], Reduction::Mean, 1e-12, 1).unwrap();
        assert_eq!(out, grads);
    }

    #[test]
    fn empty_columns() {
        let out = pcgrad(&[], 3, &random_orders(3, 0), Reduction::Mean, 1e-12, 1).unwrap();
        assert!(out.is_empty());
        assert_eq!(gram(&[], 3, 1).unwrap(), vec![0.0; 9]);
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
    fn non_finite_input_is_reported() {
        let mut grads = random_grads(3, 100, 29, 0.0);
        grads[150] = f32::NAN;
        let err = gram(&grads, 3, 1).unwrap_err();
        assert!(
            matches!(
                err,
                PcgradError::NonFinite {
                    task: 1,
                    index: 50,
                    ..
                }
            ),
            "{err:?}"
        );
        grads[150] = 0.0;
        grads[299] = f32::NEG_INFINITY;
        let err = pcgrad(&grads, 3, &random_orders(3, 0), Reduction::Mean, 1e-12, 1).unwrap_err();
        assert!(
            matches!(
                err,
                PcgradError::NonFinite {
                    task: 2,
                    index: 99,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("non-finite"));
    }

    #[test]
    fn huge_finite_values_fall_back_to_f64() {
        let grads = [3e20f32, 1.0, -3e20, 2.0];
        let g = gram(&grads, 2, 1).unwrap();
        assert!(g.iter().all(|v| v.is_finite()));
        assert!((g[0] - 9e40).abs() <= 1e-6 * 9e40);
    }

    #[test]
    fn argument_errors() {
        let grads = [1.0f32; 6];
        let mut out = [0.0f32; 3];
        let ord = random_orders(2, 0);
        let call = |orders: &[usize], eps: f64, out: &mut [f32]| {
            pcgrad_into(&grads, 2, orders, Reduction::Mean, eps, out, 1)
        };
        assert!(matches!(
            call(&ord, -1.0, &mut out),
            Err(PcgradError::BadEps(_))
        ));
        assert!(matches!(
            call(&ord, f64::NAN, &mut out),
            Err(PcgradError::BadEps(_))
        ));
        assert!(matches!(
            call(&[0, 1, 0], 0.0, &mut out),
            Err(PcgradError::OrderShape { .. })
        ));
        assert!(matches!(
            call(&[0, 1, 0, 2], 0.0, &mut out),
            Err(PcgradError::OrderEntry { .. })
        ));
        assert!(matches!(
            call(&ord, 0.0, &mut [0.0; 2]),
            Err(PcgradError::OutLength { .. })
        ));
        assert_eq!(gram(&grads, 0, 1).unwrap_err(), PcgradError::NoTasks);
        assert!(matches!(
            gram(&grads, 4, 1),
            Err(PcgradError::BadLength { .. })
        ));
        assert!(matches!(
            Reduction::parse("avg"),
            Err(PcgradError::UnknownReduction(_))
        ));
        assert!(matches!(
            checked_orders(&[0, -1, 0, 1], 2),
            Err(PcgradError::OrderEntry { row: 0, col: 1, .. })
        ));
        assert_eq!(checked_orders(&[1, 0, 0, 1], 2).unwrap(), vec![1, 0, 0, 1]);
    }

    #[test]
    fn orders_are_reproducible_permutations() {
        for tasks in 1..=8 {
            let a = random_orders(tasks, 42);
            assert_eq!(a, random_orders(tasks, 42));
            for row in a.chunks_exact(tasks) {
                let mut sorted = row.to_vec();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..tasks).collect::<Vec<_>>());
            }
        }
        assert_ne!(random_orders(8, 1), random_orders(8, 2));
        // Pinned values: mtbert.pcgrad.random_orders in Python must give the same.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(random_orders(3, 0), PINNED_ORDERS_3_SEED_0.to_vec());
    }

    /// `random_orders(3, 0)`; the Python tests pin the same rows.
    const PINNED_ORDERS_3_SEED_0: [usize; 9] = [1, 0, 2, 2, 1, 0, 1, 2, 0];
}
