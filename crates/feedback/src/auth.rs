//! Password hashing (argon2id, PHC strings).

use argon2::password_hash::{
    self, rand_core::OsRng, Output, ParamsString, PasswordHash, SaltString,
};
use argon2::{Algorithm, Argon2, Block, Params, Version};

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::error::{invalid, Error, Result};

pub const MIN_PASSWORD_LEN: usize = 8;

pub fn check_password_rules(p: &str) -> Result<()> {
    if p.chars().count() < MIN_PASSWORD_LEN {
        return Err(invalid(format!(
            "password must be at least {MIN_PASSWORD_LEN} characters"
        )));
    }
    if p.len() > 1024 {
        return Err(invalid("password too long"));
    }
    Ok(())
}

/// Argon2 working memory (19 MiB with the default parameters), owned by one hashing
/// thread and reused for every hash it runs: a fresh 19 MiB allocation per hash is what
/// the allocator keeps after a login flood (it raises its mmap threshold and then holds
/// the freed blocks in its arenas).
#[derive(Default)]
pub struct Memory(Vec<Block>);

impl Memory {
    fn blocks(&mut self, params: &Params) -> &mut [Block] {
        let n = params.block_count();
        if self.0.len() < n {
            self.0.resize(n, Block::new());
        }
        &mut self.0[..n]
    }
}

/// An argon2id PHC string for a new password (outside the pool: CLI and set-up).
pub fn hash_password(p: &str) -> Result<String> {
    hash_in(&mut Memory::default(), p)
}

fn hash_in(mem: &mut Memory, p: &str) -> Result<String> {
    check_password_rules(p)?;
    fn phc(mem: &mut Memory, p: &str) -> password_hash::Result<String> {
        let params = Params::default();
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let salt = SaltString::generate(&mut OsRng);
        let mut buf = [0u8; 64];
        let salt_bytes = salt.as_salt().decode_b64(&mut buf)?;
        let hash = Output::init_with(Params::DEFAULT_OUTPUT_LEN, |out| {
            Ok(argon.hash_password_into_with_memory(
                p.as_bytes(),
                salt_bytes,
                out,
                mem.blocks(&params),
            )?)
        })?;
        Ok(PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params)?,
            salt: Some(salt.as_salt()),
            hash: Some(hash),
        }
        .to_string())
    }
    phc(mem, p).map_err(|e| Error::Other(anyhow::anyhow!("hashing password: {e}")))
}

/// Checks a password against a PHC string (any argon2 variant and parameters).
fn verify_in(mem: &mut Memory, p: &str, hash: &str) -> bool {
    fn check(mem: &mut Memory, p: &str, hash: &str) -> password_hash::Result<bool> {
        let h = PasswordHash::new(hash)?;
        let algorithm = Algorithm::try_from(h.algorithm)?;
        let version = h
            .version
            .map(Version::try_from)
            .transpose()?
            .unwrap_or_default();
        let params = Params::try_from(&h)?;
        let (Some(salt), Some(expected)) = (h.salt, h.hash) else {
            return Ok(false);
        };
        let mut buf = [0u8; 64];
        let salt = salt.decode_b64(&mut buf)?;
        let argon = Argon2::new(algorithm, version, params.clone());
        let got = Output::init_with(expected.len(), |out| {
            Ok(argon.hash_password_into_with_memory(
                p.as_bytes(),
                salt,
                out,
                mem.blocks(&params),
            )?)
        })?;
        // Output's comparison is constant-time.
        Ok(got == expected)
    }
    check(mem, p, hash).unwrap_or(false)
}

/// A real hash of a random password, computed once (on a hashing thread).
fn dummy_hash(mem: &mut Memory) -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_in(mem, &crate::store::random_token()).unwrap_or_default())
}

/// Runs the deliberately slow and memory-hungry argon2 hashes (19 MiB each) on a fixed
/// set of `workers` threads, with at most `queue` more jobs waiting; anyone past that is
/// told to come back later (HTTP 429). Unbounded, a login flood ran one hash per request
/// at once and grew the process by 19 MiB per concurrent request. Dedicated threads also
/// matter: on tokio's blocking pool the hashes wander over many threads, each with its
/// own allocator arena that keeps its 19 MiB after the flood.
pub struct HashPool {
    jobs: mpsc::Sender<Job>,
}

type Job = Box<dyn FnOnce(&mut Memory) + Send>;

impl HashPool {
    pub fn new(workers: usize, queue: usize) -> HashPool {
        // A job a worker holds has left the channel, so the channel bounds only the waiting ones.
        let (tx, rx) = mpsc::channel::<Job>(queue.max(1));
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..workers.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    let mut mem = Memory::default();
                    loop {
                        // The lock is held only while waiting for the next job, not while hashing.
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).blocking_recv();
                        match job {
                            Some(job) => job(&mut mem),
                            None => return, // the pool was dropped
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start password-hashing thread: {e}");
            }
        }
        HashPool { jobs: tx }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Memory) -> T + Send + 'static,
    ) -> Result<T> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move |mem| {
            let _ = done.send(f(mem));
        });
        self.jobs.try_send(job).map_err(|_| Error::TooMany {
            msg: "The server is busy checking passwords; try again in a few seconds.".into(),
            retry_after_s: 2,
        })?;
        result
            .await
            .map_err(|e| Error::Other(anyhow::anyhow!("password hashing thread stopped: {e}")))
    }

    /// Checks a password; `hash: None` (unknown user) still costs one real verification
    /// so timing does not reveal which usernames exist.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool> {
        self.run(move |mem| match &hash {
            Some(h) => verify_in(mem, &password, h),
            None => {
                let dummy = dummy_hash(mem);
                verify_in(mem, &password, dummy);
                false
            }
        })
        .await
    }

    pub async fn hash(&self, password: String) -> Result<String> {
        check_password_rules(&password)?;
        self.run(move |mem| hash_in(mem, &password)).await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let mut mem = Memory::default();
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_in(&mut mem, "correct horse", &h));
        assert!(!verify_in(&mut mem, "wrong horse", &h));
        assert!(!verify_in(&mut mem, "x", "not a hash"));
        assert!(hash_password("short").is_err());
        // Interchangeable with the argon2 crate's own PHC hashing and verification
        // (databases written before the pool keep working).
        let theirs = Argon2::default()
            .hash_password(b"old password", &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string();
        assert!(verify_in(&mut mem, "old password", &theirs));
        assert!(Argon2::default()
            .verify_password(b"correct horse", &PasswordHash::new(&h).unwrap())
            .is_ok());
        // Other parameters: memory grows to fit.
        let small = Argon2::new(
            Algorithm::Argon2i,
            Version::V0x10,
            Params::new(2048, 3, 1, None).unwrap(),
        );
        let h2 = small
            .hash_password(b"pw", &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string();
        assert!(verify_in(&mut mem, "pw", &h2) && !verify_in(&mut mem, "pW", &h2));
    }

    #[tokio::test]
    async fn pool_refuses_past_its_queue() {
        let pool = Arc::new(HashPool::new(1, 2));
        let h = hash_password("correct horse").unwrap();
        // Ten at once on one worker with two waiting places: at most three are checked
        // (one running, two queued; the first may already be done), the rest get 429.
        let calls: Vec<_> = (0..10)
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
        assert!(
            (2..=3).contains(&ok) && ok + busy == 10,
            "{ok} checked, {busy} refused"
        );
        // Unknown user: false, after a real verification.
        assert!(!pool.verify("correct horse".into(), None).await.unwrap());
    }
}
