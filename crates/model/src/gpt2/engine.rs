//! GPT-2's stack on the engine ([`crate::engine`]): token + learned position embeddings, pre-LN
//! blocks with the fused `c_attn` and the MLP activation, the final `ln_f`; written out with the
//! same kernels as the candle graph path in [`crate::ops`].

use super::{Block, Gpt2};
use crate::engine::{
    begin_pass, gather_rows, linear_tensors, keeps_tape, read_linear, scatter_rows,
    Adapted, Attend, Body, Grads, LowRankTape, Packs, Reads,
};
use crate::linear::Linear;
use crate::lora::DropoutMask;
use crate::ops::{
    activation_bwd_rows, activation_rows, attention_bwd, layer_norm_bwd_rows,
    layer_norm_rows, AttnDims,
};
use std::sync::Arc;
use candle_core::{bail, Result, Tensor};

/// What one block's backward needs.
pub(crate) struct BlockTape {
    /// Block input (the residual stream).
    x: Vec<f32>,
    h1: Arc<Vec<f32>>,
    /// Queries, keys and values `[b, nh, t, d]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output `[b, t, nh*d]` and its row log-sum-exps.
    a: Arc<Vec<f32>>,
    lse: Vec<f32>,
    /// The residual stream after attention.
    x2: Vec<f32>,
    h2: Arc<Vec<f32>>,
    /// `c_fc`'s output and its activation.
    f: Vec<f32>,
    m: Arc<Vec<f32>>,
    /// The tapes of the adapters that ran, in the order of [`Block::linears`].
    lora: [Option<LowRankTape>; 4],
}

pub(crate) struct Tape {
    ids: Vec<u32>,
    /// The pass's attention groups (`[b, t]`), if any.
    groups: Option<Vec<u32>>,
    /// Every token's position, row-major `[b, t]`.
    pos: Vec<u32>,
    b: usize,
    t: usize,
    blocks: Vec<BlockTape>,
    /// Input of `ln_f`.
    last: Vec<f32>,
    /// Whether the base parameters train (else only adapters do).
    base: bool,
}

/// A LayerNorm's weight and bias.
type Norm<'a> = (&'a [f32], &'a [f32]);

/// One block's weights.
struct BlockW<'a> {
    ln1: Norm<'a>,
    c_attn: Adapted<'a>,
    c_proj: Adapted<'a>,
    ln2: Norm<'a>,
    c_fc: Adapted<'a>,
    mlp_proj: Adapted<'a>,
}

/// The stack's weights.
struct StackW<'a> {
    wte: &'a [f32],
    wpe: &'a [f32],
    blocks: Vec<BlockW<'a>>,
    ln_f: Norm<'a>,
}

/// Walks the reads of [`Gpt2::stack_tensors`] in order.
struct Cursor<'a> {
    reads: &'a Reads<'a>,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn next(&mut self) -> Result<&'a [f32]> {
        let data = self.reads.get(self.at)?;
        self.at += 1;
        Ok(data)
    }

    fn norm(&mut self) -> Result<Norm<'a>> {
        Ok((self.next()?, self.next()?))
    }

    fn lin(&mut self, l: &'a Linear) -> Result<Adapted<'a>> {
        read_linear(l, self.reads, &mut self.at)
    }
}

impl Block {
    fn linears(&self) -> [&Linear; 4] {
        [&self.c_attn, &self.c_proj, &self.c_fc, &self.mlp_proj]
    }

    /// Every parameter in the order [`Block::weights`] reads them.
    fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.ln1.0, &self.ln1.1];
        for (i, l) in self.linears().into_iter().enumerate() {
            if i == 2 {
                v.extend([&self.ln2.0, &self.ln2.1]);
            }
            v.extend(linear_tensors(l));
        }
        v
    }

    /// Starts this forward pass of each adapter, in the order of [`Block::linears`].
    fn begin_passes(&self) -> [Option<Option<DropoutMask>>; 4] {
        self.linears().map(begin_pass)
    }

    fn weights<'a>(&'a self, c: &mut Cursor<'a>) -> Result<BlockW<'a>> {
        // Struct fields are evaluated in the order written: the order of `tensors`.
        Ok(BlockW {
            ln1: c.norm()?,
            c_attn: c.lin(&self.c_attn)?,
            c_proj: c.lin(&self.c_proj)?,
            ln2: c.norm()?,
            c_fc: c.lin(&self.c_fc)?,
            mlp_proj: c.lin(&self.mlp_proj)?,
        })
    }
}

