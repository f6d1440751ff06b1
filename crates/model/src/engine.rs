//! The engine: hand-written forward and backward passes of a whole stack (embedding → blocks →
//! final norm) behind the seam the trainers already use, [`crate::CausalLm::hidden_states`].
//!
//! candle's autograd records every op, allocates every intermediate and creates each gradient as
//! `zeros_like` + add. An architecture with a [`Body`] instead runs its blocks as direct kernel and
//! gemm calls into plain buffers, keeps what its backward needs in a tape, and writes
//! each parameter gradient once. To candle the whole stack is one op whose input is the embedding
//! matrix: the trainers' loss graphs (lm-head log-probs, value heads, losses) stay candle graphs,
//! and when [`backward`] reaches the op it runs the stack's backward, returns the embedding's
//! gradient to candle and hands the other parameters' gradients to [`backward`] for the store.
//! When the embedding is frozen (LoRA: only adapters train) the op hangs on a constant variable
//! instead ([`anchor`]), so that candle still reaches it, and every gradient goes to the store.
//! Generation's cached passes (prefill and decode steps through a [`crate::KvCache`]) run on the
//! same block passes without a tape where the architecture has them ([`decode_passes`]).
//! The candle graph path stays selectable ([`Backend::Candle`]) as the reference.

use crate::attention::KvCache;
use crate::bf16::{gemm_prec, PackedB, Precision};
use crate::lora::DropoutMask;
use crate::matmul::MatRef;
use crate::ops::{attention_fwd, AttnDims};
use crate::pack_cache::PackCache;
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use std::cell::RefCell;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// How a model's hidden states are computed when gradients may be needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The hand-written passes of [`crate::engine`] where the architecture has them, KV-cache
    /// decoding included (adapters the architecture's passes do not run use the candle graph).
    #[default]
    Engine,
    /// candle's autograd over the fused ops (the reference).
    Candle,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Engine => "engine",
            Backend::Candle => "candle",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "engine" => Ok(Backend::Engine),
            "candle" => Ok(Backend::Candle),
            other => Err(format!(
                "unknown backend \"{other}\" (expected engine or candle)"
            )),
        }
    }
}

/// A stack with hand-written passes (implemented per architecture).
pub(crate) trait Body: Clone + Send + Sync + 'static {
    /// What the backward pass needs from the forward.
    type Tape: Send + Sync + 'static;
    /// The embedding matrix: the stack's input in candle's graph when it is trainable.
    fn embedding(&self) -> &Tensor;
    /// Every tensor of the stack (adapter factors included), in the order the passes read them.
    fn tensors(&self) -> Vec<&Tensor>;
    /// Every linear layer of the stack, in the order its forward starts their adapters' passes.
    fn linears(&self) -> Vec<&crate::linear::Linear>;
    /// Whether any parameter of the stack may be trainable (then the forward is asked to keep its
    /// tape): the base's, or a low-rank adapter's.
    fn trainable(&self) -> bool {
        self.embedding().is_variable()
            || self
                .linears()
                .into_iter()
                .filter_map(crate::linear::Linear::low_rank)
                .any(adapter_trains)
    }
    /// Hidden states after the final norm, `[b * t * hidden]` row-major, for the row-major token
    /// ids `[b, t]` at `pos` (row-major `[rows, t]`, `rows` ∈ {1, b}), attending as `attend` says;
    /// when it asks to keep the tape, the tape, unless no parameter this pass reads is trainable
    /// (e.g. only adapters train and they are disabled).
    /// `packs`: weights already converted for this pass ([`Packs`]), to read through [`Reads`].
    /// `at` (only where [`Body::selects_rows`]): ascending indices of the `b · t` tokens whose
    /// states to return, `[at.len() * hidden]`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        pos: &[u32],
        rows: usize,
        attend: Attend,
        packs: Option<&Packs>,
        at: Option<&[u32]>,
    ) -> Result<(Vec<f32>, Option<Self::Tape>)>;
    /// Whether [`Body::forward`] computes the states of some tokens only (the last block's
    /// attention output projection and MLP run on those tokens alone: nothing after reads the
    /// others').
    fn selects_rows(&self) -> bool {
        false
    }
    /// Every parameter's gradient (the parameter's tensor, its gradient's data) for the upstream
    /// gradient of the hidden states, in an order that depends on the stack only; when `defer`
    /// (one of several row chunks), base weight gradients are left in [`Grads`]' deferred list.
    fn backward(
        &self,
        tape: Self::Tape,
        d_hidden: &[f32],
        packs: Option<&Packs>,
        defer: bool,
    ) -> Result<Grads>;
    /// Elements of all the stack's parameters.
    fn parameter_count(&self) -> usize {
        self.tensors().iter().map(|t| t.elem_count()).sum()
    }
    /// Whether rows of a batch may run as separate passes (not with adapters: a pass draws their
    /// dropout masks, whose draws would then differ from one pass over the batch).
    fn splittable(&self) -> bool {
        self.linears().iter().all(|l| l.adapter.is_none())
    }
}

/// Where a [`Body::forward`]'s attention reads its keys and values.
pub(crate) enum Attend<'c> {
    /// Its own (causal self-attention: training and scoring), keeping the tape when `keep`;
    /// `groups` (`[b, t]` of the pass) also masks keys of other groups
    /// ([`crate::CausalLm::hidden_states_grouped`]).
    Causal {
        keep: bool,
        groups: Option<&'c [u32]>,
    },
    /// The cache rows of the pass's batch rows, after writing its own there (decoding: no tape).
    Cached(&'c KvCache, Range<usize>),
}

