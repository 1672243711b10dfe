//! Connection negotiation: start-ok (mechanism and login), tune-ok and
//! open.

use amq_protocol::types::{AMQPValue, FieldTable};
use magnetar_broker::{BrokerError, Grants};
use magnetar_tenancy::NamespaceName;

use crate::codec;
use crate::error::{self, exception_of, Exception};

/// How a client logs in.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Mechanism {
    /// PLAIN or AMQPLAIN: a user name and a password (which carries the
    /// token; the broker's auth hook judges it).
    Password,
    /// EXTERNAL: the TLS client certificate's role.
    Certificate,
}

/// The mechanism `name` names, given whether the connection presented a
/// client certificate (EXTERNAL needs one).
pub(crate) fn mechanism(name: &str, certificate: bool) -> Result<Mechanism, Exception> {
    match name {
        "PLAIN" | "AMQPLAIN" => Ok(Mechanism::Password),
        "EXTERNAL" if certificate => Ok(Mechanism::Certificate),
        _ => Err(Exception::new(
            error::ACCESS_REFUSED,
            format!("unsupported authentication mechanism '{name}'"),
        )),
    }
}

/// The user name and password of a PLAIN (`\0user\0password`) or
/// AMQPLAIN (a field table without its length) response.
pub(crate) fn login(mechanism: &str, response: &[u8]) -> Option<(String, Vec<u8>)> {
    if mechanism == "PLAIN" {
        let mut parts = response.split(|&b| b == 0);
        let _authz = parts.next()?;
        let user = std::str::from_utf8(parts.next()?).ok()?.to_owned();
        let pass = parts.next()?.to_vec();
        return parts.next().is_none().then_some((user, pass));
    }
    let mut framed = u32::try_from(response.len()).ok()?.to_be_bytes().to_vec();
    framed.extend_from_slice(response);
    let (_, table) = amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
    let text = |k: &str| match table.inner().get(k)? {
        AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
        _ => None,
    };
    let user = String::from_utf8(text("LOGIN")?).ok()?;
    Some((user, text("PASSWORD")?))
}

/// The refusal of a login, as RabbitMQ words it.
pub(crate) fn login_refused(mechanism: &str) -> Exception {
    Exception::new(
        error::ACCESS_REFUSED,
        format!("Login was refused using authentication mechanism {mechanism}"),
    )
}

/// Whether the client takes connection.blocked (its capabilities say so).
pub(crate) fn blockable(client_properties: &FieldTable) -> bool {
    matches!(
        client_properties.inner().get("capabilities"),
        Some(AMQPValue::FieldTable(c))
            if c.inner().get("connection.blocked") == Some(&AMQPValue::Boolean(true))
    )
}

/// What tune-ok settles.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Tuned {
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat: u16,
}

/// The client's tune-ok against the broker's limits (what tune offered):
/// a frame_max below the minimum or above the broker's is refused, 0
/// keeps the broker's, and a channel_max is at most the broker's.
pub(crate) fn tune(
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    server_frame_max: u32,
    server_channel_max: u16,
) -> Result<Tuned, Exception> {
    if frame_max != 0 && frame_max < codec::FRAME_MIN_SIZE {
        return Err(Exception::new(
            error::NOT_ALLOWED,
            format!("frame_max={frame_max} < {} min size", codec::FRAME_MIN_SIZE),
        ));
    }
    if frame_max > server_frame_max {
        return Err(Exception::new(
            error::NOT_ALLOWED,
            format!("frame_max={frame_max} > {server_frame_max} max size"),
        ));
    }
    Ok(Tuned {
        frame_max: if frame_max == 0 {
            server_frame_max
        } else {
            frame_max
        },
        channel_max: if channel_max == 0 {
            server_channel_max
        } else {
            channel_max.min(server_channel_max)
        },
        heartbeat,
    })
}

/// The namespace a vhost names: `/` (or nothing) is the default one,
/// `tenant/namespace` (with or without a leading `/`) that namespace.
pub(crate) fn vhost_namespace(vhost: &str) -> Option<NamespaceName> {
    if vhost == "/" || vhost.is_empty() {
        return Some(NamespaceName::default_namespace());
    }
    vhost.trim_start_matches('/').parse().ok()
}

/// The grants `user` connects to `vhost` with: it must exist and the
/// user hold some grant in it.
pub(crate) fn open(
    vhost: &str,
    user: &str,
    grants: Result<Grants, &BrokerError>,
) -> Result<Grants, Exception> {
    let not_found = || Exception::new(error::NOT_ALLOWED, format!("vhost {vhost} not found"));
    match grants {
        Ok(g) if g.any() => Ok(g),
        Ok(_) => Err(Exception::new(
            error::NOT_ALLOWED,
            format!("access to vhost '{vhost}' refused for user '{user}'"),
        )),
        Err(BrokerError::NotFound(_)) => Err(not_found()),
        Err(e) => Err(exception_of(e)),
    }
}
