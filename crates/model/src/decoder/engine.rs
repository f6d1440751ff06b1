//! The decoder family's stack on the engine ([`crate::engine`]): the block forward and backward
//! written out, with the same kernels as the candle graph path in [`crate::ops`].

use super::{Decoder, Layer};
use crate::engine::{gather_rows, scatter_rows, swap_time_heads, Body, Buf, Lin, Reads};
use crate::linear::{Linear, WeightLayout};
use crate::ops::{
    attention_bwd, attention_fwd, rms_norm_bwd_rows, rms_norm_rows, rope_kernel, silu_mul_bwd_rows,
    silu_mul_rows, AttnDims,
};
use candle_core::{Result, Tensor};

/// What one block's backward needs.
pub(crate) struct BlockTape {
    /// Block input (the residual stream).
    x: Buf,
    h1: Buf,
    /// Rotated queries `[b, nh, t, d]`, keys and values `[b, nkv, t, d]`.
    q: Buf,
    k: Buf,
    v: Buf,
    /// Attention output `[b, t, nh*d]` and its row log-sum-exps.
    a: Buf,
    lse: Vec<f32>,
    /// The residual stream after attention.
    x2: Buf,
    h2: Buf,
    gate: Buf,
    up: Buf,
    act: Buf,
}

pub(crate) struct Tape {
    ids: Vec<u32>,
    b: usize,
    t: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    rows: usize,
    blocks: Vec<BlockTape>,
    /// Input of the final norm.
    last: Buf,
}

/// A linear layer's weights from the reads.
fn lin<'a>(l: &Linear, r: &'a Reads, w: usize, b: Option<usize>) -> Result<Lin<'a>> {
    Ok(Lin {
        w: r.get(w)?,
        b: b.map(|i| r.get(i)).transpose()?,
        out: l.out_features(),
        inp: l.in_features(),
        transposed: l.layout == WeightLayout::OutIn,
        precision: l.precision,
    })
}

/// One block's weights, in the order of [`Layer::tensors`].
struct BlockW<'a> {
    ln1: &'a [f32],
    q: Lin<'a>,
    k: Lin<'a>,
    v: Lin<'a>,
    o: Lin<'a>,
    ln2: &'a [f32],
    gate: Lin<'a>,
    up: Lin<'a>,
    down: Lin<'a>,
}

impl Layer {
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    /// Every parameter: ln1, then each linear's weight (and bias), then ln2 after `o`.
    fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.ln1];
        for (i, l) in self.linears().into_iter().enumerate() {
            if i == 4 {
                v.push(&self.ln2);
            }
            v.push(&l.weight);
            v.extend(l.bias.as_ref());
        }
        v
    }

    fn weights<'a>(&self, r: &'a Reads, first: usize) -> Result<BlockW<'a>> {
        // Positions in `tensors()`: ln1, q, k, v, o, ln2, gate, up, down (each linear 1 or 2 slots).
        let mut at = first;
        let mut slots = [(0, None); 7];
        let mut norms = [0; 2];
        for (i, l) in self.linears().into_iter().enumerate() {
            if i == 0 || i == 4 {
                norms[i / 4] = at;
                at += 1;
            }
            slots[i] = (at, l.bias.as_ref().map(|_| at + 1));
            at += 1 + l.bias.is_some() as usize;
        }
        let [q, k, v, o, gate, up, down] = self.linears();
        let l = |x: &Linear, i: usize| lin(x, r, slots[i].0, slots[i].1);
        Ok(BlockW {
            ln1: r.get(norms[0])?,
            q: l(q, 0)?,
            k: l(k, 1)?,
            v: l(v, 2)?,
            o: l(o, 3)?,
            ln2: r.get(norms[1])?,
            gate: l(gate, 4)?,
            up: l(up, 5)?,
            down: l(down, 6)?,
        })
    }
}

impl Decoder {
    /// Whether the engine computes this stack: no adapter inside it (LoRA runs on the candle graph)
    /// and its parameters all trainable or all frozen.
    pub(super) fn on_engine(&self) -> bool {
        let trainable = self.embed.is_variable();
        self.layers.iter().all(|l| {
            l.linears().iter().all(|x| x.adapter.is_none())
                && l.tensors().iter().all(|t| t.is_variable() == trainable)
        }) && self.norm.is_variable() == trainable
            && self.embed.device().is_cpu()
    }

