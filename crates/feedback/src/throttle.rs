//! Brute-force protection for logins: per-account and per-address failure counts with
//! growing delays (a temporary lockout), in memory. A burst of failures is audited once
//! (its first failure and the moment the lockout starts), not per attempt, so a guessing
//! attack cannot flood the audit log either. Times are passed in so the policy is testable.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Failures allowed without any delay.
    pub free_failures: u32,
    /// Delay after the first failure past the free ones; doubles with each further failure.
    pub base_delay_ms: i64,
    pub max_delay_ms: i64,
    /// A burst ends (and the count resets) this long after its last failure.
    pub window_ms: i64,
}

impl Policy {
    /// Per account: 5 free failures, then 1 s, 2 s, 4 s … up to 15 minutes.
    pub const ACCOUNT: Policy = Policy {
        free_failures: 5,
        base_delay_ms: 1000,
        max_delay_ms: 15 * 60 * 1000,
        window_ms: 15 * 60 * 1000,
    };
    /// Per client address: more headroom (people share addresses behind NAT).
    pub const ADDRESS: Policy = Policy {
        free_failures: 20,
        base_delay_ms: 1000,
        max_delay_ms: 15 * 60 * 1000,
        window_ms: 15 * 60 * 1000,
    };
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    failures: u32,
    last_failure: i64,
    blocked_until: i64,
    lock_audited: bool,
}

/// What a recorded failure means for the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Failure {
    /// The first failure of a burst (audit it).
    pub first_in_burst: bool,
    /// The burst just reached its first lockout (audit it, once).
    pub lockout_started: bool,
    pub failures: u32,
    pub blocked_for_ms: i64,
}

/// Entries kept at most; past that, finished bursts are dropped first.
const MAX_ENTRIES: usize = 100_000;

pub struct Throttle {
    policy: Policy,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Throttle {
    pub fn new(policy: Policy) -> Throttle {
        Throttle {
            policy,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // The map holds plain counters: a panic elsewhere cannot leave it inconsistent.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds `key` must still wait, if it is locked out now.
    pub fn blocked_for(&self, key: &str, now: i64) -> Option<i64> {
        let e = *self.lock().get(key)?;
        (e.blocked_until > now).then_some(e.blocked_until - now)
    }

    pub fn failure(&self, key: &str, now: i64) -> Failure {
        let p = self.policy;
        let mut map = self.lock();
        if map.len() >= MAX_ENTRIES && !map.contains_key(key) {
            map.retain(|_, e| now - e.last_failure <= p.window_ms || e.blocked_until > now);
        }
        let e = map.entry(key.to_string()).or_default();
        let first_in_burst = e.failures == 0 || now - e.last_failure > p.window_ms;
        if first_in_burst {
            *e = Entry::default();
        }
        e.failures += 1;
        e.last_failure = now;
        let mut out = Failure {
            first_in_burst,
            failures: e.failures,
            ..Failure::default()
        };
        if e.failures > p.free_failures {
            let doublings = (e.failures - p.free_failures - 1).min(40);
            let delay = p
                .base_delay_ms
                .saturating_mul(1i64 << doublings)
                .min(p.max_delay_ms);
            e.blocked_until = now + delay;
            out.blocked_for_ms = delay;
            out.lockout_started = !e.lock_audited;
            e.lock_audited = true;
        }
        out
    }

    pub fn success(&self, key: &str) {
        self.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_bursts_are_audited_once() {
        let t = Throttle::new(Policy {
            free_failures: 3,
            base_delay_ms: 100,
            max_delay_ms: 350,
            window_ms: 10_000,
        });
        let mut now = 1_000;
        let f: Vec<Failure> = (0..3).map(|_| t.failure("u:bob", now)).collect();
        assert!(f[0].first_in_burst && !f[1].first_in_burst && !f[2].first_in_burst);
        assert!(f
            .iter()
            .all(|x| !x.lockout_started && x.blocked_for_ms == 0));
        assert_eq!(t.blocked_for("u:bob", now), None);
        // 4th failure: locked 100 ms, audited once; then 200, then capped at 350.
        let f4 = t.failure("u:bob", now);
        assert_eq!(
            (f4.lockout_started, f4.blocked_for_ms, f4.failures),
            (true, 100, 4)
        );
        assert_eq!(t.blocked_for("u:bob", now + 40), Some(60));
        now += 100;
        assert_eq!(t.blocked_for("u:bob", now), None);
        let f5 = t.failure("u:bob", now);
        assert_eq!((f5.lockout_started, f5.blocked_for_ms), (false, 200));
        now += 200;
        assert_eq!(t.failure("u:bob", now).blocked_for_ms, 350);
        // Other keys are unaffected; success clears the account.
        assert_eq!(t.blocked_for("u:alice", now), None);
        t.success("u:bob");
        assert_eq!(t.blocked_for("u:bob", now), None);
        // After a quiet window a new burst starts (audited again).
        for _ in 0..4 {
            t.failure("a:10.0.0.1", now);
        }
        let later = t.failure("a:10.0.0.1", now + 20_000);
        assert!(later.first_in_burst && !later.lockout_started);
        assert_eq!(later.failures, 1);
    }
}
