//! The decoder family's stack on the engine ([`crate::engine`]): the block forward and backward
//! written out, with the same kernels as the candle graph path in [`crate::ops`].

use super::{Decoder, Layer};
use crate::engine::{
    begin_pass, gather_rows, keeps_tape, linear_tensors, next, read_linear, scatter_rows,
    swap_time_heads, Adapted, Attend, Body, Grads, LowRankTape, Packs, Reads,
};
use crate::linear::Linear;
use crate::lora::DropoutMask;
use crate::ops::{
    attention_bwd, overwritten, rms_norm_bwd_rows, rms_norm_rows, rope_kernel, silu_mul_bwd_rows,
    silu_mul_rows, AttnDims,
};
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// What one block's backward needs.
pub(crate) struct BlockTape {
    /// Block input (the residual stream).
    x: Vec<f32>,
    h1: Arc<Vec<f32>>,
    /// Rotated queries `[b, nh, t, d]`, keys and values `[b, nkv, t, d]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output `[b, t, nh*d]` and its row log-sum-exps.
    a: Arc<Vec<f32>>,
    lse: Vec<f32>,
    /// In a last block that ran past attention on some tokens only: those tokens (ascending) and
    /// their rows of `a`; `x2` onwards then hold their rows alone.
    picked: Option<(Vec<u32>, Arc<Vec<f32>>)>,
    /// The residual stream after attention.
    x2: Vec<f32>,
    h2: Arc<Vec<f32>>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Arc<Vec<f32>>,
    /// The tapes of the adapters that ran, in the order of [`Layer::linears`].
    lora: [Option<LowRankTape>; 7],
}

pub(crate) struct Tape {
    ids: Vec<u32>,
    /// The pass's attention groups (`[b, t]`), if any.
    groups: Option<Vec<u32>>,
    b: usize,
    t: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    rows: usize,
    blocks: Vec<BlockTape>,
    /// Input of the final norm.
    last: Vec<f32>,
    /// Whether the base parameters train (else only adapters do).
    base: bool,
}

/// One block's weights.
struct BlockW<'a> {
    ln1: &'a [f32],
    ln2: &'a [f32],
    q: Adapted<'a>,
    k: Adapted<'a>,
    v: Adapted<'a>,
    o: Adapted<'a>,
    gate: Adapted<'a>,
    up: Adapted<'a>,
    down: Adapted<'a>,
}

impl Layer {
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    /// Every tensor the passes read: ln1, ln2, then each linear's ([`linear_tensors`]).
    fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.ln1, &self.ln2];
        for l in self.linears() {
            v.extend(linear_tensors(l));
        }
        v
    }

    /// The weights from the reads of [`Layer::tensors`] starting at `at`.
    fn weights<'a>(&'a self, r: &'a Reads, at: &mut usize) -> Result<BlockW<'a>> {
        let (ln1, ln2) = (next(r, at)?, next(r, at)?);
        let mut lin = |l: &'a Linear| read_linear(l, r, at);
        Ok(BlockW {
            ln1,
            ln2,
            q: lin(&self.q)?,
            k: lin(&self.k)?,
            v: lin(&self.v)?,
            o: lin(&self.o)?,
            gate: lin(&self.gate)?,
            up: lin(&self.up)?,
            down: lin(&self.down)?,
        })
    }

    /// Starts this forward pass of each adapter ([`LowRankAdapter::begin_pass`]), in the order of
    /// [`Layer::linears`]: `None` for a layer without an adapter or whose adapter is off.
    fn begin_passes(&self) -> [Option<Option<DropoutMask>>; 7] {
        self.linears().map(begin_pass)
    }
}

impl Decoder {
    /// Every tensor of the stack in the order the passes read them.
    fn stack_tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.embed];
        for l in &self.layers {
            v.extend(l.tensors());
        }
        v.push(&self.norm);
        v
    }

    fn block_weights<'a>(&'a self, r: &'a Reads) -> Result<Vec<BlockW<'a>>> {
        let mut at = 1;
        self.layers.iter().map(|l| l.weights(r, &mut at)).collect()
    }
}

impl Body for Decoder {
    type Tape = Tape;

    fn embedding(&self) -> &Tensor {
        &self.embed
    }

    fn tensors(&self) -> Vec<&Tensor> {
        self.stack_tensors()
    }

    fn linears(&self) -> Vec<&Linear> {
        self.layers.iter().flat_map(|l| l.linears()).collect()
    }

