//! Bearer-token authentication: the tokens file, parsed into a [`TokenTable`]
//! that maps a token to a [`Principal`] (tenant and role), and [`Tokens`], the
//! table currently in force, replaced as a whole on reload.
//!
//! Tokens file, one entry per line (`#` starts a comment, blank lines are
//! ignored):
//!
//! ```text
//! <credential> <tenant> <role>
//! ```
//!
//! `credential` is `sha256:<64 hex digits>` (the SHA-256 of the token:
//! `printf %s "$TOKEN" | sha256sum`) or the token itself; `tenant` is 1 to 64
//! characters of `[A-Za-z0-9._-]`; `role` is `user` or `admin`.
//!
//! Presented tokens are hashed and compared with every entry's hash in
//! constant time. Tokens are never logged or echoed, and parse errors name the
//! line, never its credential. Knows nothing about gRPC.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::session::is_valid_tenant;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sees and changes its own tenant's sessions only.
    User,
    /// Sees and changes every tenant's sessions, naming them by their keys
    /// (`tenant/name`; a bare `name` is a session of the default tenant).
    Admin,
}

/// Who is calling: the tenant and role of the caller's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: String,
    pub role: Role,
}

impl Principal {
    /// The caller when authentication is off: a user of the default tenant
    /// `""`, which owns every session created without authentication.
    pub fn anonymous() -> Principal {
        Principal {
            tenant: String::new(),
            role: Role::User,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// The tokens file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("tokens file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("tokens file {path}, line {line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

type TokenDigest = [u8; 32];

fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

struct Entry {
    digest: TokenDigest,
    principal: Principal,
}

/// The tokens of one version of the tokens file.
pub struct TokenTable {
    entries: Vec<Entry>,
}

impl TokenTable {
    /// Parses the text of a tokens file; errors name the line, not the token.
    pub fn parse(text: &str) -> Result<TokenTable, (usize, String)> {
        let mut entries: Vec<(usize, Entry)> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [credential, tenant, role] = fields[..] else {
                return Err((
                    number,
                    format!(
                        "expected `<credential> <tenant> <role>`, got {} fields",
                        fields.len()
                    ),
                ));
            };
            let digest = credential_digest(credential).map_err(|m| (number, m))?;
            if !is_valid_tenant(tenant) {
                return Err((
                    number,
                    format!("tenant must be 1 to 64 characters of [A-Za-z0-9._-], got {tenant:?}"),
                ));
            }
            let role = match role {
                "user" => Role::User,
                "admin" => Role::Admin,
                other => {
                    return Err((
                        number,
                        format!("role must be `user` or `admin`, got {other:?}"),
                    ))
                }
            };
            if let Some((first, _)) = entries
                .iter()
                .find(|(_, e)| bool::from(e.digest.ct_eq(&digest)))
            {
                return Err((number, format!("the same token as line {first}")));
            }
            let principal = Principal {
                tenant: tenant.to_owned(),
                role,
            };
            entries.push((number, Entry { digest, principal }));
        }
        Ok(TokenTable {
            entries: entries.into_iter().map(|(_, e)| e).collect(),
        })
    }

    /// Reads and parses the tokens file at `path`.
    pub fn load(path: &Path) -> Result<TokenTable, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|error| TokensError::Read {
            path: path.to_owned(),
            error,
        })?;
        TokenTable::parse(&text).map_err(|(line, message)| TokensError::Invalid {
            path: path.to_owned(),
            line,
            message,
        })
    }

    /// The principal of `token`, comparing its hash with every entry in
    /// constant time (the time depends on the number of entries only).
    pub fn authenticate(&self, token: &str) -> Option<&Principal> {
        self.principal_of(&digest(token))
    }

