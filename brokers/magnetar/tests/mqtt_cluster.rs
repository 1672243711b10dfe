//! MQTT across brokers, judged with rumqttc (MQTT 5): a client id that
//! connects to a second broker ends its connection on the first (0x8E),
//! and a persistent session whose broker is SIGKILLed is taken up on
//! another broker with every queued QoS 1 message. Two clusters side by
//! side stay apart, and a client behind a link that is delayed and cut
//! loses no acknowledged message.

mod common;

use std::time::{Duration, Instant};

use common::{free_port, start_broker, LedgerCluster};
use magnetar_testkit::cluster::start_broker_named;
use magnetar_testkit::faults::FaultProxy;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, DisconnectReasonCode, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError};

/// A connected MQTT 5 client: its handle, event loop and CONNACK's
/// session-present flag.
async fn connect(
    port: u16,
    id: &str,
    persistent: bool,
) -> anyhow::Result<(AsyncClient, EventLoop, bool)> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    if persistent {
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(3600));
    }
    let (client, mut ev) = AsyncClient::new(opts, 64);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "no CONNACK from {port}");
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await?? {
            Event::Incoming(Packet::ConnAck(a)) => {
                anyhow::ensure!(a.code == ConnectReturnCode::Success, "CONNACK {:?}", a.code);
                return Ok((client, ev, a.session_present));
            }
            _ => continue,
        }
    }
}

/// Polls until a packet `pick` accepts arrives.
async fn until<T>(
    ev: &mut EventLoop,
    within: Duration,
    mut pick: impl FnMut(&Packet) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "timed out");
        if let Event::Incoming(p) = tokio::time::timeout(left, ev.poll()).await?? {
            if let Some(t) = pick(&p) {
                return Ok(t);
            }
        }
    }
}

#[tokio::test]
async fn client_ids_and_persistent_sessions_move_between_brokers() -> anyhow::Result<()> {
    let cluster = LedgerCluster::start(3, &[]);
    let (http, mqtt) = ([free_port(), free_port()], [free_port(), free_port()]);
    let logs = [
        cluster.meta.dir.path().join("broker-a.log"),
        cluster.meta.dir.path().join("broker-b.log"),
    ];
    let mut a = start_broker(&cluster, http[0], Some(mqtt[0]), &logs[0]);
    let _b = start_broker(&cluster, http[1], Some(mqtt[1]), &logs[1]);

    // Takeover: the same client id on broker B ends its connection on A.
    let (_first, mut first_ev, _) = connect(mqtt[0], "device-7", false).await?;
    let (_second, mut second_ev, _) = connect(mqtt[1], "device-7", false).await?;
    // rumqttc reports the server's DISCONNECT as the end of the loop.
    let reason = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match first_ev.poll().await {
                Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                    reason_code,
                    ..
                })) => return Some(reason_code),
                Err(_) => return None,
                Ok(_) => continue,
            }
        }
    })
    .await?;
    assert_eq!(reason, Some(DisconnectReasonCode::SessionTakenOver));
    // The newer connection stays: nothing, or anything but an error.
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), second_ev.poll()).await {
        r?;
    }

    // A persistent session subscribed on A, then offline while B takes
    // 20 QoS 1 messages for it.
    let (sub, mut sub_ev, present) = connect(mqtt[0], "collector", true).await?;
    assert!(!present);
    sub.subscribe("plant/+/pressure", QoS::AtLeastOnce).await?;
    until(&mut sub_ev, Duration::from_secs(10), |p| {
        matches!(p, Packet::SubAck(_)).then_some(())
    })
    .await?;
    sub.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while sub_ev.poll().await.is_ok() {}
    })
    .await;

    let (publisher, mut pub_ev, _) = connect(mqtt[1], "plc", false).await?;
    for i in 0..20 {
        publisher
            .publish(
                format!("plant/{}/pressure", i % 3),
                QoS::AtLeastOnce,
                false,
                format!("p{i}"),
            )
            .await?;
    }
    let mut acked = 0;
    while acked < 20 {
        until(&mut pub_ev, Duration::from_secs(20), |p| {
            matches!(p, Packet::PubAck(_)).then_some(())
        })
        .await?;
        acked += 1;
    }

    // Broker A dies; the session comes back on B with its messages.
    a.kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got: Vec<String> = Vec::new();
    while got.len() < 20 {
        assert!(
            Instant::now() < deadline,
            "after failover only {got:?} arrived"
        );
        let Ok((_c, mut ev, present)) = connect(mqtt[1], "collector", true).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        assert!(present, "the session is known on broker B");
        while got.len() < 20 {
            match until(&mut ev, Duration::from_secs(5), |p| match p {
                Packet::Publish(m) => Some(String::from_utf8_lossy(&m.payload).into_owned()),
                _ => None,
            })
            .await
            {
                Ok(m) => {
                    if !got.contains(&m) {
                        got.push(m);
                    }
                }
                Err(_) => break,
            }
        }
    }
    let mut want: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "every acknowledged message, after failover");
    Ok(())
}