impl Attend<'_> {
    /// Whether the pass is asked to keep its tape.
    pub(crate) fn keep(&self) -> bool {
        matches!(self, Attend::Causal { keep: true, .. })
    }

    /// The attention groups of a causal pass.
    pub(crate) fn groups(&self) -> Option<&[u32]> {
        match self {
            Attend::Causal { groups, .. } => *groups,
            Attend::Cached(..) => None,
        }
    }

    /// Layer `layer`'s attention over the rotated queries `q [b, nh, t, d]` and the keys and
    /// values `k, v [b, nkv, t, d]` of the pass, into `out [b, t, nh * d]`; the log-sum-exps
    /// [`attention_bwd`](crate::ops::attention_bwd) needs (none through a cache).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &self,
        layer: usize,
        dm: AttnDims,
        scale: f32,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
    ) -> Result<Vec<f32>> {
        match self {
            Attend::Causal { groups, .. } => Ok(attention_fwd(dm, scale, q, k, v, out, *groups)),
            Attend::Cached(cache, rows) => {
                let t = dm.t();
                cache.store(layer, t, rows.clone(), k, v)?;
                cache.attend(layer, t, rows.clone(), scale, q, out)?;
                Ok(vec![])
            }
        }
    }
}

/// Whether the engine can run `body` without gradients (decoding through a KV cache): every
/// adapter inside it low-rank (LoRA; others run on the candle graph), on the CPU.
pub(crate) fn decodes<B: Body>(body: &B) -> bool {
    body.linears()
        .iter()
        .all(|l| l.adapter.is_none() || l.low_rank().is_some())
        && body.embedding().device().is_cpu()
}

thread_local! {
    /// Cached (decoding) passes the engine ran on this thread.
    static DECODE_PASSES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many forward passes through a KV cache (prefills and decode steps of [`crate::generate`],
/// [`crate::Decoder`], [`crate::CausalLm::hidden_states_cached`]) the engine ran on the calling
/// thread: which models decode on the engine is observable, not only inferred.
pub fn decode_passes() -> u64 {
    DECODE_PASSES.get()
}

/// Counts one cached pass of the engine ([`decode_passes`]).
pub(crate) fn count_decode_pass() {
    DECODE_PASSES.set(DECODE_PASSES.get() + 1);
}

/// Whether the engine computes `body` with gradients: it [`decodes`] it, and its base parameters
/// are all trainable or all frozen (adapters' own parameters may train either way).
pub(crate) fn on_engine<B: Body>(body: &B) -> bool {
    let linears = body.linears();
    let factors: std::collections::HashSet<_> = linears
        .iter()
        .filter_map(|l| l.low_rank())
        .flat_map(|lr| {
            let (a, b, _) = lr.factors();
            [a.id(), b.id()]
        })
        .collect();
    let trainable = body.embedding().is_variable();
    decodes(body)
        && body
            .tensors()
            .iter()
            .filter(|t| !factors.contains(&t.id()))
            .all(|t| t.is_variable() == trainable)
}

/// Whether a forward asked to `keep` its tape needs one: the base trains, or an adapter that runs
/// in this pass trains (`passes`: [`begin_pass`] of each of [`Body::linears`], in order).
pub(crate) fn keeps_tape<'a, B: Body>(
    body: &B,
    keep: bool,
    passes: impl IntoIterator<Item = &'a Option<Option<DropoutMask>>>,
) -> bool {
    keep && (body.embedding().is_variable()
        || body
            .linears()
            .into_iter()
            .zip(passes)
            .any(|(l, p)| pass_trains(l, p)))
}

/// Up to this many parameters, a batch runs as one pass per thread over its share of the rows (see
/// [`row_chunks`]), in training as in decoding.
const SPLIT_MAX_PARAMS: usize = 1 << 24;

/// How many row chunks to run side by side: on small models each product is too small for both
/// cores (measured on the tiny Llama: the second thread added 7–16 % to a step, most of it lost to
/// waking it up for every op), while whole passes over a share of the rows each keep a core busy.
/// Each chunk's backward writes its own copy of the gradients, summed after: why only small models.
fn row_chunks<B: Body>(body: &B, b: usize) -> usize {
    let threads = crate::par::threads();
    if threads < 2 || b < 2 || body.parameter_count() > SPLIT_MAX_PARAMS || !body.splittable() {
        return 1;
    }
    threads.min(b)
}

/// `(a(), b())`, side by side on the [`crate::par`] pool: two independent models' passes (PPO's
/// policy and value) then run whole on one core each, their own ops serially, instead of each
/// pass splitting its rows over the cores in turn.
pub fn apart<A: Send, B: Send>(
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    crate::par::join(a, b)
}

/// `f(c)` for every chunk `0..k` as tasks of one [`crate::par`] job: each chunk's own ops run
/// serially on its thread, so the chunks never wait for each other's work.
fn run_chunks<T: Send>(k: usize, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    crate::par::map(k, f).into_iter().collect()
}

/// Runs the rows `0..b` of a pass as [`row_chunks`] chunks, chunk `c` as `f(its rows)` (see
/// [`run_chunks`]); the chunks' rows and results, in row order.
pub(crate) fn by_row_chunks<B: Body, T: Send>(
    body: &B,
    b: usize,
    f: impl Fn(Range<usize>) -> Result<T> + Sync,
) -> Result<Vec<(Range<usize>, T)>> {
    let k = row_chunks(body, b);
    let bounds: Vec<_> = (0..k).map(|c| c * b / k..(c + 1) * b / k).collect();
    let parts = run_chunks(k, |c| f(bounds[c].clone()))?;
    Ok(bounds.into_iter().zip(parts).collect())
}

/// The positions of the batch rows `r` of a pass over `t` tokens, from `pos` (row-major
/// `[rows, t]`, `rows` ∈ {1, b}), and how many rows they have.
pub(crate) fn positions_of_rows<'p>(
    pos: &'p [u32],
    rows: usize,
    t: usize,
    r: &Range<usize>,
) -> (&'p [u32], usize) {
    if rows == 1 {
        (pos, 1)
    } else {
        (&pos[r.start * t..r.end * t], r.len())
    }
}