    fn principal_of(&self, presented: &TokenDigest) -> Option<&Principal> {
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.digest.ct_eq(presented)) {
                found = Some(&entry.principal);
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `sha256:<hex>` decoded, or the hash of a plain token.
fn credential_digest(credential: &str) -> Result<TokenDigest, String> {
    let Some(hex) = credential.strip_prefix("sha256:") else {
        return Ok(digest(credential));
    };
    let bad = || "a sha256: credential needs exactly 64 hexadecimal digits".to_owned();
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let text = std::str::from_utf8(pair).map_err(|_| bad())?;
        *byte = u8::from_str_radix(text, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// The tokens in force, read from a file and replaced as a whole by
/// [`Tokens::reload`]: a request sees either the old table or the new one.
pub struct Tokens {
    path: PathBuf,
    table: RwLock<Arc<TokenTable>>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        Ok(Tokens {
            path: path.to_owned(),
            table: RwLock::new(Arc::new(TokenTable::load(path)?)),
        })
    }

    /// Reads the file again; on error the previous tokens stay in force.
    /// Returns the number of tokens now in force.
    pub fn reload(&self) -> Result<usize, TokensError> {
        let table = Arc::new(TokenTable::load(&self.path)?);
        let count = table.len();
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = table;
        Ok(count)
    }

    fn current(&self) -> Arc<TokenTable> {
        // A poisoned lock only means a panic elsewhere; the Arc is always whole.
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        self.current().authenticate(token).cloned()
    }

    /// The credential of `token` for a call that outlives one message (a
    /// stream): it can be checked again against the tokens in force later.
    pub fn credential(self: &Arc<Self>, token: &str) -> Option<Credential> {
        let presented = digest(token);
        let principal = self.current().principal_of(&presented).cloned()?;
        Some(Credential {
            digest: presented,
            principal,
            tokens: self.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.current().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A token as a caller presented it (its hash, never the token itself), and
/// who it named then. A stream keeps it to check each message against the
/// tokens in force, so that a revocation (a reload without the token, or with
/// it for another tenant or role) also ends the calls already open.
#[derive(Clone)]
pub struct Credential {
    digest: TokenDigest,
    principal: Principal,
    tokens: Arc<Tokens>,
}

impl Credential {
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// Whether the tokens in force still name the same principal.
    pub fn is_still_valid(&self) -> bool {
        self.tokens.current().principal_of(&self.digest) == Some(&self.principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_and_plain_credentials_authenticate() {
        let text = "# comment\n\nplain-token acme user   # trailing\nsha256:ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789 ops admin\n";
        let table = TokenTable::parse(text).unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(
            table.authenticate("plain-token"),
            Some(&Principal {
                tenant: "acme".into(),
                role: Role::User
            })
        );
        assert_eq!(table.authenticate("plain-toke"), None);
        assert_eq!(table.authenticate(""), None);
    }

    #[test]
    fn a_hashed_entry_matches_its_token_only() {
        // The digest of "abc" is FIPS 180-2's test vector.
        let text =
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad t user\n";
        let table = TokenTable::parse(text).unwrap();
        assert_eq!(
            table.authenticate("abc").map(|p| p.tenant.as_str()),
            Some("t")
        );
        assert_eq!(table.authenticate("abd"), None);
    }

    #[test]
    fn bad_lines_name_the_line_and_never_the_token() {
        let cases = [
            ("secret-one acme\n", 1, "got 2 fields"),
            ("ok acme user\nsecret-two acme root\n", 2, "role must be"),
            ("secret-three bad/tenant user\n", 1, "tenant must be"),
            ("sha256:abc acme user\n", 1, "64 hexadecimal digits"),
            (
                "secret-four a user\nsecret-four b admin\n",
                2,
                "the same token as line 1",
            ),
        ];
        for (text, line, expected) in cases {
            let (got_line, message) = TokenTable::parse(text).err().unwrap();
            assert_eq!(got_line, line, "{text:?}");
            assert!(message.contains(expected), "{message}");
            assert!(!message.contains("secret"), "{message}");
        }
    }
}
