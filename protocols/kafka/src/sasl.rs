//! SASL/PLAIN, as KoP does it: the user name may name the namespace
//! (`tenant/namespace`), the password is a token (`token:<jwt>`), and both
//! go to the broker's auth hook.

use bytes::Bytes;
use kafka_protocol::messages::{
    SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::ResponseError as E;
use magnetar_tenancy::Credentials;

use crate::handler::{str, Ctx, Session};

pub(crate) fn handshake(s: &mut Session, r: SaslHandshakeRequest) -> SaslHandshakeResponse {
    let out = SaslHandshakeResponse::default().with_mechanisms(vec![str("PLAIN")]);
    if r.mechanism.as_str() == "PLAIN" {
        s.sasl_mechanism = Some("PLAIN".into());
        out
    } else {
        out.with_error_code(E::UnsupportedSaslMechanism.code())
    }
}

/// Splits a PLAIN token: `[authzid] NUL authcid NUL password`.
pub(crate) fn parse_plain(token: &[u8]) -> Option<(String, String)> {
    let mut parts = token.split(|&b| b == 0);
    let _authz = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?;
    let pass = std::str::from_utf8(parts.next()?).ok()?;
    if parts.next().is_some() || user.is_empty() {
        return None;
    }
    Some((user.to_string(), pass.to_string()))
}

pub(crate) async fn authenticate(
    ctx: &Ctx,
    s: &mut Session,
    r: SaslAuthenticateRequest,
) -> SaslAuthenticateResponse {
    let fail = |why: &str| {
        SaslAuthenticateResponse::default()
            .with_error_code(E::SaslAuthenticationFailed.code())
            .with_error_message(Some(str(why)))
            .with_auth_bytes(Bytes::new())
    };
    if s.sasl_mechanism.as_deref() != Some("PLAIN") {
        s.closing = true;
        return SaslAuthenticateResponse::default()
            .with_error_code(E::IllegalSaslState.code())
            .with_error_message(Some(str("SaslHandshake must come first")));
    }
    let Some((user, password)) = parse_plain(&r.auth_bytes) else {
        s.closing = true;
        return fail("malformed PLAIN token");
    };
    let creds = Credentials {
        user: Some(&user),
        secret: Some(password.as_bytes()),
        certificate: None,
    };
    let (principal, expires) = match ctx.broker.authenticate_until(&creds) {
        Ok(x) => x,
        Err(e) => {
            ctx.broker.metrics().auth_failure("kafka");
            s.closing = true;
            return fail(&e.to_string());
        }
    };
    if s.principal.as_ref().is_some_and(|p| *p != principal) {
        s.closing = true;
        return fail("cannot change principals during re-authentication");
    }
    let mut ns = s.ns.clone();
    if user.contains('/') {
        ns = match user.parse() {
            Ok(ns) => ns,
            Err(_) => {
                s.closing = true;
                return fail("user name is not tenant/namespace");
            }
        };
    }
    if let Err(why) = login(ctx, s, &principal, ns).await {
        s.closing = true;
        return fail(&why);
    }
    // KIP-368: the client is told how long the session lasts (the token's
    // exp), and re-authenticates on this connection before then; if it
    // does not, the connection is closed at exp.
    s.expires = expires;
    s.principal = Some(principal);
    let lifetime_ms = expires.map_or(0, |e| {
        let left = e.saturating_duration_since(tokio::time::Instant::now());
        i64::try_from(left.as_millis()).unwrap_or(i64::MAX).max(1)
    });
    SaslAuthenticateResponse::default()
        .with_auth_bytes(Bytes::new())
        .with_session_lifetime_ms(lifetime_ms)
}

/// A connection over TLS with a client certificate the CA verified is
/// its CN's role in the listener's namespace from the start, as on a
/// Kafka SSL listener with `ssl.client.auth`; SASL, if the client goes on
/// to it (SASL_SSL), replaces that login. A role with no grant there is
/// not logged in, so it must use SASL.
pub(crate) async fn certificate_login(ctx: &Ctx, s: &mut Session, role: &str) {
    let creds = Credentials {
        certificate: Some(role),
        ..Credentials::default()
    };
    let Ok((principal, _)) = ctx.broker.authenticate_until(&creds) else {
        ctx.broker.metrics().auth_failure("kafka");
        return;
    };
    let ns = s.ns.clone();
    if let Err(why) = login(ctx, s, &principal, ns).await {
        tracing::debug!(peer = %s.peer, "certificate of {role} not logged in: {why}");
    }
}

/// Logs the session in as `principal` in `ns`, if it may do anything
/// there.
async fn login(
    ctx: &Ctx,
    s: &mut Session,
    principal: &magnetar_broker::Principal,
    ns: magnetar_tenancy::NamespaceName,
) -> Result<(), String> {
    match ctx.broker.grants(principal, &ns).await {
        Ok(g) if g.any() => s.grants = g,
        Ok(_) => return Err(format!("not authorized in namespace {ns}")),
        Err(_) => return Err("no such namespace".into()),
    }
    s.ns = ns;
    s.authenticated = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_tokens_parse() {
        assert_eq!(
            parse_plain(b"\0public/default\0token:x"),
            Some(("public/default".into(), "token:x".into()))
        );
        assert_eq!(parse_plain(b"only"), None);
        assert_eq!(parse_plain(b"\0\0pw"), None);
    }
}
