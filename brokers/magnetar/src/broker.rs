//! `magnetar broker` and `magnetar standalone`.
//!
//! Standalone is the embedded default: one metadata node, one bookie and
//! one broker in this process, data under one directory, ledgers at
//! 1/1/1. A broker on its own joins an existing metadata group and bookies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use magnetar_bookies::{BookieConfig, BookieServer, LedgerClient};
use magnetar_broker::listener::ListenerLimits;
use magnetar_broker::managed_ledger::ManagedLedgerConfig;
use magnetar_broker::topic::RetentionDefaults;
use magnetar_broker::{Broker, BrokerConfig, BrokerInfo};
use magnetar_metadata::{parse_endpoints, MetaClient, MetaNode, NodeConfig};

/// Options every broker has, standalone or not.
#[derive(Args, Clone)]
pub struct BrokerOptions {
    /// HTTP listener: admin REST API, health, lookup.
    #[arg(long, env = "MAGNETAR_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    /// HTTPS listener (admin, REST, WebSocket API, MQTT over WSS,
    /// console over TLS); off unless given, 8443 by convention.
    #[arg(long, env = "MAGNETAR_HTTPS_LISTEN")]
    https_listen: Option<SocketAddr>,
    /// HOST:PORT other brokers and clients use to reach the HTTPS
    /// listener (default: the bound address); with --internal-tls it is
    /// what this broker advertises.
    #[arg(long, env = "MAGNETAR_ADVERTISED_HTTPS")]
    advertised_https: Option<String>,
    /// HOST:PORT other brokers and clients use to reach the HTTP listener
    /// (default: the bound address). It also names this broker.
    #[arg(long, env = "MAGNETAR_ADVERTISED_HTTP")]
    advertised_http: Option<String>,
    /// Browser origins (`scheme://host:port`, comma-separated; `*` for
    /// any) allowed to open WebSockets and send requests that change
    /// state on the HTTP listener. Default: the listener's own (its
    /// loopback names and advertised address).
    #[arg(long, env = "MAGNETAR_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Bookies each ledger is written to, and copies per entry.
    #[arg(long, env = "MAGNETAR_ENSEMBLE")]
    ensemble: Option<usize>,
    #[arg(long, env = "MAGNETAR_WRITE_QUORUM")]
    write_quorum: Option<usize>,
    /// Copies that must be durable before an add is acknowledged.
    #[arg(long, env = "MAGNETAR_ACK_QUORUM")]
    ack_quorum: Option<usize>,
    /// A topic's current ledger rolls over past this many entries...
    #[arg(long, env = "MAGNETAR_LEDGER_MAX_ENTRIES", default_value_t = 50_000)]
    ledger_max_entries: u64,
    /// ...or this many MiB...
    #[arg(long, env = "MAGNETAR_LEDGER_MAX_MB", default_value_t = 128)]
    ledger_max_mb: u64,
    /// ...or this age in seconds.
    #[arg(long, env = "MAGNETAR_LEDGER_MAX_AGE_S", default_value_t = 4 * 3600)]
    ledger_max_age_s: u64,
    /// Tail cache per topic partition, in MiB.
    #[arg(long, env = "MAGNETAR_TOPIC_CACHE_MB", default_value_t = 4)]
    topic_cache_mb: usize,
    /// Byte budget of each non-persistent partition, in MiB.
    #[arg(long, env = "MAGNETAR_MEMORY_TOPIC_MB", default_value_t = 16)]
    memory_topic_mb: usize,
    /// How long a non-persistent topic without subscriptions stays
    /// loaded after its last use, in seconds (Pulsar removes inactive
    /// ones after 60 s); 0: for good.
    #[arg(long, env = "MAGNETAR_MEMORY_TOPIC_IDLE_S", default_value_t = 60)]
    memory_topic_idle_s: u64,
    /// Retention of topics without subscriptions when the namespace sets
    /// none, in minutes (-1: forever).
    #[arg(long, env = "MAGNETAR_DEFAULT_RETENTION_MINUTES", default_value_t = 7 * 24 * 60)]
    default_retention_minutes: i64,
    /// How often retention deletes expired ledgers, in seconds.
    #[arg(long, env = "MAGNETAR_RETENTION_INTERVAL_S", default_value_t = 60)]
    retention_interval_s: u64,
    /// How long this broker's topics stay owned after it dies, in ms.
    #[arg(long, env = "MAGNETAR_BROKER_SESSION_TTL_MS", default_value_t = 10_000)]
    session_ttl_ms: u64,
    /// Kafka listener.
    #[arg(long, env = "MAGNETAR_KAFKA_LISTEN", default_value = "127.0.0.1:9092")]
    kafka_listen: SocketAddr,
    /// HOST:PORT Kafka clients are told to connect to (Metadata and
    /// FindCoordinator answers); default: the bound address.
    #[arg(long, env = "MAGNETAR_ADVERTISED_KAFKA")]
    advertised_kafka: Option<String>,
    /// Kafka over TLS (SSL, or SASL_SSL for clients that go on to SASL);
    /// off unless given, 9093 by convention.
    #[arg(long, env = "MAGNETAR_KAFKA_TLS_LISTEN")]
    kafka_tls_listen: Option<SocketAddr>,
    /// HOST:PORT Kafka TLS clients are told to connect to; default: the
    /// bound address.
    #[arg(long, env = "MAGNETAR_ADVERTISED_KAFKA_TLS")]
    advertised_kafka_tls: Option<String>,
    /// Namespace of Kafka topics for clients whose SASL user names none.
    #[arg(
        long,
        env = "MAGNETAR_KAFKA_NAMESPACE",
        default_value = "public/default"
    )]
    kafka_namespace: String,
    /// Partitions of Kafka topics created without a count (Kafka's
    /// `num.partitions`).
    #[arg(long, env = "MAGNETAR_KAFKA_PARTITIONS", default_value_t = 1)]
    kafka_partitions: u32,
    /// How long a new consumer group waits for more members before its
    /// first rebalance (Kafka's `group.initial.rebalance.delay.ms`).
    #[arg(
        long,
        env = "MAGNETAR_KAFKA_GROUP_INITIAL_DELAY_MS",
        default_value_t = 3000
    )]
    kafka_group_initial_delay_ms: u64,
    /// How long a consumer group's committed offsets keep holding topic
    /// data after their last commit, in minutes (Kafka's
    /// `offsets.retention.minutes`).
    #[arg(
        long,
        env = "MAGNETAR_KAFKA_OFFSETS_RETENTION_MINUTES",
        default_value_t = 7 * 24 * 60
    )]
    kafka_offsets_retention_minutes: u64,
    /// Largest record batch a Kafka produce may store, in bytes, for
    /// topics without a `max.message.bytes` of their own (Kafka's
    /// `message.max.bytes`); larger batches get MESSAGE_TOO_LARGE.
    #[arg(
        long,
        env = "MAGNETAR_KAFKA_MESSAGE_MAX_BYTES",
        default_value_t = magnetar_kafka::DEFAULT_MESSAGE_MAX_BYTES
    )]
    kafka_message_max_bytes: usize,
    /// Kafka consumer groups one namespace may hold; a new group past it
    /// is refused with POLICY_VIOLATION (0: no limit).
    #[arg(
        long,
        env = "MAGNETAR_KAFKA_MAX_GROUPS_PER_NAMESPACE",
        default_value_t = 100_000
    )]
    kafka_max_groups_per_namespace: usize,
    #[command(flatten)]
    listener: ListenerArgs,
    /// How long a Kafka connection may send nothing before it is closed,
    /// in seconds (Kafka's `connections.max.idle.ms`).
    #[arg(long, env = "MAGNETAR_KAFKA_IDLE_TIMEOUT_S", default_value_t = 600)]
    kafka_idle_timeout_s: u64,
    /// AMQP 0-9-1 listener.
    #[arg(long, env = "MAGNETAR_AMQP_LISTEN", default_value = "127.0.0.1:5672")]
    amqp_listen: SocketAddr,
    /// AMQP over TLS (AMQPS); off unless given, 5671 by convention.
    #[arg(long, env = "MAGNETAR_AMQP_TLS_LISTEN")]
    amqp_tls_listen: Option<SocketAddr>,
    /// Heartbeat interval offered to AMQP clients, in seconds (0: none).
    #[arg(long, env = "MAGNETAR_AMQP_HEARTBEAT_S", default_value_t = 60)]
    amqp_heartbeat_s: u16,
    /// Resident memory, in MiB, above which AMQP publishers are blocked
    /// (connection.blocked); 0: no limit.
    #[arg(long, env = "MAGNETAR_AMQP_MEMORY_LIMIT_MB", default_value_t = 0)]
    amqp_memory_limit_mb: u64,
    /// MQTT 3.1/3.1.1/5.0 listener.
    #[arg(long, env = "MAGNETAR_MQTT_LISTEN", default_value = "127.0.0.1:1883")]
    mqtt_listen: SocketAddr,
    /// MQTT over TLS; off unless given, 8883 by convention.
    #[arg(long, env = "MAGNETAR_MQTT_TLS_LISTEN")]
    mqtt_tls_listen: Option<SocketAddr>,
    /// Largest MQTT packet accepted, in bytes (v5 Maximum Packet Size).
    #[arg(long, env = "MAGNETAR_MQTT_MAX_PACKET_SIZE", default_value_t = 1 << 20)]
    mqtt_max_packet_size: u32,
    /// Longest MQTT keep-alive allowed, in seconds: v5 clients asking for
    /// more are told this one, v3 clients are refused; 65535: no limit.
    #[arg(long, env = "MAGNETAR_MQTT_MAX_KEEP_ALIVE", default_value_t = u16::MAX)]
    mqtt_max_keep_alive: u16,
    /// Retained MQTT messages one namespace may hold; a publish that
    /// would retain one more is refused (0: no limit).
    #[arg(
        long,
        env = "MAGNETAR_MQTT_MAX_RETAINED_PER_NAMESPACE",
        default_value_t = 100_000
    )]
    mqtt_max_retained_per_namespace: usize,
    /// Persistent MQTT sessions one namespace may hold; a CONNECT that
    /// would start one more gets CONNACK Quota exceeded (0: no limit).
    #[arg(
        long,
        env = "MAGNETAR_MQTT_MAX_SESSIONS_PER_NAMESPACE",
        default_value_t = 100_000
    )]
    mqtt_max_sessions_per_namespace: usize,
    #[command(flatten)]
    auth: crate::auth_args::AuthArgs,
    #[command(flatten)]
    tls: crate::tls::TlsArgs,
    /// Where closed ledgers are offloaded: `s3://bucket/prefix` (S3, MinIO
    /// and other S3-compatible servers), `file:///dir`, or `none`.
    /// Standalone's default is `file://<data-dir>/offload`; a broker's is
    /// none.
    #[arg(long, env = "MAGNETAR_OFFLOAD_URL")]
    offload_url: Option<String>,
    /// Settings of an S3 store, KEY=VALUE, repeated or comma-separated:
    /// endpoint, region, access_key_id, secret_access_key,
    /// virtual_hosted_style_request, … (`AWS_*` variables apply first).
    #[arg(
        long = "offload-option",
        env = "MAGNETAR_OFFLOAD_OPTIONS",
        value_delimiter = ','
    )]
    offload_options: Vec<String>,
    /// Bytes on the bookies past which a topic's oldest closed ledgers are
    /// offloaded, when its namespace sets no offloadThreshold; -1: never.
    #[arg(long, env = "MAGNETAR_OFFLOAD_THRESHOLD_BYTES", default_value_t = -1, allow_hyphen_values = true)]
    offload_threshold_bytes: i64,
    /// Seconds after closing past which ledgers are offloaded, when the
    /// namespace sets no offloadThresholdInSeconds; -1: never.
    #[arg(long, env = "MAGNETAR_OFFLOAD_THRESHOLD_SECONDS", default_value_t = -1, allow_hyphen_values = true)]
    offload_threshold_seconds: i64,
    /// How long bookies keep an offloaded ledger, when the namespace sets
    /// no offloadDeletionLagMs, in ms.
    #[arg(long, env = "MAGNETAR_OFFLOAD_DELETION_LAG_MS", default_value_t = 4 * 3600 * 1000)]
    offload_deletion_lag_ms: u64,
    /// How often the offload policy runs over the loaded topics, in ms.
    #[arg(long, env = "MAGNETAR_OFFLOAD_INTERVAL_MS", default_value_t = 60_000)]
    offload_interval_ms: u64,
    /// Memory for blocks read back from the object store, in MiB.
    #[arg(long, env = "MAGNETAR_OFFLOAD_CACHE_MB", default_value_t = 64)]
    offload_cache_mb: usize,
    /// Bound on one record batch of an offloaded file, in KiB: what one
    /// ranged GET fetches.
    #[arg(long, env = "MAGNETAR_OFFLOAD_BLOCK_KB", default_value_t = 1024)]
    offload_block_kb: usize,
    /// Gives topics series of their own in /metrics (a `topic` label),
    /// beside their namespace's. Off by default: every MQTT session is a
    /// queue, so topic-level series grow with the devices.
    #[arg(long, env = "MAGNETAR_METRICS_TOPIC_LEVEL")]
    metrics_topic_level: bool,
    /// With --metrics-topic-level, how many topics (the first by name) get
    /// series of their own; the rest stay in their namespace's series.
    #[arg(long, env = "MAGNETAR_METRICS_MAX_TOPICS", default_value_t = 1000)]
    metrics_max_topics: usize,
    /// Roles, besides superusers, that other clusters may replicate into
    /// this one as (comma-separated).
    #[arg(long, env = "MAGNETAR_GEO_PEER_ROLES", value_delimiter = ',')]
    geo_peer_roles: Vec<String>,
    /// How often the replicators are checked against the replication
    /// policies and the ownership of partitions (besides on every change
    /// of a policy).
    #[arg(long, env = "MAGNETAR_GEO_RESCAN_MS", default_value_t = 5000)]
    geo_rescan_ms: u64,
    /// Batches a replicator sends ahead of the remote's replies.
    #[arg(
        long,
        env = "MAGNETAR_GEO_MAX_INFLIGHT_BATCHES",
        default_value_t = 1000
    )]
    geo_max_inflight_batches: usize,
    /// Bytes a replicator sends ahead of the remote's replies.
    #[arg(long, env = "MAGNETAR_GEO_MAX_INFLIGHT_BYTES", default_value_t = 8 << 20)]
    geo_max_inflight_bytes: u64,
    /// Longest pause between a replicator's attempts to reach a remote.
    #[arg(long, env = "MAGNETAR_GEO_BACKOFF_MAX_MS", default_value_t = 60_000)]
    geo_backoff_max_ms: u64,
}

