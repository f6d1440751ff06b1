//! Simulated annotators: the feedback app's export formats, Bradley–Terry agreement with gold, and the app's
//! own flags on the biased ones.

use std::collections::BTreeSet;

use rand::SeedableRng;
use rlhf_feedback::export::Format;
use rlhf_sandbox::annotators::{
    check_flags, corrections, critiques, demonstrations, pairwise, ratings, Annotator, Bias, Panel,
};
use rlhf_sandbox::{generate, gold_reward, Mix, Prompt};

fn world() -> Vec<Prompt> {
    generate(240, &Mix::default(), 11, "a-")
}

/// Ideal vs noisy reply, in random order; identical pairs left out.
fn pairs(ps: &[Prompt]) -> Vec<(&Prompt, String, String)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    ps.iter()
        .filter_map(|p| {
            let (a, b) = (p.ideal(), p.noisy(&mut rng));
            (a != b).then(|| {
                if p.gold.id.ends_with(['1', '3', '5', '7', '9']) {
                    (p, b, a)
                } else {
                    (p, a, b)
                }
            })
        })
        .collect()
}

fn keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn write_and_load(rows: &[serde_json::Value]) -> rlhf_data::Dataset {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.jsonl");
    rlhf_sandbox::source::write_rows(&path, rows).unwrap();
    rlhf_data::load_dataset(&path).unwrap()
}

#[test]
fn pairwise_exports_the_apps_preference_format() {
    let ps = world();
    let pr = pairs(&ps);
    let s = pairwise(&Panel::default_mix(1), &pr);
    let rows = s.export(Format::Preference).unwrap();
    assert!(
        rows.len() > pr.len() * 8 / 10,
        "{} of {}",
        rows.len(),
        pr.len()
    );
    for r in &rows {
        let k = keys(r);
        for f in [
            "prompt",
            "chosen",
            "rejected",
            "margin",
            "project",
            "item_id",
            "external_id",
            "annotator_ids",
            "label_ids",
            "votes",
        ] {
            assert!(k.contains(f), "{f} missing in {r}");
        }
        assert_eq!(r["annotator_ids"].as_array().unwrap().len(), 3, "overlap 3");
    }
    let ds = write_and_load(&rows);
    assert_eq!(ds.len(), rows.len());
    assert_eq!(ds.format.to_string(), "preference");
    // Majority of 3 with 3 careful of 6 annotators: most exported choices agree with gold.
    let agree = rows
        .iter()
        .filter(|r| {
            let p = ps.iter().find(|p| p.gold.id == r["external_id"]).unwrap();
            gold_reward(&p.gold, r["chosen"].as_str().unwrap())
                >= gold_reward(&p.gold, r["rejected"].as_str().unwrap())
        })
        .count();
    assert!(
        agree as f64 > 0.75 * rows.len() as f64,
        "{agree} of {}",
        rows.len()
    );
    // Same seed, same labels.
    let again = pairwise(&Panel::default_mix(1), &pr)
        .export(Format::Preference)
        .unwrap();
    assert_eq!(rows, again);
}

#[test]
fn temperature_controls_agreement_with_gold() {
    let ps = world();
    let pr = pairs(&ps);
    let panel = |t: f64| Panel {
        annotators: vec![
            Annotator::new("a", t, Bias::None),
            Annotator::new("b", t, Bias::None),
        ],
        overlap: 1,
        gold_item_share: 0.0,
        seed: 3,
    };
    let agreement = |t: f64| {
        let p = panel(t);
        let s = pairwise(&p, &pr);
        let c = check_flags(&p, &s, &pr);
        c.iter().map(|c| c.gold_agreement.unwrap()).sum::<f64>() / 2.0
    };
    let (sharp, noisy) = (agreement(0.05), agreement(2.0));
    assert!(sharp > 0.95, "{sharp}");
    assert!(noisy < 0.75 && noisy > 0.45, "{noisy}");
}

