//! The fork-join pool every parallel op of the engine, the kernels and the optimizer runs on.
//!
//! Waking a parked thread costs 70–330 µs on the 2-core KVM boxes this project is measured on
//! (a dispatch to rayon's pool after 0.1–2 ms of idleness, timed in a loop); a tiny model's
//! training step makes hundreds of parallel ops of 10–500 µs each, so their threads were mostly
//! being woken. Here the helper threads spin (yielding the core to any other runnable thread)
//! for [`SPIN`] after each job before they park, as OpenMP runtimes do, and a job reaches a
//! spinning helper in about a microsecond. The calling thread takes part in every job, so a job
//! never waits for a helper that is slow to wake: work is handed out index by index.
//!
//! A job started inside a task (nested), or while another thread's job holds the pool, runs on
//! its caller alone: one job at a time, never a deadlock. Results never depend on which thread
//! ran a task: reductions in the callers fix their split by the data's size alone.

use std::any::Any;
use std::cell::Cell;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper spins for the next job before it parks. A training step's gaps between
/// parallel ops (the loss graph, sampling) are well under this.
const SPIN: Duration = Duration::from_millis(2);

thread_local! {
    /// Set while this thread runs a task: a job started from here runs serially.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// The threads a parallel op started here splits over: 1 inside a task, else the pool's size
/// (`RAYON_NUM_THREADS`, which [`crate::init`] sets to the cores when unset).
pub fn threads() -> usize {
    if IN_TASK.get() {
        1
    } else {
        pool().map_or(1, |p| p.helper_count() + 1)
    }
}

/// `f()` with every job it starts run on this thread alone (as a task's are).
pub fn serially<R>(f: impl FnOnce() -> R) -> R {
    let outer = IN_TASK.replace(true);
    let r = catch_unwind(AssertUnwindSafe(f));
    IN_TASK.set(outer);
    r.unwrap_or_else(|p| resume_unwind(p))
}

/// Runs `f(i)` for every `i` in `0..n` on the pool and returns when all have run; a panic in any
/// task is raised here after the others finished.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    let f: &(dyn Fn(usize) + Sync) = &f;
    match pool() {
        Some(p) if n > 1 && !IN_TASK.get() => p.run(n, f),
        _ => (0..n).for_each(f),
    }
}

/// `[f(0), …, f(n-1)]`, computed on the pool.
pub fn map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for_each_mut(&mut out, |i, o| *o = Some(f(i)));
    out.into_iter()
        .map(|o| o.expect("par: every task ran"))
        .collect()
}

/// `(a(), b())`, side by side when a helper is free.
pub fn join<A: Send, B: Send>(
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    let (a, b) = (Mutex::new(Some(a)), Mutex::new(Some(b)));
    let (ra, rb) = (Slot::default(), Slot::default());
    for_each(2, |i| {
        if i == 0 {
            ra.put(take(&a)());
        } else {
            rb.put(take(&b)());
        }
    });
    (ra.take(), rb.take())
}

/// `f(i, item)` for every item of `items`, on the pool.
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(usize, &mut T) + Sync) {
    let items = Disjoint::new(items);
    // SAFETY: each index is handed to exactly one task.
    for_each(items.len, |i| f(i, unsafe { &mut *items.at(i) }));
}

/// `[f(0, &mut items[0]), …]`, computed on the pool.
pub fn map_mut<T: Send, R: Send>(items: &mut [T], f: impl Fn(usize, &mut T) -> R + Sync) -> Vec<R> {
    let items = Disjoint::new(items);
    // SAFETY: each index is handed to exactly one task.
    map(items.len, |i| f(i, unsafe { &mut *items.at(i) }))
}

/// `f(i, chunk)` for the `i`-th `size`-element chunk of `data` (the last may be shorter), on the pool.
pub fn chunks_mut<T: Send>(data: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    assert!(size > 0, "par::chunks_mut: chunk size 0");
    let len = data.len();
    let data = Disjoint::new(data);
    for_each(len.div_ceil(size), |i| {
        let (s, e) = (i * size, ((i + 1) * size).min(len));
        // SAFETY: chunk i alone covers s..e, inside the slice.
        f(i, unsafe {
            std::slice::from_raw_parts_mut(data.at(s), e - s)
        })
    });
}

