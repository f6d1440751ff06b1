use rlhf_train::metrics::{read_metrics, LogRecord, MetricsWriter};

fn rec(step: u64, loss: f64) -> LogRecord {
    LogRecord {
        step,
        epoch: step as f64 / 10.0,
        loss: Some(loss),
        ..Default::default()
    }
}

#[test]
fn lines_use_trl_names_and_omit_absent_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.jsonl");
    let mut w = MetricsWriter::open(&path, false).unwrap();
    w.write(&LogRecord {
        grad_norm: Some(1.5),
        learning_rate: Some(1e-3),
        num_tokens: Some(80),
        ..rec(1, 2.0)
    })
    .unwrap();
    w.write(&LogRecord {
        step: 1,
        epoch: 0.1,
        eval_loss: Some(2.5),
        eval_mean_token_accuracy: Some(0.5),
        ..Default::default()
    })
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        r#"{"step":1,"epoch":0.1,"loss":2.0,"grad_norm":1.5,"learning_rate":0.001,"num_tokens":80}"#
    );
    assert_eq!(
        lines[1],
        r#"{"step":1,"epoch":0.1,"eval_loss":2.5,"eval_mean_token_accuracy":0.5}"#
    );
}

#[test]
fn resumed_log_drops_later_steps_and_a_torn_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.jsonl");
    let mut w = MetricsWriter::open(&path, false).unwrap();
    for s in 1..=5 {
        w.write(&rec(s, s as f64)).unwrap();
    }
    drop(w);
    // Killed in the middle of writing step 6.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(r#"{"step":6,"ep"#);
    std::fs::write(&path, text).unwrap();

    let mut w = MetricsWriter::open_resumed(&path, 3).unwrap();
    w.write(&rec(4, 40.0)).unwrap();
    let steps: Vec<(u64, f64)> = read_metrics(&path)
        .unwrap()
        .iter()
        .map(|r| (r.step, r.loss.unwrap()))
        .collect();
    assert_eq!(steps, [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]);
}