impl Gpt2 {
    /// Every parameter of the stack in the order the passes read them.
    fn stack_tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.wte, &self.wpe];
        for b in &self.blocks {
            v.extend(b.tensors());
        }
        v.extend([&self.ln_f.0, &self.ln_f.1]);
        v
    }

    fn stack_weights<'a>(&'a self, reads: &'a Reads<'a>) -> Result<StackW<'a>> {
        let mut c = Cursor { reads, at: 0 };
        Ok(StackW {
            wte: c.next()?,
            wpe: c.next()?,
            blocks: self
                .blocks
                .iter()
                .map(|b| b.weights(&mut c))
                .collect::<Result<_>>()?,
            ln_f: c.norm()?,
        })
    }

    /// `(b, t, heads, head_dim)` and the attention's dimensions.
    fn attn_dims(&self, b: usize, t: usize) -> Result<((usize, usize, usize, usize), AttnDims)> {
        let nh = self.cfg.n_head;
        let d = self.cfg.n_embd / nh;
        let shape = [b, nh, t, d];
        Ok(((b, t, nh, d), AttnDims::of(&shape, &shape, &shape)?))
    }
}

/// `(offset in the fused [b, t, 3, nh, d] projection, offset in the part's own [b, nh, t, d])` of
/// each `d`-long row of part `part` (0 queries, 1 keys, 2 values) of `c_attn`'s output.
fn part_rows(
    (b, t, nh, d): (usize, usize, usize, usize),
    part: usize,
) -> impl Iterator<Item = (usize, usize)> {
    (0..b).flat_map(move |bi| {
        (0..t).flat_map(move |ti| {
            (0..nh).map(move |hi| {
                (
                    (((bi * t + ti) * 3 + part) * nh + hi) * d,
                    ((bi * nh + hi) * t + ti) * d,
                )
            })
        })
    })
}

impl Body for Gpt2 {
    type Tape = Tape;

    fn embedding(&self) -> &Tensor {
        &self.wte
    }

    fn tensors(&self) -> Vec<&Tensor> {
        self.stack_tensors()
    }

