//! The endpoints on the HTTP listener. A request is parsed, authenticated
//! and its producer or consumer created before the upgrade, so that every
//! refusal is an HTTP status, as Pulsar's servlets answer; after the
//! upgrade one task per connection moves frames.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, OriginalUri, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::stream::{BoxStream, FuturesOrdered, SelectAll};
use futures::{FutureExt, SinkExt, StreamExt};
use magnetar_broker::listener::PeerCertificate;
use magnetar_broker::subscription::{
    Consumer, ConsumerControl, ConsumerOptions, Delivery, InitialPosition, SubscriptionOptions,
    SubscriptionType,
};
use magnetar_broker::{Broker, BrokerError, Coalescer, Grants, Principal};
use magnetar_tenancy::{AuthAction, Credentials, TopicName};
use tokio::time::Instant;
use tracing::debug;

use crate::flow::{Flow, Grant};
use crate::frames::{ConsumerCommand, EndOfTopic, ProducerAck, ProducerMessage};
use crate::mapping::{to_frame, to_record, IdBase};
use crate::message_id::MessageId;
use crate::request::{
    parse_v2, parse_v3, ConsumerRequest, Params, ProducerRequest, ReaderRequest, ReaderStart,
    Refusal, Request, Topics,
};
use crate::WsError;

/// Settings of the WebSocket API.
#[derive(Clone, Debug)]
pub struct WsConfig {
    /// Largest frame accepted (a base64 payload and its JSON).
    pub max_message_size: usize,
    /// Publishes a producer connection may have in flight before its
    /// frames wait.
    pub max_pending_publishes: usize,
    /// How often a pattern consumer looks for new topics.
    pub pattern_discovery: Duration,
    /// Bytes read from a socket at a time. The socket library's default
    /// (128 KiB, allocated per connection) would make ten thousand idle
    /// subscribers cost more than a gigabyte.
    pub read_buffer_size: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_message_size: 8 << 20,
            max_pending_publishes: 1000,
            pattern_discovery: Duration::from_secs(5),
            read_buffer_size: 8 << 10,
        }
    }
}

#[derive(Clone)]
struct Ctx {
    broker: Broker,
    cfg: WsConfig,
}

/// The WebSocket API's routes, with their state; merge them into the
/// HTTP listener's router.
pub fn routes(broker: Broker, cfg: WsConfig) -> Router {
    Router::new()
        .route("/ws/v2/{kind}/{domain}/{tenant}/{ns}/{*rest}", get(v2))
        .route("/ws/v3/consumer/{*subscription}", get(v3))
        .route(
            "/",
            get(|| console("text/html; charset=utf-8", CONSOLE_HTML)),
        )
        .route(
            "/console/console.js",
            get(|| console("text/javascript; charset=utf-8", CONSOLE_JS)),
        )
        .route(
            "/console/console.css",
            get(|| console("text/css; charset=utf-8", CONSOLE_CSS)),
        )
        .with_state(Ctx { broker, cfg })
}

// The console: a static page over the admin API and this API, built into
// the binary so that it needs nothing installed.
const CONSOLE_HTML: &str = include_str!("../console/index.html");
const CONSOLE_JS: &str = include_str!("../console/console.js");
const CONSOLE_CSS: &str = include_str!("../console/console.css");

async fn console(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
/// The token the socket was opened with expired.
const CLOSE_POLICY: u16 = 1008;
const TOKEN_EXPIRED: &str = "the token expired";

/// Pulsar closes with its WebSocketError code (3 for a frame that is not
/// JSON), which is below the codes RFC 6455 lets an endpoint send, and
/// clients refuse it as a protocol error. The code goes out in the private
/// range as 4000 + Pulsar's code, with Pulsar's description as the reason.
fn pulsar_close(code: u16) -> u16 {
    4000 + code
}

fn refuse(r: Refusal) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, r.message).into_response()
}

/// What a broker error before the upgrade answers: the status of the
/// broker's one map (as the admin API answers), and the message under
/// Pulsar's prefix for what was being made.
fn refusal(e: &BrokerError, making: &str) -> Refusal {
    let status = magnetar_broker::http::status_of(e).as_u16();
    if status == 400 {
        Refusal::bad_params(e)
    } else {
        Refusal::new(status, format!("{making}: {e}"))
    }
}