/// The data of token ids `[b, t]` (u32 or i64).
fn id_data(ids: &Tensor) -> Result<Vec<u32>> {
    ids.to_dtype(candle_core::DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()
}

/// The hidden states `[b, t, hidden]` of `ids` at `pos` (row-major `[rows, t]`, `rows` ∈ {1, b})
/// through `body` and `cache` (begun for `t` positions, one row per batch row): a prefill or
/// decode step of generation on the engine, counted by [`decode_passes`].
pub(crate) fn hidden_cached<B: Body>(
    body: &B,
    ids: &Tensor,
    pos: &[u32],
    rows: usize,
    cache: &mut KvCache,
) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    cache.check_rows(b)?;
    let ids = id_data(ids)?;
    let cache: &KvCache = cache;
    // Decode steps split too, for the reason training does (`row_chunks`): their products are small,
    // and a pass per thread wakes the other core once per pass instead of once per product.
    let parts = by_row_chunks(body, b, |r| {
        let (p, prows) = positions_of_rows(pos, rows, t, &r);
        let ids = &ids[r.start * t..r.end * t];
        let attend = Attend::Cached(cache, r.clone());
        Ok(body
            .forward(ids, r.len(), t, p, prows, attend, None, None)?
            .0)
    })?;
    count_decode_pass();
    let mut parts = parts.into_iter().map(|(_, out)| out);
    let mut hidden = parts.next().unwrap_or_default();
    parts.for_each(|out| hidden.extend_from_slice(&out));
    let h = hidden.len() / (b * t).max(1);
    Tensor::from_vec(hidden, (b, t, h), body.embedding().device())
}

/// The hidden states `[b, t, hidden]` of `ids` through `body`: a plain tensor when no parameter is
/// trainable, else the output of one candle op whose backward runs `body`'s. `groups`: `[b, t]`
/// attention groups ([`crate::CausalLm::hidden_states_grouped`]). With `at` (ascending flat
/// indices into the `b · t` tokens; only where [`Body::selects_rows`]), only those tokens' states,
/// `[at.len(), hidden]`: the last block runs past attention on those tokens alone.
pub(crate) fn hidden<B: Body>(
    body: &B,
    ids: &Tensor,
    pos: &[u32],
    rows: usize,
    groups: Option<&[u32]>,
    at: Option<&[u32]>,
) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    if let Some(at) = at {
        if at.windows(2).any(|w| w[0] >= w[1]) || at.last().is_some_and(|&i| i as usize >= b * t) {
            bail!(
                "engine: the wanted tokens must be ascending indices below {}",
                b * t
            );
        }
        if !body.selects_rows() {
            bail!("engine: this stack computes every token's states (it does not pick rows)");
        }
    }
    if groups.is_some_and(|g| g.len() != b * t) {
        bail!(
            "attention groups: {} ids for a [{b}, {t}] batch",
            groups.map_or(0, <[u32]>::len)
        );
    }
    let ids = id_data(ids)?;
    let embed = body.embedding();
    let keep = body.trainable();
    let packs = if row_chunks(body, b) > 1 {
        Packs::new(body, Pass::Forward)?
    } else {
        None
    };
    // A chunk's wanted tokens, as indices into its own rows.
    let wanted = |r: &Range<usize>| {
        at.map(|at| {
            let (lo, hi) = ((r.start * t) as u32, (r.end * t) as u32);
            at.iter()
                .filter(|&&i| (lo..hi).contains(&i))
                .map(|&i| i - lo)
                .collect::<Vec<u32>>()
        })
    };
    let parts = by_row_chunks(body, b, |r| {
        let (p, prows) = positions_of_rows(pos, rows, t, &r);
        let attend = Attend::Causal {
            keep,
            groups: groups.map(|g| &g[r.start * t..r.end * t]),
        };
        body.forward(
            &ids[r.start * t..r.end * t],
            r.len(),
            t,
            p,
            prows,
            attend,
            packs.as_ref(),
            wanted(&r).as_deref(),
        )
    })?;
    let k = parts.len();
    let tokens = at.map_or(b * t, <[u32]>::len);
    let h = body.embedding().dim(1)?;
    let mut hidden = Vec::with_capacity(tokens * h);
    let mut tapes = Vec::with_capacity(k);
    for (_, (out, tape)) in parts {
        let start = hidden.len();
        hidden.extend_from_slice(&out);
        tapes.extend(tape.map(|tape| (start..hidden.len(), tape)));
    }
    let shape = match at {
        Some(_) => Shape::from((tokens, h)),
        None => Shape::from((b, t, h)),
    };
    if tapes.len() < k {
        return Tensor::from_vec(hidden, shape, embed.device());
    }
    let input = if embed.is_variable() {
        embed.clone()
    } else {
        anchor()?
    };
    input.apply_op1(StackOp {
        body: body.clone(),
        out: Mutex::new(Some((hidden, shape))),
        tapes: Mutex::new(Some(tapes)),
    })
}

/// The input of the stack's op when the embedding is frozen: candle runs an op's backward only when
/// its input leads to a variable, so a frozen stack with trainable adapters hangs on this constant
/// variable (one element, never in a store: the op returns no gradient for it).
fn anchor() -> Result<Tensor> {
    static ANCHOR: std::sync::OnceLock<Tensor> = std::sync::OnceLock::new();
    if let Some(t) = ANCHOR.get() {
        return Ok(t.clone());
    }
    let var = candle_core::Var::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    Ok(ANCHOR.get_or_init(|| var.as_tensor().clone()).clone())
}

/// The stack as one candle op (see the module comment).
struct StackOp<B: Body> {
    body: B,
    /// The forward's result, moved into candle's storage by `cpu_fwd` (computed before, outside
    /// the read lock candle holds on the embedding while the op runs).
    out: Mutex<Option<(Vec<f32>, Shape)>>,
    tapes: Mutex<Option<ChunkTapes<B::Tape>>>,
}