#[test]
fn the_apps_flags_catch_position_bias_length_bias_and_carelessness() {
    // Four times the usual world: the length flag needs ≥ 20 disagreements with the others, and the long-lover
    // disagrees on few items (9, all towards the longer reply, on the 240-prompt world).
    let ps = generate(960, &Mix::default(), 11, "a-");
    let pr = pairs(&ps);
    let panel = Panel::default_mix(2);
    let s = pairwise(&panel, &pr);
    let checks = check_flags(&panel, &s, &pr);
    let by = |n: &str| checks.iter().find(|c| c.annotator == n).unwrap();
    for n in ["careful-1", "careful-2", "careful-3"] {
        assert!(by(n).flags.is_empty(), "{n}: {:?}", by(n).flags);
        assert!(by(n).gold_agreement.unwrap() > 0.9, "{n}");
    }
    assert!(
        by("lefty")
            .flags
            .iter()
            .any(|f| f.starts_with("position bias")),
        "{:?}",
        by("lefty").flags
    );
    let careless = by("careless");
    assert!(
        careless.flags.iter().any(|f| f.starts_with("too fast")),
        "{:?}",
        careless.flags
    );
    assert!((careless.gold_agreement.unwrap() - 0.5).abs() < 0.15);
    // The long-lover agrees with gold less than the careful annotators, and the app's length flag (its leaning
    // where it disagrees with the others) catches it.
    let long = by("long-lover");
    assert!(long.gold_agreement.unwrap() < by("careful-1").gold_agreement.unwrap());
    assert!(
        long.flags
            .iter()
            .any(|f| f.starts_with("prefers the longer response")),
        "{:?}",
        long.flags
    );
    assert!(
        !long
            .flags
            .iter()
            .any(|f| f.starts_with("position") || f.starts_with("too fast")),
        "{:?}",
        long.flags
    );
    // Agreement statistics come from the app's quality code.
    let stats = s.stats();
    assert_eq!(stats.agreement.len(), 1);
    let kappa = stats.agreement[0].fleiss_kappa.unwrap();
    assert!(kappa > 0.2 && kappa < 0.9, "{kappa}");
}

#[test]
fn single_response_tasks_export_their_formats() {
    let ps = world();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let responses: Vec<(&Prompt, String)> =
        ps.iter().take(60).map(|p| (p, p.noisy(&mut rng))).collect();
    let panel = Panel::default_mix(5);

    let r = ratings(&panel, &responses).export(Format::Rating).unwrap();
    assert_eq!(r.len(), 60);
    for row in &r {
        assert!(
            [
                "prompt",
                "completion",
                "score",
                "score_min",
                "score_max",
                "criteria_scores"
            ]
            .iter()
            .all(|k| row.get(k).is_some()),
            "{row}"
        );
        let s = row["score"].as_f64().unwrap();
        assert!((1.0..=5.0).contains(&s));
    }
    assert_eq!(write_and_load(&r).format.to_string(), "rating");

    let c = corrections(&panel, &responses)
        .export(Format::Correction)
        .unwrap();
    let flawed = responses
        .iter()
        .filter(|(p, x)| gold_reward(&p.gold, x) < 1.0 && *x != p.ideal())
        .count();
    assert_eq!(c.len(), flawed);
    for row in &c {
        let p = ps.iter().find(|p| p.gold.id == row["external_id"]).unwrap();
        assert_eq!(row["corrected"], p.ideal());
        assert!(row["diff"].as_str().unwrap().contains("+"));
    }
    assert_eq!(write_and_load(&c).format.to_string(), "correction");

    let k = critiques(&panel, &responses)
        .export(Format::Critique)
        .unwrap();
    assert_eq!(k.len(), 60);
    assert!(k.iter().any(|row| row["critique"]
        .as_str()
        .unwrap()
        .contains("makes up a number")));

    let refs: Vec<&Prompt> = ps.iter().take(20).collect();
    let d = demonstrations(&panel, &refs)
        .export(Format::Demonstration)
        .unwrap();
    assert_eq!(d.len(), 20);
    assert_eq!(
        keys(&d[0])
            .iter()
            .filter(|k| ["prompt", "completion"].contains(&k.as_str()))
            .count(),
        2
    );
    assert_eq!(d[0]["completion"], refs[0].ideal());
    assert_eq!(write_and_load(&d).format.to_string(), "prompt_completion");
}
