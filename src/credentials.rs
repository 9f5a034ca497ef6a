//! Client credentials: which bearer token may use which client ids.
//!
//! The contract's rule 1: with credentials on, a stream presents a token
//! (`authorization: Bearer <token>`). A missing or unknown token is refused
//! before any frame. The token names the client ids its holder may say
//! `Hello` with, so no one can replace or squat another client's id.
//!
//! # The file
//!
//! One credential a line, `TOKEN IDS`. `TOKEN` is the token itself, or
//! `sha256:<64 hex digits>` of it, so the file need not hold the secret. `IDS`
//! is a comma-separated list of what the token allows: an exact `id`, a
//! `prefix*`, `*` for any id, and `""` for the empty (anonymous) id. Blank
//! lines and `#` comments are ignored.
//!
//! ```text
//! # workers of zone eu-1, and the operator's probe
//! s3cret-eu1                      worker-eu1-*
//! sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 probe,""
//! ```
//!
//! Tokens are kept only as SHA-256 digests, compared in constant time, and
//! never logged. [`ClientCredentials`] is a cheap handle whose table can be
//! reloaded from its file while the server runs, without dropping sessions.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

use crate::error::CredentialsError;

/// What one credential allows its holder to say `Hello` as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedIds {
    /// Any client id at all.
    any: bool,
    /// The empty (anonymous) client id.
    anonymous: bool,
    /// These client ids exactly.
    exact: Vec<String>,
    /// Client ids that begin with one of these.
    prefixes: Vec<String>,
}

impl AllowedIds {
    /// Whether `client_id` is allowed.
    pub fn allows(&self, client_id: &str) -> bool {
        if client_id.is_empty() {
            return self.any || self.anonymous;
        }
        self.any
            || self.exact.iter().any(|id| id == client_id)
            || self
                .prefixes
                .iter()
                .any(|prefix| client_id.starts_with(prefix.as_str()))
    }

    /// Parses `id,prefix*,*,""`; the error says which entry is wrong.
    fn parse(ids: &str) -> Result<Self, String> {
        let mut allowed = Self::default();
        for id in ids.split(',') {
            match id {
                "" => {
                    return Err(
                        "an empty entry in the id list (write \"\" for the anonymous id)".into(),
                    )
                }
                "*" => allowed.any = true,
                "\"\"" => allowed.anonymous = true,
                _ if id.chars().any(|c| c.is_control() || c == '"') => {
                    return Err(format!("the id {id:?} has a control character or a quote"))
                }
                _ => match id.strip_suffix('*') {
                    Some(prefix) if prefix.contains('*') => {
                        return Err(format!("the id {id:?} has a '*' that is not at its end"))
                    }
                    Some(prefix) => allowed.prefixes.push(prefix.to_owned()),
                    None if id.contains('*') => {
                        return Err(format!("the id {id:?} has a '*' that is not at its end"))
                    }
                    None => allowed.exact.push(id.to_owned()),
                },
            }
        }
        Ok(allowed)
    }
}

/// What a stream's credential lets it say `Hello` as: the ids of its bearer
/// token, or the names its client certificate is valid for (under mutual
/// TLS, a certificate's DNS subject alternative names are its client ids).
#[derive(Debug, Clone)]
pub enum IdPermit {
    /// The ids a bearer token allows.
    Token(Arc<AllowedIds>),
    /// A verified client certificate (DER): the client ids it names.
    Certificate(Arc<CertificateDer<'static>>),
}

impl IdPermit {
    /// Whether `client_id` is allowed. A certificate allows the names it is
    /// valid for as a DNS name (wildcards included), written in lower case
    /// without a trailing dot, as client ids are compared exactly; never the
    /// empty id.
    pub fn allows(&self, client_id: &str) -> bool {
        match self {
            Self::Token(allowed) => allowed.allows(client_id),
            Self::Certificate(_)
                if client_id.ends_with('.')
                    || client_id.bytes().any(|b| b.is_ascii_uppercase()) =>
            {
                false
            }
            Self::Certificate(der) => {
                let Ok(name) = ServerName::try_from(client_id) else {
                    return false;
                };
                webpki::EndEntityCert::try_from(der.as_ref())
                    .and_then(|cert| cert.verify_is_valid_for_subject_name(&name))
                    .is_ok()
            }
        }
    }
}

/// One line of the file: a token's digest and what it allows.
#[derive(Clone, PartialEq, Eq)]
struct Credential {
    digest: [u8; 32],
    allowed: Arc<AllowedIds>,
}

/// The credentials of one file, as read.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CredentialTable {
    credentials: Vec<Credential>,
}

impl CredentialTable {
    /// Parses the file's text; the error names the line and what is wrong.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut credentials = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(token), Some(ids), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err((number, "write TOKEN IDS: a token, white space, then a comma-separated list of client ids".into()));
            };
            let digest = match token.strip_prefix("sha256:") {
                Some(hex) => decode_digest(hex).ok_or_else(|| {
                    (
                        number,
                        "a sha256: token needs exactly 64 hex digits".to_owned(),
                    )
                })?,
                None => Sha256::digest(token.as_bytes()).into(),
            };
            let allowed = AllowedIds::parse(ids).map_err(|problem| (number, problem))?;
            credentials.push(Credential {
                digest,
                allowed: Arc::new(allowed),
            });
        }
        Ok(Self { credentials })
    }

    /// What `token` allows, if it is one of the table's. Every credential is
    /// compared, each in constant time, so the time taken says nothing about
    /// which token, or how much of one, matched.
    pub fn check(&self, token: &[u8]) -> Option<Arc<AllowedIds>> {
        let presented: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for credential in &self.credentials {
            let difference = credential
                .digest
                .iter()
                .zip(&presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if difference == 0 && found.is_none() {
                found = Some(credential.allowed.clone());
            }
        }
        found
    }

    /// How many credentials the table holds.
    pub fn len(&self) -> usize {
        self.credentials.len()
    }

    /// Whether the table holds none.
    pub fn is_empty(&self) -> bool {
        self.credentials.is_empty()
    }
}