impl BrokerOptions {
    fn geo(&self) -> magnetar_geo::GeoConfig {
        magnetar_geo::GeoConfig {
            rescan: Duration::from_millis(self.geo_rescan_ms.max(100)),
            max_inflight_batches: self.geo_max_inflight_batches.max(1),
            max_inflight_bytes: self.geo_max_inflight_bytes.max(1 << 16),
            backoff_max: Duration::from_millis(self.geo_backoff_max_ms.max(100)),
            peer_roles: self.geo_peer_roles.iter().cloned().collect(),
            ..magnetar_geo::GeoConfig::default()
        }
    }
}

/// The offload store the options ask for, if any.
fn offload_tier(
    opts: &BrokerOptions,
    default_url: Option<String>,
) -> anyhow::Result<Option<magnetar_tiering::Tier>> {
    match opts.offload_url.clone().or(default_url) {
        None => Ok(None),
        Some(url) if url == "none" => Ok(None),
        Some(url) => tier_from_url(&url, &opts.offload_options, opts.offload_cache_mb).map(Some),
    }
}

/// An offload store from its URL, `KEY=VALUE` settings and block-cache size.
pub fn tier_from_url(
    url: &str,
    options: &[String],
    cache_mb: usize,
) -> anyhow::Result<magnetar_tiering::Tier> {
    let options = options
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .with_context(|| format!("--offload-option {kv:?} is not KEY=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tier_opts = magnetar_tiering::TierOptions {
        cache_bytes: cache_mb << 20,
        ..Default::default()
    };
    Ok(magnetar_tiering::Tier::from_url(url, &options, tier_opts)?)
}

/// The protocol listeners, bound before the broker registers so that its
/// registration can advertise them.
struct Listeners {
    kafka: tokio::net::TcpListener,
    kafka_advertised: String,
    amqp: tokio::net::TcpListener,
    mqtt: tokio::net::TcpListener,
    /// The TLS listeners that are on, with their TLS.
    kafka_tls: Option<(tokio::net::TcpListener, magnetar_net::TlsServer)>,
    kafka_tls_advertised: Option<String>,
    amqp_tls: Option<(tokio::net::TcpListener, magnetar_net::TlsServer)>,
    mqtt_tls: Option<(tokio::net::TcpListener, magnetar_net::TlsServer)>,
}

/// A TLS listener, if `addr` asks for one.
async fn bind_tls(
    addr: Option<SocketAddr>,
    flag: &str,
    opts: &BrokerOptions,
) -> anyhow::Result<Option<(tokio::net::TcpListener, magnetar_net::TlsServer)>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let tls = if flag == "--https-listen" {
        opts.tls.https()?
    } else {
        opts.tls.listener(flag)?
    };
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {flag} {addr}"))?;
    Ok(Some((l, tls)))
}

