//! Connection negotiation: start-ok (mechanism and login), tune-ok and
//! open.

use std::sync::Arc;

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

/// The broker's limits, offered in connection.tune.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat: u16,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    StartOk,
    /// Waiting for the broker's verdict on the credentials.
    Login,
    TuneOk,
    Open,
    /// Waiting for the grants of the role in the vhost's namespace.
    Grants {
        vhost: String,
        ns: NamespaceName,
    },
    Running,
}

/// The connection's negotiation (start-ok, tune-ok, open) as a machine:
/// channel-0 methods and the broker's answers go in, and out come the
/// steps the session takes: calls to the broker, methods to send, the
/// settings to apply. It holds no socket and awaits nothing.
#[derive(Debug)]
pub(crate) struct Handshake {
    phase: Phase,
    limits: Limits,
    /// The role of the client's verified TLS certificate, if it showed one.
    certificate: Option<Arc<str>>,
    mechanism: String,
    user: String,
}

/// What goes into the [`Handshake`].
#[derive(Debug)]
pub(crate) enum Input<'a> {
    /// A method on channel 0 while the connection is not open.
    Method(&'a amq_protocol::protocol::connection::AMQPMethod),
    /// The broker's verdict on [`Step::Authenticate`]'s credentials.
    Judged { accepted: bool },
    /// The grants [`Step::LookUpGrants`] found.
    Granted(Result<Grants, &'a BrokerError>),
}

/// What the session does next.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    /// Judge these credentials and feed back [`Input::Judged`]. The
    /// password is None for EXTERNAL (the certificate's role logs in).
    Authenticate {
        user: String,
        password: Option<Vec<u8>>,
        /// The client takes connection.blocked.
        blockable: bool,
    },
    /// Send this method on channel 0.
    Send(amq_protocol::protocol::AMQPClass),
    /// Frame size, channels and heartbeat from now on.
    Tune(Tuned),
    /// Find the role's grants in `ns` and feed back [`Input::Granted`].
    LookUpGrants(NamespaceName),
    /// The connection is open on `vhost`, with these grants.
    Opened {
        vhost: String,
        ns: NamespaceName,
        grants: Grants,
    },
}

impl Handshake {
    pub(crate) fn new(limits: Limits, certificate: Option<Arc<str>>) -> Self {
        Handshake {
            phase: Phase::StartOk,
            limits,
            certificate,
            mechanism: String::new(),
            user: String::new(),
        }
    }

    /// The role of the client's verified TLS certificate, if it showed one.
    pub(crate) fn certificate(&self) -> Option<&str> {
        self.certificate.as_deref()
    }

    /// The mechanisms connection.start offers: EXTERNAL (the client
    /// certificate's role, as RabbitMQ's rabbitmq_auth_mechanism_ssl) only
    /// where there is a certificate.
    pub(crate) fn mechanisms(&self) -> &'static str {
        if self.certificate.is_some() {
            "PLAIN AMQPLAIN EXTERNAL"
        } else {
            "PLAIN AMQPLAIN"
        }
    }

    /// Whether connection.open-ok went out: channels may be used.
    pub(crate) fn is_open(&self) -> bool {
        self.phase == Phase::Running
    }

    /// The next steps after `input`; an exception closes the connection.
    pub(crate) fn on(&mut self, input: Input<'_>) -> Result<Vec<Step>, Exception> {
        use amq_protocol::protocol::connection::{self, AMQPMethod as M};
        use amq_protocol::protocol::AMQPClass;
        // connection.start-ok's class and method ids, for its refusals.
        const START_OK: (u16, u16) = (10, 11);
        match (input, &self.phase) {
            (Input::Method(M::StartOk(s)), Phase::StartOk) => {
                let mech = s.mechanism.as_str();
                let how = mechanism(mech, self.certificate.is_some())
                    .map_err(|e| e.on(START_OK.0, START_OK.1))?;
                let (user, password) = match how {
                    Mechanism::Certificate => {
                        (self.certificate().unwrap_or_default().to_owned(), None)
                    }
                    Mechanism::Password => {
                        let Some((user, password)) = login(mech, s.response.as_bytes()) else {
                            return Err(login_refused(mech).on(START_OK.0, START_OK.1));
                        };
                        (user, Some(password))
                    }
                };
                self.mechanism = mech.to_owned();
                self.user.clone_from(&user);
                self.phase = Phase::Login;
                Ok(vec![Step::Authenticate {
                    user,
                    password,
                    blockable: blockable(&s.client_properties),
                }])
            }
            (Input::Judged { accepted }, Phase::Login) => {
                if !accepted {
                    return Err(login_refused(&self.mechanism).on(START_OK.0, START_OK.1));
                }
                self.phase = Phase::TuneOk;
                Ok(vec![Step::Send(AMQPClass::Connection(M::Tune(
                    connection::Tune {
                        channel_max: self.limits.channel_max,
                        frame_max: self.limits.frame_max,
                        heartbeat: self.limits.heartbeat,
                    },
                )))])
            }
            (Input::Method(M::TuneOk(t)), Phase::TuneOk) => {
                let tuned = tune(
                    t.frame_max,
                    t.channel_max,
                    t.heartbeat,
                    self.limits.frame_max,
                    self.limits.channel_max,
                )?;
                self.phase = Phase::Open;
                Ok(vec![Step::Tune(tuned)])
            }
            (Input::Method(M::Open(o)), Phase::Open) => {
                let vhost = o.virtual_host.as_str().to_owned();
                let Some(ns) = vhost_namespace(&vhost) else {
                    return Err(Exception::new(
                        error::NOT_ALLOWED,
                        format!("vhost {vhost} not found"),
                    ));
                };
                self.phase = Phase::Grants {
                    vhost,
                    ns: ns.clone(),
                };
                Ok(vec![Step::LookUpGrants(ns)])
            }
            (Input::Granted(found), Phase::Grants { vhost, ns }) => {
                let grants = open(vhost, &self.user, found)?;
                let opened = Step::Opened {
                    vhost: vhost.clone(),
                    ns: ns.clone(),
                    grants,
                };
                self.phase = Phase::Running;
                Ok(vec![
                    opened,
                    Step::Send(AMQPClass::Connection(M::OpenOk(connection::OpenOk {}))),
                ])
            }
            (Input::Method(m), _) => Err(Exception::new(
                error::COMMAND_INVALID,
                format!("connection method {m:?} is not valid now"),
            )
            // A protocol violation: the copy for the ids is no cost.
            .on(10, AMQPClass::Connection(m.clone()).get_amqp_method_id())),
            // The session feeds an answer only right after the step that
            // asked for it.
            (input, phase) => Err(Exception::new(
                error::INTERNAL_ERROR,
                format!("{input:?} while the handshake is at {phase:?}"),
            )),
        }
    }
}