impl fmt::Debug for CredentialTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialTable")
            .field("credentials", &self.credentials.len())
            .finish_non_exhaustive()
    }
}

fn decode_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(text, 16).ok()?;
    }
    Some(digest)
}

/// The server's client credentials: a table that can be reloaded from its
/// file while the server runs. Cheap to clone; clones share the table.
#[derive(Clone)]
pub struct ClientCredentials {
    path: Option<PathBuf>,
    table: Arc<RwLock<Arc<CredentialTable>>>,
}

impl ClientCredentials {
    /// Reads the credentials file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, CredentialsError> {
        let table = read_table(path)?;
        Ok(Self {
            path: Some(path.to_owned()),
            table: Arc::new(RwLock::new(Arc::new(table))),
        })
    }

    /// Credentials from a table in memory (they cannot be reloaded).
    pub fn from_table(table: CredentialTable) -> Self {
        Self {
            path: None,
            table: Arc::new(RwLock::new(Arc::new(table))),
        }
    }

    /// Reads the file again and, if it is valid, uses it from now on (the
    /// sessions already open keep what they were allowed). An invalid file
    /// leaves the credentials in force unchanged. Returns how many
    /// credentials are in force.
    pub fn reload(&self) -> Result<usize, CredentialsError> {
        let Some(path) = &self.path else {
            return Ok(self.table.read().len());
        };
        let table = read_table(path)?;
        let count = table.len();
        *self.table.write() = Arc::new(table);
        Ok(count)
    }

    /// What `token` allows under the credentials in force now.
    pub fn check(&self, token: &[u8]) -> Option<Arc<AllowedIds>> {
        let table = self.table.read().clone();
        table.check(token)
    }

    /// The file the credentials come from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

fn read_table(path: &Path) -> Result<CredentialTable, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    CredentialTable::parse(&text).map_err(|(line, problem)| CredentialsError::Malformed {
        path: path.to_owned(),
        line,
        problem,
    })
}

impl PartialEq for ClientCredentials {
    fn eq(&self, other: &Self) -> bool {
        // One lock at a time: a reload waiting between two reads would deadlock.
        let mine = self.table.read().clone();
        let theirs = other.table.read().clone();
        self.path == other.path && mine == theirs
    }
}

impl Eq for ClientCredentials {}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("path", &self.path)
            .field("credentials", &self.table.read().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that tokens, hashed tokens and every kind of id entry parse and
    /// allow exactly what they say.
    #[test]
    fn tokens_allow_what_their_line_says() {
        let hashed = format!("{:x}", Sha256::digest(b"hashed"));
        let table = CredentialTable::parse(&format!(
            "# comment\n\nplain worker-1,zone-a-*\nsha256:{hashed} \"\",probe\nroot *\n"
        ))
        .expect("valid");
        assert_eq!(table.len(), 3);
        let plain = table.check(b"plain").expect("known");
        assert!(plain.allows("worker-1") && plain.allows("zone-a-7"));
        assert!(!plain.allows("worker-2") && !plain.allows("") && !plain.allows("zone-b-1"));
        let hashed = table.check(b"hashed").expect("known by its digest");
        assert!(hashed.allows("") && hashed.allows("probe") && !hashed.allows("probe2"));
        let root = table.check(b"root").expect("known");
        assert!(root.allows("anything") && root.allows(""));
        assert!(table.check(b"plai").is_none() && table.check(b"").is_none());
    }

    /// Tests that each malformed line is refused naming its number and the fix.
    #[test]
    fn malformed_lines_name_their_number() {
        for (text, line, expected) in [
            ("ok a\nlonely\n", 2, "write TOKEN IDS"),
            ("t a b\n", 1, "write TOKEN IDS"),
            ("sha256:abc a\n", 1, "64 hex digits"),
            ("t a,,b\n", 1, "an empty entry"),
            ("t a*b\n", 1, "not at its end"),
        ] {
            let (number, problem) = CredentialTable::parse(text).expect_err(text);
            assert_eq!(number, line, "{text:?}");
            assert!(problem.contains(expected), "{text:?}: {problem}");
        }
    }

    /// Tests that a reload takes a valid file and keeps the old table when
    /// the new file is broken.
    #[test]
    fn reload_keeps_the_old_table_on_error() {
        let dir = std::env::temp_dir().join(format!("hb-credentials-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("credentials");
        std::fs::write(&file, "one a\n").expect("write");
        let credentials = ClientCredentials::from_file(&file).expect("valid");
        std::fs::write(&file, "two b\n").expect("write");
        assert_eq!(credentials.reload().expect("valid"), 1);
        assert!(credentials.check(b"one").is_none() && credentials.check(b"two").is_some());
        std::fs::write(&file, "broken\n").expect("write");
        let error = credentials.reload().expect_err("broken").to_string();
        assert!(error.contains("line 1"), "{error}");
        assert!(credentials.check(b"two").is_some(), "the old table stays");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