async fn bind_protocols(opts: &BrokerOptions) -> anyhow::Result<Listeners> {
    let kafka = tokio::net::TcpListener::bind(opts.kafka_listen)
        .await
        .with_context(|| format!("binding the Kafka listener on {}", opts.kafka_listen))?;
    let bound = kafka.local_addr()?;
    let amqp = tokio::net::TcpListener::bind(opts.amqp_listen)
        .await
        .with_context(|| format!("binding the AMQP listener on {}", opts.amqp_listen))?;
    let mqtt = tokio::net::TcpListener::bind(opts.mqtt_listen)
        .await
        .with_context(|| format!("binding the MQTT listener on {}", opts.mqtt_listen))?;
    let kafka_tls = bind_tls(opts.kafka_tls_listen, "--kafka-tls-listen", opts).await?;
    let kafka_tls_advertised = match &kafka_tls {
        None => None,
        Some((l, _)) => Some(match &opts.advertised_kafka_tls {
            Some(a) => a.clone(),
            None => l.local_addr()?.to_string(),
        }),
    };
    Ok(Listeners {
        amqp,
        mqtt,
        kafka,
        kafka_advertised: opts
            .advertised_kafka
            .clone()
            .unwrap_or_else(|| bound.to_string()),
        kafka_tls,
        kafka_tls_advertised,
        amqp_tls: bind_tls(opts.amqp_tls_listen, "--amqp-tls-listen", opts).await?,
        mqtt_tls: bind_tls(opts.mqtt_tls_listen, "--mqtt-tls-listen", opts).await?,
    })
}

