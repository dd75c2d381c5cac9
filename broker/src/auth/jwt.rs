//! `--auth jwt`: a signed token is the identity.
//!
//! In: the key file (`--jwt-secret-file` for HS256/384/512, `--jwt-public-key-file` for
//! RS256/384/512, ES256/384 or EdDSA), the optional issuer and audience, and tokens. Out: the
//! token's `sub` as the user name, its `groups`, and when it expires. The algorithm a token
//! names must belong to the key's family: `alg:none` and an HS* token under a public key are
//! refused, whatever the token says.

use crate::message::check_user_name;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Seconds of clock difference allowed around `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 30;

/// Why the JWT settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    /// Neither or both key files.
    #[error("--auth jwt needs exactly one of --jwt-secret-file and --jwt-public-key-file")]
    KeyChoice,
    /// A key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A secret file with nothing in it.
    #[error("{0}: the secret is empty")]
    EmptySecret(PathBuf),
    /// A public key file that holds no RSA, EC or Ed25519 public key in PEM.
    #[error("{0}: not an RSA, EC (P-256, P-384) or Ed25519 public key in PEM")]
    NotAKey(PathBuf),
}

/// A verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `sub`: the user name.
    pub user: String,
    /// `groups`.
    pub groups: Vec<String>,
    /// `exp` plus the leeway: when the session must end.
    pub expires_at: SystemTime,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    groups: Vec<String>,
}

/// Verifies tokens against one key.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, JwtConfigError> {
    std::fs::read(path).map_err(|source| JwtConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

impl JwtVerifier {
    /// A verifier for the configured key file, issuer and audience.
    ///
    /// # Errors
    /// No key file or two, a file that cannot be read, or a key of no known kind.
    pub fn new(
        secret_file: Option<&Path>,
        public_key_file: Option<&Path>,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<JwtVerifier, JwtConfigError> {
        let (key, algorithms) = match (secret_file, public_key_file) {
            (Some(path), None) => {
                let bytes = read(path)?;
                // A secret file ends with a newline more often than not.
                let end = bytes
                    .iter()
                    .rposition(|b| !b.is_ascii_whitespace())
                    .map_or(0, |i| i + 1);
                if end == 0 {
                    return Err(JwtConfigError::EmptySecret(path.to_owned()));
                }
                let key = DecodingKey::from_secret(&bytes[..end])
                    .map_err(|_| JwtConfigError::EmptySecret(path.to_owned()))?;
                (
                    key,
                    vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
                )
            }
            (None, Some(path)) => {
                let pem = read(path)?;
                let not_a_key = || JwtConfigError::NotAKey(path.to_owned());
                let label = pem_label(&pem).ok_or_else(not_a_key)?;
                if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    (
                        key,
                        vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
                    )
                } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                    (key, vec![Algorithm::ES256, Algorithm::ES384])
                } else if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
                    (key, vec![Algorithm::EdDSA])
                } else {
                    tracing::debug!(%label, "the public key file is no key this broker reads");
                    return Err(not_a_key());
                }
            }
            _ => return Err(JwtConfigError::KeyChoice),
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.required_spec_claims = ["exp".to_owned(), "sub".to_owned()].into();
        match issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        Ok(JwtVerifier { key, validation })
    }

    /// The token's identity, if it is valid now. The reason for a refusal is for the log
    /// only: the client is told `authentication failed` whatever it was.
    ///
    /// # Errors
    /// What was wrong with the token.
    pub fn verify(&self, token: &str) -> Result<Verified, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| e.to_string())?;
        let claims = data.claims;
        check_user_name(&claims.sub).map_err(|e| format!("sub: {e}"))?;
        Ok(Verified {
            user: claims.sub,
            groups: claims.groups,
            expires_at: UNIX_EPOCH + Duration::from_secs(claims.exp.saturating_add(LEEWAY_SECONDS)),
        })
    }
}

/// The label of the first PEM block (`PUBLIC KEY`, `RSA PUBLIC KEY`, ...), if any.
fn pem_label(pem: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(pem).ok()?;
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let end = text[start..].find("-----")?;
    Some(text[start..start + end].to_owned())
}