/// Per row chunk of a pass: its range of the hidden states' data and its tape.
type ChunkTapes<T> = Vec<(std::ops::Range<usize>, T)>;

impl<B: Body> CustomOp1 for StackOp<B> {
    fn name(&self) -> &'static str {
        "rlhf-engine-stack"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.out.lock().expect("engine op poisoned").take() {
            Some((data, shape)) => Ok((CpuStorage::F32(data), shape)),
            None => bail!("engine: the stack op ran twice"),
        }
    }

    fn bwd(&self, input: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(tapes) = self.tapes.lock().expect("engine op poisoned").take() else {
            bail!("engine: a second backward through the same forward pass (run the forward again)")
        };
        let grad = grad.contiguous()?;
        let mut chunks = {
            let (st, l) = grad.storage_and_layout();
            let g = cpu_f32(&st, l, "engine backward")?;
            let tapes: Vec<_> = tapes.into_iter().map(|t| Mutex::new(Some(t))).collect();
            let packs = if tapes.len() > 1 {
                Packs::new(&self.body, Pass::Backward)?
            } else {
                None
            };
            run_chunks(tapes.len(), |c| {
                let (range, tape) = tapes[c]
                    .lock()
                    .expect("engine tape poisoned")
                    .take()
                    .expect("each chunk runs once");
                self.body
                    .backward(tape, &g[range], packs.as_ref(), tapes.len() > 1)
            })?
        };
        let deferred = chunks
            .iter_mut()
            .filter_map(|c| c.deferred.take())
            .collect::<Vec<_>>();
        let mut chunks: Vec<_> = chunks.into_iter().map(|c| c.done).collect();
        // The chunks' gradients, summed in chunk order.
        let mut grads = chunks.remove(0);
        for other in chunks {
            crate::par::for_each_mut(&mut grads, |i, (_, acc)| {
                acc.iter_mut().zip(&other[i].1).for_each(|(a, g)| *a += g);
            });
        }
        if !deferred.is_empty() {
            grads.extend(finish_deferred(deferred)?);
        }
        let mut input_grad = None;
        for (p, g) in grads {
            let g = Tensor::from_vec(g, p.shape(), p.device())?;
            if p.id() == input.id() {
                input_grad = Some(g);
            } else if p.is_variable() {
                SINK.with_borrow_mut(|sink| sink.push((p, g)));
            }
        }
        Ok(input_grad)
    }
}

thread_local! {
    /// Parameter gradients of the stacks [`backward`] went through (candle's backward runs on the
    /// calling thread).
    static SINK: RefCell<Vec<(Tensor, Tensor)>> = const { RefCell::new(Vec::new()) };
}

/// `loss.backward()` that also collects the gradients of parameters inside engine stacks. Use it
/// instead of candle's `Tensor::backward` for any loss of a model on the engine.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    SINK.with_borrow_mut(Vec::clear);
    let mut store = loss.backward()?;
    for (p, g) in SINK.take() {
        let g = match store.remove(&p) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        store.insert(&p, g);
    }
    Ok(store)
}

/// The contiguous f32 CPU data behind a storage guard.
pub(crate) fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(CpuStorage::F32(data)) => match layout.contiguous_offsets() {
            Some((a, b)) => Ok(&data[a..b]),
            None => bail!("{what}: tensor is not contiguous"),
        },
        _ => bail!("{what}: the engine runs on f32 CPU tensors"),
    }
}

/// Read access to many tensors' data at once (the weights of a pass), and the weights this pass
/// has already converted.
pub(crate) struct Reads<'a> {
    guards: Vec<(Box<dyn std::ops::Deref<Target = Storage> + 'a>, &'a Layout)>,
    packs: Option<&'a Packs>,
}

impl<'a> Reads<'a> {
    /// `ts`: [`Body::tensors`] (the positions `packs` refers to).
    pub(crate) fn new(ts: &[&'a Tensor], packs: Option<&'a Packs>) -> Self {
        let guards = ts
            .iter()
            .map(|t| {
                let (st, l) = t.storage_and_layout();
                (
                    Box::new(st) as Box<dyn std::ops::Deref<Target = Storage> + 'a>,
                    l,
                )
            })
            .collect();
        Self { guards, packs }
    }

    /// The data of the `i`-th tensor given to [`Reads::new`].
    pub(crate) fn get(&self, i: usize) -> Result<&[f32]> {
        let (st, l) = &self.guards[i];
        cpu_f32(st, l, "engine")
    }
}

/// Which pass a [`Packs`] serves: its weights are packed as the right-hand side of `x · Wᵀ`
/// (forward) or of `dy · W` (the input's gradient).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    Forward,
    Backward,
}

/// The bf16 linear weights of a stack converted for a pass: each layer's kept conversion
/// ([`crate::pack_cache`]), or converted now (across all threads, one weight per task) and kept.
/// Converted up front rather than per product: a pass running as several row chunks would
/// otherwise convert every weight in each chunk. Indexed by position in [`Body::tensors`].
pub(crate) struct Packs {
    pass: Pass,
    by_tensor: Vec<Option<Arc<PackedB>>>,
}

impl Packs {
    /// `None` when no linear layer of `body` computes at bf16 and none at f32 has a conversion kept
    /// for this pass (f32 products convert nothing; they take what generation converted).
    fn new<B: Body>(body: &B, pass: Pass) -> Result<Option<Self>> {
        let tensors = body.tensors();
        let linears: Vec<_> = body
            .linears()
            .into_iter()
            .filter(|l| l.precision == Precision::Bf16 || pass == Pass::Forward)
            .filter_map(|l| {
                let at = tensors.iter().position(|t| t.id() == l.weight.id())?;
                Some((l, at))
            })
            .collect();
        if linears.is_empty() {
            return Ok(None);
        }
        let reads = Reads::new(&tensors, None);
        let weights = linears
            .iter()
            .map(|&(l, at)| Ok((l, at, reads.get(at)?)))
            .collect::<Result<Vec<_>>>()?;
        let packed = crate::par::map(weights.len(), |i| {
            let (l, at, w) = weights[i];
            (at, Lin::of(l, w, None).conversion(pass, false))
        });
        if packed.iter().all(|(_, p)| p.is_none()) {
            return Ok(None);
        }
        let mut by_tensor: Vec<Option<Arc<PackedB>>> = (0..tensors.len()).map(|_| None).collect();
        for (at, p) in packed {
            by_tensor[at] = p;
        }
        Ok(Some(Self { pass, by_tensor }))
    }
}