/// Pulsar's prefix for a failure to make what `req` asks for.
fn making(req: &Request) -> &'static str {
    match req {
        Request::Reader(_) => "Failed to create reader",
        Request::Producer(_) | Request::Consumer(_) => "Failed to create producer/consumer",
    }
}

/// The subprotocol a browser offers next to `bearer.<jwt>`, and which the
/// server echoes, since a browser may set no header on a WebSocket.
const TOKEN_SUBPROTOCOL: &str = "magnetar";

/// The grants of the request's role, and when its token expires (the
/// socket closes then).
async fn authorize(
    b: &Broker,
    req: &Request,
    q: &Params,
    headers: &HeaderMap,
    certificate: Option<&str>,
) -> Result<(Grants, Option<Instant>), Refusal> {
    let (principal, expires) = if b.auth_enabled() {
        let t = magnetar_broker::http::upgrade_token(headers, q.get("token"));
        if t.is_none() && certificate.is_none() {
            return Err(Refusal::new(401, "Authentication required"));
        }
        b.authenticate_until(&Credentials {
            user: None,
            secret: t.map(str::as_bytes),
            certificate,
        })
        .map_err(|e| {
            b.metrics().auth_failure("websocket");
            Refusal::new(401, format!("Failed to authenticate: {e}"))
        })?
    } else {
        (Principal::Anonymous, None)
    };
    let Some(ns) = req.namespace() else {
        return Err(Refusal::bad_params("no topic"));
    };
    let grants = b
        .grants(&principal, ns)
        .await
        .map_err(|e| refusal(&e, making(req)))?;
    let action = match req {
        Request::Producer(_) => AuthAction::Produce,
        Request::Consumer(_) | Request::Reader(_) => AuthAction::Consume,
    };
    grants
        .check(action, || ns.to_string())
        .map_err(|e| Refusal::new(403, format!("Not authorized: {e}")))?;
    // The broker writes dead letters on the consumer's behalf, so the role
    // must be one that may produce there, as a Pulsar client's own
    // dead-letter producer would have to.
    if let Request::Consumer(c) = req {
        if let Some(dl) = c.dead_letter.as_ref().and_then(|d| d.topic.as_deref()) {
            let target = magnetar_broker::service::resolve_in(ns, dl)
                .map_err(|e| Refusal::bad_params(format!("deadLetterTopic: {e}")))?;
            let target_grants = if target.namespace() == ns {
                grants
            } else {
                b.grants(&principal, target.namespace())
                    .await
                    .map_err(|e| match e {
                        BrokerError::NotFound(_) => {
                            Refusal::new(403, format!("Not authorized to produce to {target}"))
                        }
                        e => refusal(&e, making(req)),
                    })?
            };
            target_grants
                .check(AuthAction::Produce, || target.to_string())
                .map_err(|e| Refusal::new(403, format!("Not authorized: {e}")))?;
        }
    }
    Ok((grants, expires))
}

async fn v2(
    State(ctx): State<Ctx>,
    Path((kind, domain, tenant, ns, rest)): Path<(String, String, String, String, String)>,
    Query(q): Query<Vec<(String, String)>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    cert: Option<Extension<PeerCertificate>>,
    ws: WebSocketUpgrade,
) -> Response {
    let q = Params(q);
    match parse_v2(&kind, &domain, &tenant, &ns, &rest, &q) {
        Ok(req) => open(ctx, req, q, &uri, headers, cert, ws).await,
        Err(r) => refuse(r),
    }
}

async fn v3(
    State(ctx): State<Ctx>,
    Path(subscription): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    cert: Option<Extension<PeerCertificate>>,
    ws: WebSocketUpgrade,
) -> Response {
    let q = Params(q);
    match parse_v3(&subscription, &q) {
        Ok(req) => open(ctx, req, q, &uri, headers, cert, ws).await,
        Err(r) => refuse(r),
    }
}