/// A slice whose disjoint parts tasks write through raw pointers.
pub(crate) struct Disjoint<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: tasks touch disjoint elements only (each caller above argues it); T crosses threads.
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    pub(crate) fn new(s: &'a mut [T]) -> Self {
        Disjoint {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: PhantomData,
        }
    }

    /// Pointer to element `i` (`i ≤ len`).
    pub(crate) fn at(&self, i: usize) -> *mut T {
        assert!(i <= self.len);
        // SAFETY: in bounds or one past the end (checked).
        unsafe { self.ptr.add(i) }
    }
}

/// One task's result.
struct Slot<T>(Mutex<Option<T>>);

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot(Mutex::new(None))
    }
}

impl<T> Slot<T> {
    fn put(&self, v: T) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
    }

    fn take(self) -> T {
        self.0
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .expect("par: every task ran")
    }
}

fn take<F>(f: &Mutex<Option<F>>) -> F {
    f.lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .expect("par: each closure runs once")
}

/// The job being run: its tasks, with the caller's lifetime erased (see [`Pool::run`]).
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync + 'static),
    n: usize,
}

// SAFETY: `f` is `Sync`, and `Pool::run` keeps it alive until every helper that took the job left it.
unsafe impl Send for Job {}

struct Pool {
    /// The helper threads, set once they are spawned.
    helpers: OnceLock<Vec<Thread>>,
    /// Held by the thread whose job runs.
    busy: Mutex<()>,
    /// The current job's number; helpers watch it.
    gen: AtomicU64,
    /// `gen << 32 | CLOSED | helpers that took the job`: a helper takes job `gen` only while it is
    /// open, and the caller closes it before waiting for those that took it.
    state: AtomicU64,
    /// Helpers that took the current job and finished with it.
    left: AtomicU64,
    /// The next task index to hand out.
    next: AtomicUsize,
    job: Mutex<Option<Job>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Per helper: parked (or about to park) waiting for a job.
    parked: Vec<AtomicBool>,
}

const CLOSED: u64 = 1 << 31;
const TAKERS: u64 = CLOSED - 1;

/// The pool, started on first use; `None` with a single thread.
fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
    *POOL.get_or_init(|| {
        let n = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if n < 2 {
            return None;
        }
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            helpers: OnceLock::new(),
            busy: Mutex::new(()),
            gen: AtomicU64::new(0),
            state: AtomicU64::new(CLOSED),
            left: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            job: Mutex::new(None),
            panic: Mutex::new(None),
            parked: (1..n).map(|_| AtomicBool::new(false)).collect(),
        }));
        let helpers: Vec<Thread> = (0..n - 1)
            .map_while(|h| {
                std::thread::Builder::new()
                    .name(format!("rlhf-par-{h}"))
                    .stack_size(16 << 20)
                    .spawn(move || pool.helper(h))
                    .ok()
                    .map(|j| j.thread().clone())
            })
            .collect();
        if helpers.is_empty() {
            return None;
        }
        let _ = pool.helpers.set(helpers);
        Some(pool)
    })
}

impl Pool {
    fn helper_count(&self) -> usize {
        self.helpers.get().map_or(0, Vec::len)
    }

