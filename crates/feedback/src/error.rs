use thiserror::Error;

/// Errors that the web layer maps to HTTP statuses; anything else is a 500.
#[derive(Debug, Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("conflict: {0}")]
    Conflict(String),
    /// A request body over its limit (HTTP 413); the message says the limit.
    #[error("{0}")]
    TooLarge(String),
    /// Refused for now (HTTP 429): the password-hash queue is full or a login is throttled.
    #[error("{msg}")]
    TooMany { msg: String, retry_after_s: u64 },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Other(e.into())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Other(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}
