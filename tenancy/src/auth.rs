//! Authentication and permissions.
//!
//! Every protocol hands what its client presented (a user name, a password
//! or token) to one [`AuthProvider`], which names the role the credentials
//! prove. Tokens are Pulsar's: JWTs whose `sub` claim is the role, signed
//! with a shared secret (HS256/384/512) or a key pair (RS*/ES*/EdDSA), so
//! that tokens made by `pulsar tokens create` work here unchanged. What a
//! role may do in a namespace is [`permits`]: superusers and the tenant's
//! admin roles do everything, other roles what the namespace grants them.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TenancyError};
use crate::policies::{AuthAction, Policies, TenantInfo};

/// What a client presented. Protocols fill what they have: MQTT and AMQP a
/// user name and password, Kafka the SASL/PLAIN pair, WebSocket a token.
#[derive(Clone, Copy, Default)]
pub struct Credentials<'a> {
    pub user: Option<&'a str>,
    /// The password or token, as sent.
    pub secret: Option<&'a [u8]>,
    /// The CN of a client certificate the TLS listener verified against
    /// its CA: the role of a client that presents no secret.
    pub certificate: Option<&'a str>,
}

impl fmt::Debug for Credentials<'_> {
    // Secrets stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("secret", &self.secret.map(|_| "<redacted>"))
            .field("certificate", &self.certificate)
            .finish()
    }
}

/// Checks credentials. Implementations must be cheap enough to run once per
/// connection on the accepting task.
pub trait AuthProvider: Send + Sync + 'static {
    /// The role the credentials prove, or [`TenancyError::Unauthenticated`].
    fn authenticate(&self, creds: &Credentials<'_>) -> Result<String> {
        self.authenticate_until(creds).map(|(role, _)| role)
    }

    /// The role, and when the credentials stop proving it (seconds since
    /// the Unix epoch; None: never), so that a connection that outlives
    /// them can be closed.
    fn authenticate_until(&self, creds: &Credentials<'_>) -> Result<(String, Option<u64>)>;
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
}

type KeyParser = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;

/// Pulsar-compatible token authentication.
pub struct TokenAuth {
    key: DecodingKey,
    validation: Validation,
}

impl TokenAuth {
    /// Verifies tokens signed with this HMAC secret (raw bytes, as
    /// `pulsar tokens create-secret-key` writes them).
    pub fn with_secret(secret: &[u8]) -> Result<Self> {
        if secret.is_empty() {
            return Err(TenancyError::InvalidKey("the secret key is empty".into()));
        }
        Ok(Self::new(
            DecodingKey::from_secret(secret),
            AlgorithmFamily::Hmac,
        ))
    }

    /// Verifies tokens signed by the private half of this PEM public key
    /// (RSA, EC or Ed25519).
    pub fn with_public_key_pem(pem: &[u8]) -> Result<Self> {
        let attempts: [(KeyParser, _); 3] = [
            (DecodingKey::from_rsa_pem, AlgorithmFamily::Rsa),
            (DecodingKey::from_ec_pem, AlgorithmFamily::Ec),
            (DecodingKey::from_ed_pem, AlgorithmFamily::Ed),
        ];
        for (parse, family) in attempts {
            if let Ok(key) = parse(pem) {
                return Ok(Self::new(key, family));
            }
        }
        Err(TenancyError::InvalidKey(
            "not a PEM RSA, EC or Ed25519 public key".into(),
        ))
    }

    fn new(key: DecodingKey, family: AlgorithmFamily) -> Self {
        let mut validation = Validation::new_for_family(family);
        // Pulsar's tokens need not expire, nor name an audience.
        validation.set_required_spec_claims::<&str>(&[]);
        validation.validate_aud = false;
        // A token that is not valid yet is refused, as one that expired.
        validation.validate_nbf = true;
        validation.leeway = 0;
        TokenAuth { key, validation }
    }
}

impl AuthProvider for TokenAuth {
    fn authenticate_until(&self, creds: &Credentials<'_>) -> Result<(String, Option<u64>)> {
        let Some(secret) = creds.secret.filter(|s| !s.is_empty()) else {
            return Err(TenancyError::Unauthenticated("no token presented".into()));
        };
        let token = std::str::from_utf8(secret)
            .map_err(|_| TenancyError::Unauthenticated("the token is not UTF-8".into()))?
            .trim();
        // KoP's SASL convention puts `token:` before the JWT.
        let token = token.strip_prefix("token:").unwrap_or(token);
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| TenancyError::Unauthenticated(format!("invalid token: {e}")))?;
        if data.claims.sub.is_empty() {
            return Err(TenancyError::Unauthenticated(
                "the token names no role (sub)".into(),
            ));
        }
        Ok((data.claims.sub, data.claims.exp))
    }
}

