//! The one error every operation of the platform answers with: what kind
//! of failure it is, a short title and a detail that says how to fix it.
//! Protocols render it (the API as an RFC 9457 problem document, the
//! console as a page); the kind, not a status code, is what the
//! application layer decides. A leaf: it names no other module.

/// What kind of failure: each protocol maps it to its own answer (the
/// API's status codes are in `web::status_of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request cannot be read (not JSON, a query of the wrong type).
    Malformed,
    /// No caller, or credentials that are unknown.
    Unauthenticated,
    /// The caller is known and may not do this.
    Forbidden,
    /// No such thing, or none the caller may see.
    NotFound,
    /// It clashes with what exists (a taken name, the last admin).
    Conflict,
    /// More than the route takes.
    TooLarge,
    /// Readable, but not valid (an unknown role, a blueprint with errors).
    Invalid,
    /// Too many attempts; try again later.
    TooMany,
    /// A part the operation needs is not there now.
    Unavailable,
    /// The platform failed; not the caller's fault.
    Internal,
}

/// A failed operation: its kind, a title, and what went wrong and how to
/// fix it.
#[derive(Debug)]
pub struct AppError {
    pub kind: ErrorKind,
    pub title: &'static str,
    pub detail: String,
    /// When to try again, in seconds, where waiting helps.
    pub retry_after_s: Option<i64>,
}

impl AppError {
    pub fn new(kind: ErrorKind, title: &'static str, detail: impl Into<String>) -> AppError {
        AppError {
            kind,
            title,
            detail: detail.into(),
            retry_after_s: None,
        }
    }

    /// Tells the caller when to try again.
    pub fn retry_after(mut self, seconds: i64) -> AppError {
        self.retry_after_s = Some(seconds);
        self
    }
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.title, self.detail)
    }
}

impl std::error::Error for AppError {}

/// A store that fails is not the caller's fault (text it cannot keep is).
impl From<commons_store::StoreError> for AppError {
    fn from(e: commons_store::StoreError) -> AppError {
        match e {
            commons_store::StoreError::Refused(why) => {
                AppError::new(ErrorKind::Invalid, "Text refused", why)
            }
            e => AppError::new(ErrorKind::Internal, "Store failed", e.to_string()),
        }
    }
}

/// An engine error: bad input is the caller's to fix; anything else is the
/// platform's.
impl From<commons_engine::EngineError> for AppError {
    fn from(e: commons_engine::EngineError) -> AppError {
        if e.is_bad_input() {
            AppError::new(ErrorKind::Invalid, "Invalid request", e.to_string())
        } else {
            AppError::new(ErrorKind::Internal, "The engine failed", e.to_string())
        }
    }
}
