//! One MQTT connection: CONNECT, then publishes in and deliveries out.
//!
//! Publishes route through the namespace's `amq.topic`. A session's
//! subscriptions bind its queues there, as RabbitMQ's plugin does:
//! `mqtt-subscription-<client id>qos0`, in memory, for QoS 0
//! subscriptions, and `mqtt-subscription-<client id>qos1`, durable, for
//! QoS 1 and 2; a shared subscription `$share/<group>/<filter>` binds the group's queue
//! (`mqtt-share-<group>`), which its members consume together, so the
//! broker's shared subscription spreads the load. The verdicts are
//! [`crate::rules`]' and the outgoing bookkeeping (packet ids, the
//! in-flight window, QoS 2 states) is [`crate::state`]'s, both without
//! I/O; what all connections share is [`crate::ctx`].

use std::collections::{HashMap, VecDeque};
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use bytestring::ByteString;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use magnetar_broker::format::now_ms;
use magnetar_broker::routing::Binding;
use magnetar_broker::subscription::{
    ConsumerControl, ConsumerOptions, InitialPosition, SubscriptionOptions, SubscriptionType,
};
use magnetar_broker::{BrokerError, Delivery, Grants, Principal};
use magnetar_tenancy::names::NamespaceName;
use magnetar_tenancy::Credentials;
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5::{self, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::codec::{self, Framing};
use crate::ctx::{Ctx, Live, StoredSession};
use crate::error::{MqttError, Result};
use crate::order::{spawn_reader, Batch, Inbound, Reader};
use crate::props;
use crate::retained;
use crate::rules::connect;
use crate::rules::inbound::{self, Admission, Publishes, Reply};
use crate::rules::subscriptions::{self, qos_of, session_queue, Plan, Sub, Verdict};
use crate::server::AbortOnDrop;
use crate::state::{AliasesOut, Inflight, Outbound, TopicRef};
use crate::topic;
use crate::EXCHANGE;

/// The broker subscription MQTT sessions consume their queues through.
const SUBSCRIPTION: &str = "mqtt";
/// QoS 0 publishes (and their payload bytes) of one connection on their
/// way to the bookies before it reads no more.
const QOS0_IN_FLIGHT: usize = 4096;
const QOS0_IN_FLIGHT_BYTES: usize = 8 << 20;

/// A queue this session consumes: its own, or a shared group's.
struct Source {
    control: ConsumerControl,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An inbound publish on its way to the bookies, and what acknowledges it
/// once durable.
type Stored = BoxFuture<'static, (Reply, Result<()>)>;

enum End {
    /// DISCONNECT: no will (unless it asked for one).
    Clean {
        will: bool,
    },
    /// Socket closed or an error: the will goes out.
    Abrupt(Option<MqttError>),
    TakenOver,
}

struct Conn {
    ctx: Arc<Ctx>,
    id: u64,
    ns: NamespaceName,
    client_id: String,
    framing: Framing,
    /// The sequence number of the packet being served, and the reader's
    /// connection number: publishes wait for other connections'
    /// SUBSCRIBEs read before them ([`SubscribeGate`]).
    read_seq: u64,
    read_conn: u64,
    out: BytesMut,
    v5: bool,
    subs: Vec<Sub>,
    /// Seconds the session outlives the connection.
    expiry: u32,
    will: Option<v5::LastWill>,
    keep_alive: Option<Duration>,
    /// The client's publishes: topic aliases, Receive Maximum, answers.
    publishes: Publishes,
    outbound: Outbound,
    /// Topic aliases of outgoing publishes (v5).
    aliases_out: AliasesOut,
    sources: HashMap<String, Source>,
    /// Where the session's consumers send their deliveries; made with
    /// the first consumer, so that idle connections carry no channel.
    deliveries_tx: Option<mpsc::UnboundedSender<(String, Delivery)>>,
    /// The receiving end of a channel just made, for `run` to take.
    deliveries_new: Option<mpsc::UnboundedReceiver<(String, Delivery)>>,
    /// Whether the session left anything in the broker (queues, a stored
    /// session) that ending it must remove.
    touched: bool,
    /// Counts the connection as a producer of its namespace once it has
    /// published.
    producer: Option<magnetar_broker::metrics::ProducerGuard>,
    /// Deliveries not yet sent, for the in-flight window is full.
    waiting: VecDeque<(String, Delivery)>,
    /// Retained messages for new subscriptions, waiting likewise.
    retained_out: VecDeque<Publish>,
    /// When a resumed session's connection began: messages stored before
    /// may have gone to an earlier connection (whose unsettled
    /// deliveries a restart forgets), so they go out marked DUP, which
    /// MQTT reads as "might be a re-delivery".
    resumed_at: Option<i64>,
    stores: FuturesOrdered<Stored>,
    /// QoS 0 publishes on their way to the bookies. Nobody waits for
    /// them, but while there are [`QOS0_IN_FLIGHT`] (or
    /// [`QOS0_IN_FLIGHT_BYTES`]) the connection reads
    /// no more, so that a flood faster than the bookies waits in TCP
    /// rather than in memory.
    qos0: futures::stream::FuturesUnordered<BoxFuture<'static, usize>>,
    /// Payload bytes of those publishes.
    qos0_bytes: usize,
    /// What the authenticated role may do in the namespace.
    grants: Grants,
    /// The connection's role, stored with its session.
    role: Option<String>,
    /// When the CONNECT token expires: the connection closes then, unless
    /// the client re-authenticates first (v5 AUTH).
    expires: Option<Instant>,
    /// The v5 authentication method of CONNECT ([`connect::TOKEN_AUTH_METHOD`]),
    /// if the client used one: AUTH re-authenticates with it.
    auth_method: Option<ByteString>,
    /// Writes that SUBACK and UNSUBACK do not wait for: bindings on their
    /// way to the metadata store (routes follow them already) and saves of
    /// the session. One failing ends the connection.
    background: futures::stream::FuturesUnordered<BoxFuture<'static, Background>>,
    /// A save of the session is among them; another is due after it.
    saving: bool,
    save_again: bool,
}

/// What a background write was, and how it went.
enum Background {
    Stored(std::result::Result<(), BrokerError>),
    Saved(Result<()>),
}

/// What a client showed before its CONNECT.
#[derive(Debug, Default)]
pub(crate) struct Presented {
    /// The role of the client's TLS certificate, if it showed one the CA
    /// verified.
    pub certificate: Option<Arc<str>>,
    /// Over WebSocket, the token the upgrade carried: it stands for a
    /// CONNECT without a password.
    pub token: Option<Arc<str>>,
    /// Over WebSocket, the namespace the path named, in place of the
    /// listener's.
    pub namespace: Option<NamespaceName>,
}

/// Serves one connection, over TCP or a WebSocket's bytes, until it ends.
/// Its halves are apart, so that reading (on the reading thread) never
/// waits for a write: a plain TCP connection's halves share no lock.
pub(crate) async fn serve<R, W>(
    mut rd: R,
    mut wr: W,
    presented: Presented,
    ctx: Arc<Ctx>,
) -> Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let mut framing = Framing::new(ctx.cfg.max_packet_size);
    let mut buf = BytesMut::new();
    let first = tokio::time::timeout(ctx.cfg.connect_timeout, async {
        loop {
            if let Some(p) = framing.decode(&mut buf)? {
                return Ok::<_, MqttError>(Some(p));
            }
            buf.reserve(256);
            if rd.read_buf(&mut buf).await? == 0 {
                return Ok(None);
            }
        }
    })
    .await;
    let connect = match first {
        Err(_) | Ok(Ok(None)) => return Ok(()),
        Ok(Err(MqttError::ClientIdRejected)) => {
            refuse(
                framing,
                &mut wr,
                v5::ConnectAckReason::ClientIdentifierNotValid,
            )
            .await;
            return Ok(());
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(Some(_))) => return Err(MqttError::Protocol("first packet is not CONNECT".into())),
    };
    let (mut conn, kick) = match Conn::open(&ctx, framing, *connect, &presented).await {
        Ok(x) => x,
        Err((framing, reason)) => {
            refuse(framing, &mut wr, reason).await;
            return Ok(());
        }
    };
    let end = conn.run(rd, &mut wr, buf, kick).await;
    conn.close(end, &mut wr).await;
    Ok(())
}

/// CONNACK with a refusal, before the connection closes.
async fn refuse<W: AsyncWrite + Unpin>(
    mut framing: Framing,
    wr: &mut W,
    reason: v5::ConnectAckReason,
) {
    let mut out = BytesMut::new();
    let _ = framing.encode(
        Packet::ConnectAck(Box::new(v5::ConnectAck {
            reason_code: reason,
            ..Default::default()
        })),
        &mut out,
    );
    let _ = wr.write_all(&out).await;
}

impl Conn {
    /// Takes CONNECT: the session, takeover of an older connection, and
    /// CONNACK. On refusal, the reason for CONNACK.
    async fn open(
        ctx: &Arc<Ctx>,
        mut framing: Framing,
        c: v5::Connect,
        presented: &Presented,
    ) -> std::result::Result<(Conn, oneshot::Receiver<()>), (Framing, v5::ConnectAckReason)> {
        let v5 = framing.is_v5();
        let auth_method = c.auth_method.clone();
        if let Err(reason) = connect::auth_method(auth_method.as_deref()) {
            return Err((framing, reason));
        }
        // The user name and secret go to the auth hook; without either, a
        // client certificate's CN is the role (Mosquitto's
        // `use_identity_as_username`).
        let creds = Credentials {
            user: c.username.as_deref(),
            secret: connect::secret(&c, presented.token.as_deref()),
            certificate: presented.certificate.as_deref(),
        };
        let (principal, expires) = match ctx.broker.authenticate_until(&creds) {
            Ok(p) => p,
            Err(e) => {
                ctx.broker.metrics().auth_failure("mqtt");
                debug!("CONNECT refused: {e}");
                let reason = connect::auth_refusal(creds.user.is_some(), creds.secret.is_some());
                return Err((framing, reason));
            }
        };
        let (ns, named) = match connect::namespace(
            c.username.as_deref(),
            presented.namespace.as_ref(),
            &ctx.cfg.default_namespace,
        ) {
            Ok(x) => x,
            Err(reason) => return Err((framing, reason)),
        };
        // Connection storms to the listener's namespace with auth off skip
        // the metadata read.
        let found = if named || principal != Principal::Anonymous {
            ctx.broker.grants(&principal, &ns).await
        } else {
            Ok(Grants::ALL)
        };
        if let Err(e) = &found {
            debug!("CONNECT: grants of {principal:?} in {ns}: {e}");
        }
        let grants = match connect::grants(found.as_ref().copied(), c.last_will.is_some()) {
            Ok(g) => g,
            Err(reason) => return Err((framing, reason)),
        };
        let (client_id, assigned) =
            match connect::client_id(&c.client_id, v5, c.clean_start, rand::random()) {
                Ok(x) => x,
                Err(reason) => return Err((framing, reason)),
            };
        let assigned = assigned.then(|| client_id.clone());
        if let Err(reason) = connect::will(c.last_will.as_ref()) {
            return Err((framing, reason));
        }
        if let Some(max) = c.max_packet_size {
            framing.set_max_outbound(max.get());
        }
        let id = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
        let key = Ctx::session_key(&ns, &client_id);
        let token = ctx.token(id);
        // A client id, and the session under it, belong to the role that
        // holds it: another role may neither kick its connection nor
        // resume its session (Mosquitto ties them the same way with
        // use_username_as_clientid).
        let role = match &principal {
            Principal::Role(r) if !ctx.broker.is_superuser(&principal) => Some(r.clone()),
            _ => None,
        };
        if let Some(role) = &role {
            let held = ctx.load_session(&ns, &client_id).await.and_then(|s| s.role);
            if held.as_ref().is_some_and(|h| h != role) {
                debug!(client = %client_id, "CONNECT refused: the session is another role's");
                return Err((framing, v5::ConnectAckReason::NotAuthorized));
            }
        }
        let principal_role = match &principal {
            Principal::Role(r) => Some(r.clone()),
            Principal::Anonymous => None,
        };
        // Takeover: the older connection of this client id goes, here at
        // once, on another broker once it sees the owner record.
        let (kick_tx, kick_rx) = oneshot::channel();
        let old = {
            let mut reg = ctx.registry();
            if let (Some(role), Some(live)) = (&role, reg.live.get(&key)) {
                if live.role.as_ref() != Some(role) {
                    drop(reg);
                    debug!(client = %client_id, "CONNECT refused: the client id is another role's");
                    return Err((framing, v5::ConnectAckReason::NotAuthorized));
                }
            }
            reg.live.insert(
                key.clone(),
                Live {
                    conn: id,
                    role: principal_role.clone(),
                    kick: Some(kick_tx),
                    owner_version: u64::MAX,
                },
            )
        };
        if let Some(mut old) = old {
            if let Some(k) = old.kick.take() {
                let _ = k.send(());
            }
        }
        if ctx.cfg.takeover_across_brokers {
            let written = {
                let _permit = ctx.meta_ops.acquire().await;
                ctx.owners.put(&key, token.clone()).await
            };
            match written {
                Ok(version) => {
                    if let Some(l) = ctx.registry().live.get_mut(&key) {
                        if l.conn == id {
                            l.owner_version = version;
                        }
                    }
                }
                Err(e) => debug!(client = %client_id, "owner record not written: {e}"),
            }
        }
        let stored = ctx.load_session(&ns, &client_id).await;
        let had_session = stored.is_some();
        let resume = connect::resume(c.clean_start, stored.map(|s| s.subs), grants.consume);
        if resume.discard {
            ctx.drop_session(&ns, &client_id).await;
        }
        if resume.present {
            if let Err(e) = ctx.load_received(&ns, &client_id).await {
                debug!(client = %client_id, "QoS 2 state not loaded: {e}");
                return Err((framing, v5::ConnectAckReason::ServerUnavailable));
            }
        }
        let (session_present, subs) = (resume.present, resume.subs);
        let ka = match connect::keep_alive(c.keep_alive, ctx.cfg.max_keep_alive, v5) {
            Ok(ka) => ka,
            Err(reason) => return Err((framing, reason)),
        };
        let expiry = c.session_expiry_interval_secs;
        // One stored before (resumed, or replaced by a clean start)
        // counts already.
        if expiry > 0 && !had_session {
            let admitted = ctx
                .session_quota
                .admit(
                    &retained::namespace_prefix(&ns),
                    &magnetar_tenancy::names::encode_segment(&client_id),
                )
                .await;
            if let Err(e) = admitted {
                warn!(client = %client_id, "session refused: {e}");
                return Err((framing, v5::ConnectAckReason::QuotaExceeded));
            }
        }
        if expiry > 0 {
            // Kept from the start, so that a session without
            // subscriptions is present on the next CONNECT too.
            let s = StoredSession {
                subs: subs.clone(),
                expiry,
                owner: token.clone(),
                disconnected_ms: None,
                role: principal_role.clone(),
            };
            if let Err(e) = ctx.save_session(&ns, &client_id, &s).await {
                debug!(client = %client_id, "session not saved: {e}");
                return Err((framing, v5::ConnectAckReason::ServerUnavailable));
            }
        }
        let keep_alive = ka.idle_limit();
        let receive_max = c.receive_max.map_or(65_535, NonZeroU16::get);
        let mut conn = Conn {
            ctx: Arc::clone(ctx),
            id,
            ns,
            client_id,
            framing,
            read_seq: 0,
            read_conn: u64::MAX,
            out: BytesMut::new(),
            v5,
            subs: Vec::new(),
            expiry,
            will: c.last_will,
            keep_alive,
            publishes: Publishes::new(ctx.cfg.topic_alias_max, ctx.cfg.receive_max, v5),
            outbound: Outbound::new(receive_max),
            aliases_out: AliasesOut::new(if v5 { c.topic_alias_max } else { 0 }),
            sources: HashMap::new(),
            deliveries_tx: None,
            deliveries_new: None,
            touched: expiry > 0 || session_present,
            producer: None,
            waiting: VecDeque::new(),
            retained_out: VecDeque::new(),
            resumed_at: session_present.then(now_ms),
            stores: FuturesOrdered::new(),
            background: futures::stream::FuturesUnordered::new(),
            saving: false,
            save_again: false,
            qos0: futures::stream::FuturesUnordered::new(),
            qos0_bytes: 0,
            grants,
            role: principal_role,
            expires,
            auth_method: auth_method.clone(),
        };
        conn.send(Packet::ConnectAck(Box::new(v5::ConnectAck {
            session_present,
            auth_method,
            assigned_client_id: assigned.map(ByteString::from),
            receive_max: NonZeroU16::new(ctx.cfg.receive_max).unwrap_or(NonZeroU16::MIN),
            topic_alias_max: ctx.cfg.topic_alias_max,
            max_packet_size: Some(ctx.cfg.max_packet_size),
            session_expiry_interval_secs: None,
            server_keepalive_sec: ka.server,
            ..Default::default()
        })));
        conn.subs = subs;
        Ok((conn, kick_rx))
    }

    fn send(&mut self, p: Packet) {
        if let Err(e) = self.framing.encode(p, &mut self.out) {
            debug!(client = %self.client_id, "not sent: {e}");
        }
    }

    /// Serves a batch of packets as read; the end of the connection if
    /// one ends it.
    async fn serve_batch(&mut self, mut batch: Batch) -> Option<End> {
        for Inbound { seq, packet, held } in std::mem::take(&mut batch.packets) {
            self.read_seq = seq;
            let served = match packet {
                Ok(p) => self.on_packet(p).await,
                Err(e) => return Some(End::Abrupt(Some(e))),
            };
            // A SUBSCRIBE's filters are bound (or refused) by now.
            drop(held);
            match served {
                Ok(None) => {}
                Ok(Some(end)) => return Some(end),
                Err(e) => return Some(End::Abrupt(Some(e))),
            }
        }
        None
    }

    async fn run<R, W>(
        &mut self,
        rd: R,
        wr: &mut W,
        buf: BytesMut,
        mut kick: oneshot::Receiver<()>,
    ) -> End
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin,
    {
        let mut deliveries = None::<mpsc::UnboundedReceiver<(String, Delivery)>>;
        // A resumed session's subscriptions: bound again (the QoS 0
        // queue lives in memory and went with the last connection or a
        // restart), and consumed.
        for sub in self.subs.clone() {
            if let Err(e) = self.attach(&sub).await {
                return End::Abrupt(Some(e));
            }
        }
        // Packets a client sent right behind CONNECT (paho sends SUBSCRIBE
        // before CONNACK comes) arrived with it, in `buf`: the reader
        // serves them before waiting for more bytes.
        let Reader {
            batches: mut inbound,
            task,
            conn,
        } = spawn_reader(
            rd,
            self.framing.decoder(),
            buf,
            self.ns.clone(),
            Arc::clone(&self.ctx.gate),
        );
        let _reader = AbortOnDrop(task);
        self.read_conn = conn;
        let mut deadline = self.keep_alive.map(|k| Instant::now() + k);
        loop {
            if let Some(rx) = self.deliveries_new.take() {
                deliveries = Some(rx);
            }
            if !self.out.is_empty() {
                let out = self.out.split();
                if wr.write_all(&out).await.is_err() {
                    return End::Abrupt(None);
                }
            }
            tokio::select! {
                // Stores in flight, not publishes waiting for PUBREL, hold
                // back reading: the PUBRELs are read.
                batch = inbound.recv(), if self.qos0.len() < QOS0_IN_FLIGHT
                    && self.qos0_bytes < QOS0_IN_FLIGHT_BYTES
                    && self.publishes.has_room(self.stores.len()) => {
                    let Some(batch) = batch else {
                        return End::Abrupt(None);
                    };
                    deadline = self.keep_alive.map(|k| Instant::now() + k);
                    if let Some(end) = self.serve_batch(batch).await {
                        return end;
                    }
                }
                Some(first) = async {
                    match deliveries.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.waiting.push_back(first);
                    // Take what is already there, so that one write
                    // carries many.
                    if let Some(rx) = deliveries.as_mut() {
                        while let Ok(next) = rx.try_recv() {
                            self.waiting.push_back(next);
                        }
                    }
                    self.pump();
                }
                Some(done) = self.background.next(), if !self.background.is_empty() => {
                    if let Err(e) = self.on_background(done) {
                        return End::Abrupt(Some(e));
                    }
                }
                Some(size) = self.qos0.next(), if !self.qos0.is_empty() => {
                    self.qos0_bytes -= size;
                    // Not reading was the broker's doing, not the client's.
                    deadline = self.keep_alive.map(|k| Instant::now() + k);
                }
                Some((ack, r)) = self.stores.next(), if !self.stores.is_empty() => {
                    // A v5 publish refused for a quota is answered with
                    // 0x97 and the connection stays; a 3.1.1 client has
                    // no way to be told but being disconnected.
                    let ack = match (r, ack.over_quota()) {
                        (Ok(()), _) => ack,
                        (Err(e), Some(refusal)) if e.is_quota() && self.v5 => refusal,
                        (Err(e), _) => return End::Abrupt(Some(e)),
                    };
                    if let Reply::PubRec(id) = ack {
                        self.ctx.registry().received.entry((self.ns.clone(), self.client_id.clone())).or_default().insert(id.get());
                    }
                    if let Some(p) = self.publishes.stored(ack) {
                        self.send(p);
                    }
                }
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await }, if deadline.is_some() => {
                    return End::Abrupt(Some(MqttError::KeepAlive));
                }
                _ = tokio::time::sleep_until(self.expires.unwrap_or_else(Instant::now)), if self.expires.is_some() => {
                    return End::Abrupt(Some(MqttError::TokenExpired));
                }
                _ = &mut kick => return End::TakenOver,
            }
        }
    }

    async fn on_packet(&mut self, p: Packet) -> Result<Option<End>> {
        match p {
            Packet::Connect(_) => return Err(MqttError::Protocol("a second CONNECT".into())),
            Packet::Publish(p) => self.on_publish(*p).await?,
            Packet::PublishAck(a) => self.settle(a.packet_id.get(), false),
            Packet::PublishReceived(a) => {
                let rel = inbound::release(&mut self.outbound, a.packet_id);
                self.send(rel);
            }
            Packet::PublishComplete(a) => self.settle(a.packet_id.get(), true),
            Packet::PublishRelease(a) => {
                let known = self
                    .ctx
                    .registry()
                    .received
                    .get_mut(&(self.ns.clone(), self.client_id.clone()))
                    .is_some_and(|s| s.remove(&a.packet_id.get()));
                if known && self.expiry > 0 {
                    let key = format!(
                        "{}{}",
                        Ctx::qos2_prefix(&self.ns, &self.client_id),
                        a.packet_id
                    );
                    self.ctx.qos2.delete(&key).await?;
                }
                let comp = self.publishes.released(a.packet_id, known);
                self.send(comp);
            }
            Packet::Subscribe(s) => self.on_subscribe(s).await?,
            Packet::Unsubscribe(u) => self.on_unsubscribe(u).await?,
            Packet::PingRequest => self.send(Packet::PingResponse),
            Packet::Disconnect(d) => {
                let e = inbound::disconnect_expiry(self.expiry, d.session_expiry_interval_secs)?;
                if e != self.expiry && e > 0 {
                    self.expiry = e;
                    self.settle_background().await;
                    self.save().await?;
                }
                self.expiry = e;
                return Ok(Some(End::Clean {
                    will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
                }));
            }
            Packet::Auth(a) => self.on_auth(a)?,
            Packet::ConnectAck(_)
            | Packet::SubscribeAck(_)
            | Packet::UnsubscribeAck(_)
            | Packet::PingResponse => {
                return Err(MqttError::Protocol("a server packet from a client".into()))
            }
        }
        Ok(None)
    }

    /// Re-authentication (v5 AUTH 0x19) with the CONNECT's method: a new
    /// token of the same role moves the connection's expiry; any other
    /// ends the connection with Not authorized.
    fn on_auth(&mut self, a: v5::Auth) -> Result<()> {
        let method = inbound::reauth(self.auth_method.as_ref(), &a)?;
        let creds = Credentials {
            secret: a.auth_data.as_deref(),
            ..Credentials::default()
        };
        let (role, expires) = match self.ctx.broker.authenticate_until(&creds) {
            Ok((Principal::Role(r), expires)) => (Some(r), expires),
            Ok((Principal::Anonymous, expires)) => (None, expires),
            Err(e) => {
                self.ctx.broker.metrics().auth_failure("mqtt");
                debug!(client = %self.client_id, "re-authentication refused: {e}");
                return Err(MqttError::TokenExpired);
            }
        };
        if role != self.role {
            debug!(client = %self.client_id, "re-authentication as another role refused");
            return Err(MqttError::TokenExpired);
        }
        self.expires = expires;
        self.send(Packet::Auth(v5::Auth {
            reason_code: v5::AuthReasonCode::Success,
            auth_method: Some(method),
            ..Default::default()
        }));
        Ok(())
    }

    async fn on_publish(&mut self, mut p: Publish) -> Result<()> {
        let arrived = std::time::Instant::now();
        // Asked for QoS 2 publishes only: the key is built then.
        let stored_before = |id: NonZeroU16| {
            self.ctx
                .registry()
                .received
                .get(&(self.ns.clone(), self.client_id.clone()))
                .is_some_and(|s| s.contains(&id.get()))
        };
        let (topic, ack) = match self.publishes.publish(&mut p, self.grants, stored_before)? {
            Admission::Store { topic, ack } => (topic, ack),
            Admission::Answer(ack) => {
                if let Reply::Refused(..) | Reply::Nothing = ack {
                    debug!(client = %self.client_id, topic = %p.topic, "publish not authorised");
                }
                if ack != Reply::Nothing {
                    self.stores.push_back(async move { (ack, Ok(())) }.boxed());
                }
                return Ok(());
            }
        };
        if self.producer.is_none() {
            self.producer = Some(self.ctx.broker.metrics().producer(&self.ns));
        }
        let record = props::to_record(&p, &topic, &self.client_id);
        // Subscribers whose SUBSCRIBE arrived first get it.
        self.ctx
            .gate
            .wait(self.read_conn, self.read_seq, &self.ns, &topic)
            .await;
        let mut stored = match self.ctx.publish(&self.ns, &topic, record, p.retain).await {
            Ok(stored) => stored,
            // A v5 client is told in turn, by the acknowledgement.
            Err(e) if e.is_quota() && self.v5 && ack.over_quota().is_some() => {
                futures::future::ready(Err(e)).boxed()
            }
            Err(e) => return Err(e),
        };
        if let (Reply::PubRec(id), true) = (ack, self.expiry > 0) {
            // Remembered durably before PUBREC goes out.
            let key = format!("{}{id}", Ctx::qos2_prefix(&self.ns, &self.client_id));
            let ctx = Arc::clone(&self.ctx);
            stored = async move {
                stored.await?;
                ctx.qos2.put(&key, Vec::new()).await?;
                Ok(())
            }
            .boxed();
        }
        if ack == Reply::Nothing {
            // QoS 0: nobody waits; errors are only logged.
            let size = p.payload.len();
            self.qos0_bytes += size;
            self.qos0.push(
                async move {
                    if let Err(e) = stored.await {
                        debug!("QoS 0 publish not stored: {e}");
                    }
                    size
                }
                .boxed(),
            );
        } else {
            let latency = self.ctx.publish_latency.clone();
            self.stores.push_back(
                async move {
                    let r = stored.await;
                    latency.observe(arrived.elapsed().as_secs_f64());
                    (ack, r)
                }
                .boxed(),
            );
        }
        Ok(())
    }

    /// Starts consuming `queue`, unless this session already does.
    async fn consume(&mut self, queue: &str) -> Result<()> {
        if self.sources.contains_key(queue) {
            return Ok(());
        }
        let durable = queue != session_queue(&self.client_id, 0);
        self.touched = true;
        self.ctx.ensure_queue(&self.ns, queue, durable).await?;
        let topic = self.ctx.broker.queue_topic(&self.ns, queue, durable)?;
        let mut consumer = self
            .ctx
            .broker
            .subscribe(
                &topic,
                SUBSCRIPTION,
                SubscriptionOptions {
                    sub_type: SubscriptionType::Shared,
                    initial_position: InitialPosition::Earliest,
                    durable,
                    ..SubscriptionOptions::default()
                },
                ConsumerOptions {
                    name: self.client_id.clone(),
                    ..ConsumerOptions::default()
                },
            )
            .await?;
        consumer.flow(u64::from(self.outbound.window()));
        let control = consumer.control();
        let tx = match &self.deliveries_tx {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                self.deliveries_tx = Some(tx.clone());
                self.deliveries_new = Some(rx);
                tx
            }
        };
        let name = queue.to_owned();
        let task = tokio::spawn(async move {
            while let Some(d) = consumer.recv().await {
                if tx.send((name.clone(), d)).is_err() {
                    break;
                }
            }
        });
        self.sources
            .insert(queue.to_owned(), Source { control, task });
        Ok(())
    }

    async fn on_subscribe(&mut self, s: v5::Subscribe) -> Result<()> {
        let mut status = Vec::with_capacity(s.topic_filters.len());
        let mut changed = false;
        let mut retained_for = Vec::new();
        for (filter, opts) in s.topic_filters {
            let filter = filter.to_string();
            let shared = match subscriptions::verdict(&filter, opts.no_local, self.grants.consume)?
            {
                Verdict::Accepted { shared } => shared,
                Verdict::Invalid => {
                    status.push(v5::SubscribeAckReason::TopicFilterInvalid);
                    continue;
                }
                Verdict::NotAuthorized => {
                    debug!(client = %self.client_id, "not authorized to subscribe to {filter}");
                    status.push(v5::SubscribeAckReason::NotAuthorized);
                    continue;
                }
            };
            let existed = self.subs.iter().any(|x| x.filter == filter);
            let sub = Sub {
                filter: filter.clone(),
                qos: opts.qos.value(),
                no_local: opts.no_local,
                retain_as_published: opts.retain_as_published,
                id: s.id.map(NonZeroU32::get),
            };
            if let Err(e) = self.attach(&sub).await {
                debug!(client = %self.client_id, "subscribe {filter}: {e}");
                status.push(v5::SubscribeAckReason::UnspecifiedError);
                continue;
            }
            if let Some(old) = subscriptions::moved(&self.subs, &sub, &self.client_id).cloned() {
                self.detach(&old, &[&sub]).await;
            }
            if subscriptions::sends_retained(shared, opts.retain_handling, existed) {
                retained_for.push(sub.clone());
            }
            match self.subs.iter_mut().find(|x| x.filter == filter) {
                Some(x) => *x = sub,
                None => self.subs.push(sub),
            }
            changed = true;
            status.push(codec::granted(opts.qos));
        }
        if changed && self.expiry > 0 {
            self.save_later();
        }
        self.send(Packet::SubscribeAck(v5::SubscribeAck {
            packet_id: s.packet_id,
            properties: Vec::new(),
            reason_string: None,
            status,
        }));
        for sub in retained_for {
            self.queue_retained(&sub).await;
        }
        self.pump();
        Ok(())
    }

    async fn on_unsubscribe(&mut self, u: v5::Unsubscribe) -> Result<()> {
        let mut status = Vec::with_capacity(u.topic_filters.len());
        for filter in u.topic_filters {
            let Some(i) = self.subs.iter().position(|s| s.filter == *filter) else {
                status.push(v5::UnsubscribeAckReason::NoSubscriptionExisted);
                continue;
            };
            let sub = self.subs.remove(i);
            self.detach(&sub, &[]).await;
            status.push(v5::UnsubscribeAckReason::Success);
        }
        if self.expiry > 0 {
            self.save_later();
        }
        self.send(Packet::UnsubscribeAck(v5::UnsubscribeAck {
            packet_id: u.packet_id,
            properties: Vec::new(),
            reason_string: None,
            status,
        }));
        Ok(())
    }

    /// Consumes `sub`'s queue and binds it to its filter. The consumer
    /// comes first, so that nothing routed by the binding waits unseen;
    /// the binding routes publishes when this returns, and is stored in
    /// the background.
    async fn attach(&mut self, sub: &Sub) -> Result<()> {
        self.touched = true;
        let queue = sub.queue(&self.client_id);
        // A queue the session consumes exists.
        self.consume(&queue).await?;
        let stored = self
            .ctx
            .broker
            .bind_now(
                &self.ns,
                Binding::queue(EXCHANGE, queue.as_str(), topic::binding_key(sub.pattern())),
            )
            .await?;
        self.background
            .push(async move { Background::Stored(stored.await) }.boxed());
        Ok(())
    }

    /// A background write ended; a failed one ends the connection, whose
    /// client then holds a subscription the broker may not keep.
    fn on_background(&mut self, done: Background) -> Result<()> {
        match done {
            Background::Stored(r) => r?,
            Background::Saved(r) => {
                self.saving = false;
                r?;
                if std::mem::take(&mut self.save_again) {
                    self.save_later();
                }
            }
        }
        Ok(())
    }

    /// Saves the session in the background, one save at a time, the
    /// latest state winning.
    fn save_later(&mut self) {
        if self.saving {
            self.save_again = true;
            return;
        }
        self.saving = true;
        self.touched = true;
        let ctx = Arc::clone(&self.ctx);
        let (ns, client_id) = (self.ns.clone(), self.client_id.clone());
        let session = self.stored_session(None);
        self.background.push(
            async move { Background::Saved(ctx.save_session(&ns, &client_id, &session).await) }
                .boxed(),
        );
    }

    /// Lets the background writes finish, before the session's last save.
    async fn settle_background(&mut self) {
        while let Some(done) = self.background.next().await {
            if let Background::Saved(_) = done {
                self.saving = false;
            }
        }
    }

    /// Undoes what `sub` needed of its queue, as far as
    /// [`subscriptions::release`] says nothing else needs it.
    async fn detach(&mut self, sub: &Sub, keep: &[&Sub]) {
        let queue = sub.queue(&self.client_id);
        let release = subscriptions::release(&self.subs, sub, keep, &self.client_id);
        if let Some(key) = release.unbind {
            // Routes drop the binding at once; storing it is not waited
            // for, and a failure leaves a binding whose deliveries the
            // session no longer wants, which is not worth the connection.
            let binding = Binding::queue(EXCHANGE, queue.as_str(), key);
            if let Ok(stored) = self.ctx.broker.unbind_now(&self.ns, binding).await {
                let client = self.client_id.clone();
                self.background.push(
                    async move {
                        if let Err(e) = stored.await {
                            debug!(client = %client, "unbind not stored: {e}");
                        }
                        Background::Stored(Ok(()))
                    }
                    .boxed(),
                );
            }
        }
        if release.stop_consuming {
            self.sources.remove(&queue);
        }
    }

    async fn save(&mut self) -> Result<()> {
        self.save_as(None).await
    }

    /// Saves the session, as disconnected at `disconnected_ms` if given.
    async fn save_as(&mut self, disconnected_ms: Option<i64>) -> Result<()> {
        self.touched = true;
        let session = self.stored_session(disconnected_ms);
        self.ctx
            .save_session(&self.ns, &self.client_id, &session)
            .await
    }

    fn stored_session(&self, disconnected_ms: Option<i64>) -> StoredSession {
        StoredSession {
            subs: self.subs.clone(),
            expiry: self.expiry,
            owner: self.ctx.token(self.id),
            disconnected_ms,
            role: self.role.clone(),
        }
    }

    /// Sends what waits, retained messages first, while the in-flight
    /// window has room.
    fn pump(&mut self) {
        while !self.outbound.is_full() {
            if let Some(p) = self.retained_out.pop_front() {
                self.emit(p, None, false);
            } else if let Some((q, d)) = self.waiting.pop_front() {
                self.deliver(q, d);
            } else {
                break;
            }
        }
    }

    /// A message from one of the session's queues: sent at the QoS its
    /// subscriptions allow, or dropped if none matches any more.
    fn deliver(&mut self, queue: String, d: Delivery) {
        let Some(stored) = props::read(&d.message, now_ms()) else {
            self.done(&queue, d.offset);
            return;
        };
        let publisher = stored.publisher.as_deref();
        let plan = subscriptions::plan(
            &self.subs,
            &self.client_id,
            &queue,
            &stored.topic,
            publisher,
            stored.qos,
            stored.expired,
        );
        let Plan::Send {
            qos,
            ids,
            retain_as_published: rap,
        } = plan
        else {
            self.done(&queue, d.offset);
            return;
        };
        let properties = self.v5.then(|| props::properties(&d.message, &stored, ids));
        let publish = Publish {
            dup: false,
            retain: rap && stored.retain,
            qos,
            topic: ByteString::from(stored.topic),
            packet_id: None,
            payload: d.message.value.clone().unwrap_or_default(),
            properties,
        };
        let dup =
            d.redelivery_count > 0 || self.resumed_at.is_some_and(|t| d.message.timestamp_ms < t);
        self.emit(publish, Some((queue, d.offset)), dup);
    }

    /// Puts a publish on the wire: QoS 0 at once (its queue message done
    /// with), QoS 1 and 2 under a packet id of the in-flight window,
    /// which the caller made sure has room. `origin`: the queue message
    /// it carries; None for a retained message.
    fn emit(&mut self, mut publish: Publish, origin: Option<(String, u64)>, dup: bool) {
        let (queue, offset) = origin.unwrap_or_default();
        let qos = publish.qos;
        if qos != QoS::AtMostOnce {
            let Some(id) = self.outbound.start(Inflight {
                queue: queue.clone(),
                offset,
                qos: qos.value(),
            }) else {
                return;
            };
            publish.packet_id = NonZeroU16::new(id);
            publish.dup = dup;
        }
        if let Some(props) = publish.properties.as_mut() {
            match self.aliases_out.name(&publish.topic) {
                TopicRef::Full => {}
                TopicRef::Set(a) => props.topic_alias = NonZeroU16::new(a),
                TopicRef::Alias(a) => {
                    props.topic_alias = NonZeroU16::new(a);
                    publish.topic = ByteString::new();
                }
            }
        }
        let id = publish.packet_id;
        if let Err(e) = self
            .framing
            .encode(Packet::Publish(Box::new(publish)), &mut self.out)
        {
            // Too big for the client (its Maximum Packet Size): as MQTT 5
            // says, dropped as if delivered.
            debug!(client = %self.client_id, "publish not sent: {e}");
            if let Some(id) = id {
                // Whatever its QoS, the slot in the client's Receive
                // Maximum is free again.
                self.outbound.finish(id.get(), qos == QoS::ExactlyOnce);
            }
            self.done(&queue, offset);
        } else if qos == QoS::AtMostOnce {
            self.done(&queue, offset);
        }
    }

    /// A delivery is finished with: acknowledged on its queue, and the
    /// credit it used given back. Retained messages have no queue.
    fn done(&mut self, queue: &str, offset: u64) {
        if let Some(s) = self.sources.get(queue) {
            s.control.ack(vec![offset]);
            s.control.flow(1);
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) from the client.
    fn settle(&mut self, id: u16, complete: bool) {
        if let Some(f) = self.outbound.finish(id, complete) {
            self.done(&f.queue, f.offset);
        }
        self.pump();
    }

    /// Queues the retained messages `sub` matches, as retained publishes.
    async fn queue_retained(&mut self, sub: &Sub) {
        let found = match self.ctx.retained_matching(&self.ns, sub.pattern()).await {
            Ok(found) => found,
            Err(e) => {
                debug!(client = %self.client_id, "retained messages for {}: {e}", sub.filter);
                return;
            }
        };
        let now = now_ms();
        for m in found {
            let Some(stored) = props::read(&m, now) else {
                continue;
            };
            let ids = sub.id.and_then(NonZeroU32::new).into_iter().collect();
            let properties = self.v5.then(|| props::properties(&m, &stored, ids));
            self.retained_out.push_back(Publish {
                dup: false,
                retain: true,
                qos: stored.qos.less_value(qos_of(sub.qos)),
                topic: ByteString::from(stored.topic),
                packet_id: None,
                payload: m.value.clone().unwrap_or_default(),
                properties,
            });
        }
    }

    async fn close<W: AsyncWrite + Unpin>(mut self, end: End, wr: &mut W) {
        let reason = match &end {
            End::TakenOver => Some(v5::DisconnectReasonCode::SessionTakenOver),
            End::Abrupt(Some(e)) => Some(e.reason()),
            _ => None,
        };
        if let Some(reason) = reason {
            // Said in a Reason String too (which MQTT 5 allows on
            // DISCONNECT whatever the client's Request Problem
            // Information): paho reads the reason code only then.
            let mut why = None;
            if let End::Abrupt(Some(e)) = &end {
                debug!(client = %self.client_id, "closing: {e}");
                why = Some(ByteString::from(e.to_string()));
            }
            self.send(Packet::Disconnect(v5::Disconnect {
                reason_code: reason,
                session_expiry_interval_secs: None,
                server_reference: None,
                reason_string: why,
                user_properties: Vec::new(),
            }));
        }
        if !self.out.is_empty() {
            let _ = wr.write_all(&self.out).await;
        }
        let _ = wr.shutdown().await;
        // Unsettled deliveries go back to their queues for the next
        // connection (or another member of a share group).
        self.sources.clear();
        self.settle_background().await;
        let fire = match end {
            End::Clean { will } => will,
            End::Abrupt(_) | End::TakenOver => true,
        };
        let key = Ctx::session_key(&self.ns, &self.client_id);
        let still_mine = {
            let mut reg = self.ctx.registry();
            let mine = reg.live.get(&key).is_some_and(|l| l.conn == self.id);
            if mine {
                reg.live.remove(&key);
            }
            mine
        };
        if still_mine && !matches!(end, End::TakenOver) && self.ctx.cfg.takeover_across_brokers {
            // Only ours: a newer connection elsewhere has rewritten it.
            let ctx = Arc::clone(&self.ctx);
            let token = self.ctx.token(self.id);
            tokio::spawn(async move {
                let _permit = ctx.meta_ops.acquire().await;
                let owners = &ctx.owners;
                if let Ok(Some(v)) = owners.get(&key).await {
                    if v.value == token.as_bytes() {
                        let _ = owners.compare_and_delete(&key, v.version).await;
                    }
                }
            });
        }
        if let Some(w) = self.will.take().filter(|_| fire) {
            publish_will(
                Arc::clone(&self.ctx),
                self.ns.clone(),
                self.client_id.clone(),
                self.id,
                w,
                self.expiry,
            );
        }
        if still_mine && self.expiry == 0 {
            if self.touched {
                self.ctx.drop_session(&self.ns, &self.client_id).await;
            } else {
                self.ctx
                    .registry()
                    .received
                    .remove(&(self.ns.clone(), self.client_id.clone()));
            }
        } else if still_mine {
            // QoS 0 messages are not kept for an offline session, as
            // Mosquitto does by default; the next connection binds the
            // queue again.
            self.ctx
                .delete_queue(&self.ns, &session_queue(&self.client_id, 0))
                .await;
            if self.expiry != u32::MAX {
                if let Err(e) = self.save_as(Some(now_ms())).await {
                    debug!(client = %self.client_id, "disconnect time not saved: {e}");
                }
                expire_later(
                    Arc::clone(&self.ctx),
                    self.ns.clone(),
                    self.client_id.clone(),
                    self.id,
                    self.expiry,
                );
            }
        }
    }
}