    /// Not when an adapter runs past attention in the last block: its pass draws a dropout mask
    /// over all the tokens' inputs.
    fn selects_rows(&self) -> bool {
        self.layers.last().is_some_and(|l| {
            [&l.o, &l.gate, &l.up, &l.down]
                .iter()
                .all(|x| x.adapter.is_none())
        })
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
        let s = &self.spec;
        let (n, h, nh, nkv, d) = (b * t, s.hidden, s.heads, s.kv_heads, s.head_dim);
        let eps = s.eps as f32;
        let scale = 1.0 / (d as f32).sqrt();
        let dm = AttnDims::of(&[b, nh, t, d], &[b, nkv, t, d], &[b, nkv, t, d])?;
        let (cos, sin) = s.rope.table_data(pos);
        let tensors = self.stack_tensors();
        let reads = Reads::new(&tensors, packs);
        let mut x = vec![0.0; n * h];
        gather_rows(reads.get(0)?, h, ids, &mut x)?;
        // Each adapter's pass starts here, as its forward on the graph would (one dropout draw per
        // adapter and forward; the streams are per layer, so the order does not matter).
        let passes: Vec<_> = self.layers.iter().map(Layer::begin_passes).collect();
        let base = self.embed.is_variable();
        let keep = keeps_tape(self, attend.keep(), passes.iter().flatten());
        let mut blocks = Vec::with_capacity(if keep { self.layers.len() } else { 0 });
        for (li, (w, [pq, pk, pv, po, pgate, pup, pdown])) in
            self.block_weights(&reads)?.iter().zip(passes).enumerate()
        {
            let mut h1 = overwritten(n * h);
            rms_norm_rows(&x, w.ln1, eps, &mut h1);
            let rope = |lin: &Adapted, heads: usize, pass| {
                let mut p = overwritten(n * heads * d);
                let tape = lin.forward(&h1, &mut p, false, pass);
                let mut r = overwritten(n * heads * d);
                rope_kernel(&p, &cos, &sin, (b, t, heads, d), rows, true, &mut r);
                (r, tape)
            };
            let ((q, lq), (k, lk)) = (rope(&w.q, nh, pq), rope(&w.k, nkv, pk));
            let mut vp = overwritten(n * nkv * d);
            let lv = w.v.forward(&h1, &mut vp, false, pv);
            let mut v = overwritten(n * nkv * d);
            swap_time_heads(&vp, (b, t, nkv, d), &mut v);
            let mut a = overwritten(n * nh * d);
            let lse = attend.run(li, dm, scale, &q, &k, &v, &mut a)?;
            // Past attention, the last block runs on the picked tokens alone.
            let picked = match at.filter(|_| li + 1 == self.layers.len()) {
                Some(at) => {
                    let mut ap = overwritten(at.len() * nh * d);
                    gather_rows(&a, nh * d, at, &mut ap)?;
                    Some((at.to_vec(), Arc::new(ap)))
                }
                None => None,
            };
            let mut x2 = match &picked {
                Some((at, _)) => {
                    let mut xp = overwritten(at.len() * h);
                    gather_rows(&x, h, at, &mut xp)?;
                    xp
                }
                None => x.clone(),
            };
            let n = x2.len() / h;
            let lo =
                w.o.forward(picked.as_ref().map_or(&a, |p| &p.1), &mut x2, true, po);
            let mut h2 = overwritten(n * h);
            rms_norm_rows(&x2, w.ln2, eps, &mut h2);
            let inter = w.gate.lin.out;
            let (mut gate, mut up, mut act) = (
                overwritten(n * inter),
                overwritten(n * inter),
                overwritten(n * inter),
            );
            let lgate = w.gate.forward(&h2, &mut gate, false, pgate);
            let lup = w.up.forward(&h2, &mut up, false, pup);
            silu_mul_rows(&gate, &up, inter, &mut act);
            let mut x3 = x2.clone();
            let ldown = w.down.forward(&act, &mut x3, true, pdown);
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
                    picked,
                    x2,
                    h2: Arc::new(h2),
                    gate,
                    up,
                    act: Arc::new(act),
                    lora: [lq, lk, lv, lo, lgate, lup, ldown],
                });
            }
        }
        let mut out = overwritten(x.len());
        rms_norm_rows(&x, reads.get(tensors.len() - 1)?, eps, &mut out);
        let tape = keep.then(|| Tape {
            ids: ids.to_vec(),
            groups: attend.groups().map(<[u32]>::to_vec),
            b,
            t,
            cos,
            sin,
            rows,
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
        let s = &self.spec;
        let Tape {
            ids,
            groups,
            b,
            t,
            cos,
            sin,
            rows,
            blocks,
            last,
            base,
        } = tape;
        let (n, h, nh, nkv, d) = (b * t, s.hidden, s.heads, s.kv_heads, s.head_dim);
        let eps = s.eps as f32;
        let scale = 1.0 / (d as f32).sqrt();
        let dm = AttnDims::of(&[b, nh, t, d], &[b, nkv, t, d], &[b, nkv, t, d])?;
        let tensors = self.stack_tensors();
        let reads = Reads::new(&tensors, packs);
        let mut grads = Grads::new(tensors.len(), defer);
        let mut dx = overwritten(last.len());
        let dnorm = rms_norm_bwd_rows(
            &last,
            reads.get(tensors.len() - 1)?,
            dy,
            eps,
            &mut dx,
            false,
        );
        if base {
            grads.put(&self.norm, dnorm)?;
        }
        let weights = self.block_weights(&reads)?;
        for ((layer, w), bt) in self.layers.iter().zip(&weights).zip(blocks).rev() {
            let [lq, lk, lv, lo, lgate, lup, ldown] = &bt.lora;
            // MLP: x3 = x2 + down(silu(gate(h2)) * up(h2)), h2 = norm2(x2), on `m` tokens (all
            // but in a last block that picked some).
            let m = bt.x2.len() / h;
            let inter = w.gate.lin.out;
            let mut dact = overwritten(m * inter);
            grads.backward(
                &layer.down,
                &w.down,
                &bt.act,
                &dx,
                Some((&mut dact, false)),
                base,
                ldown.as_ref(),
            )?;
            let (mut dgate, mut dup) = (overwritten(m * inter), overwritten(m * inter));
            silu_mul_bwd_rows(&bt.gate, &bt.up, &dact, inter, &mut dgate, &mut dup);
            drop(dact);
            let mut dh = overwritten(m * h);
            grads.backward(
                &layer.gate,
                &w.gate,
                &bt.h2,
                &dgate,
                Some((&mut dh, false)),
                base,
                lgate.as_ref(),
            )?;
            grads.backward(
                &layer.up,
                &w.up,
                &bt.h2,
                &dup,
                Some((&mut dh, true)),
                base,
                lup.as_ref(),
            )?;
            let dln2 = rms_norm_bwd_rows(&bt.x2, w.ln2, &dh, eps, &mut dx, true);
            // Attention: x2 = x + o(attn(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm1(x).
            let mut da = overwritten(m * nh * d);
            grads.backward(
                &layer.o,
                &w.o,
                bt.picked.as_ref().map_or(&bt.a, |p| &p.1),
                &dx,
                Some((&mut da, false)),
                base,
                lo.as_ref(),
            )?;
            // The tokens that were not picked get no gradient past attention.
            if let Some((at, _)) = &bt.picked {
                da = scatter_rows(&da, nh * d, at, n);
                dx = scatter_rows(&dx, h, at, n);
                dh = overwritten(n * h);
            }
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
            let mut dqp = overwritten(n * nh * d);
            rope_kernel(&dq, &cos, &sin, (b, t, nh, d), rows, false, &mut dqp);
            let mut dkp = overwritten(n * nkv * d);
            rope_kernel(&dk, &cos, &sin, (b, t, nkv, d), rows, false, &mut dkp);
            let mut dvp = overwritten(n * nkv * d);
            swap_time_heads(&dv, (b, nkv, t, d), &mut dvp);
            grads.backward(
                &layer.q,
                &w.q,
                &bt.h1,
                &dqp,
                Some((&mut dh, false)),
                base,
                lq.as_ref(),
            )?;
            grads.backward(
                &layer.k,
                &w.k,
                &bt.h1,
                &dkp,
                Some((&mut dh, true)),
                base,
                lk.as_ref(),
            )?;
            grads.backward(
                &layer.v,
                &w.v,
                &bt.h1,
                &dvp,
                Some((&mut dh, true)),
                base,
                lv.as_ref(),
            )?;
            let dln1 = rms_norm_bwd_rows(&bt.x, w.ln1, &dh, eps, &mut dx, true);
            if base {
                grads.put(&layer.ln2, dln2)?;
                grads.put(&layer.ln1, dln1)?;
            }
        }
        if base {
            grads.put(&self.embed, scatter_rows(&dx, h, &ids, s.vocab))?;
        }
        Ok(grads)
    }
}