    fn linears(&self) -> Vec<&Linear> {
        self.blocks.iter().flat_map(|b| b.linears()).collect()
    }

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
    ) -> Result<(Vec<f32>, Option<Tape>)> {
        if at.is_some() {
            bail!("engine: GPT-2's stack computes every token's states (it does not select rows)");
        }
        self.check_positions(pos)?;
        let (n, h) = (b * t, self.cfg.n_embd);
        let eps = self.cfg.layer_norm_epsilon as f32;
        let (dims, dm) = self.attn_dims(b, t)?;
        let d = dims.3;
        // `rows` ∈ {1, b}: one row of positions is shared by the whole batch.
        let pos: Vec<u32> = (0..n).map(|i| pos[i % (rows * t)]).collect();
        let tensors = self.stack_tensors();
        let reads = Reads::new(&tensors, packs);
        let w = self.stack_weights(&reads)?;
        let mut x = vec![0.0; n * h];
        gather_rows(w.wte, h, ids, &mut x)?;
        for (xr, &p) in x.chunks_mut(h).zip(&pos) {
            let pe = &w.wpe[p as usize * h..][..h];
            xr.iter_mut().zip(pe).for_each(|(x, p)| *x += p);
        }
        // Each adapter's pass starts here, as its forward on the graph would (one dropout draw per
        // adapter and forward).
        let passes: Vec<_> = self.blocks.iter().map(Block::begin_passes).collect();
        let base = self.wte.is_variable();
        let keep = keeps_tape(self, attend.keep(), passes.iter().flatten());
        let mut blocks = Vec::with_capacity(if keep { w.blocks.len() } else { 0 });
        for (li, (bw, [p_attn, p_proj, p_fc, p_mlp])) in w.blocks.iter().zip(passes).enumerate() {
            let mut h1 = vec![0.0; n * h];
            layer_norm_rows(&x, bw.ln1.0, bw.ln1.1, eps, &mut h1);
            let mut qkv = vec![0.0; n * 3 * h];
            let l_attn = bw.c_attn.forward(&h1, &mut qkv, false, p_attn);
            let [q, k, v] = [0, 1, 2].map(|part| {
                let mut p = vec![0.0; n * h];
                for (f, o) in part_rows(dims, part) {
                    p[o..o + d].copy_from_slice(&qkv[f..f + d]);
                }
                p
            });
            drop(qkv);
            let mut a = vec![0.0; n * h];
            let lse = attend.run(li, dm, self.attn_scale(li) as f32, &q, &k, &v, &mut a)?;
            let mut x2 = vec![0.0; n * h];
            x2.copy_from_slice(&x);
            let l_proj = bw.c_proj.forward(&a, &mut x2, true, p_proj);
            let mut h2 = vec![0.0; n * h];
            layer_norm_rows(&x2, bw.ln2.0, bw.ln2.1, eps, &mut h2);
            let inner = bw.c_fc.lin.out;
            let (mut f, mut m) = (vec![0.0; n * inner], vec![0.0; n * inner]);
            let l_fc = bw.c_fc.forward(&h2, &mut f, false, p_fc);
            activation_rows(self.act, &f, inner, &mut m);
            let mut x3 = vec![0.0; n * h];
            x3.copy_from_slice(&x2);
            let l_mlp = bw.mlp_proj.forward(&m, &mut x3, true, p_mlp);
            let input = std::mem::replace(&mut x, x3);
            if keep {
                blocks.push(BlockTape {
                    x: input,
                    h1: Arc::new(h1),
                    q,
                    k,
                    v,
                    a: Arc::new(a),
                    lse,
                    x2,
                    h2: Arc::new(h2),
                    f,
                    m: Arc::new(m),
                    lora: [l_attn, l_proj, l_fc, l_mlp],
                });
            }
        }
        let mut out = vec![0f32; n * h];
        layer_norm_rows(&x, w.ln_f.0, w.ln_f.1, eps, &mut out);
        let tape = keep.then(|| Tape {
            ids: ids.to_vec(),
            groups: attend.groups().map(<[u32]>::to_vec),
            pos,
            b,
            t,
            blocks,
            last: x,
            base,
        });
        Ok((out, tape))
    }

    fn backward(
        &self,
        tape: Tape,
        dy: &[f32],
        packs: Option<&Packs>,
        defer: bool,
    ) -> Result<Grads> {
        let Tape {
            ids,
            groups,
            pos,
            b,
            t,
            blocks,
            last,
            base,
        } = tape;
        let (n, h) = (b * t, self.cfg.n_embd);
        let eps = self.cfg.layer_norm_epsilon as f32;
        let (dims, dm) = self.attn_dims(b, t)?;
        let d = dims.3;
        let tensors = self.stack_tensors();
        let reads = Reads::new(&tensors, packs);
        let w = self.stack_weights(&reads)?;
        let mut grads = Grads::new(tensors.len(), defer);
        let mut dx = vec![0.0; n * h];
        let (dw, db) = layer_norm_bwd_rows(&last, w.ln_f.0, dy, eps, &mut dx, false);
        if base {
            grads.put(&self.ln_f.0, dw)?;
            grads.put(&self.ln_f.1, db)?;
        }
        let layers = self.blocks.iter().zip(&w.blocks).zip(blocks);
        for (li, ((blk, bw), bt)) in layers.enumerate().rev() {
            let [l_attn, l_proj, l_fc, l_mlp] = &bt.lora;
            // MLP: x3 = x2 + mlp_proj(act(c_fc(h2))), h2 = ln2(x2).
            let inner = bw.c_fc.lin.out;
            let mut dm_act = vec![0.0; n * inner];
            grads.backward(&blk.mlp_proj, &bw.mlp_proj, &bt.m, &dx, Some((&mut dm_act, false)), base, l_mlp.as_ref())?;
            let mut df = vec![0.0; n * inner];
            activation_bwd_rows(self.act, &bt.f, &dm_act, inner, &mut df);
            drop(dm_act);
            let mut dh = vec![0.0; n * h];
            grads.backward(&blk.c_fc, &bw.c_fc, &bt.h2, &df, Some((&mut dh, false)), base, l_fc.as_ref())?;
            drop(df);
            let (dln2w, dln2b) = layer_norm_bwd_rows(&bt.x2, bw.ln2.0, &dh, eps, &mut dx, true);
            // Attention: x2 = x + c_proj(attn(c_attn(h1) split into q, k, v)), h1 = ln1(x).
            let mut da = vec![0.0; n * h];
            grads.backward(&blk.c_proj, &bw.c_proj, &bt.a, &dx, Some((&mut da, false)), base, l_proj.as_ref())?;
            let scale = self.attn_scale(li) as f32;
            let (dq, dk, dv) = attention_bwd(
                dm,
                scale,
                &bt.lse,
                &bt.q,
                &bt.k,
                &bt.v,
                &bt.a,
                &da,
                groups.as_deref(),
            );
            drop(da);
            let mut dqkv = vec![0.0; n * 3 * h];
            for (part, g) in [dq, dk, dv].iter().enumerate() {
                for (f, o) in part_rows(dims, part) {
                    dqkv[f..f + d].copy_from_slice(&g[o..o + d]);
                }
            }
            grads.backward(&blk.c_attn, &bw.c_attn, &bt.h1, &dqkv, Some((&mut dh, false)), base, l_attn.as_ref())?;
            let (dln1w, dln1b) = layer_norm_bwd_rows(&bt.x, bw.ln1.0, &dh, eps, &mut dx, true);
            if base {
                grads.put(&blk.ln2.0, dln2w)?;
                grads.put(&blk.ln2.1, dln2b)?;
                grads.put(&blk.ln1.0, dln1w)?;
                grads.put(&blk.ln1.1, dln1b)?;
            }
        }
        if base {
            grads.put(&self.wpe, scatter_rows(&dx, h, &pos, self.cfg.n_positions))?;
            grads.put(&self.wte, scatter_rows(&dx, h, &ids, self.cfg.vocab_size))?;
        }
        Ok(grads)
    }
}
