//! Password hashing (argon2id, PHC strings).

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

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

/// A real hash of a random password, computed once.
pub fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password(&crate::store::random_token()).unwrap_or_default())
}

/// Runs the (deliberately slow) hash off the async worker threads.
pub async fn hash_password_async(p: String) -> Result<String> {
    tokio::task::spawn_blocking(move || hash_password(&p)).await.map_err(|e| Error::Other(e.into()))?
}

pub async fn verify_password_async(p: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || verify_password(&p, &hash)).await.unwrap_or(false)
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
}