async fn open(
    ctx: Ctx,
    req: Request,
    q: Params,
    uri: &axum::http::Uri,
    headers: HeaderMap,
    cert: Option<Extension<PeerCertificate>>,
    ws: WebSocketUpgrade,
) -> Response {
    let certificate = cert.as_ref().and_then(|Extension(c)| c.0.as_deref());
    let expires = match authorize(&ctx.broker, &req, &q, &headers, certificate).await {
        Ok((_, expires)) => expires,
        Err(r) => return refuse(r),
    };
    let ws = ws
        .protocols([TOKEN_SUBPROTOCOL])
        .max_message_size(ctx.cfg.max_message_size)
        .read_buffer_size(ctx.cfg.read_buffer_size);
    let making = making(&req);
    let made = match req {
        Request::Producer(p) => producer(&ctx, p).await.map(|p| {
            ws.on_upgrade(move |s| run_producer(s, ctx, p, expires))
                .into_response()
        }),
        Request::Consumer(c) => consumer(&ctx, c).await.map(|c| {
            ws.on_upgrade(move |s| run_consumer(s, ctx, c, expires))
                .into_response()
        }),
        Request::Reader(r) => reader(&ctx, r).await.map(|c| {
            ws.on_upgrade(move |s| run_consumer(s, ctx, c, expires))
                .into_response()
        }),
    };
    match made {
        Ok(r) => r,
        // Another broker serves the topic: send the client there, as an
        // HTTP lookup redirect does.
        Err(BrokerError::NotOwner {
            owner: Some(url), ..
        }) => {
            let path = uri.path_and_query().map_or("", |p| p.as_str());
            let to = format!("{}{path}", url.trim_end_matches('/'))
                .replacen("http://", "ws://", 1)
                .replacen("https://", "wss://", 1);
            (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response()
        }
        Err(e) => refuse(refusal(&e, making)),
    }
}

// ---- producer ----

struct ProducerState {
    /// One coalescer per partition (one for a plain topic).
    partitions: Vec<(IdBase, Coalescer)>,
    round_robin: usize,
    /// A message from its frame's arrival to its ack.
    latency: magnetar_broker::metrics::Histogram,
    /// Counts the socket as a producer of the topic's namespace.
    _producer: magnetar_broker::metrics::ProducerGuard,
}

async fn producer(ctx: &Ctx, p: ProducerRequest) -> Result<ProducerState, BrokerError> {
    let b = &ctx.broker;
    let topics = match b.partitions(&p.topic).await? {
        Some(n) => (0..n).map(|i| p.topic.partition(i)).collect(),
        None => {
            if !b.topic_exists(&p.topic).await? && !b.config().auto_create_topics {
                return Err(BrokerError::NotFound(format!("topic {}", p.topic)));
            }
            vec![p.topic.clone()]
        }
    };
    Ok(ProducerState {
        partitions: topics
            .into_iter()
            .map(|t| (IdBase::of(&t), b.coalescer(&t)))
            .collect(),
        round_robin: 0,
        latency: b.metrics().publish_latency("websocket"),
        _producer: b.metrics().producer(p.topic.namespace()),
    })
}

impl ProducerState {
    /// Keyed messages go to the key's partition; others round-robin.
    fn pick(&mut self, key: Option<&[u8]>) -> usize {
        let n = self.partitions.len();
        match key {
            Some(k) => crc32c::crc32c(k) as usize % n,
            None => {
                self.round_robin = self.round_robin.wrapping_add(1);
                self.round_robin % n
            }
        }
    }
}

fn text_of(msg: WsMessage) -> Option<Result<String, WsError>> {
    match msg {
        WsMessage::Text(t) => Some(Ok(t.as_str().to_owned())),
        WsMessage::Binary(b) => Some(
            String::from_utf8(b.to_vec())
                .map_err(|_| WsError::Json("a binary frame that is not UTF-8 text".into())),
        ),
        WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Close(_) => None,
    }
}

fn json(v: &impl serde::Serialize) -> WsMessage {
    WsMessage::Text(serde_json::to_string(v).unwrap_or_default().into())
}

/// The close frame for a frame that could not be read: too large (1009)
/// or not WebSocket (1002). The socket library names the limit it hit
/// only in its message.
fn read_failure(e: &axum::Error) -> WsMessage {
    let why = e.to_string();
    let too_big = why.contains("limit") || why.contains("too long") || why.contains("too big");
    if too_big {
        close(1009, &why)
    } else {
        close(1002, &why)
    }
}

fn close(code: u16, reason: &str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: reason.chars().take(120).collect::<String>().into(),
    }))
}

