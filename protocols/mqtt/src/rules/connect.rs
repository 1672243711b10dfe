//! CONNECT: which secret authenticates, which namespace the session is
//! in, the client id, the keep-alive, and what a resumed session brings,
//! each with the CONNACK reason of a refusal.

use std::time::Duration;

use magnetar_broker::{BrokerError, Grants};
use magnetar_tenancy::names::NamespaceName;
use rmqtt_codec::v5::{self, ConnectAckReason as Reason};

use super::subscriptions::Sub;
use crate::topic;

/// The one v5 enhanced-authentication method, whose data is a token: a
/// client that logs in with it may renew the token on its connection
/// with AUTH (reason 0x19) before the old one expires.
pub(crate) const TOKEN_AUTH_METHOD: &str = "token";

/// Refuses any v5 authentication method other than [`TOKEN_AUTH_METHOD`].
pub(crate) fn auth_method(method: Option<&str>) -> Result<(), Reason> {
    match method {
        Some(m) if m != TOKEN_AUTH_METHOD => Err(Reason::BadAuthenticationMethod),
        _ => Ok(()),
    }
}

/// What authenticates the connection: the authentication data with a v5
/// method, else the password (it carries the token, as with Pulsar's MQTT
/// handlers), else the WebSocket upgrade's token.
pub(crate) fn secret<'a>(c: &'a v5::Connect, upgrade_token: Option<&'a str>) -> Option<&'a [u8]> {
    match &c.auth_method {
        Some(_) => c.auth_data.as_deref(),
        None => c.password.as_deref().or(upgrade_token.map(str::as_bytes)),
    }
}

/// The refusal when authentication fails: Mosquitto's split, where
/// nothing presented is "not authorized" and a wrong secret a bad user
/// name or password.
pub(crate) fn auth_refusal(user: bool, secret: bool) -> Reason {
    if user || secret {
        Reason::BadUserNameOrPassword
    } else {
        Reason::NotAuthorized
    }
}

/// The session's namespace: a user name `tenant/namespace` names it (as
/// a Kafka SASL user does), else the WebSocket path's, else the
/// listener's default. Also whether it was named, which makes the
/// grants worth looking up even with authentication off.
pub(crate) fn namespace(
    username: Option<&str>,
    presented: Option<&NamespaceName>,
    default: &NamespaceName,
) -> Result<(NamespaceName, bool), Reason> {
    match username.filter(|u| u.contains('/')) {
        Some(user) => user
            .parse::<NamespaceName>()
            .map(|ns| (ns, true))
            .map_err(|_| Reason::BadUserNameOrPassword),
        None => Ok((
            presented.cloned().unwrap_or_else(|| default.clone()),
            presented.is_some(),
        )),
    }
}

/// The role's grants in the namespace as the connection may use them: it
/// needs some, and a will is a publish it must be allowed to make.
pub(crate) fn grants(found: Result<Grants, &BrokerError>, will: bool) -> Result<Grants, Reason> {
    match found {
        Ok(g) if !g.any() => Err(Reason::NotAuthorized),
        Ok(g) if will && !g.produce => Err(Reason::NotAuthorized),
        Ok(g) => Ok(g),
        Err(BrokerError::NotFound(_)) => Err(Reason::BadUserNameOrPassword),
        Err(_) => Err(Reason::ServerUnavailable),
    }
}

/// The client id, and whether the server assigned it (`random` picks
/// one): 3.1.1 gives an id only to clean sessions.
pub(crate) fn client_id(
    sent: &str,
    v5: bool,
    clean_start: bool,
    random: u64,
) -> Result<(String, bool), Reason> {
    if !sent.is_empty() {
        return Ok((sent.to_owned(), false));
    }
    if !v5 && !clean_start {
        return Err(Reason::ClientIdentifierNotValid);
    }
    Ok((format!("magnetar-{random:016x}"), true))
}

/// A will's topic must be a valid topic name.
pub(crate) fn will(w: Option<&v5::LastWill>) -> Result<(), Reason> {
    match w {
        Some(w) if topic::check_name(&w.topic).is_err() => Err(Reason::TopicNameInvalid),
        _ => Ok(()),
    }
}

/// The keep-alive a connection gets.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct KeepAlive {
    /// Seconds; 0: none.
    pub secs: u16,
    /// The v5 Server Keep Alive to tell the client, when it is not what
    /// it asked for.
    pub server: Option<u16>,
}

impl KeepAlive {
    /// How long the connection may stay silent: one and a half times the
    /// keep-alive (MQTT 3.1.2.10).
    pub fn idle_limit(&self) -> Option<Duration> {
        (self.secs > 0).then(|| Duration::from_millis(u64::from(self.secs) * 1500))
    }
}

/// The keep-alive for `asked` under the broker's `max` (u16::MAX: none):
/// a v5 client asking for more, or for none, is given the maximum as
/// Server Keep Alive; a 3.1.1 client cannot be told, and is refused (as
/// Mosquitto's `max_keepalive` does).
pub(crate) fn keep_alive(asked: u16, max: u16, v5: bool) -> Result<KeepAlive, Reason> {
    if max < u16::MAX && (asked == 0 || asked > max) {
        if !v5 {
            return Err(Reason::ClientIdentifierNotValid);
        }
        return Ok(KeepAlive {
            secs: max,
            server: Some(max),
        });
    }
    Ok(KeepAlive {
        secs: asked,
        server: None,
    })
}

/// What a CONNECT finds of a stored session.
#[derive(Debug, PartialEq)]
pub(crate) struct Resume {
    /// CONNACK's Session Present.
    pub present: bool,
    /// The subscriptions to bind again.
    pub subs: Vec<Sub>,
    /// A clean start discards the stored session.
    pub discard: bool,
}

/// A clean start discards a stored session; otherwise it is resumed with
/// its subscriptions, unless the role has lost its consume grant since it
/// made them.
pub(crate) fn resume(clean_start: bool, stored: Option<Vec<Sub>>, may_consume: bool) -> Resume {
    match stored {
        Some(_) if clean_start => Resume {
            present: false,
            subs: Vec::new(),
            discard: true,
        },
        Some(subs) => Resume {
            present: true,
            subs: if may_consume { subs } else { Vec::new() },
            discard: false,
        },
        None => Resume {
            present: false,
            subs: Vec::new(),
            discard: false,
        },
    }
}
