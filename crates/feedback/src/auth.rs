//! Password hashing (argon2id, PHC strings).

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::error::{invalid, Error, Result};

pub const MIN_PASSWORD_LEN: usize = 8;

pub fn check_password_rules(p: &str) -> Result<()> {
    if p.chars().count() < MIN_PASSWORD_LEN {
        return Err(invalid(format!("password must be at least {MIN_PASSWORD_LEN} characters")));
    }
    if p.len() > 1024 {
        return Err(invalid("password too long"));
    }
    Ok(())
}

pub fn hash_password(p: &str) -> Result<String> {
    check_password_rules(p)?;
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(p.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Other(anyhow::anyhow!("hashing password: {e}")))
}

pub fn verify_password(p: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(p.as_bytes(), &h).is_ok())
}

/// A real hash of a random password, computed once (on a hashing thread).
fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password(&crate::store::random_token()).unwrap_or_default())
}

/// Runs the deliberately slow and memory-hungry argon2 hashes (19 MiB each) with bounded
/// concurrency: at most `workers` at once, at most `queue` more waiting; anyone past that
/// is told to come back later (HTTP 429) instead of getting a thread and 19 MiB. Without
/// the bound a login flood grows the process by 19 MiB per concurrent request, and the
/// allocator keeps that memory after the flood.
pub struct HashPool {
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
}

impl HashPool {
    pub fn new(workers: usize, queue: usize) -> HashPool {
        let workers = workers.max(1);
        HashPool { admitted: Arc::new(Semaphore::new(workers + queue)), running: Arc::new(Semaphore::new(workers)) }
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let _slot = self.admitted.clone().try_acquire_owned().map_err(|_| Error::TooMany {
            msg: "The server is busy checking passwords; try again in a few seconds.".into(),
            retry_after_s: 2,
        })?;
        let _run = self.running.clone().acquire_owned().await.map_err(|e| Error::Other(e.into()))?;
        tokio::task::spawn_blocking(f).await.map_err(|e| Error::Other(e.into()))
    }

    /// Checks a password; `hash: None` (unknown user) still costs one real verification
    /// so timing does not reveal which usernames exist.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool> {
        self.run(move || {
            let ok = verify_password(&password, hash.as_deref().unwrap_or_else(|| dummy_hash()));
            ok && hash.is_some()
        })
        .await
    }

    pub async fn hash(&self, password: String) -> Result<String> {
        check_password_rules(&password)?;
        self.run(move || hash_password(&password)).await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("x", "not a hash"));
        assert!(hash_password("short").is_err());
    }

    #[tokio::test]
    async fn pool_refuses_past_its_queue() {
        let pool = Arc::new(HashPool::new(1, 1));
        let h = hash_password("correct horse").unwrap();
        // Three at once: one runs, one waits, the third is refused with 429.
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let (pool, h) = (pool.clone(), h.clone());
                tokio::spawn(async move { pool.verify("correct horse".into(), Some(h)).await })
            })
            .collect();
        let mut ok = 0;
        let mut busy = 0;
        for c in calls {
            match c.await.unwrap() {
                Ok(true) => ok += 1,
                Err(Error::TooMany { .. }) => busy += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((ok, busy), (2, 1));
        // Unknown user: false, after a real verification.
        assert!(!pool.verify("correct horse".into(), None).await.unwrap());
    }
}
