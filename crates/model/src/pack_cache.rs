//! A linear layer's weight conversions, kept while the weight does not change.
//!
//! Every bf16 pass converts each weight it multiplies by into the packed layout the kernels read
//! (the forward's `Wᵀ` pairs, the input gradient's `W` pairs), reading the whole weight from
//! memory. Some conversions are made again with nothing changing the weight in between: the
//! training forward packs the same `Wᵀ` that generation's inference copy packed a moment before,
//! and a frozen model (PPO's reference, a reward model, a LoRA base) packs the same weights every
//! pass. A layer's cache keeps the conversion of a frozen weight for good, and an inference
//! copy's until the next forward of the trainable layer takes it. A trainable layer's own pass
//! keeps nothing: the optimizer changes the weight before any pass could reuse it, and keeping the
//! packs would only hold memory and push the pass's other data out of the CPU caches (measured:
//! PPO 5 % slower when every conversion was kept).
//!
//! f32 products convert nothing, but an f32 inference copy makes one conversion, the row-major
//! `[in, out]` transpose of an `[out, in]` weight (decoding multiplies by it about twice as fast
//! as by the transposed view); it is kept like a bf16 one, and the training forward that follows
//! generation multiplies by it too (a quarter faster than by the view at a GRPO batch's size).
//!
//! rlhf's optimizer calls [`weights_changed`] after each update, as do the library's other
//! in-place writes (LoRA merging, loading adapter and score-head weights); anything else that
//! writes a weight in place must call it too. As a guard, each conversion is stored with a
//! fingerprint of the weight (its address, length and a sample of its values): a mismatch
//! converts again.

use crate::bf16::PackedB;
use crate::engine::Pass;
use candle_core::{CpuStorage, Storage, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Values sampled into a fingerprint (evenly spaced, plus the last).
const SAMPLES: usize = 64;

/// Identifies one state of a weight's data (see the module comment).
#[derive(Clone, PartialEq, Eq)]
struct Fingerprint {
    addr: usize,
    len: usize,
    bits: [u32; SAMPLES + 1],
}

impl Fingerprint {
    fn of(w: &[f32]) -> Self {
        let n = w.len();
        let mut bits = [0u32; SAMPLES + 1];
        if n > 0 {
            for (i, b) in bits.iter_mut().take(SAMPLES).enumerate() {
                *b = w[i * n / SAMPLES].to_bits();
            }
            bits[SAMPLES] = w[n - 1].to_bits();
        }
        Self {
            addr: w.as_ptr() as usize,
            len: n,
            bits,
        }
    }
}

/// One layer's conversions, one per [`Pass`]; shared by the layer's clones and inference copies.
#[derive(Default)]
pub(crate) struct PackCache {
    slots: Mutex<[Option<Kept>; 2]>,
}

/// A conversion and the state of the weight it was made from.
type Kept = (Fingerprint, Arc<PackedB>);

impl std::fmt::Debug for PackCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PackCache")
    }
}

fn slot(pass: Pass) -> usize {
    match pass {
        Pass::Forward => 0,
        Pass::Backward => 1,
    }
}

impl PackCache {
    /// A cache for the layer whose weight is `weight`, found by [`weights_changed`] through any
    /// tensor sharing the weight's data (its variable, a detached copy).
    pub(crate) fn registered(weight: &Tensor) -> Arc<Self> {
        let cache = Arc::new(Self::default());
        if let Some(addr) = data_address(weight) {
            let mut reg = registry().lock().expect("pack registry poisoned");
            // Drop the entries of dropped layers now and then (models come and go across rounds).
            if reg.len() >= 64 && reg.len().is_power_of_two() {
                reg.retain(|_, cs| {
                    cs.retain(|c| c.strong_count() > 0);
                    !cs.is_empty()
                });
            }
            reg.entry(addr).or_default().push(Arc::downgrade(&cache));
        }
        cache
    }

    /// The conversion of `w` for `pass`: the kept one when `w` has not changed since, else `pack()`.
    /// `keep`: leave it kept for the next pass (a weight that does not change: frozen, or until an
    /// inference copy's conversion reaches the training forward); otherwise a kept conversion is
    /// handed over and the cache left empty, and a new one is not kept. A trainable weight changes
    /// after every backward pass, so keeping its conversions would only hold memory (and push the
    /// pass's other data out of the caches).
    pub(crate) fn get(
        &self,
        pass: Pass,
        w: &[f32],
        keep: bool,
        pack: impl FnOnce() -> PackedB,
    ) -> Arc<PackedB> {
        let print = Fingerprint::of(w);
        let mut slots = self.slots.lock().expect("pack cache poisoned");
        let s = &mut slots[slot(pass)];
        if let Some(packed) = Self::matching(s, &print, keep) {
            return packed;
        }
        let packed = Arc::new(pack());
        if keep {
            *s = Some((print, packed.clone()));
        }
        packed
    }

    /// The kept conversion of `w` for `pass` if there is one and `w` has not changed since (handed
    /// over unless `keep`, as [`PackCache::get`]); never converts. For f32 passes, whose products
    /// need no conversion: one made anyway for generation is still worth taking.
    pub(crate) fn kept(&self, pass: Pass, w: &[f32], keep: bool) -> Option<Arc<PackedB>> {
        let print = Fingerprint::of(w);
        let mut slots = self.slots.lock().expect("pack cache poisoned");
        Self::matching(&mut slots[slot(pass)], &print, keep)
    }