/// The running protocol servers.
struct Protocols {
    kafka: magnetar_kafka::KafkaServer,
    amqp: magnetar_amqp::AmqpServer,
    mqtt: magnetar_mqtt::MqttServer,
    /// Pulsar's WebSocket API and the console, on the HTTP listener.
    websocket: axum::Router,
    /// The replicators to other clusters (stopped when dropped), and the
    /// service receiving from them, on the HTTP listener.
    _geo: magnetar_geo::Geo,
    geo_routes: axum::Router,
}

impl Protocols {
    /// `clustered`: other brokers may serve the same clients (false for
    /// standalone, which is the only broker of its metadata store).
    fn start(
        l: Listeners,
        broker: &Broker,
        opts: &BrokerOptions,
        clustered: bool,
    ) -> anyhow::Result<Protocols> {
        let kafka_cfg = magnetar_kafka::KafkaConfig {
            default_namespace: opts
                .kafka_namespace
                .parse()
                .with_context(|| format!("--kafka-namespace {}", opts.kafka_namespace))?,
            default_partitions: opts.kafka_partitions.max(1),
            group_initial_rebalance_delay: Duration::from_millis(opts.kafka_group_initial_delay_ms),
            offsets_retention: Duration::from_secs(
                opts.kafka_offsets_retention_minutes.saturating_mul(60),
            ),
            message_max_bytes: opts.kafka_message_max_bytes,
            max_groups_per_namespace: opts.kafka_max_groups_per_namespace,
            ..Default::default()
        };
        let amqp_cfg = magnetar_amqp::AmqpConfig {
            heartbeat: opts.amqp_heartbeat_s,
            handshake_timeout: broker.config().listener_limits.handshake_timeout,
            memory_limit_bytes: opts.amqp_memory_limit_mb << 20,
            ..Default::default()
        };
        let mqtt_cfg = magnetar_mqtt::MqttConfig {
            max_packet_size: opts.mqtt_max_packet_size.max(64),
            max_keep_alive: opts.mqtt_max_keep_alive.max(1),
            takeover_across_brokers: clustered,
            connect_timeout: broker.config().listener_limits.handshake_timeout,
            max_retained_per_namespace: opts.mqtt_max_retained_per_namespace,
            max_sessions_per_namespace: opts.mqtt_max_sessions_per_namespace,
            ..Default::default()
        };
        let mut kafka = magnetar_kafka::KafkaServer::start(l.kafka, broker.clone(), kafka_cfg)?;
        if let Some((listener, tls)) = l.kafka_tls {
            kafka.listeners.add_tls(listener, tls)?;
        }
        let mut amqp = magnetar_amqp::AmqpServer::start(l.amqp, broker.clone(), amqp_cfg)?;
        if let Some((listener, tls)) = l.amqp_tls {
            amqp.listeners.add_tls(listener, tls)?;
        }
        let mut mqtt = magnetar_mqtt::MqttServer::start(l.mqtt, broker.clone(), mqtt_cfg)?;
        if let Some((listener, tls)) = l.mqtt_tls {
            mqtt.listeners.add_tls(listener, tls)?;
        }
        let geo_cfg = opts.geo();
        let geo = magnetar_geo::Geo::start(broker, geo_cfg.clone());
        Ok(Protocols {
            geo_routes: geo.router(broker, &geo_cfg),
            _geo: geo,
            kafka,
            amqp,
            mqtt,
            websocket: magnetar_websocket::routes(
                broker.clone(),
                magnetar_websocket::WsConfig::default(),
            ),
        })
    }

