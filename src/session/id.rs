//! Session identifiers.

use std::fmt;

/// A session's id: 1 to 128 characters of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(String);

pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("session_id must be 1 to {MAX_ID_LEN} characters of [A-Za-z0-9._-], got {0:?}")]
pub struct InvalidSessionId(pub String);

impl SessionId {
    pub fn parse(text: &str) -> Result<Self, InvalidSessionId> {
        let valid = !text.is_empty()
            && text.len() <= MAX_ID_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid {
            Ok(SessionId(text.to_owned()))
        } else {
            let shown: String = text.chars().take(MAX_ID_LEN + 8).collect();
            Err(InvalidSessionId(shown))
        }
    }

    /// A fresh random id, "s-" and 24 hex digits.
    pub fn generate() -> Self {
        let bits: u128 = rand::random();
        SessionId(format!("s-{:024x}", bits & ((1u128 << 96) - 1)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_restricted_to_a_safe_alphabet() {
        assert!(SessionId::parse("bn-layer.3_a").is_ok());
        assert!(SessionId::parse("").is_err());
        assert!(SessionId::parse("a/b").is_err());
        assert!(SessionId::parse(&"x".repeat(129)).is_err());
        assert!(SessionId::parse(SessionId::generate().as_str()).is_ok());
    }
}