/// Reads a key given as Pulsar writes it in its config: `file:///path`,
/// `data:;base64,…`, or a plain path.
pub fn read_key(spec: &str) -> Result<Vec<u8>> {
    if let Some(b64) = spec
        .strip_prefix("data:;base64,")
        .or_else(|| spec.strip_prefix("data:base64,"))
    {
        return base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| TenancyError::InvalidKey(format!("bad base64 key: {e}")));
    }
    let path = spec.strip_prefix("file://").unwrap_or(spec);
    std::fs::read(path).map_err(|e| TenancyError::InvalidKey(format!("cannot read {path}: {e}")))
}

/// A random HS256 secret of Pulsar's size (32 bytes).
pub fn create_secret_key() -> Vec<u8> {
    use rand::RngCore;
    let mut key = vec![0u8; 32];
    rand::rng().fill_bytes(&mut key);
    key
}

/// Signs a token for `role` with an HMAC secret (HS256), or with a PEM
/// private key (RS256, ES256 or EdDSA), expiring after `expiry` if given.
pub fn create_token(
    key: &[u8],
    private_pem: bool,
    role: &str,
    expiry: Option<Duration>,
) -> Result<String> {
    let (alg, key) = if private_pem {
        if let Ok(k) = EncodingKey::from_rsa_pem(key) {
            (Algorithm::RS256, k)
        } else if let Ok(k) = EncodingKey::from_ec_pem(key) {
            (Algorithm::ES256, k)
        } else if let Ok(k) = EncodingKey::from_ed_pem(key) {
            (Algorithm::EdDSA, k)
        } else {
            return Err(TenancyError::InvalidKey(
                "not a PEM RSA, EC or Ed25519 private key".into(),
            ));
        }
    } else {
        (Algorithm::HS256, EncodingKey::from_secret(key))
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let claims = Claims {
        sub: role.to_string(),
        exp: expiry.map(|e| (now + e).as_secs()),
    };
    jsonwebtoken::encode(&Header::new(alg), &claims, &key)
        .map_err(|e| TenancyError::InvalidKey(format!("cannot sign: {e}")))
}

/// What `role` may do in a namespace of `tenant` with `policies`.
pub fn permits(
    role: &str,
    superusers: &BTreeSet<String>,
    tenant: &TenantInfo,
    policies: &Policies,
    action: AuthAction,
) -> bool {
    if superusers.contains(role) || tenant.admin_roles.contains(role) {
        return true;
    }
    policies
        .auth_policies
        .namespace_auth
        .get(role)
        .is_some_and(|actions| actions.contains(&action))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(secret: &str) -> Credentials<'_> {
        Credentials {
            secret: Some(secret.as_bytes()),
            ..Credentials::default()
        }
    }

    #[test]
    fn secret_key_tokens_round_trip() {
        let key = create_secret_key();
        let auth = TokenAuth::with_secret(&key).expect("test");
        let t = create_token(&key, false, "device-1", None).expect("test");
        assert_eq!(auth.authenticate(&creds(&t)).expect("test"), "device-1");
        // KoP's SASL form.
        let kop = format!("token:{t}");
        assert_eq!(auth.authenticate(&creds(&kop)).expect("test"), "device-1");
        let t = create_token(&key, false, "x", Some(Duration::from_secs(3600))).expect("test");
        assert_eq!(auth.authenticate(&creds(&t)).expect("test"), "x");
        // The expiry comes back, so that connections can close at it.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("test")
            .as_secs();
        let (role, exp) = auth.authenticate_until(&creds(&t)).expect("test");
        assert_eq!(role, "x");
        assert!(
            exp.is_some_and(|e| (now + 3590..=now + 3600).contains(&e)),
            "{exp:?}"
        );
        let t = create_token(&key, false, "y", None).expect("test");
        assert_eq!(
            auth.authenticate_until(&creds(&t)).expect("test"),
            ("y".into(), None)
        );
    }

    #[test]
    fn tokens_not_valid_yet_are_unauthenticated() {
        let key = create_secret_key();
        let auth = TokenAuth::with_secret(&key).expect("test");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("test")
            .as_secs();
        let claims = serde_json::json!({"sub": "r", "nbf": now + 3600});
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&key),
        )
        .expect("test");
        assert!(matches!(
            auth.authenticate(&creds(&t)),
            Err(TenancyError::Unauthenticated(_))
        ));
    }

    #[test]
    fn bad_tokens_are_unauthenticated() {
        let key = create_secret_key();
        let auth = TokenAuth::with_secret(&key).expect("test");
        let other = create_token(&create_secret_key(), false, "r", None).expect("test");
        let claims = Claims {
            sub: "r".into(),
            exp: Some(1),
        };
        let past = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&key),
        )
        .expect("test");
        for bad in [other.as_str(), past.as_str(), "", "not-a-jwt", "a.b.c"] {
            let r = auth.authenticate(&creds(bad));
            assert!(
                matches!(r, Err(TenancyError::Unauthenticated(_))),
                "{bad}: {r:?}"
            );
        }
        let none = Credentials::default();
        assert!(auth.authenticate(&none).is_err());
        let not_utf8 = Credentials {
            secret: Some(&[0xff, 0xfe]),
            ..Credentials::default()
        };
        assert!(auth.authenticate(&not_utf8).is_err());
    }

    // Test-only key pairs.
    const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIBgV5c24mfE0JWuct0I7vexrtFrokOeAMAB2u4K1YRt8
