//! The continuous-batching engine: one thread owns the model and a [`Decoder`]; requests arrive on a
//! channel and join the running batch between decode steps, and every produced token goes straight
//! back to the request's sink. A request whose sink is gone (client disconnected) is cancelled.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use rlhf_generate::Generator;
use rlhf_model::{Decoder, GenRequest, StepToken};
use serde::Serialize;

/// What a request's sink receives: `(tag, token or error)`, the tag being the caller's (e.g. choice
/// index). A token with `finished` set is the request's last message.
pub type Event = (usize, Result<StepToken, String>);
pub type Sink = tokio::sync::mpsc::UnboundedSender<Event>;

struct Job {
    req: GenRequest,
    tag: usize,
    sink: Sink,
}

/// Counters for `/health` and the benchmark.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stats {
    /// Decode steps run (a step advances every running request by one token).
    pub steps: u64,
    pub tokens: u64,
    /// Requests in the running batch / waiting for a free row, right now.
    pub running: usize,
    pub waiting: usize,
    /// Most requests ever decoded in one step.
    pub peak_batch: usize,
}

/// Handle to the engine thread; dropping the last one stops it once its requests are done.
pub struct Engine {
    jobs: Sender<Vec<Job>>,
    stats: Arc<Mutex<Stats>>,
    generator: Arc<Generator>,
}

impl Engine {
    /// Starts the engine thread; at most `max_batch` requests decode together, the rest wait.
    pub fn start(generator: Arc<Generator>, max_batch: usize) -> Self {
        let (jobs, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(Stats::default()));
        let (g, s) = (generator.clone(), stats.clone());
        std::thread::Builder::new()
            .name("rlhf-engine".into())
            .spawn(move || run(&g, rx, &s, max_batch.max(1)))
            .expect("cannot spawn the engine thread");
        Self {
            jobs,
            stats,
            generator,
        }
    }

    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    /// Queues requests together, so that on an idle engine they join the batch at the same decode
    /// step (a row's floats depend on the batch it runs in, so this keeps one HTTP request's answer
    /// reproducible); request `i`'s tokens arrive on `sink` tagged `i`.
    pub fn submit(&self, reqs: &[GenRequest], sink: &Sink) -> Result<()> {
        let jobs = reqs
            .iter()
            .enumerate()
            .map(|(tag, req)| Job {
                req: req.clone(),
                tag,
                sink: sink.clone(),
            })
            .collect();
        self.jobs
            .send(jobs)
            .map_err(|_| anyhow!("the generation engine has stopped"))
    }

    pub fn stats(&self) -> Stats {
        *self.stats.lock().expect("stats lock poisoned")
    }
}

fn run(generator: &Generator, rx: Receiver<Vec<Job>>, stats: &Mutex<Stats>, max_batch: usize) {
    let decode = |ids: &[u32]| generator.tokenizer.decode(ids, true).unwrap_or_default();
    let new_decoder = || Decoder::new(&generator.model);
    let mut decoder = match new_decoder() {
        Ok(d) => d,
        Err(e) => return fail_all(rx, &e.to_string()),
    };
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut sinks: HashMap<u64, (usize, Sink)> = HashMap::new();
    let mut open = true;
    while open || !waiting.is_empty() || !decoder.is_empty() {
        // Block only when idle; otherwise take whatever arrived during the last step.
        if decoder.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(jobs) => waiting.extend(jobs),
                Err(_) => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(jobs) => waiting.extend(jobs),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        while decoder.len() < max_batch {
            let Some(job) = waiting.pop_front() else {
                break;
            };
            if job.sink.is_closed() {
                continue;
            }
            match decoder.add(job.req) {
                Ok(id) => {
                    sinks.insert(id, (job.tag, job.sink));
                }
                Err(e) => {
                    let _ = job.sink.send((job.tag, Err(e.to_string())));
                }
            }
        }
        if decoder.is_empty() {
            continue;
        }
        let rows = decoder.len();
        match decoder.step(Some(&decode)) {
            Ok(tokens) => {
                let n = tokens.len() as u64;
                for t in tokens {
                    let (id, done) = (t.id, t.finished.is_some());
                    let Some((tag, sink)) = sinks.get(&id) else {
                        continue;
                    };
                    if sink.send((*tag, Ok(t))).is_err() && !done {
                        let _ = decoder.cancel(id);
                        sinks.remove(&id);
                    } else if done {
                        sinks.remove(&id);
                    }
                }
                let mut s = stats.lock().expect("stats lock poisoned");
                s.steps += 1;
                s.tokens += n;
                s.peak_batch = s.peak_batch.max(rows);
                s.running = decoder.len();
                s.waiting = waiting.len();
            }
            Err(e) => {
                // A failed step leaves the batch in an unknown state: fail its requests, start afresh.
                tracing::error!("generation step failed: {e}");
                for (_, (tag, sink)) in sinks.drain() {
                    let _ = sink.send((tag, Err(format!("generation failed: {e}"))));
                }
                decoder = match new_decoder() {
                    Ok(d) => d,
                    Err(e) => return fail_all(rx, &e.to_string()),
                };
            }
        }
    }
}

fn fail_all(rx: Receiver<Vec<Job>>, msg: &str) {
    for job in rx.into_iter().flatten() {
        let _ = job.sink.send((job.tag, Err(msg.to_string())));
    }
}