    /// What the protocols serve on the HTTP listener.
    fn http_routes(&self) -> axum::Router {
        self.mqtt
            .websocket_routes()
            .merge(self.websocket.clone())
            .merge(self.geo_routes.clone())
    }

    fn stop(&self) {
        self.kafka.listeners.stop();
        self.amqp.listeners.stop();
        self.mqtt.listeners.stop();
    }

    /// The TLS listeners that are on, for the ready line.
    fn tls_addrs(&self) -> String {
        [
            ("kafka-tls", self.kafka.listeners.tls_addr()),
            ("amqps", self.amqp.listeners.tls_addr()),
            ("mqtts", self.mqtt.listeners.tls_addr()),
        ]
        .into_iter()
        .filter_map(|(name, a)| a.map(|a| format!(" {name}={a}")))
        .collect()
    }
}

#[derive(Args)]
pub struct BrokerArgs {
    /// Metadata nodes, as HOST:PORT,HOST:PORT,...
    #[arg(long, env = "MAGNETAR_META", default_value = "127.0.0.1:2379")]
    meta: String,
    /// Name of this cluster (region).
    #[arg(long, env = "MAGNETAR_CLUSTER", default_value = "local")]
    cluster: String,
    #[command(flatten)]
    opts: BrokerOptions,
}

#[derive(Args)]
pub struct StandaloneArgs {
    /// Metadata, journal, entry logs and index all live here.
    #[arg(long, env = "MAGNETAR_DATA_DIR", default_value = "data/standalone")]
    data_dir: PathBuf,
    /// The embedded metadata node's gRPC listener.
    #[arg(long, env = "MAGNETAR_META_LISTEN", default_value = "127.0.0.1:2379")]
    meta_listen: SocketAddr,
    /// The embedded bookie's gRPC listener.
    #[arg(long, env = "MAGNETAR_BOOKIE_LISTEN", default_value = "127.0.0.1:3181")]
    bookie_listen: SocketAddr,
    #[arg(long, env = "MAGNETAR_CLUSTER", default_value = "standalone")]
    cluster: String,
    #[command(flatten)]
    disk: EmbeddedDisk,
    #[command(flatten)]
    opts: BrokerOptions,
}

/// When the embedded bookie turns read-only, which raises the disk alarm
/// (AMQP's connection.blocked).
#[derive(Args, Clone, Copy)]
pub struct EmbeddedDisk {
    /// Fraction of the data disk in use above which the bookie turns
    /// read-only.
    #[arg(
        long = "bookie-disk-usage-threshold",
        env = "MAGNETAR_BOOKIE_DISK_USAGE_THRESHOLD",
        default_value_t = 0.95
    )]
    usage_threshold: f64,
    #[arg(
        long = "bookie-disk-check-interval-ms",
        env = "MAGNETAR_BOOKIE_DISK_CHECK_INTERVAL_MS",
        default_value_t = 10_000
    )]
    check_interval_ms: u64,
}

impl Default for EmbeddedDisk {
    fn default() -> Self {
        EmbeddedDisk {
            usage_threshold: 0.95,
            check_interval_ms: 10_000,
        }
    }
}

/// The limits of every listener: the broker's client protocols and HTTP,
/// and the gRPC planes of `magnetar meta` and `magnetar bookie` (all six
/// in standalone), which face the same floods.
#[derive(Args, Clone, Copy)]
pub struct ListenerArgs {
    /// Connections open at once on each listener; over it a new
    /// connection is closed at once. 0: a sixth of the file descriptors
    /// left after 1024 kept for storage.
    #[arg(long, env = "MAGNETAR_MAX_CONNECTIONS", default_value_t = 0)]
    max_connections: usize,
    /// Connections open at once from one IP address on each listener; 0:
    /// no limit.
    #[arg(long, env = "MAGNETAR_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    max_connections_per_ip: usize,
    /// How long a new connection has to finish its handshake and
    /// authentication (AMQP connection.open, MQTT CONNECT, a Kafka
    /// request and SASL, HTTP request headers, the HTTP/2 preface of the
    /// gRPC planes), in ms.
    #[arg(long, env = "MAGNETAR_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    handshake_timeout_ms: u64,
}

impl ListenerArgs {
    pub fn limits(&self) -> ListenerLimits {
        ListenerLimits {
            max_connections: match self.max_connections {
                0 => connection_budget(),
                n => n,
            },
            max_connections_per_ip: self.max_connections_per_ip,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms.max(100)),
            ..ListenerLimits::default()
        }
    }
}

/// File descriptors kept for the process's own files (journal, entry
/// logs, RocksDB, the metadata store and internal connections) whatever
/// the clients do.
const RESERVED_FDS: u64 = 1024;