/// Layer `l`'s forward conversion (kept, or made now), for an inference copy; kept for the training
/// forward that follows when `keep` (a frozen layer's always). `None` off the CPU fused path.
pub(crate) fn cached_forward_pack(
    l: &crate::linear::Linear,
    keep: bool,
) -> Result<Option<Arc<PackedB>>> {
    if !crate::ops::fused_ok(&[&l.weight]) {
        return Ok(None);
    }
    let w = l.weight.contiguous()?;
    let reads = Reads::new(&[&w], None);
    let data = reads.get(0)?;
    let keep = keep || !l.weight.is_variable();
    Ok(Some(l.packs.get(Pass::Forward, data, keep, || {
        Lin::of(l, data, None).convert(Pass::Forward, true)
    })))
}

/// A weight conversion borrowed from a pass or an inference copy, or shared from a layer's cache.
enum Conv<'a> {
    Borrowed(&'a PackedB),
    Kept(Arc<PackedB>),
}

impl std::ops::Deref for Conv<'_> {
    type Target = PackedB;
    fn deref(&self) -> &PackedB {
        match self {
            Conv::Borrowed(b) => b,
            Conv::Kept(k) => k,
        }
    }
}

/// One linear layer's weights as the engine reads them: `y = x Wᵀ + b` with W stored `[out, in]`
/// (`transposed`, torch `nn.Linear`) or `[in, out]` (GPT-2 `Conv1D`).
pub(crate) struct Lin<'a> {
    pub w: &'a [f32],
    pub b: Option<&'a [f32]>,
    pub out: usize,
    pub inp: usize,
    pub transposed: bool,
    pub precision: Precision,
    /// The weight already converted: by this pass ([`Packs`]), or once for generation (inference
    /// copies, forward only).
    pub packed: Option<(&'a PackedB, Pass)>,
    /// The layer's kept conversions, used by a product when the pass converted nothing up front
    /// (converted right before its product, the weight is still in cache for it), and whether to
    /// keep them ([`PackCache::get`]: a frozen weight's).
    pub kept: Option<(&'a PackCache, bool)>,
}

impl Lin<'_> {
    /// The weight converted for `pass`: up front by this pass, else the layer's kept conversion
    /// ([`Lin::conversion`]).
    fn packed_for(&self, pass: Pass) -> Option<Conv<'_>> {
        if let Some((b, _)) = self.packed.filter(|&(_, p)| p == pass) {
            return Some(Conv::Borrowed(b));
        }
        self.conversion(pass, true).map(Conv::Kept)
    }

    /// The layer's kept conversion for `pass`: at bf16 made now if the weight changed; at f32 only
    /// one kept from generation (of a weight stored `[out, in]`), since f32 products need none.
    fn conversion(&self, pass: Pass, parallel: bool) -> Option<Arc<PackedB>> {
        let (kept, keep) = self.kept?;
        match self.precision {
            Precision::Bf16 => Some(kept.get(pass, self.w, keep, || self.convert(pass, parallel))),
            Precision::Fp32 if pass == Pass::Forward && self.transposed => {
                kept.kept(pass, self.w, keep)
            }
            Precision::Fp32 => None,
        }
    }

    /// The weight converted for `pass`: the right-hand side of `x · Wᵀ` (forward) or of `dy · W`
    /// (the input's gradient), packed to bf16 or (f32) copied row-major.
    fn convert(&self, pass: Pass, parallel: bool) -> PackedB {
        let rhs = match pass {
            Pass::Forward => self.rhs(),
            Pass::Backward => self.rhs().t(),
        };
        match self.precision {
            Precision::Bf16 => PackedB::new(rhs, parallel),
            Precision::Fp32 => PackedB::f32_rows(rhs, parallel),
        }
    }

    /// The weight as the `[in, out]` right-hand side of `x · W`.
    fn rhs(&self) -> MatRef<'_> {
        if self.transposed {
            MatRef::new(self.w, self.out, self.inp, self.inp).t()
        } else {
            MatRef::new(self.w, self.inp, self.out, self.out)
        }
    }

    /// `y = x · W (+ b)`, or `y += x · W (+ b)` when `accumulate` (a residual added in place).
    pub(crate) fn forward(&self, x: &[f32], y: &mut [f32], accumulate: bool) {
        let x = MatRef::rows_of(x, self.inp);
        crate::ops::linear_gemm(
            self.precision,
            self.packed_for(Pass::Forward).as_deref(),
            y,
            self.out,
            accumulate,
            x,
            self.rhs(),
        );
        if let Some(b) = self.b {
            for row in y.chunks_mut(self.out) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
    }

    /// Gradients for the upstream `dy` of the forward on `x`: wrt the input into `dx` (added to
    /// what it holds when `accumulate`), wrt the weight (in its stored layout) and the bias.
    pub(crate) fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        dx: Option<(&mut [f32], bool)>,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut dw = crate::ops::overwritten(self.out * self.inp);
        weight_grad(self.shape(), x, dy, &mut dw, false, true);
        if let Some((dx, accumulate)) = dx {
            self.input_grad(dy, dx, accumulate);
        }
        let db = self.b.map(|_| col_sums(dy, self.out));
        (dw, db)
    }

    fn shape(&self) -> LinShape {
        LinShape {
            out: self.out,
            inp: self.inp,
            transposed: self.transposed,
            precision: self.precision,
        }
    }

    /// The gradient wrt the input only (a frozen layer): into `dx`, or added to it when `accumulate`.
    pub(crate) fn input_grad(&self, dy: &[f32], dx: &mut [f32], accumulate: bool) {
        let g = MatRef::rows_of(dy, self.out);
        crate::ops::linear_gemm(
            self.precision,
            self.packed_for(Pass::Backward).as_deref(),
            dx,
            self.inp,
            accumulate,
            g,
            self.rhs().t(),
        );
    }
}