    /// Runs job `f` over `0..n` with whichever helpers are free, the caller taking part.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let Ok(_busy) = self.busy.try_lock() else {
            // Another thread's job holds the pool (tests run side by side): run alone, as tasks.
            return serially(|| (0..n).for_each(f));
        };
        // SAFETY: only the lifetime is erased; `f` outlives every use, as every helper that took
        // this job has left it (`left` reached the takers counted when the job closed) before
        // this function returns or unwinds.
        let erased: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
        let g = self.gen.load(Relaxed) + 1;
        self.next.store(0, Relaxed);
        self.left.store(0, Relaxed);
        *lock(&self.job) = Some(Job { f: erased, n });
        self.state.store(g << 32, SeqCst);
        self.gen.store(g, SeqCst);
        for (h, t) in self.helpers.get().into_iter().flatten().enumerate() {
            if self.parked[h].load(SeqCst) {
                t.unpark();
            }
        }
        self.work(f, n);
        let takers = self.state.fetch_or(CLOSED, SeqCst) & TAKERS;
        let mut spins = 0u32;
        while self.left.load(Acquire) < takers {
            spin_round(&mut spins, std::thread::yield_now);
        }
        *lock(&self.job) = None;
        if let Some(p) = lock(&self.panic).take() {
            resume_unwind(p);
        }
    }

    /// Takes task indices until none are left; a panicking task's payload is kept for the caller.
    fn work(&self, f: &(dyn Fn(usize) + Sync), n: usize) {
        // Indices go out a few at a time: one shared counter update per task would cost as much as
        // a short task (a row's log-sum-exp).
        let step = (n / (16 * (self.helper_count() + 1))).max(1);
        let outer = IN_TASK.replace(true);
        loop {
            let i0 = self.next.fetch_add(step, Relaxed);
            if i0 >= n {
                break;
            }
            for i in i0..(i0 + step).min(n) {
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                    lock(&self.panic).get_or_insert(p);
                }
            }
        }
        IN_TASK.set(outer);
    }

    fn helper(&'static self, h: usize) {
        let mut seen = 0;
        loop {
            let g = self.wait_for_job(h, seen);
            seen = g;
            // Take the job while it is open.
            let mut s = self.state.load(Acquire);
            let took = loop {
                if s >> 32 != g || s & CLOSED != 0 {
                    break false;
                }
                match self.state.compare_exchange_weak(s, s + 1, AcqRel, Acquire) {
                    Ok(_) => break true,
                    Err(now) => s = now,
                }
            };
            if !took {
                continue;
            }
            let job = (*lock(&self.job)).expect("par: an open job is set");
            // SAFETY: the job's caller waits for this helper to leave before `f` goes away.
            let f = unsafe { &*job.f };
            self.work(f, job.n);
            self.left.fetch_add(1, Release);
        }
    }

    /// The number of a job newer than `seen`: spins for [`SPIN`], then parks until woken.
    fn wait_for_job(&self, h: usize, seen: u64) -> u64 {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = self.gen.load(Acquire);
            if g != seen {
                return g;
            }
            spin_round(&mut spins, || {
                if start.elapsed() < SPIN {
                    std::thread::yield_now();
                } else {
                    // Parked only if no job came after the flag went up: `run` reads the flag after
                    // publishing its job (both sequentially consistent), so one of them sees the other.
                    self.parked[h].store(true, SeqCst);
                    if self.gen.load(SeqCst) == seen {
                        std::thread::park();
                    }
                    self.parked[h].store(false, SeqCst);
                }
            });
        }
    }
}

/// One round of a busy wait: a pause hint, and every 64th round `slow()` (a yield, or parking),
/// so that a waiting thread gives its core to any other runnable one.
fn spin_round(spins: &mut u32, slow: impl FnOnce()) {
    *spins = spins.wrapping_add(1);
    if spins.is_multiple_of(64) {
        slow()
    } else {
        std::hint::spin_loop()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once_and_nested_jobs_run_on_their_caller() {
        for n in [0, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            let nested = AtomicU32::new(0);
            for_each(n, |i| {
                hits[i].fetch_add(1, Relaxed);
                if n > 1 {
                    assert_eq!(threads(), 1, "inside a task a job runs serially");
                }
                for_each(3, |_| {
                    nested.fetch_add(1, Relaxed);
                });
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "n = {n}");
            assert_eq!(nested.load(Relaxed), 3 * n as u32);
        }
        assert_eq!(map(5, |i| i * i), [0, 1, 4, 9, 16]);
        assert_eq!(join(|| "a", || 2), ("a", 2));
    }

    #[test]
    fn chunks_and_items_cover_the_data_once() {
        let mut v = vec![0usize; 1001];
        chunks_mut(&mut v, 100, |i, c| c.iter_mut().for_each(|x| *x += i + 1));
        assert!(v.iter().enumerate().all(|(j, &x)| x == j / 100 + 1));
        let mut items: Vec<(usize, usize)> = (0..9).map(|i| (i, 0)).collect();
        for_each_mut(&mut items, |i, it| it.1 = it.0 * 10 + i);
        assert!(items.iter().all(|&(a, b)| b == a * 11));
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_keeps_working() {
        let r = catch_unwind(|| {
            for_each(8, |i| {
                if i == 5 {
                    panic!("task 5");
                }
            })
        });
        let msg = r.unwrap_err();
        assert_eq!(msg.downcast_ref::<&str>(), Some(&"task 5"));
        assert_eq!(map(4, |i| i + 1), [1, 2, 3, 4]);
    }

    #[test]
    fn callers_on_many_threads_share_the_pool_safely() {
        let total = AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let part: u32 = map(16, |i| i as u32).into_iter().sum();
                        total.fetch_add(part, Relaxed);
                    }
                });
            }
        });
        assert_eq!(total.load(Relaxed), 4 * 200 * 120);
    }
}
