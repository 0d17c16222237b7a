//! Session identifiers.
//!
//! A [`SessionId`] is the session's key in the registry and the store. Sessions
//! of the default tenant (`""`: every session when authentication is off) are
//! keyed by their name alone; a tenant's sessions by `tenant/name`. The slash
//! is outside the alphabet of names, so the two forms never collide and one
//! tenant's names cannot reach another tenant's keys.

use std::fmt;

/// A session's key: a name of 1 to 128 characters of `[A-Za-z0-9._-]`,
/// prefixed by `tenant/` unless the session belongs to the default tenant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(String);

pub const MAX_ID_LEN: usize = 128;
/// Longest tenant name (tenants come from the tokens file).
pub const MAX_TENANT_LEN: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("session_id must be 1 to {MAX_ID_LEN} characters of [A-Za-z0-9._-], got {0:?}")]
pub struct InvalidSessionId(pub String);

fn valid_name(text: &str, max_len: usize) -> bool {
    !text.is_empty()
        && text.len() <= max_len
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `text` can name a tenant: 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn is_valid_tenant(text: &str) -> bool {
    valid_name(text, MAX_TENANT_LEN)
}

impl SessionId {
    /// A session name as a client sends it; the session of the default tenant.
    pub fn parse(text: &str) -> Result<Self, InvalidSessionId> {
        if valid_name(text, MAX_ID_LEN) {
            Ok(SessionId(text.to_owned()))
        } else {
            let shown: String = text.chars().take(MAX_ID_LEN + 8).collect();
            Err(InvalidSessionId(shown))
        }
    }

    /// A full key, `name` or `tenant/name` (stored keys; admins' requests).
    pub fn parse_key(text: &str) -> Result<Self, InvalidSessionId> {
        match text.split_once('/') {
            None => SessionId::parse(text),
            Some((tenant, name)) if is_valid_tenant(tenant) && valid_name(name, MAX_ID_LEN) => {
                Ok(SessionId(text.to_owned()))
            }
            Some(_) => {
                let shown: String = text.chars().take(MAX_ID_LEN + MAX_TENANT_LEN + 8).collect();
                Err(InvalidSessionId(shown))
            }
        }
    }

    /// The session `name` (a default-tenant id, as [`SessionId::parse`] gives)
    /// of `tenant`.
    pub fn in_tenant(tenant: &str, name: &SessionId) -> SessionId {
        if tenant.is_empty() {
            name.clone()
        } else {
            SessionId(format!("{tenant}/{}", name.name()))
        }
    }

    /// A fresh random id in `tenant`, named "s-" and 24 hex digits.
    pub fn generate_in(tenant: &str) -> Self {
        let bits: u128 = rand::random();
        let name = SessionId(format!("s-{:024x}", bits & ((1u128 << 96) - 1)));
        SessionId::in_tenant(tenant, &name)
    }

    /// A fresh random id of the default tenant.
    pub fn generate() -> Self {
        SessionId::generate_in("")
    }

    /// The lower bound of `tenant`'s keys: every key of the tenant sorts
    /// after it, and no key of another tenant sorts between it and them.
    pub fn tenant_start(tenant: &str) -> SessionId {
        SessionId(format!("{tenant}/"))
    }

    /// The full key, as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The owning tenant ("" for the default tenant).
    pub fn tenant(&self) -> &str {
        self.0.split_once('/').map_or("", |(tenant, _)| tenant)
    }

    /// The name within the tenant, as the tenant's clients know it.
    pub fn name(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(_, name)| name)
    }

    /// Whether the session belongs to `tenant`.
    pub fn belongs_to(&self, tenant: &str) -> bool {
        self.tenant() == tenant
    }
}

/// Shows the name only: error texts are the same whichever tenant asks, so
/// they reveal nothing about the key space beyond the caller's own names.
impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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

    #[test]
    fn tenant_keys_are_prefixed_and_parse_back() {
        let name = SessionId::parse("demo").unwrap();
        let key = SessionId::in_tenant("acme", &name);
        assert_eq!(key.as_str(), "acme/demo");
        assert_eq!((key.tenant(), key.name()), ("acme", "demo"));
        assert_eq!(key.to_string(), "demo");
        assert_eq!(SessionId::parse_key("acme/demo"), Ok(key.clone()));
        assert_eq!(SessionId::in_tenant("", &name), name);
        assert_eq!(name.tenant(), "");
        assert!(SessionId::parse_key("acme/").is_err());
        assert!(SessionId::parse_key("/demo").is_err());
        assert!(SessionId::parse_key("a/b/c").is_err());
        assert!(SessionId::tenant_start("acme") < key);
        assert!(
            SessionId::parse_key("acme0/a").unwrap() > SessionId::parse_key("acme/zzz").unwrap()
        );
        assert!(SessionId::generate_in("acme").belongs_to("acme"));
    }
}