/// What a linear layer's weight gradient depends on besides its input and upstream gradient.
#[derive(Clone, Copy)]
struct LinShape {
    out: usize,
    inp: usize,
    transposed: bool,
    precision: Precision,
}

/// The weight gradient `dyᵀ · x` of a linear layer (in its stored layout) into `dw`, or added to it
/// when `accumulate`.
fn weight_grad(
    s: LinShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    let g = MatRef::rows_of(dy, s.out);
    let xm = MatRef::rows_of(x, s.inp);
    if s.transposed {
        gemm_prec(s.precision, dw, s.inp, accumulate, g.t(), xm, parallel);
    } else {
        gemm_prec(s.precision, dw, s.out, accumulate, xm.t(), g, parallel);
    }
}

/// A weight gradient left for after every row chunk's backward pass ([`Grads::backward`]): one
/// product per chunk, accumulated in chunk order, and the products of all layers spread over the
/// threads — instead of a gradient per chunk, zeroed, written and summed.
pub(crate) struct DeferredDw {
    weight: Tensor,
    shape: LinShape,
    x: Arc<Vec<f32>>,
    dy: Vec<f32>,
}

/// The weight gradients of every chunk's deferred products (`chunks[c][j]`: chunk c's j-th; every
/// chunk defers the same layers in the same order).
fn finish_deferred(chunks: Vec<Vec<DeferredDw>>) -> Result<Vec<(Tensor, Vec<f32>)>> {
    let n = chunks.first().map_or(0, Vec::len);
    if chunks.iter().any(|c| c.len() != n) {
        bail!("engine: row chunks deferred different weight gradients")
    }
    Ok(crate::par::map(n, |j| {
        let first = &chunks[0][j];
        let s = first.shape;
        // Chunk 0's product overwrites it, the others add to it.
        let mut dw = crate::ops::overwritten(s.out * s.inp);
        for (c, jobs) in chunks.iter().enumerate() {
            weight_grad(s, &jobs[j].x, &jobs[j].dy, &mut dw, c > 0, false);
        }
        (first.weight.clone(), dw)
    }))
}

/// A low-rank adapter on a [`Lin`] as the engine reads it: the delta `scale · (x ⊙ mask) Aᵀ Bᵀ`
/// with A `[r, inp]`, B `[out, r]`, at f32 (adapters compute at f32 on the graph too).
pub(crate) struct LowRank<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub r: usize,
    pub inp: usize,
    pub out: usize,
    pub scale: f32,
}

/// What an adapter's backward needs from its forward.
pub(crate) struct LowRankTape {
    /// The dropout mask the input was multiplied by (`None`: no dropout).
    mask: Option<Vec<f32>>,
    /// `scale · (x ⊙ mask) Aᵀ`, `[n, r]`.
    u: Vec<f32>,
}

impl LowRank<'_> {
    /// `y += scale · (x ⊙ mask) Aᵀ Bᵀ` for `x` `[n, inp]`, `y` `[n, out]`.
    pub(crate) fn forward(&self, x: &[f32], y: &mut [f32], mask: Option<Vec<f32>>) -> LowRankTape {
        let r = self.r;
        let dropped = mask.as_ref().map(|m| masked(x, m));
        let xd = dropped.as_deref().unwrap_or(x);
        let mut u = vec![0.0; x.len() / self.inp * r];
        gemm_prec(
            Precision::Fp32,
            &mut u,
            r,
            false,
            MatRef::rows_of(xd, self.inp),
            MatRef::new(self.a, r, self.inp, self.inp).t(),
            true,
        );
        u.iter_mut().for_each(|v| *v *= self.scale);
        gemm_prec(
            Precision::Fp32,
            y,
            self.out,
            true,
            MatRef::rows_of(&u, r),
            MatRef::new(self.b, self.out, r, r).t(),
            true,
        );
        LowRankTape { mask, u }
    }

    /// The gradients wrt A and B for the upstream `dy` of the forward on `x`; the input's gradient
    /// is added to `dx` when given.
    pub(crate) fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        tape: &LowRankTape,
        dx: Option<&mut [f32]>,
    ) -> (Vec<f32>, Vec<f32>) {
        let (r, inp, out) = (self.r, self.inp, self.out);
        let fp = Precision::Fp32;
        let g = MatRef::rows_of(dy, out);
        let mut db = vec![0f32; out * r];
        gemm_prec(
            fp,
            &mut db,
            r,
            false,
            g.t(),
            MatRef::rows_of(&tape.u, r),
            true,
        );
        // du = scale · dy B, the gradient of u / scale.
        let mut du = vec![0.0; dy.len() / out * r];
        gemm_prec(
            fp,
            &mut du,
            r,
            false,
            g,
            MatRef::new(self.b, out, r, r),
            true,
        );
        du.iter_mut().for_each(|v| *v *= self.scale);
        let du = MatRef::rows_of(&du, r);
        let dropped = tape.mask.as_ref().map(|m| masked(x, m));
        let xd = dropped.as_deref().unwrap_or(x);
        let mut da = vec![0f32; r * inp];
        gemm_prec(
            fp,
            &mut da,
            inp,
            false,
            du.t(),
            MatRef::rows_of(xd, inp),
            true,
        );
        let a = MatRef::new(self.a, r, inp, inp);
        match (dx, &tape.mask) {
            (Some(dx), None) => gemm_prec(fp, dx, inp, true, du, a, true),
            (Some(dx), Some(mask)) => {
                let mut dxd = vec![0.0; dx.len()];
                gemm_prec(fp, &mut dxd, inp, false, du, a, true);
                dx.iter_mut()
                    .zip(dxd.iter().zip(mask.iter()))
                    .for_each(|(dx, (g, m))| *dx += g * m);
            }
            (None, _) => {}
        }
        (da, db)
    }
}