/// Publishes a will, after its delay (at most the session's expiry),
/// unless the client came back in the meantime.
fn publish_will(
    ctx: Arc<Ctx>,
    ns: NamespaceName,
    client_id: String,
    conn: u64,
    w: v5::LastWill,
    expiry: u32,
) {
    tokio::spawn(async move {
        let delay = w.will_delay_interval_sec.unwrap_or(0).min(expiry);
        if delay > 0 {
            tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
            let back = ctx
                .registry()
                .live
                .get(&Ctx::session_key(&ns, &client_id))
                .is_some_and(|l| l.conn != conn);
            if back
                || !ctx
                    .session_still_with(&ns, &client_id, &ctx.token(conn))
                    .await
            {
                return;
            }
        }
        let p = Publish {
            dup: false,
            retain: w.retain,
            qos: w.qos,
            topic: w.topic.clone(),
            packet_id: None,
            payload: w.message.clone(),
            properties: Some(v5::PublishProperties {
                correlation_data: w.correlation_data.clone(),
                message_expiry_interval: w.message_expiry_interval,
                content_type: w.content_type.clone(),
                user_properties: w.user_properties.clone(),
                is_utf8_payload: w.is_utf8_payload.unwrap_or(false),
                response_topic: w.response_topic.clone(),
                ..Default::default()
            }),
        };
        let record = props::to_record(&p, &w.topic, &client_id);
        match ctx.publish(&ns, &w.topic, record, w.retain).await {
            Ok(stored) => {
                if let Err(e) = stored.await {
                    debug!(client = %client_id, "will not stored: {e}");
                }
            }
            Err(e) => debug!(client = %client_id, "will not routed: {e}"),
        }
    });
}

/// Drops a session `expiry` seconds after its connection went, unless the
/// client came back.
fn expire_later(ctx: Arc<Ctx>, ns: NamespaceName, client_id: String, conn: u64, expiry: u32) {
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(u64::from(expiry))).await;
        let back = ctx
            .registry()
            .live
            .contains_key(&Ctx::session_key(&ns, &client_id));
        if !back
            && ctx
                .session_still_with(&ns, &client_id, &ctx.token(conn))
                .await
        {
            ctx.drop_session(&ns, &client_id).await;
        }
    });
}