-----END PRIVATE KEY-----
";
    const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAOffptqooeKp5IMupVdCHY8f/lxgn7RZzPlhhDUo+yKQ=
-----END PUBLIC KEY-----
";
    const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgLO0J7JASrPxLs2b/
yPA9JTxqbs2zYAcx5/JyC9yRQAWhRANCAARpUVLcEh/D1Mh8MHEJ/jzWt5fdxnVt
6DDGpFQduwplURMu90/Kz+3bpe+A/L3YcFtdUdik6Pk9FGWXpv9GjgzC
-----END PRIVATE KEY-----
";
    const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEaVFS3BIfw9TIfDBxCf481reX3cZ1
begwxqRUHbsKZVETLvdPys/t26XvgPy92HBbXVHYpOj5PRRll6b/Ro4Mwg==
-----END PUBLIC KEY-----
";

    #[test]
    fn key_pair_tokens_verify_with_the_public_half_only() {
        for (private, public, other) in [
            (ED_PRIVATE, ED_PUBLIC, EC_PUBLIC),
            (EC_PRIVATE, EC_PUBLIC, ED_PUBLIC),
        ] {
            let t = create_token(private.as_bytes(), true, "edge", None).expect("test");
            let auth = TokenAuth::with_public_key_pem(public.as_bytes()).expect("test");
            assert_eq!(auth.authenticate(&creds(&t)).expect("test"), "edge");
            let wrong = TokenAuth::with_public_key_pem(other.as_bytes()).expect("test");
            assert!(wrong.authenticate(&creds(&t)).is_err());
            // An HMAC token signed with the public key's bytes is refused:
            // the algorithm family is fixed by the key.
            let confused = create_token(public.as_bytes(), false, "edge", None).expect("test");
            assert!(auth.authenticate(&creds(&confused)).is_err());
        }
        assert!(create_token(b"not a pem", true, "x", None).is_err());
    }

    #[test]
    fn keys_read_from_files_and_data_urls() {
        let dir = tempfile::tempdir().expect("test");
        let p = dir.path().join("k");
        std::fs::write(&p, b"\x01\x02").expect("test");
        assert_eq!(
            read_key(p.to_str().expect("test")).expect("test"),
            b"\x01\x02"
        );
        let url = format!("file://{}", p.display());
        assert_eq!(read_key(&url).expect("test"), b"\x01\x02");
        assert_eq!(read_key("data:;base64,AQI=").expect("test"), b"\x01\x02");
        assert!(read_key("/no/such/key").is_err());
        assert!(TokenAuth::with_secret(b"").is_err());
        assert!(TokenAuth::with_public_key_pem(b"junk").is_err());
    }

    #[test]
    fn permissions_follow_roles_and_grants() {
        let supers: BTreeSet<String> = ["admin".to_string()].into();
        let mut tenant = TenantInfo::default();
        tenant.admin_roles.insert("ops".into());
        let mut p = Policies::default();
        p.auth_policies
            .namespace_auth
            .insert("sensor".into(), [AuthAction::Produce].into());
        for role in ["admin", "ops"] {
            assert!(permits(role, &supers, &tenant, &p, AuthAction::Consume));
        }
        assert!(permits("sensor", &supers, &tenant, &p, AuthAction::Produce));
        assert!(!permits(
            "sensor",
            &supers,
            &tenant,
            &p,
            AuthAction::Consume
        ));
        assert!(!permits(
            "nobody",
            &supers,
            &tenant,
            &p,
            AuthAction::Produce
        ));
    }
}
