//! The authentication flags every role shares: the broker checks client
//! tokens with them, and metadata nodes and bookies take only superusers'
//! tokens on their gRPC planes. Every process presents its internal token
//! to the others.

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use magnetar_net::{GrpcAuth, TokenVerifier};
use magnetar_tenancy::auth::{create_token, read_key, TokenAuth};
use magnetar_tenancy::{AuthProvider, Credentials};

#[derive(Args, Clone, Debug, Default)]
pub struct AuthArgs {
    /// Turn on token authentication, with tokens signed by this HMAC
    /// secret key: `file:///path`, a path, or `data:;base64,…` (what
    /// `magnetar tokens create-secret-key` writes, as Pulsar's
    /// tokenSecretKey).
    #[arg(
        long,
        env = "MAGNETAR_AUTH_TOKEN_SECRET_KEY",
        conflicts_with = "auth_token_public_key"
    )]
    auth_token_secret_key: Option<String>,
    /// Turn on token authentication, with tokens signed by the private
    /// half of this PEM public key (RSA, EC or Ed25519).
    #[arg(long, env = "MAGNETAR_AUTH_TOKEN_PUBLIC_KEY")]
    auth_token_public_key: Option<String>,
    /// Roles that may do everything, comma-separated; the only roles the
    /// metadata and bookie planes take.
    #[arg(long, env = "MAGNETAR_AUTH_SUPERUSER_ROLES", value_delimiter = ',')]
    auth_superuser_roles: Vec<String>,
    /// The token this process presents to the others (brokers, metadata
    /// nodes, bookies), a superuser's: the token itself, `file:///path` or
    /// a path. With a secret key and none given, the process signs one
    /// for the first superuser role.
    #[arg(long, env = "MAGNETAR_INTERNAL_TOKEN")]
    internal_token: Option<String>,
}

/// Who may call a metadata node or bookie: a token `provider` accepts,
/// for one of `roles`.
pub fn grpc_auth(provider: Arc<dyn AuthProvider>, roles: BTreeSet<String>) -> GrpcAuth {
    GrpcAuth::new(Arc::new(Verifier(provider)), roles)
}

/// Tenancy's token check as the gRPC planes ask for it.
struct Verifier(Arc<dyn AuthProvider>);

impl TokenVerifier for Verifier {
    fn verify(&self, token: &str) -> Result<String, String> {
        self.0
            .authenticate(&Credentials {
                secret: Some(token.as_bytes()),
                ..Credentials::default()
            })
            .map_err(|e| e.to_string())
    }
}

impl AuthArgs {
    fn provider(&self) -> anyhow::Result<Option<Arc<dyn AuthProvider>>> {
        let provider = match (&self.auth_token_secret_key, &self.auth_token_public_key) {
            (Some(spec), _) => TokenAuth::with_secret(&read_key(spec)?)?,
            (None, Some(spec)) => TokenAuth::with_public_key_pem(&read_key(spec)?)?,
            (None, None) => return Ok(None),
        };
        Ok(Some(Arc::new(provider)))
    }

    fn superusers(&self) -> BTreeSet<String> {
        self.auth_superuser_roles
            .iter()
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect()
    }

    /// The token this process presents to the others: the one given, or
    /// one signed with the secret key for the first superuser role.
    pub fn internal_token(&self) -> anyhow::Result<Option<String>> {
        if let Some(spec) = &self.internal_token {
            return read_token(spec).map(Some);
        }
        let first = self
            .auth_superuser_roles
            .iter()
            .map(|r| r.trim())
            .find(|r| !r.is_empty());
        match (&self.auth_token_secret_key, first) {
            (Some(key), Some(role)) => Ok(Some(create_token(&read_key(key)?, false, role, None)?)),
            _ => Ok(None),
        }
    }

    /// The broker's auth hook; none without a key.
    pub fn broker(&self) -> anyhow::Result<Option<magnetar_broker::AuthConfig>> {
        let Some(provider) = self.provider()? else {
            return Ok(None);
        };
        let internal_token = self.internal_token()?;
        if internal_token.is_none() {
            tracing::warn!(
                "authentication is on without --internal-token or a superuser role: \
                 the metadata store, bookies and other brokers will refuse this one"
            );
        }
        Ok(Some(magnetar_broker::AuthConfig {
            provider,
            superusers: self.superusers(),
            internal_token,
        }))
    }

    /// Who may call a metadata node or bookie: superusers only, or anyone
    /// with authentication off.
    pub fn grpc(&self) -> anyhow::Result<GrpcAuth> {
        Ok(match self.provider()? {
            None => GrpcAuth::default(),
            Some(p) => {
                let roles = self.superusers();
                anyhow::ensure!(
                    !roles.is_empty(),
                    "authentication is on but --auth-superuser-roles names nobody who may call this node"
                );
                grpc_auth(p, roles)
            }
        })
    }
}

/// A token given on the command line: itself, or `file:///path` or a path
/// to a file holding it.
pub fn read_token(spec: &str) -> anyhow::Result<String> {
    let path = spec.strip_prefix("file://").unwrap_or(spec);
    if spec.starts_with("file://") || std::path::Path::new(path).is_file() {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        Ok(text.trim().to_string())
    } else {
        Ok(spec.trim().to_string())
    }
}
