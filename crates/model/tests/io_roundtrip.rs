mod common;

use candle_core::Device;
use common::*;
use rlhf_model::CausalLm;

#[test]
fn save_load_roundtrip_gives_identical_logits() {
    for (name, cfg) in all_configs() {
        let m = model(cfg, 7);
        let x = ids(2, 9, m.vocab_size(), 3);
        let before = m.forward(&x).unwrap();
        assert_eq!(before.dims(), &[2, 9, m.vocab_size()]);
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let loaded = CausalLm::load(dir.path(), &Device::Cpu).unwrap();
        let after = loaded.forward(&x).unwrap();
        assert_eq!(max_abs_diff(&before, &after).unwrap(), 0.0, "{name}");
        // A tied head is not written separately (as transformers does).
        let st = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        assert_eq!(
            st.names().contains(&"lm_head.weight"),
            !m.config().tie_word_embeddings(),
            "{name}"
        );
        assert_eq!(st.len(), m.varmap().all_vars().len(), "{name}");
    }
}