    /// Every parameter of the stack in the order the passes read them.
    fn stack_tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.embed];
        for l in &self.layers {
            v.extend(l.tensors());
        }
        v.push(&self.norm);
        v
    }

    fn block_weights<'a>(&self, r: &'a Reads) -> Result<Vec<BlockW<'a>>> {
        let mut first = 1;
        let mut out = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            out.push(l.weights(r, first)?);
            first += l.tensors().len();
        }
        Ok(out)
    }
}

impl Body for Decoder {
    type Tape = Tape;

    fn embedding(&self) -> &Tensor {
        &self.embed
    }

    fn forward(
        &self,
        ids: &[u32],
        b: usize,
        t: usize,
        pos: &[u32],
        rows: usize,
        keep: bool,
    ) -> Result<(Vec<f32>, Option<Tape>)> {
        let s = &self.spec;
        let (n, h, nh, nkv, d) = (b * t, s.hidden, s.heads, s.kv_heads, s.head_dim);
        let eps = s.eps as f32;
        let scale = 1.0 / (d as f32).sqrt();
        let dm = AttnDims::of(&[b, nh, t, d], &[b, nkv, t, d], &[b, nkv, t, d])?;
        let (cos, sin) = s.rope.table_data(pos);
        let tensors = self.stack_tensors();
        let reads = Reads::new(&tensors);
        let mut x = Buf::new(n * h);
        gather_rows(reads.get(0)?, h, ids, &mut x)?;
        let mut blocks = Vec::with_capacity(if keep { self.layers.len() } else { 0 });
        for w in self.block_weights(&reads)? {
            let mut h1 = Buf::new(n * h);
            rms_norm_rows(&x, w.ln1, eps, &mut h1);
            let rope = |lin: &Lin, heads: usize| {
                let mut p = Buf::new(n * heads * d);
                lin.forward(&h1, &mut p, false);
                let mut r = Buf::new(n * heads * d);
                rope_kernel(&p, &cos, &sin, (b, t, heads, d), rows, true, &mut r);
                r
            };
            let (q, k) = (rope(&w.q, nh), rope(&w.k, nkv));
            let mut vp = Buf::new(n * nkv * d);
            w.v.forward(&h1, &mut vp, false);
            let mut v = Buf::new(n * nkv * d);
            swap_time_heads(&vp, (b, t, nkv, d), &mut v);
            let mut a = Buf::new(n * nh * d);
            let lse = attention_fwd(dm, scale, &q, &k, &v, &mut a);
            let mut x2 = Buf::new(n * h);
            x2.copy_from_slice(&x);
            w.o.forward(&a, &mut x2, true);
            let mut h2 = Buf::new(n * h);
            rms_norm_rows(&x2, w.ln2, eps, &mut h2);
            let inter = w.gate.out;
            let (mut gate, mut up, mut act) = (
                Buf::new(n * inter),
                Buf::new(n * inter),
                Buf::new(n * inter),
            );
            w.gate.forward(&h2, &mut gate, false);
            w.up.forward(&h2, &mut up, false);
            silu_mul_rows(&gate, &up, inter, &mut act);
            let mut x3 = Buf::new(n * h);
            x3.copy_from_slice(&x2);
            w.down.forward(&act, &mut x3, true);
            let input = std::mem::replace(&mut x, x3);
            if keep {
                blocks.push(BlockTape {
                    x: input,
                    h1,
                    q,
                    k,
                    v,
                    a,
                    lse,
                    x2,
                    h2,
                    gate,
                    up,
                    act,
                });
            }
        }
        let mut out = vec![0f32; n * h];
        rms_norm_rows(&x, reads.get(tensors.len() - 1)?, eps, &mut out);
        let tape = keep.then(|| Tape {
            ids: ids.to_vec(),
            b,
            t,
            cos,
            sin,
            rows,
            blocks,
            last: x,
        });
        Ok((out, tape))
    }