/// Raises the open-files limit to its hard limit, and gives each of the
/// up to six listeners of one process (Kafka, AMQP, MQTT, HTTP, and the
/// metadata and bookie gRPC planes of standalone) a sixth of what is left
/// after the reserve, so that a flood of connections refuses new clients
/// instead of failing the storage underneath.
pub fn connection_budget() -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let raised = rustix::process::Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            lim = raised;
        }
    }
    let open = lim.current.unwrap_or(1 << 20);
    let per_listener = open.saturating_sub(RESERVED_FDS) / 6;
    usize::try_from(per_listener.max(64)).unwrap_or(usize::MAX)
}

struct Http {
    addr: SocketAddr,
    https_addr: Option<SocketAddr>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The HTTP listener, and the HTTPS one if it is on.
struct HttpListeners {
    http: tokio::net::TcpListener,
    https: Option<(tokio::net::TcpListener, magnetar_net::TlsServer)>,
    advertised: String,
    /// HOST:PORT of the HTTPS listener as others reach it, if it is on.
    https_advertised: Option<String>,
    /// Brokers give each other the HTTPS listener (--internal-tls).
    internal_tls: bool,
}

impl HttpListeners {
    /// The base URL other brokers are given.
    fn url(&self) -> String {
        match &self.https_advertised {
            Some(a) if self.internal_tls => format!("https://{a}"),
            _ => format!("http://{}", self.advertised),
        }
    }
}

async fn bind_http(opts: &BrokerOptions) -> anyhow::Result<HttpListeners> {
    let listener = tokio::net::TcpListener::bind(opts.http_listen)
        .await
        .with_context(|| format!("binding the HTTP listener on {}", opts.http_listen))?;
    let bound = listener.local_addr()?;
    let advertised = opts
        .advertised_http
        .clone()
        .unwrap_or_else(|| bound.to_string());
    let https = bind_tls(opts.https_listen, "--https-listen", opts).await?;
    let https_advertised = match &https {
        None => None,
        Some((l, _)) => Some(match &opts.advertised_https {
            Some(a) => a.clone(),
            None => l.local_addr()?.to_string(),
        }),
    };
    Ok(HttpListeners {
        http: listener,
        https,
        advertised,
        https_advertised,
        internal_tls: opts.tls.internal_on(),
    })
}

fn allowed_origins(
    opts: &BrokerOptions,
    l: &HttpListeners,
) -> anyhow::Result<magnetar_broker::http::AllowedOrigins> {
    use magnetar_broker::http::AllowedOrigins;
    Ok(if opts.allowed_origins.is_empty() {
        let https = match (&l.https, &l.https_advertised) {
            (Some((h, _)), Some(a)) => Some((h.local_addr()?.port(), a.as_str())),
            _ => None,
        };
        AllowedOrigins::own(l.http.local_addr()?.port(), &l.advertised, https)
    } else {
        AllowedOrigins::parse(&opts.allowed_origins)
    })
}

/// Serves the admin API, and `protocols`' routes (MQTT over WebSocket),
/// over HTTP and, if it is on, HTTPS.
fn serve_http(
    listeners: HttpListeners,
    broker: Broker,
    protocols: axum::Router,
    origins: magnetar_broker::http::AllowedOrigins,
) -> anyhow::Result<Http> {
    let addr = listeners.http.local_addr()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // One budget for both: they serve the same routes.
    let admission = broker.admission("HTTP");
    let app = magnetar_broker::http::router(broker)
        .merge(protocols)
        .layer(axum::middleware::from_fn_with_state(
            std::sync::Arc::new(origins),
            magnetar_broker::http::origin_guard,
        ));
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.changed().await;
        }
    };
    let plain = magnetar_broker::listener::serve_http(
        listeners.http,
        std::sync::Arc::clone(&admission),
        None,
        app.clone(),
        until_stopped(),
    );
    let (https_addr, secure) = match listeners.https {
        Some((l, tls)) => (
            Some(l.local_addr()?),
            Some(magnetar_broker::listener::serve_http(
                l,
                admission,
                Some(tls),
                app,
                until_stopped(),
            )),
        ),
        None => (None, None),
    };
    let task = tokio::spawn(async move {
        match secure {
            Some(secure) => {
                tokio::join!(plain, secure);
            }
            None => plain.await,
        }
    });
    Ok(Http {
        addr,
        https_addr,
        stop,
        task,
    })
}