async fn run_producer(socket: WebSocket, ctx: Ctx, mut p: ProducerState, expires: Option<Instant>) {
    let (mut sink, mut stream) = socket.split();
    let mut pending = FuturesOrdered::new();
    loop {
        let room = pending.len() < ctx.cfg.max_pending_publishes;
        tokio::select! {
            frame = stream.next(), if room => {
                let frame = match frame {
                    Some(Ok(f)) => f,
                    Some(Err(e)) => {
                        let _ = sink.send(read_failure(&e)).await;
                        return;
                    }
                    None => break,
                };
                if matches!(frame, WsMessage::Close(_)) {
                    break;
                }
                let Some(text) = text_of(frame) else { continue };
                pending.push_back(publish(&mut p, text));
            }
            Some(ack) = pending.next(), if !pending.is_empty() => {
                if sink.send(json(&ack)).await.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(expires.unwrap_or_else(Instant::now)), if expires.is_some() => {
                let _ = sink.send(close(CLOSE_POLICY, TOKEN_EXPIRED)).await;
                return;
            }
        }
    }
    // The client is gone or closing: what is in flight is still stored,
    // and its acks go out if the socket still takes them.
    while let Some(ack) = pending.next().await {
        if sink.send(json(&ack)).await.is_err() {
            return;
        }
    }
    let _ = sink.send(close(CLOSE_NORMAL, "")).await;
}

fn publish(
    p: &mut ProducerState,
    text: Result<String, WsError>,
) -> futures::future::BoxFuture<'static, ProducerAck> {
    let parsed = text.and_then(|t| ProducerMessage::parse(&t));
    let context = parsed.as_ref().ok().and_then(|m| m.context.clone());
    let record = parsed.and_then(|m| to_record(&m));
    match record {
        Err(e) => {
            futures::future::ready(ProducerAck::error(e.code(), e.to_string(), context)).boxed()
        }
        Ok(record) => {
            let i = p.pick(record.key.as_deref());
            let (ids, coalescer) = &p.partitions[i];
            let ids = *ids;
            let sent = coalescer.publish(record);
            let (latency, arrived) = (p.latency.clone(), std::time::Instant::now());
            async move {
                match sent.await {
                    Ok(offset) => {
                        latency.observe(arrived.elapsed().as_secs_f64());
                        ProducerAck::ok(ids.id(offset).encode(), context)
                    }
                    Err(e) => ProducerAck::error(
                        crate::SEND_FAILED,
                        format!("Failed to send message: {e}"),
                        context,
                    ),
                }
            }
            .boxed()
        }
    }
}

// ---- consumer and reader ----

/// One topic (or partition) a connection reads.
struct Slot {
    topic: TopicName,
    ids: IdBase,
    control: ConsumerControl,
}

struct ConsumerState {
    /// Subscription name; for readers a generated one.
    subscription: String,
    slots: Vec<Slot>,
    /// What ids of each slot carry, to the slot, for acks.
    by_id: HashMap<IdBase, usize>,
    streams: SelectAll<BoxStream<'static, (usize, Option<Delivery>)>>,
    flow: Flow<Delivery>,
    /// Readers acknowledge on receipt: the client's acks only pace them.
    reader: bool,
    /// The subscription is the connection's own (a reader's, or a
    /// non-durable consumer's): it goes when the connection does.
    ephemeral: bool,
    nack_delay: Duration,
    /// Set for pattern consumers: what to look for, and how to subscribe.
    pattern: Option<(Topics, SubscriptionOptions, ConsumerOptions)>,
}