    fn backward(&self, tape: Tape, dy: &[f32]) -> Result<Vec<(Tensor, Tensor)>> {
        let s = &self.spec;
        let Tape {
            ids,
            b,
            t,
            cos,
            sin,
            rows,
            blocks,
            last,
        } = tape;
        let (n, h, nh, nkv, d) = (b * t, s.hidden, s.heads, s.kv_heads, s.head_dim);
        let eps = s.eps as f32;
        let scale = 1.0 / (d as f32).sqrt();
        let dm = AttnDims::of(&[b, nh, t, d], &[b, nkv, t, d], &[b, nkv, t, d])?;
        let tensors = self.stack_tensors();
        let reads = Reads::new(&tensors);
        let mut grads = Grads(Vec::with_capacity(tensors.len()));
        let mut dx = Buf::new(n * h);
        let dnorm = rms_norm_bwd_rows(
            &last,
            reads.get(tensors.len() - 1)?,
            dy,
            eps,
            &mut dx,
            false,
        );
        grads.put(&self.norm, dnorm)?;
        let weights = self.block_weights(&reads)?;
        for ((layer, w), bt) in self.layers.iter().zip(&weights).zip(blocks).rev() {
            // MLP: x3 = x2 + down(silu(gate(h2)) * up(h2)), h2 = norm2(x2).
            let inter = w.gate.out;
            let mut dact = Buf::new(n * inter);
            grads.linear(
                &layer.down,
                w.down.backward(&bt.act, &dx, Some((&mut dact, false))),
            )?;
            let (mut dgate, mut dup) = (Buf::new(n * inter), Buf::new(n * inter));
            silu_mul_bwd_rows(&bt.gate, &bt.up, &dact, inter, &mut dgate, &mut dup);
            drop(dact);
            let mut dh = Buf::new(n * h);
            grads.linear(
                &layer.gate,
                w.gate.backward(&bt.h2, &dgate, Some((&mut dh, false))),
            )?;
            grads.linear(
                &layer.up,
                w.up.backward(&bt.h2, &dup, Some((&mut dh, true))),
            )?;
            let dln2 = rms_norm_bwd_rows(&bt.x2, w.ln2, &dh, eps, &mut dx, true);
            // Attention: x2 = x + o(attn(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm1(x).
            let mut da = Buf::new(n * nh * d);
            grads.linear(&layer.o, w.o.backward(&bt.a, &dx, Some((&mut da, false))))?;
            let (dq, dk, dv) = attention_bwd(dm, scale, &bt.lse, &bt.q, &bt.k, &bt.v, &bt.a, &da);
            drop(da);
            let mut dqp = Buf::new(n * nh * d);
            rope_kernel(&dq, &cos, &sin, (b, t, nh, d), rows, false, &mut dqp);
            let mut dkp = Buf::new(n * nkv * d);
            rope_kernel(&dk, &cos, &sin, (b, t, nkv, d), rows, false, &mut dkp);
            let mut dvp = Buf::new(n * nkv * d);
            swap_time_heads(&dv, (b, nkv, t, d), &mut dvp);
            grads.linear(&layer.q, w.q.backward(&bt.h1, &dqp, Some((&mut dh, false))))?;
            grads.linear(&layer.k, w.k.backward(&bt.h1, &dkp, Some((&mut dh, true))))?;
            grads.linear(&layer.v, w.v.backward(&bt.h1, &dvp, Some((&mut dh, true))))?;
            let dln1 = rms_norm_bwd_rows(&bt.x, w.ln1, &dh, eps, &mut dx, true);
            grads.put(&layer.ln2, dln2)?;
            grads.put(&layer.ln1, dln1)?;
        }
        let dembed = scatter_rows(&dx, h, &ids, s.vocab);
        grads.put(&self.embed, dembed)?;
        Ok(grads.0)
    }
}

/// Gradients as the engine hands them over: (parameter, gradient).
struct Grads(Vec<(Tensor, Tensor)>);

impl Grads {
    fn put(&mut self, p: &Tensor, g: Vec<f32>) -> Result<()> {
        self.0
            .push((p.clone(), Tensor::from_vec(g, p.shape(), p.device())?));
        Ok(())
    }

    fn linear(&mut self, l: &Linear, (dw, db): (Vec<f32>, Option<Vec<f32>>)) -> Result<()> {
        self.put(&l.weight, dw)?;
        if let (Some(bias), Some(db)) = (&l.bias, db) {
            self.put(bias, db)?;
        }
        Ok(())
    }
}
