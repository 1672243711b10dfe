//! Who may call the internal gRPC planes (metadata and bookies): every
//! call carries `authorization: Bearer <token>`, and the server takes only
//! tokens whose role is one of the cluster's superusers (the brokers',
//! bookies' and operators' identity), or, without a token, a client
//! certificate the listener's CA verified whose CN is such a role
//! (mTLS), refusing the rest with
//! UNAUTHENTICATED or PERMISSION_DENIED before the service sees the
//! call. Token verification itself is the tenancy layer's; it is handed
//! in as a [`TokenVerifier`] so that these low crates need not know JWTs.

use std::collections::BTreeSet;
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Checks a bearer token: the role it carries, or why it is refused.
pub trait TokenVerifier: Send + Sync + 'static {
    fn verify(&self, token: &str) -> Result<String, String>;
}

/// The server side: with no verifier every call passes (authentication
/// off, as on the broker's listeners).
#[derive(Clone, Default)]
pub struct GrpcAuth {
    check: Option<Arc<Check>>,
}

struct Check {
    verifier: Arc<dyn TokenVerifier>,
    roles: BTreeSet<String>,
}

impl std::fmt::Debug for GrpcAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcAuth")
            .field("enabled", &self.check.is_some())
            .finish()
    }
}

impl GrpcAuth {
    /// Calls must carry a token `verifier` accepts for one of `roles`.
    pub fn new(verifier: Arc<dyn TokenVerifier>, roles: BTreeSet<String>) -> Self {
        GrpcAuth {
            check: Some(Arc::new(Check { verifier, roles })),
        }
    }

    pub fn enabled(&self) -> bool {
        self.check.is_some()
    }

    /// The role of a caller with `token` (a bearer token) or a verified
    /// client certificate's `certified` role: `None` with authentication
    /// off and no certificate. The same rule serves the gRPC planes and
    /// the HTTP listeners of metadata nodes and bookies.
    pub fn caller(
        &self,
        token: Option<&str>,
        certified: Option<&str>,
    ) -> Result<Option<String>, Refusal> {
        let Some(check) = &self.check else {
            return Ok(certified.map(str::to_owned));
        };
        let Check { verifier, roles } = &**check;
        let role = match (token, certified) {
            (Some(token), _) => verifier
                .verify(token.trim())
                .map_err(|why| Refusal::Unauthenticated(format!("token refused: {why}")))?,
            (None, Some(role)) => role.to_string(),
            (None, None) => {
                return Err(Refusal::Unauthenticated(
                    "a bearer token or a client certificate is required".into(),
                ))
            }
        };
        if roles.contains(&role) {
            Ok(Some(role))
        } else {
            Err(Refusal::Forbidden(format!(
                "role {role:?} may not call the cluster's internal services"
            )))
        }
    }
}

/// Why a caller was turned away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No credential, or one that does not verify (gRPC UNAUTHENTICATED,
    /// HTTP 401).
    Unauthenticated(String),
    /// A verified role that may not call (PERMISSION_DENIED, HTTP 403).
    Forbidden(String),
}

/// Who a call authenticated as (a token's role, or a client
/// certificate's CN), in the request's extensions for the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerRole(pub Arc<str>);

impl Interceptor for GrpcAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        let certified = req
            .extensions()
            .get::<crate::GrpcPeer>()
            .and_then(|p| p.certificate_role.as_deref());
        // Without tokens, a verified certificate still names the caller.
        match self.caller(token, certified) {
            Ok(role) => {
                if let Some(role) = role {
                    req.extensions_mut().insert(CallerRole(role.into()));
                }
                Ok(req)
            }
            Err(Refusal::Unauthenticated(why)) => Err(Status::unauthenticated(why)),
            Err(Refusal::Forbidden(why)) => Err(Status::permission_denied(why)),
        }
    }
}

/// The client side: adds the process's token to every call (none when
/// authentication is off).
#[derive(Clone, Debug, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// A token that cannot be a header value (a control character, say)
    /// is an error rather than a silently anonymous client.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        match token {
            None => Ok(BearerToken(None)),
            Some(t) => format!("Bearer {}", t.trim())
                .parse()
                .map(|v| BearerToken(Some(v)))
                .map_err(|_| "the token holds characters a header may not".to_string()),
        }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl TokenVerifier for Fixed {
        fn verify(&self, token: &str) -> Result<String, String> {
            match token {
                "super" => Ok("admin".into()),
                "user" => Ok("sensor".into()),
                _ => Err("bad signature".into()),
            }
        }
    }

    fn call(auth: &mut GrpcAuth, token: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::new(());
        BearerToken::new(token)
            .expect("token")
            .call(Request::new(()))
            .map(|r| req = r)
            .expect("client side");
        auth.call(req).map(drop).map_err(|s| s.code())
    }

    #[test]
    fn only_superuser_tokens_pass() {
        let mut auth = GrpcAuth::new(Arc::new(Fixed), ["admin".to_string()].into());
        assert_eq!(call(&mut auth, Some("super")), Ok(()));
        assert_eq!(call(&mut auth, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(
            call(&mut auth, Some("forged")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(&mut auth, Some("user")),
            Err(tonic::Code::PermissionDenied)
        );
        let mut by_cert = |role: &str| {
            let mut req = Request::new(());
            req.extensions_mut().insert(crate::GrpcPeer {
                remote: None,
                certificate_role: Some(role.into()),
            });
            auth.call(req).map(drop).map_err(|s| s.code())
        };
        assert_eq!(by_cert("admin"), Ok(()));
        assert_eq!(by_cert("sensor"), Err(tonic::Code::PermissionDenied));
        let mut off = GrpcAuth::default();
        assert_eq!(call(&mut off, None), Ok(()));
        assert!(BearerToken::new(Some("a\nb")).is_err());
    }
}