fn receive(i: usize, c: Consumer) -> BoxStream<'static, (usize, Option<Delivery>)> {
    // Ends with one `None` when the subscription stops.
    futures::stream::unfold(Some(c), move |c| async move {
        let mut c = c?;
        match c.recv().await {
            Some(d) => Some(((i, Some(d)), Some(c))),
            None => Some(((i, None), None)),
        }
    })
    .boxed()
}

impl ConsumerState {
    fn new(subscription: String, flow: Flow<Delivery>, reader: bool, nack_delay: Duration) -> Self {
        ConsumerState {
            subscription,
            slots: Vec::new(),
            by_id: HashMap::new(),
            streams: SelectAll::new(),
            flow,
            reader,
            ephemeral: reader,
            nack_delay,
            pattern: None,
        }
    }

    fn add(&mut self, topic: TopicName, c: Consumer) {
        let i = self.slots.len();
        let ids = IdBase::of(&topic);
        self.by_id.insert(ids, i);
        let control = c.control();
        if let Some((_, n)) = self.flow.added_topic(i) {
            control.flow(n);
        }
        self.streams.push(receive(i, c));
        self.slots.push(Slot {
            topic,
            ids,
            control,
        });
    }

    fn grant(&self, g: Option<Grant>) {
        if let Some((i, n)) = g {
            if let Some(s) = self.slots.get(i) {
                s.control.flow(n);
            }
        }
    }

    fn slot_of(&self, id: &MessageId) -> Option<usize> {
        self.by_id.get(&IdBase::of_id(id)).copied()
    }
}

/// The topics of a request, partitions spelled out.
async fn expand(b: &Broker, topics: &[TopicName]) -> Result<Vec<TopicName>, BrokerError> {
    let mut out = Vec::new();
    for t in topics {
        match b.partitions(t).await? {
            Some(n) => out.extend((0..n).map(|i| t.partition(i))),
            None => out.push(t.clone()),
        }
    }
    Ok(out)
}

async fn pattern_topics(b: &Broker, topics: &Topics) -> Result<Vec<TopicName>, BrokerError> {
    let Topics::Pattern {
        namespace, regex, ..
    } = topics
    else {
        return Ok(Vec::new());
    };
    let re = regex::Regex::new(regex).map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
    let mut out: Vec<TopicName> = b
        .list_topics(namespace)
        .await?
        .into_iter()
        .filter(|t| re.is_match(&t.base().to_string()))
        .collect();
    out.sort();
    Ok(out)
}

async fn consumer(ctx: &Ctx, c: ConsumerRequest) -> Result<ConsumerState, BrokerError> {
    let b = &ctx.broker;
    let topics = match &c.topics {
        Topics::One(t) => expand(b, std::slice::from_ref(t)).await?,
        Topics::List(ts) => expand(b, ts).await?,
        Topics::Pattern { .. } => pattern_topics(b, &c.topics).await?,
    };
    let sub_opts = SubscriptionOptions {
        sub_type: c.sub_type,
        initial_position: c.initial_position,
        durable: c.durable,
        dead_letter: c.dead_letter.clone(),
        priority: None,
    };
    let cons_opts = ConsumerOptions {
        name: c.consumer_name.clone(),
        priority: c.priority,
        ack_timeout: c.ack_timeout,
    };
    let mut st = ConsumerState::new(
        c.subscription.clone(),
        Flow::new(c.flow),
        false,
        c.nack_delay,
    );
    st.ephemeral = !c.durable;
    for t in topics {
        let con = b
            .subscribe(&t, &c.subscription, sub_opts.clone(), cons_opts.clone())
            .await?;
        st.add(t, con);
    }
    if matches!(c.topics, Topics::Pattern { .. }) {
        st.pattern = Some((c.topics, sub_opts, cons_opts));
    }
    Ok(st)
}