/// `advertised`: the broker's name (its HTTP HOST:PORT); `url`: where
/// other brokers reach it.
fn broker_config(
    cluster: &str,
    (advertised, url): (&str, &str),
    opts: &BrokerOptions,
    quorum: (usize, usize, usize),
    listeners: Option<&Listeners>,
    offload_default: Option<String>,
) -> anyhow::Result<BrokerConfig> {
    let (e, qw, qa) = (
        opts.ensemble.unwrap_or(quorum.0),
        opts.write_quorum.unwrap_or(quorum.1),
        opts.ack_quorum.unwrap_or(quorum.2),
    );
    anyhow::ensure!(
        qa >= 1 && qa <= qw && qw <= e,
        "need 1 <= ack quorum <= write quorum <= ensemble (got {e}/{qw}/{qa})"
    );
    let mut cfg = BrokerConfig::new(
        cluster,
        BrokerInfo {
            id: advertised.to_string(),
            http_url: url.to_string(),
            listeners: listeners
                .map(|l| {
                    let mut m: std::collections::BTreeMap<String, String> =
                        [("kafka".to_string(), l.kafka_advertised.clone())].into();
                    if let Some(a) = &l.kafka_tls_advertised {
                        m.insert(magnetar_kafka::server::TLS_LISTENER.to_string(), a.clone());
                    }
                    m
                })
                .unwrap_or_default(),
        },
    );
    cfg.managed_ledger = ManagedLedgerConfig {
        ensemble: e,
        write_quorum: qw,
        ack_quorum: qa,
        max_entries_per_ledger: opts.ledger_max_entries.max(1),
        max_ledger_bytes: opts.ledger_max_mb.max(1) << 20,
        max_ledger_age: Duration::from_secs(opts.ledger_max_age_s.max(1)),
        cache_bytes: opts.topic_cache_mb << 20,
        tier: offload_tier(opts, offload_default).context("the offload store")?,
        offload_block_bytes: opts.offload_block_kb.max(1) << 10,
        ..ManagedLedgerConfig::default()
    };
    cfg.offload = magnetar_broker::OffloadDefaults {
        interval: Duration::from_millis(opts.offload_interval_ms.max(10)),
        threshold_bytes: opts.offload_threshold_bytes,
        threshold_seconds: opts.offload_threshold_seconds,
        deletion_lag: Duration::from_millis(opts.offload_deletion_lag_ms),
        ..Default::default()
    };
    cfg.memory_topic_bytes = opts.memory_topic_mb.max(1) << 20;
    cfg.memory_topic_idle = Duration::from_secs(opts.memory_topic_idle_s);
    cfg.retention = RetentionDefaults {
        stream_minutes: opts.default_retention_minutes,
        stream_mb: -1,
    };
    cfg.retention_interval = Duration::from_secs(opts.retention_interval_s.max(1));
    cfg.session_ttl = Duration::from_millis(opts.session_ttl_ms);
    cfg.listener_limits = ListenerLimits {
        idle_timeout: Duration::from_secs(opts.kafka_idle_timeout_s.max(1)),
        ..opts.listener.limits()
    };
    cfg.auth = opts.auth.broker().context("token authentication")?;
    cfg.http_tls = opts.tls.http_client()?;
    cfg.metrics_topics = if opts.metrics_topic_level {
        opts.metrics_max_topics
    } else {
        0
    };
    Ok(cfg)
}

async fn stop_http(http: Http) {
    let _ = http.stop.send(true);
    if tokio::time::timeout(Duration::from_secs(5), http.task)
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open at shutdown");
    }
}

pub async fn run_broker(args: BrokerArgs) -> anyhow::Result<()> {
    let endpoints = parse_endpoints(&args.meta);
    anyhow::ensure!(!endpoints.is_empty(), "--meta names no metadata node");
    let meta = meta_client(&endpoints, args.opts.auth.internal_token()?, &args.opts.tls)?;
    let http_listeners = bind_http(&args.opts).await?;
    let listeners = bind_protocols(&args.opts).await?;
    let cfg = broker_config(
        &args.cluster,
        (&http_listeners.advertised, &http_listeners.url()),
        &args.opts,
        (3, 3, 2),
        Some(&listeners),
        None,
    )?;
    let broker = Broker::start(meta, cfg)
        .await
        .context("starting the broker")?;
    let protocols = Protocols::start(listeners, &broker, &args.opts, true)?;
    let origins = allowed_origins(&args.opts, &http_listeners)?;
    let http = serve_http(
        http_listeners,
        broker.clone(),
        protocols.http_routes(),
        origins,
    )?;
    println!(
        "magnetar broker ready: http={} kafka={} amqp={} mqtt={}{}{}",
        http.addr,
        protocols.kafka.listeners.local_addr(),
        protocols.amqp.listeners.local_addr(),
        protocols.mqtt.listeners.local_addr(),
        http.https_addr
            .map(|a| format!(" https={a}"))
            .unwrap_or_default(),
        protocols.tls_addrs(),
    );
    crate::wait_for_signal().await;
    tracing::info!("shutting down");
    protocols.stop();
    broker.shutdown().await;
    stop_http(http).await;
    Ok(())
}

/// A client of the metadata store presenting `token` on every call (and
/// on the bookie calls made through it), over TLS where `tls` says the
/// planes speak it.
pub fn meta_client(
    endpoints: &[String],
    token: Option<String>,
    tls: &crate::tls::TlsArgs,
) -> anyhow::Result<MetaClient> {
    Ok(MetaClient::with_options(
        endpoints,
        magnetar_metadata::ClientOptions {
            token,
            tls: tls.meta_client()?,
            bookie_tls: tls.bookie_client()?,
            ..Default::default()
        },
    )?)
}

/// A metadata node, a bookie and a broker in this process.
pub struct Embedded {
    pub node: MetaNode,
    pub bookie: BookieServer,
    pub broker: Broker,
}