/// Publishes `payloads` at QoS 1 and waits for each PUBACK.
async fn publish_acked(
    client: &AsyncClient,
    ev: &mut EventLoop,
    topic: &str,
    payloads: impl IntoIterator<Item = String>,
) -> anyhow::Result<()> {
    let mut sent = 0;
    for p in payloads {
        client.publish(topic, QoS::AtLeastOnce, false, p).await?;
        sent += 1;
    }
    for _ in 0..sent {
        until(ev, Duration::from_secs(20), |p| {
            matches!(p, Packet::PubAck(_)).then_some(())
        })
        .await?;
    }
    Ok(())
}

/// Collects `n` publications' payloads.
async fn receive(ev: &mut EventLoop, n: usize) -> anyhow::Result<Vec<String>> {
    let mut got = Vec::new();
    while got.len() < n {
        got.push(
            until(ev, Duration::from_secs(20), |p| match p {
                Packet::Publish(m) => Some(String::from_utf8_lossy(&m.payload).into_owned()),
                _ => None,
            })
            .await?,
        );
    }
    Ok(got)
}

async fn subscribed(port: u16, id: &str, filter: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (c, mut ev, _) = connect(port, id, false).await?;
    c.subscribe(filter, QoS::AtLeastOnce).await?;
    until(&mut ev, Duration::from_secs(10), |p| {
        matches!(p, Packet::SubAck(_)).then_some(())
    })
    .await?;
    Ok((c, ev))
}

#[tokio::test]
async fn two_clusters_side_by_side_and_a_client_behind_a_delayed_then_cut_link(
) -> anyhow::Result<()> {
    // Two regions: each its own metadata, bookie and broker, on its own
    // directory and ports.
    let east = LedgerCluster::start(1, &[]);
    let west = LedgerCluster::start(1, &[]);
    let mqtt = [free_port(), free_port()];
    let _east_broker = start_broker_named(
        &east,
        "east",
        free_port(),
        Some(mqtt[0]),
        &east.meta.dir.path().join("broker.log"),
    );
    let _west_broker = start_broker_named(
        &west,
        "west",
        free_port(),
        Some(mqtt[1]),
        &west.meta.dir.path().join("broker.log"),
    );
    let (_e, mut east_sub) = subscribed(mqtt[0], "east-sub", "site/#").await?;
    let (_w, mut west_sub) = subscribed(mqtt[1], "west-sub", "site/#").await?;

    // The publisher reaches east through a link the test controls.
    let proxy = FaultProxy::start(([127, 0, 0, 1], mqtt[0]).into()).await?;
    let (publisher, mut pub_ev, _) = connect(proxy.addr().port(), "plc", false).await?;
    publish_acked(
        &publisher,
        &mut pub_ev,
        "site/a",
        (0..10).map(|i| format!("m{i}")),
    )
    .await?;

    // A delayed link is slow, both ways, and loses nothing.
    proxy.delay(Duration::from_millis(150));
    let t = Instant::now();
    publish_acked(&publisher, &mut pub_ev, "site/a", ["slow".to_string()]).await?;
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );

    // A cut link ends the connection; after the heal the client connects
    // again and goes on.
    proxy.cut();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if pub_ev.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the cut link ends the client's connection");
    proxy.heal();
    drop((publisher, pub_ev));
    let (publisher, mut pub_ev, _) = connect(proxy.addr().port(), "plc", false).await?;
    publish_acked(
        &publisher,
        &mut pub_ev,
        "site/a",
        (10..20).map(|i| format!("m{i}")),
    )
    .await?;

    let mut got = receive(&mut east_sub, 21).await?;
    got.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    want.push("slow".into());
    want.sort();
    assert_eq!(
        got, want,
        "every acknowledged message reached east's subscriber"
    );

    // Nothing crossed to the other cluster.
    let crossed = until(&mut west_sub, Duration::from_millis(500), |p| {
        matches!(p, Packet::Publish(_)).then_some(())
    })
    .await;
    assert!(crossed.is_err(), "west is a separate cluster");
    Ok(())
}