async fn reader(ctx: &Ctx, r: ReaderRequest) -> Result<ConsumerState, BrokerError> {
    let b = &ctx.broker;
    let partitioned = b.partitions(&r.topic).await?;
    let topics = expand(b, std::slice::from_ref(&r.topic)).await?;
    // As Pulsar's readers do, a reader creates its topic where topics are
    // created on first use.
    if partitioned.is_none() && !b.config().auto_create_topics && !b.topic_exists(&r.topic).await? {
        return Err(BrokerError::NotFound(format!("topic {}", r.topic)));
    }
    let initial_position = match r.start {
        ReaderStart::Earliest => InitialPosition::Earliest,
        ReaderStart::Latest => InitialPosition::Latest,
        ReaderStart::After(_) if partitioned.is_some() => {
            return Err(BrokerError::InvalidArgument(format!(
                "{} is partitioned: a reader of it starts at earliest or latest; read one \
                 partition ({}-partition-N) to start at a message id",
                r.topic, r.topic
            )))
        }
        ReaderStart::After(id) => InitialPosition::Offset(id.entry.saturating_add(1)),
    };
    let name = format!("reader-{:016x}", rand::random::<u64>());
    let opts = SubscriptionOptions {
        sub_type: SubscriptionType::Exclusive,
        initial_position,
        durable: false,
        dead_letter: None,
        priority: None,
    };
    let mut st = ConsumerState::new(name.clone(), Flow::new(r.flow), true, Duration::ZERO);
    for t in topics {
        let con = b
            .subscribe(
                &t,
                &name,
                opts.clone(),
                ConsumerOptions {
                    name: r.reader_name.clone(),
                    ..ConsumerOptions::default()
                },
            )
            .await?;
        st.add(t, con);
    }
    Ok(st)
}

/// What a consumer connection does on a client frame; `Some` ends it
/// with that close frame.
async fn command(ctx: &Ctx, st: &mut ConsumerState, text: Result<String, WsError>) -> Reply {
    let cmd = match text.and_then(|t| ConsumerCommand::parse(&t)) {
        Ok(c) => c,
        Err(e) => return Reply::Close(pulsar_close(e.code()), e.to_string()),
    };
    if st.reader {
        // A reader's frames only pace it (nothing is acknowledged), as in
        // Pulsar, where any frame counts as one message settled.
        return match cmd {
            ConsumerCommand::IsEndOfTopic => Reply::Send(json(&EndOfTopic {
                end_of_topic: false,
            })),
            ConsumerCommand::Ack(id) | ConsumerCommand::NegativeAck(id) => {
                let key = MessageId::decode(&id)
                    .ok()
                    .and_then(|id| Some((st.slot_of(&id)?, id.entry)));
                let g = st.flow.settled_any(key);
                st.grant(g);
                Reply::None
            }
            ConsumerCommand::Permit(_) | ConsumerCommand::Unsubscribe => {
                let g = st.flow.settled_any(None);
                st.grant(g);
                Reply::None
            }
        };
    }
    let settle = |st: &mut ConsumerState, id: &str, nack: bool| -> Reply {
        let id = match MessageId::decode(id) {
            Ok(id) => id,
            Err(e) => return Reply::Close(pulsar_close(e.code()), e.to_string()),
        };
        // An id of a topic this connection does not read is ignored, as
        // an ack of an unknown message is.
        let Some(i) = st.slot_of(&id) else {
            return Reply::None;
        };
        let key = (i, id.entry);
        let g = st.flow.settled(key);
        let c = &st.slots[i].control;
        if nack {
            c.nack(vec![id.entry], st.nack_delay);
        } else {
            c.ack(vec![id.entry]);
        }
        st.grant(g);
        Reply::None
    };
    match cmd {
        ConsumerCommand::Ack(id) => settle(st, &id, false),
        ConsumerCommand::NegativeAck(id) => settle(st, &id, true),
        ConsumerCommand::Permit(n) => {
            for g in st.flow.permit(u64::from(n), st.slots.len()) {
                st.grant(Some(g));
            }
            Reply::None
        }
        ConsumerCommand::IsEndOfTopic => Reply::Send(json(&EndOfTopic {
            // Magnetar topics are never terminated.
            end_of_topic: false,
        })),
        ConsumerCommand::Unsubscribe => {
            let sub = st.subscription.clone();
            let topics: Vec<TopicName> = st.slots.iter().map(|s| s.topic.clone()).collect();
            // The subscription goes once its consumers do: this one's are
            // dropped with the connection, so the removal is forced.
            for t in topics {
                if let Err(e) = ctx.broker.unsubscribe(&t, &sub, true).await {
                    return Reply::Close(
                        pulsar_close(3),
                        format!("Failed to de-serialize from JSON: failed to unsubscribe: {e}"),
                    );
                }
            }
            Reply::Close(CLOSE_NORMAL, "unsubscribed".into())
        }
    }
}

