//! The auth hook as protocols see it: credentials in, a [`Principal`] out,
//! and the namespace [`Grants`] of that principal, resolved once per
//! connection so that the publish path stays free of metadata reads.
//!
//! With no provider configured every client is [`Principal::Anonymous`] and
//! may do everything, as Pulsar behaves with authentication disabled.

use std::collections::BTreeSet;
use std::sync::Arc;

use magnetar_tenancy::{AuthAction, AuthProvider, Credentials, NamespaceName, TenancyError};

use crate::error::{BrokerError, Result};
use crate::service::Broker;

/// Authentication settings of a broker.
#[derive(Clone)]
pub struct AuthConfig {
    pub provider: Arc<dyn AuthProvider>,
    /// Roles that may do anything anywhere, admin included.
    pub superusers: BTreeSet<String>,
    /// The token this broker presents to other brokers (forwarded
    /// publishes); a superuser's, since `/internal/` takes superusers only.
    pub internal_token: Option<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("superusers", &self.superusers)
            .finish_non_exhaustive()
    }
}

/// Who a connection is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Authentication is off.
    Anonymous,
    Role(String),
}

/// What a principal may do in one namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grants {
    pub produce: bool,
    pub consume: bool,
    /// Configure the namespace: create, delete, reconfigure and purge its
    /// topics and queues. Superusers and the tenant's admin roles.
    pub admin: bool,
}

impl Grants {
    pub const ALL: Grants = Grants {
        produce: true,
        consume: true,
        admin: true,
    };

    pub fn any(self) -> bool {
        self.produce || self.consume
    }

    /// [`BrokerError::AccessRefused`] unless `action` is granted. `what`
    /// names the target, built only on refusal: this runs per publish.
    pub fn check(self, action: AuthAction, what: impl FnOnce() -> String) -> Result<()> {
        let ok = match action {
            AuthAction::Produce => self.produce,
            AuthAction::Consume => self.consume,
            AuthAction::Admin => self.admin,
        };
        if ok {
            Ok(())
        } else {
            let verb = match action {
                AuthAction::Produce => "produce to",
                AuthAction::Consume => "consume from",
                AuthAction::Admin => "administer",
            };
            Err(BrokerError::AccessRefused(format!(
                "not authorized to {verb} {}",
                what()
            )))
        }
    }
}

impl Broker {
    pub fn auth_enabled(&self) -> bool {
        self.config().auth.is_some()
    }

    /// Runs the configured provider over what the client presented.
    pub fn authenticate(&self, creds: &Credentials<'_>) -> Result<Principal> {
        self.authenticate_until(creds).map(|(p, _)| p)
    }

    /// As [`Self::authenticate`], with the instant the credentials expire
    /// (None: never, or authentication is off): a connection is closed
    /// then, as a token's `exp` means. A client that presents no secret
    /// over TLS with a certificate the listener's CA verified is the role
    /// its CN names, as with Pulsar's TLS authentication provider.
    pub fn authenticate_until(
        &self,
        creds: &Credentials<'_>,
    ) -> Result<(Principal, Option<tokio::time::Instant>)> {
        let Some(auth) = &self.config().auth else {
            return Ok((Principal::Anonymous, None));
        };
        if let (None, Some(role)) = (creds.secret, creds.certificate) {
            if !role.is_empty() {
                return Ok((Principal::Role(role.to_string()), None));
            }
        }
        match auth.provider.authenticate_until(creds) {
            Ok((role, exp)) => Ok((Principal::Role(role), exp.map(expiry_instant))),
            Err(TenancyError::Unauthenticated(why)) => Err(BrokerError::Unauthenticated(why)),
            Err(e) => Err(e.into()),
        }
    }

    pub fn is_superuser(&self, p: &Principal) -> bool {
        match (p, &self.config().auth) {
            (Principal::Anonymous, _) | (_, None) => true,
            (Principal::Role(r), Some(auth)) => auth.superusers.contains(r),
        }
    }

    /// The principal's grants in `ns`, which must exist (a metadata read,
    /// so once per connection); a missing namespace is
    /// [`BrokerError::NotFound`].
    pub async fn grants(&self, p: &Principal, ns: &NamespaceName) -> Result<Grants> {
        let policies = match self.tenancy().get_policies(ns).await {
            Ok(p) => p,
            Err(TenancyError::NotFound(what)) => return Err(BrokerError::NotFound(what)),
            Err(e) => return Err(e.into()),
        };
        let (Principal::Role(role), Some(auth)) = (p, &self.config().auth) else {
            return Ok(Grants::ALL);
        };
        if auth.superusers.contains(role) {
            return Ok(Grants::ALL);
        }
        let tenant = self.tenancy().get_tenant(ns.tenant()).await?;
        let permits =
            |a| magnetar_tenancy::auth::permits(role, &auth.superusers, &tenant, &policies, a);
        Ok(Grants {
            produce: permits(AuthAction::Produce),
            consume: permits(AuthAction::Consume),
            admin: permits(AuthAction::Admin),
        })
    }

    /// Whether `p` may administer `tenant`: a superuser, or one of the
    /// tenant's admin roles (a missing tenant is [`BrokerError::NotFound`]).
    pub async fn is_tenant_admin(&self, p: &Principal, tenant: &str) -> Result<bool> {
        if self.is_superuser(p) {
            return Ok(true);
        }
        let Principal::Role(role) = p else {
            return Ok(true);
        };
        match self.tenancy().get_tenant(tenant).await {
            Ok(t) => Ok(t.admin_roles.contains(role)),
            Err(TenancyError::NotFound(what)) => Err(BrokerError::NotFound(what)),
            Err(e) => Err(e.into()),
        }
    }
}

/// The instant of an `exp` claim (seconds since the Unix epoch).
fn expiry_instant(exp: u64) -> tokio::time::Instant {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp);
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::Instant::now() + left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_check_actions() {
        let g = Grants {
            produce: true,
            consume: false,
            admin: false,
        };
        assert!(g.any());
        assert!(g.check(AuthAction::Produce, || "t".into()).is_ok());
        let e = g.check(AuthAction::Consume, || "t".into());
        assert!(matches!(e, Err(BrokerError::AccessRefused(_))), "{e:?}");
        assert!(g.check(AuthAction::Admin, || "t".into()).is_err());
        assert!(Grants::ALL.check(AuthAction::Admin, || "t".into()).is_ok());
    }
}