/// A linear layer with its low-rank adapter (if any), as the engine runs them.
pub(crate) struct Adapted<'a> {
    pub lin: Lin<'a>,
    pub lora: Option<LowRank<'a>>,
}

/// The gradients of an [`Adapted`] layer: the base weight's and bias's when the base trains, A's
/// and B's when the adapter ran.
pub(crate) struct AdaptedGrads {
    pub base: Option<(Vec<f32>, Option<Vec<f32>>)>,
    pub lora: Option<(Vec<f32>, Vec<f32>)>,
}

impl Adapted<'_> {
    /// [`Lin::forward`], plus the adapter's delta when it runs this pass (`pass`: from
    /// [`crate::linear::LowRankAdapter::begin_pass`], its dropout mask drawn here); returns the
    /// adapter's tape then.
    pub(crate) fn forward(
        &self,
        x: &[f32],
        y: &mut [f32],
        accumulate: bool,
        pass: Option<Option<DropoutMask>>,
    ) -> Option<LowRankTape> {
        self.lin.forward(x, y, accumulate);
        let (lora, mask) = (self.lora.as_ref()?, pass?);
        let mask = mask.map(|m| {
            let mut buf = vec![0.0; x.len()];
            m.fill(&mut buf);
            buf
        });
        Some(lora.forward(x, y, mask))
    }

    /// Gradients for the upstream `dy` of the forward on `x` (the base's only when `base`, a
    /// trainable base; the adapter's when it ran, `tape`); the input's into `dx` (added to what it
    /// holds when `accumulate`).
    pub(crate) fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        mut dx: Option<(&mut [f32], bool)>,
        base: bool,
        tape: Option<&LowRankTape>,
    ) -> AdaptedGrads {
        let base = if base {
            Some(
                self.lin
                    .backward(x, dy, dx.as_mut().map(|(d, a)| (&mut **d, *a))),
            )
        } else {
            if let Some((d, a)) = dx.as_mut() {
                self.lin.input_grad(dy, d, *a);
            }
            None
        };
        let lora = match (&self.lora, tape) {
            (Some(l), Some(t)) => Some(l.backward(x, dy, t, dx.map(|(d, _)| d))),
            _ => None,
        };
        AdaptedGrads { base, lora }
    }
}

/// `x ⊙ mask`.
fn masked(x: &[f32], mask: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    out.iter_mut()
        .zip(x.iter().zip(mask))
        .for_each(|(o, (x, m))| *o = x * m);
    out
}

/// Sums of the columns of a row-major `[_, cols]` matrix.
fn col_sums(m: &[f32], cols: usize) -> Vec<f32> {
    let mut s = vec![0f32; cols];
    for row in m.chunks(cols) {
        s.iter_mut().zip(row).for_each(|(s, v)| *s += v);
    }
    s
}

/// `[b, t, h, d]` → `[b, h, t, d]` (or back: the same permutation with `t` and `h` swapped).
pub(crate) fn swap_time_heads(
    src: &[f32],
    (b, t, h, d): (usize, usize, usize, usize),
    dst: &mut [f32],
) {
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..h {
                let s = ((bi * t + ti) * h + hi) * d;
                let o = ((bi * h + hi) * t + ti) * d;
                dst[o..o + d].copy_from_slice(&src[s..s + d]);
            }
        }
    }
}

/// The rows of `table` `[_, h]` at `ids` into `out` `[ids.len(), h]`; an id outside the table is an error.
pub(crate) fn gather_rows(table: &[f32], h: usize, ids: &[u32], out: &mut [f32]) -> Result<()> {
    let vocab = table.len() / h.max(1);
    for (&id, o) in ids.iter().zip(out.chunks_mut(h)) {
        let id = id as usize;
        if id >= vocab {
            bail!("token id {id} is outside the embedding table ({vocab} rows): the tokenizer and config.json's vocab_size disagree")
        }
        o.copy_from_slice(&table[id * h..(id + 1) * h]);
    }
    Ok(())
}

/// Gradient of [`gather_rows`]: `d` `[ids.len(), h]` summed into a zero `[vocab, h]` matrix.
pub(crate) fn scatter_rows(d: &[f32], h: usize, ids: &[u32], vocab: usize) -> Vec<f32> {
    let mut g = vec![0f32; vocab * h];
    for (&id, r) in ids.iter().zip(d.chunks(h)) {
        let id = id as usize;
        g[id * h..(id + 1) * h]
            .iter_mut()
            .zip(r)
            .for_each(|(g, r)| *g += r);
    }
    g
}

impl<'a> Lin<'a> {
    /// The layer `l` with its weight data `w` (and bias data `b`), as read from [`Reads`].
    pub(crate) fn of(l: &'a crate::linear::Linear, w: &'a [f32], b: Option<&'a [f32]>) -> Self {
        Lin {
            w,
            b,
            out: l.out_features(),
            inp: l.in_features(),
            transposed: l.layout == crate::linear::WeightLayout::OutIn,
            precision: l.precision,
            packed: l.packed().map(|p| (p, Pass::Forward)),
            kept: Some((&l.packs, !l.weight.is_variable())),
        }
    }
}

/// Parameter gradients as a [`Body`] hands them over: (parameter, gradient).
pub(crate) struct Grads {
    done: Vec<(Tensor, Vec<f32>)>,
    /// Weight gradients left for [`finish_deferred`] (`Some` when the pass is one of several row chunks).
    deferred: Option<Vec<DeferredDw>>,
}