enum Reply {
    None,
    Send(WsMessage),
    Close(u16, String),
}

async fn discover(ctx: &Ctx, st: &mut ConsumerState) {
    let Some((topics, sub_opts, cons_opts)) = st.pattern.clone() else {
        return;
    };
    let found = match pattern_topics(&ctx.broker, &topics).await {
        Ok(f) => f,
        Err(e) => {
            debug!("pattern discovery failed: {e}");
            return;
        }
    };
    for t in found {
        if st.slots.iter().any(|s| s.topic == t) {
            continue;
        }
        match ctx
            .broker
            .subscribe(&t, &st.subscription, sub_opts.clone(), cons_opts.clone())
            .await
        {
            Ok(c) => st.add(t, c),
            Err(e) => debug!("pattern consumer could not subscribe to {t}: {e}"),
        }
    }
}

async fn run_consumer(
    socket: WebSocket,
    ctx: Ctx,
    mut st: ConsumerState,
    expires: Option<Instant>,
) {
    serve_consumer(socket, &ctx, &mut st, expires).await;
    // Detach first, so that an ephemeral subscription has no consumers
    // left when it is removed.
    st.streams = SelectAll::new();
    if st.ephemeral {
        for s in &st.slots {
            // A shared non-durable subscription stays while other
            // connections use it; a reader's is its alone.
            let force = st.reader;
            if let Err(e) = ctx
                .broker
                .unsubscribe(&s.topic, &st.subscription, force)
                .await
            {
                debug!("removing {} on {}: {e}", st.subscription, s.topic);
            }
        }
    }
}

async fn serve_consumer(
    socket: WebSocket,
    ctx: &Ctx,
    st: &mut ConsumerState,
    expires: Option<Instant>,
) {
    let (mut sink, mut stream) = socket.split();
    let mut discovery = tokio::time::interval(ctx.cfg.pattern_discovery);
    discovery.tick().await;
    let end = loop {
        // Everything the client may have now goes out first.
        while let Some(((i, _), d)) = st.flow.next_out() {
            let frame = to_frame(st.slots[i].ids, &d);
            if sink.send(json(&frame)).await.is_err() {
                return;
            }
        }
        for g in st.flow.refill(st.slots.len()) {
            st.grant(Some(g));
        }
        tokio::select! {
            frame = stream.next() => {
                let frame = match frame {
                    Some(Ok(f)) => f,
                    Some(Err(e)) => break read_failure(&e),
                    None => return,
                };
                if matches!(frame, WsMessage::Close(_)) {
                    break close(CLOSE_NORMAL, "");
                }
                let Some(text) = text_of(frame) else { continue };
                match command(ctx, st, text).await {
                    Reply::None => {}
                    Reply::Send(m) => {
                        if sink.send(m).await.is_err() {
                            return;
                        }
                    }
                    Reply::Close(code, why) => break close(code, &why),
                }
            }
            Some((i, d)) = st.streams.next(), if !st.streams.is_empty() => {
                let Some(d) = d else {
                    // The topic was unloaded or deleted here; the client
                    // reconnects and finds where it is served now.
                    break close(CLOSE_GOING_AWAY, &format!("{} is no longer served here", st.slots[i].topic));
                };
                if st.reader {
                    st.slots[i].control.ack(vec![d.offset]);
                }
                let g = st.flow.received((i, d.offset), d);
                st.grant(g);
            }
            _ = discovery.tick(), if st.pattern.is_some() => discover(ctx, st).await,
            _ = tokio::time::sleep_until(expires.unwrap_or_else(Instant::now)), if expires.is_some() => {
                break close(CLOSE_POLICY, TOKEN_EXPIRED);
            }
        }
    };
    let _ = sink.send(end).await;
}