impl Embedded {
    /// Starts all three with data under `data_dir`; the broker's HTTP
    /// listener is the caller's business.
    pub async fn start(
        data_dir: &std::path::Path,
        meta_listen: SocketAddr,
        bookie_listen: SocketAddr,
        disk: EmbeddedDisk,
        tls: &crate::tls::TlsArgs,
        cfg: impl FnOnce() -> anyhow::Result<BrokerConfig>,
    ) -> anyhow::Result<Embedded> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let cfg = cfg()?;
        // The embedded gRPC planes take the client listeners' limits: in
        // standalone they listen next to them, and the same flood reaches
        // them.
        // With authentication on, they take the broker's superusers only,
        // and every internal client presents the internal token.
        let (grpc_auth, token) = match &cfg.auth {
            Some(a) => (
                crate::auth_args::grpc_auth(a.provider.clone(), a.superusers.clone()),
                a.internal_token.clone(),
            ),
            None => (Default::default(), None),
        };
        let node = MetaNode::start(NodeConfig {
            limits: cfg.listener_limits.clone(),
            auth: grpc_auth.clone(),
            peer_token: token.clone(),
            tls: tls.meta_server()?,
            peer_tls: tls.meta_client()?,
            ..NodeConfig::single(meta_listen, data_dir.join("meta"))
        })
        .await
        .context("starting the embedded metadata node")?;
        node.wait_for_leader(Duration::from_secs(30))
            .await
            .context("waiting for the metadata node")?;
        let endpoints = vec![node.local_addr().to_string()];
        anyhow::ensure!(
            (0.0..=1.0).contains(&disk.usage_threshold),
            "--bookie-disk-usage-threshold must be between 0 and 1"
        );
        let mut bookie_cfg =
            BookieConfig::new(1, bookie_listen, data_dir.join("bookie"), endpoints.clone());
        bookie_cfg.disk_usage_threshold = disk.usage_threshold;
        bookie_cfg.disk_check_interval = Duration::from_millis(disk.check_interval_ms.max(10));
        bookie_cfg.limits = cfg.listener_limits.clone();
        bookie_cfg.auth = grpc_auth;
        bookie_cfg.token = token.clone();
        bookie_cfg.tls = tls.bookie_server()?;
        bookie_cfg.meta_tls = tls.meta_client()?;
        bookie_cfg.bookie_tls = tls.bookie_client()?;
        let bookie = BookieServer::start(bookie_cfg)
            .await
            .context("starting the embedded bookie")?;
        let meta = meta_client(&endpoints, token, tls)?;
        wait_for_bookie(&meta).await?;
        let broker = Broker::start(meta, cfg)
            .await
            .context("starting the broker")?;
        // One HTTP port serves all three processes' metrics.
        broker.metrics().extend(|r| {
            node.metrics().register(r);
            bookie.metrics().register(r);
        });
        let (meta, bk) = (node.metrics(), bookie.metrics());
        broker.metrics().add_probe(
            "metadata",
            std::sync::Arc::new(move || {
                let h = meta.health();
                (h.live, h.ready)
            }),
        );
        broker.metrics().add_probe(
            "bookie",
            std::sync::Arc::new(move || {
                let h = bk.health();
                (h.live, h.ready)
            }),
        );
        Ok(Embedded {
            node,
            bookie,
            broker,
        })
    }

    pub async fn shutdown(self) {
        self.broker.shutdown().await;
        self.bookie.shutdown().await;
        self.node.shutdown().await;
    }
}

/// The broker settings of standalone: ledgers on the one bookie.
pub fn standalone_config(cluster: &str, advertised: &str) -> anyhow::Result<BrokerConfig> {
    broker_config(
        cluster,
        (advertised, &format!("http://{advertised}")),
        &BrokerOptions::parse_defaults(),
        (1, 1, 1),
        None,
        None,
    )
}

impl BrokerOptions {
    fn parse_defaults() -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            opts: BrokerOptions,
        }
        <Wrapper as clap::Parser>::parse_from(["magnetar"]).opts
    }
}

pub async fn run_standalone(args: StandaloneArgs) -> anyhow::Result<()> {
    let http_listeners = bind_http(&args.opts).await?;
    let listeners = bind_protocols(&args.opts).await?;
    let embedded = Embedded::start(
        &args.data_dir,
        args.meta_listen,
        args.bookie_listen,
        args.disk,
        &args.opts.tls,
        || {
            broker_config(
                &args.cluster,
                (&http_listeners.advertised, &http_listeners.url()),
                &args.opts,
                (1, 1, 1),
                Some(&listeners),
                Some(format!(
                    "file://{}",
                    std::path::absolute(&args.data_dir)
                        .unwrap_or_else(|_| args.data_dir.clone())
                        .join("offload")
                        .display()
                )),
            )
        },
    )
    .await?;
    let protocols = Protocols::start(listeners, &embedded.broker, &args.opts, false)?;
    let origins = allowed_origins(&args.opts, &http_listeners)?;
    let http = serve_http(
        http_listeners,
        embedded.broker.clone(),
        protocols.http_routes(),
        origins,
    )?;
    // The one line harnesses and users wait for.
    println!(
        "magnetar standalone ready: http={} kafka={} amqp={} mqtt={} meta={} bookie={} data={}{}{}",
        http.addr,
        protocols.kafka.listeners.local_addr(),
        protocols.amqp.listeners.local_addr(),
        protocols.mqtt.listeners.local_addr(),
        embedded.node.local_addr(),
        embedded.bookie.local_addr(),
        args.data_dir.display(),
        http.https_addr
            .map(|a| format!(" https={a}"))
            .unwrap_or_default(),
        protocols.tls_addrs(),
    );
    crate::wait_for_signal().await;
    tracing::info!("shutting down");
    protocols.stop();
    stop_http(http).await;
    embedded.shutdown().await;
    Ok(())
}

/// A bookie registers right after it starts; the broker needs it before
/// it can open any topic.
async fn wait_for_bookie(meta: &MetaClient) -> anyhow::Result<()> {
    let client = LedgerClient::new(meta.clone());
    for _ in 0..300 {
        let running = client.pool().available().await?;
        if running.iter().any(|b| !b.read_only) {
            return Ok(());
        }
        if !running.is_empty() {
            // Waiting would not help: the disk must be freed first.
            anyhow::bail!(
                "the embedded bookie is read-only: its disk is fuller than the bookie's \
                 disk-usage threshold (--bookie-disk-usage-threshold); free some space and \
                 start again"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the embedded bookie never registered")
}