impl Grads {
    /// Gradients of one backward pass; `defer`: base weight gradients wait for [`finish_deferred`].
    pub(crate) fn new(capacity: usize, defer: bool) -> Self {
        Self {
            done: Vec::with_capacity(capacity),
            deferred: defer.then(Vec::new),
        }
    }

    /// `w`'s backward for the upstream `dy` of its forward on `x` ([`Adapted::backward`]) into these
    /// gradients; when deferring, a layer whose base alone trains here gives its input's and bias's
    /// gradients now and its weight's later.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &mut self,
        layer: &crate::linear::Linear,
        w: &Adapted,
        x: &Arc<Vec<f32>>,
        dy: &[f32],
        dx: Option<(&mut [f32], bool)>,
        base: bool,
        tape: Option<&LowRankTape>,
    ) -> Result<()> {
        match &mut self.deferred {
            Some(deferred) if base && tape.is_none() => {
                if let Some((d, a)) = dx {
                    w.lin.input_grad(dy, d, a);
                }
                deferred.push(DeferredDw {
                    weight: layer.weight.clone(),
                    shape: w.lin.shape(),
                    x: x.clone(),
                    dy: dy.to_vec(),
                });
                if let (Some(bias), Some(_)) = (&layer.bias, w.lin.b) {
                    self.put(bias, col_sums(dy, w.lin.out))?;
                }
                Ok(())
            }
            _ => self.adapted(layer, w.backward(x, dy, dx, base, tape)),
        }
    }

    pub(crate) fn put(&mut self, p: &Tensor, g: Vec<f32>) -> Result<()> {
        if g.len() != p.elem_count() {
            bail!(
                "engine: a gradient of {} elements for a parameter of shape {:?}",
                g.len(),
                p.dims()
            )
        }
        self.done.push((p.clone(), g));
        Ok(())
    }

    /// An adapted layer's gradients as [`Adapted::backward`] returns them.
    pub(crate) fn adapted(&mut self, l: &crate::linear::Linear, g: AdaptedGrads) -> Result<()> {
        if let Some(base) = g.base {
            self.linear(l, base)?;
        }
        if let Some((da, db)) = g.lora {
            let Some(lr) = l.low_rank() else {
                bail!("engine: adapter gradients for a layer without a low-rank adapter")
            };
            let (a, b, _) = lr.factors();
            self.put(a, da)?;
            self.put(b, db)?;
        }
        Ok(())
    }

    /// A linear layer's gradients as [`Lin::backward`] returns them.
    pub(crate) fn linear(
        &mut self,
        l: &crate::linear::Linear,
        (dw, db): (Vec<f32>, Option<Vec<f32>>),
    ) -> Result<()> {
        self.put(&l.weight, dw)?;
        if let (Some(bias), Some(db)) = (&l.bias, db) {
            self.put(bias, db)?;
        }
        Ok(())
    }
}

/// A linear layer's tensors in the order [`read_linear`] reads them: weight, bias, adapter A and B.
pub(crate) fn linear_tensors(l: &crate::linear::Linear) -> Vec<&Tensor> {
    let mut v = vec![&l.weight];
    v.extend(l.bias.as_ref());
    if let Some(lr) = l.low_rank() {
        let (a, b, _) = lr.factors();
        v.extend([a, b]);
    }
    v
}

/// The next tensor of `r` (read in the order the tensors were listed).
pub(crate) fn next<'a>(r: &'a Reads, at: &mut usize) -> Result<&'a [f32]> {
    *at += 1;
    r.get(*at - 1)
}

/// A linear layer (and its adapter) from the reads, starting at `at`.
pub(crate) fn read_linear<'a>(
    l: &'a crate::linear::Linear,
    r: &'a Reads,
    at: &mut usize,
) -> Result<Adapted<'a>> {
    let w_at = *at;
    let w = next(r, at)?;
    let mut lin = Lin::of(l, w, l.bias.as_ref().map(|_| next(r, at)).transpose()?);
    // This pass's conversion, else the layer's own (an inference copy's, for generation).
    if let Some(p) = r.packs {
        if let Some(w) = p.by_tensor.get(w_at).and_then(Option::as_deref) {
            lin.packed = Some((w, p.pass));
        }
    }
    let lora = match l.low_rank() {
        Some(lr) => {
            let (a, b, scale) = lr.factors();
            let rank = a.dims().first().copied().unwrap_or(0);
            if a.dims() != [rank, lin.inp] || b.dims() != [lin.out, rank] {
                bail!(
                    "engine: adapter factors A {:?} and B {:?} do not fit a linear layer of {} inputs and {} outputs (expected [r, {}] and [{}, r])",
                    a.dims(), b.dims(), lin.inp, lin.out, lin.inp, lin.out
                )
            }
            Some(LowRank {
                a: next(r, at)?,
                b: next(r, at)?,
                r: rank,
                inp: lin.inp,
                out: lin.out,
                scale: scale as f32,
            })
        }
        None => None,
    };
    Ok(Adapted { lin, lora })
}

/// Whether an adapter's parameters train.
pub(crate) fn adapter_trains(lr: &dyn crate::linear::LowRankAdapter) -> bool {
    let (a, b, _) = lr.factors();
    a.is_variable() || b.is_variable()
}

/// Starts this forward pass of `l`'s adapter ([`crate::linear::LowRankAdapter::begin_pass`]):
/// `None` for a layer without an adapter or whose adapter is off, else its dropout mask (if any).
pub(crate) fn begin_pass(l: &crate::linear::Linear) -> Option<Option<DropoutMask>> {
    l.low_rank().and_then(|lr| lr.begin_pass())
}

/// Whether `l`'s adapter runs in this pass (`pass` from [`begin_pass`]) and trains.
pub(crate) fn pass_trains(l: &crate::linear::Linear, pass: &Option<Option<DropoutMask>>) -> bool {
    pass.is_some() && l.low_rank().is_some_and(adapter_trains)
}