    fn matching(s: &mut Option<Kept>, print: &Fingerprint, keep: bool) -> Option<Arc<PackedB>> {
        match s.take() {
            Some((p, packed)) if p == *print => {
                if keep {
                    *s = Some((p, packed.clone()));
                }
                Some(packed)
            }
            _ => None,
        }
    }

    fn clear(&self) {
        *self.slots.lock().expect("pack cache poisoned") = [None, None];
    }

    /// Whether a conversion for `pass` is kept (for tests).
    #[cfg(test)]
    pub(crate) fn holds(&self, pass: Pass) -> bool {
        self.slots.lock().expect("pack cache poisoned")[slot(pass)].is_some()
    }
}

/// Layers' caches by the address of their weight's data (the address fingerprints hold too).
type Registry = HashMap<usize, Vec<Weak<PackCache>>>;

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Where `t`'s f32 CPU data starts (`None` for any other tensor: nothing converts it).
fn data_address(t: &Tensor) -> Option<usize> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => {
            Some(data.as_ptr() as usize + layout.start_offset() * std::mem::size_of::<f32>())
        }
        _ => None,
    }
}

/// Forget the bf16 conversions of every linear layer whose weight is `weight`'s data (the layer's
/// tensor, its `VarMap` variable, or any detached copy): call after writing the weight in place.
pub fn weights_changed(weight: &Tensor) {
    let Some(addr) = data_address(weight) else {
        return;
    };
    let caches: Vec<_> = registry()
        .lock()
        .expect("pack registry poisoned")
        .get(&addr)
        .map(|cs| cs.iter().filter_map(Weak::upgrade).collect())
        .unwrap_or_default();
    caches.iter().for_each(|c| c.clear());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::MatRef;
    use candle_core::{Device, Var};

    fn data(w: &Tensor) -> Vec<f32> {
        w.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn kept_conversions_last_until_the_weight_changes() {
        let var = Var::from_vec((0..24).map(|i| i as f32).collect(), (4, 6), &Device::Cpu).unwrap();
        // A frozen layer holds a detached copy: same data, another tensor.
        let frozen = var.as_detached_tensor();
        let cache = PackCache::registered(&frozen);
        let get = |keep: bool| {
            let (st, l) = frozen.storage_and_layout();
            let w = crate::engine::cpu_f32(&st, l, "test").unwrap();
            cache.get(Pass::Forward, w, keep, || {
                PackedB::new(MatRef::new(w, 4, 6, 6), false)
            })
        };
        let first = get(true);
        assert!(
            Arc::ptr_eq(&first, &get(true)),
            "a kept conversion is reused"
        );
        assert!(!cache.holds(Pass::Backward), "each pass has its own slot");

        // The optimizer's path: a write through the variable, announced.
        var.set(&Tensor::ones((4, 6), candle_core::DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        weights_changed(var.as_tensor());
        assert!(
            !cache.holds(Pass::Forward),
            "announced through the variable"
        );
        let second = get(true);
        assert!(!Arc::ptr_eq(&first, &second));

        // An unannounced write of the whole weight is caught by the fingerprint.
        var.set(&Tensor::full(2f32, (4, 6), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(data(&frozen), vec![2.0; 24]);
        let third = get(true);
        assert!(
            !Arc::ptr_eq(&second, &third),
            "a changed weight is converted again"
        );

        // Not kept (a trainable weight): a kept conversion is handed over once, a new one not kept.
        let handed = get(false);
        assert!(Arc::ptr_eq(&third, &handed));
        assert!(!cache.holds(Pass::Forward));
        let fresh = get(false);
        assert!(!Arc::ptr_eq(&handed, &fresh));
        assert!(!cache.holds(Pass::Forward));
    }

    /// Generation keeps a trainable model's body conversions for the training forward, not the LM
    /// head's (nothing takes it); the training forward takes them. At f32 too (transposed copies).
    #[test]
    fn generation_keeps_what_the_training_forward_takes() {
        for precision in [crate::Precision::Fp32, crate::Precision::Bf16] {
            generation_keeps_at(precision);
        }
    }

    fn generation_keeps_at(precision: crate::Precision) {
        let raw = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
            "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 32, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2
        });
        let cfg = crate::ModelConfig::from_json(raw, "test").unwrap();
        let mut m = crate::CausalLm::init_random(cfg, 3, &Device::Cpu).unwrap();
        m.set_precision(precision);
        let kept = |m: &mut crate::CausalLm| -> Vec<(String, bool)> {
            m.linears_mut()
                .into_iter()
                .map(|(n, l)| (n, l.packs.holds(Pass::Forward)))
                .collect()
        };
        let req = crate::generate::GenRequest {
            prompt_ids: vec![1, 2, 3],
            max_new_tokens: 2,
            ..Default::default()
        };
        crate::generate::generate(&m, &[req], None).unwrap();
        for (name, holds) in kept(&mut m) {
            assert_eq!(
                holds,
                name != "lm_head",
                "{name} after generation at {precision:?}"
            );
        }
        let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
        m.hidden_states(&ids, None).unwrap();
        for (name, holds) in kept(&mut m) {
            assert!(!holds, "{name} after the training forward at {precision:?}");
        }
    }
}
