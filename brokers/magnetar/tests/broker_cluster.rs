//! Brokers as real processes: `magnetar standalone` restarted with its
//! data and cursors, and a broker SIGKILLed during a produce stream while
//! another one takes its topics over. Clients speak plain HTTP to the REST
//! producer and reader.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{free_port, spawn_until, start_broker, LedgerCluster, Proc, BIN};
use serde_json::{json, Value};

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

struct Standalone {
    dir: std::path::PathBuf,
    ports: (u16, u16, u16),
}

impl Standalone {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.0)
    }

    fn start(&self) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.arg("standalone")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--http-listen", &format!("127.0.0.1:{}", self.ports.0)])
            .args([
                "--kafka-listen",
                "127.0.0.1:0",
                "--amqp-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
            ])
            .args(["--meta-listen", &format!("127.0.0.1:{}", self.ports.1)])
            .args(["--bookie-listen", &format!("127.0.0.1:{}", self.ports.2)])
            .env("MAGNETAR_LOG", "info,openraft=warn");
        spawn_until(
            cmd,
            "ready",
            &self.dir.join("standalone.log"),
            Duration::from_secs(60),
        )
    }
}

async fn produce(
    c: &reqwest::Client,
    url: &str,
    topic: &str,
    body: Value,
) -> reqwest::Result<Value> {
    c.post(format!("{url}/topics/persistent/public/default/{topic}"))
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await
}

async fn read_all(c: &reqwest::Client, url: &str, topic: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let r: Value = c
            .get(format!(
                "{url}/topics/persistent/public/default/{topic}/messages?offset={at}&max=1000"
            ))
            .send()
            .await
            .expect("read")
            .error_for_status()
            .expect("read status")
            .json()
            .await
            .expect("json");
        let msgs = r["messages"].as_array().cloned().unwrap_or_default();
        if msgs.is_empty() {
            return out;
        }
        for m in msgs {
            let off = m["offset"].as_u64().expect("offset");
            let payload = base64::engine::general_purpose::STANDARD
                .decode(m["payload"].as_str().expect("payload"))
                .expect("b64");
            out.push((off, String::from_utf8(payload).expect("utf8")));
            at = off + 1;
        }
    }
}

async fn stats(c: &reqwest::Client, url: &str, topic: &str) -> Value {
    c.get(format!(
        "{url}/admin/v2/persistent/public/default/{topic}/stats"
    ))
    .send()
    .await
    .expect("stats")
    .error_for_status()
    .expect("stats status")
    .json()
    .await
    .expect("json")
}

async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    c.get(url)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON")
}

async fn lookup(c: &reqwest::Client, url: &str, topic: &str) -> Value {
    c.get(format!(
        "{url}/lookup/v2/topic/persistent/public/default/{topic}"
    ))
    .send()
    .await
    .expect("lookup")
    .json()
    .await
    .expect("json")
}

fn wait_exit(p: &mut Proc, within: Duration) {
    let start = Instant::now();
    while p.running() {
        assert!(start.elapsed() < within, "did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn standalone_keeps_data_and_cursors_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Standalone {
        dir: dir.path().to_path_buf(),
        ports: (free_port(), free_port(), free_port()),
    };
    let c = http();
    let mut p = s.start();
    for batch in 0..10 {
        let messages: Vec<Value> = (0..10)
            .map(|i| json!({ "payload": b64(&format!("m{}", batch * 10 + i)) }))
            .collect();
        produce(&c, &s.url(), "kept", json!({ "messages": messages }))
            .await
            .expect("produce");
    }
    let sub = format!(
        "{}/admin/v2/persistent/public/default/kept/subscription/s",
        s.url()
    );
    c.put(&sub)
        .json(&json!("earliest"))
        .send()
        .await
        .expect("sub")
        .error_for_status()
        .expect("sub");
    c.post(format!("{sub}/skip/40"))
        .send()
        .await
        .expect("skip")
        .error_for_status()
        .expect("skip");
    let expected: Vec<(u64, String)> = (0..100).map(|i| (i, format!("m{i}"))).collect();

    // A clean stop, then a crash: both keep data and the cursor.
    p.signal(rustix::process::Signal::TERM);
    wait_exit(&mut p, Duration::from_secs(30));
    for round in ["after SIGTERM", "after SIGKILL"] {
        let mut p = s.start();
        // Pooled connections died with the old process.
        let c = http();
        let st = stats(&c, &s.url(), "kept").await;
        assert_eq!(st["endOffset"], json!(100), "{round}: {st}");
        assert_eq!(
            st["subscriptions"]["s"]["msgBacklog"],
            json!(60),
            "{round}: {st}"
        );
        assert_eq!(read_all(&c, &s.url(), "kept").await, expected, "{round}");
        if round == "after SIGTERM" {
            p.kill();
        }
    }
}

#[tokio::test]
async fn owner_sigkill_mid_stream_is_taken_over_with_every_ack_once_in_order() {
    const TOTAL: u64 = 1500;
    const KILL_AT: u64 = 500;
    let cluster = LedgerCluster::start(3, &[]);
    let ports = [free_port(), free_port()];
    let logs = [
        cluster.meta.dir.path().join("broker-a.log"),
        cluster.meta.dir.path().join("broker-b.log"),
    ];
    let mut brokers = [
        Some(start_broker(&cluster, ports[0], None, &logs[0])),
        Some(start_broker(&cluster, ports[1], None, &logs[1])),
    ];
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let c = http();
    // Broker A takes the topic by being asked first.
    c.put(format!(
        "{}/admin/v2/persistent/public/default/stream",
        urls[0]
    ))
    .send()
    .await
    .expect("create")
    .error_for_status()
    .expect("create status");
    assert_eq!(
        lookup(&c, &urls[1], "stream").await["httpUrl"],
        json!(urls[0])
    );

    let mut killed_at: Option<Instant> = None;
    let mut takeover = None;
    let mut target = 0usize;
    let mut seq = 0u64;
    let mut failures = 0;
    while seq < TOTAL {
        if seq == KILL_AT && killed_at.is_none() {
            if let Some(mut a) = brokers[0].take() {
                a.kill();
            }
            killed_at = Some(Instant::now());
        }
        let body = json!({
            "producerName": "stream-producer",
            "messages": [{ "payload": b64(&format!("m{seq}")), "sequenceId": seq }],
        });
        match produce(&c, &urls[target], "stream", body).await {
            Ok(r) => {
                let res = &r["messagePublishResults"][0];
                assert_eq!(res["errorCode"], json!(0), "{r}");
                if let (Some(t0), None) = (killed_at, takeover) {
                    takeover = Some(t0.elapsed());
                }
                seq += 1;
            }
            Err(_) => {
                // Retry the same sequence number, on the other broker too.
                failures += 1;
                assert!(failures < 2000, "the stream never recovered");
                target = 1 - target;
                if brokers[target].is_none() {
                    target = 1 - target;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let takeover = takeover.expect("acknowledgements after the kill");
    println!("takeover after SIGKILL: {takeover:?} ({failures} failed attempts)");
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );

    let stored = read_all(&c, &urls[1], "stream").await;
    let payloads: Vec<String> = stored.iter().map(|(_, p)| p.clone()).collect();
    let expected: Vec<String> = (0..TOTAL).map(|i| format!("m{i}")).collect();
    assert_eq!(
        payloads.len(),
        expected.len(),
        "each acknowledged message exactly once"
    );
    assert_eq!(payloads, expected, "in order");
    let offsets: Vec<u64> = stored.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (0..TOTAL).collect::<Vec<_>>());
    assert_eq!(
        lookup(&c, &urls[1], "stream").await["httpUrl"],
        json!(urls[1])
    );
}

/// A partitioned topic's base name stands for its partitions on whichever
/// broker is asked: one that owns none forwards each partition's unload,
/// offload status and subscriptions to the owner, as Pulsar's admin API
/// does.
#[tokio::test]
async fn base_name_operations_reach_partitions_owned_elsewhere() {
    let cluster = LedgerCluster::start(3, &[]);
    let ports = [free_port(), free_port()];
    let dir = cluster.meta.dir.path();
    let _a = start_broker(&cluster, ports[0], None, &dir.join("broker-a.log"));
    let _b = start_broker(&cluster, ports[1], None, &dir.join("broker-b.log"));
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let c = http();
    let base = "/admin/v2/persistent/public/default/parts";
    c.put(format!("{}{base}/partitions", urls[0]))
        .json(&json!(3))
        .send()
        .await
        .expect("create")
        .error_for_status()
        .expect("create status");
    // Broker A takes the namespace's bundle by serving the partitions.
    for i in 0..3 {
        let body = json!({ "messages": [{ "payload": b64(&format!("m{i}")) }] });
        produce(&c, &urls[0], &format!("parts-partition-{i}"), body)
            .await
            .expect("produce");
    }
    assert_eq!(
        lookup(&c, &urls[1], "parts-partition-0").await["httpUrl"],
        json!(urls[0])
    );
    let status = c
        .get(format!("{}{base}/offload", urls[1]))
        .send()
        .await
        .expect("offload status");
    assert!(status.status().is_success(), "{}", status.status());
    let status: Value = status.json().await.expect("json");
    let parts = status["partitions"].as_object().expect("by partition");
    assert_eq!(parts.len(), 3, "{status}");
    let unload = c
        .put(format!("{}{base}/unload", urls[1]))
        .send()
        .await
        .expect("unload");
    assert_eq!(unload.status().as_u16(), 204);
    // The data is still there after the unload.
    let read = read_all(&c, &urls[0], "parts-partition-2").await;
    assert_eq!(read.len(), 1);
    // Subscriptions: listed and deleted through the broker that owns none.
    c.put(format!("{}{base}-partition-1/subscription/audit", urls[0]))
        .json(&json!("earliest"))
        .send()
        .await
        .expect("subscribe")
        .error_for_status()
        .expect("subscribe status");
    let subs = get_json(&c, &format!("{}{base}/subscriptions", urls[1])).await;
    assert!(
        subs.as_array().expect("a list").contains(&json!("audit")),
        "{subs}"
    );
    let deleted = c
        .delete(format!("{}{base}/subscription/audit", urls[1]))
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status().as_u16(), 204);
    let subs = get_json(&c, &format!("{}{base}/subscriptions", urls[1])).await;
    assert!(
        !subs.as_array().expect("a list").contains(&json!("audit")),
        "{subs}"
    );
    // Stats, and a subscription made, moved (with a body) and read back
    // on every partition, all through the broker that owns none.
    let stats = get_json(&c, &format!("{}{base}/partitioned-stats", urls[1])).await;
    // Counters count since the unload; the stored data is all there.
    let ends: Vec<Value> = stats["partitions"]
        .as_object()
        .expect("by partition")
        .values()
        .map(|p| p["endOffset"].clone())
        .collect();
    assert_eq!(ends, vec![json!(1); 3], "{stats}");
    let post = |path: String, body: Option<Value>| {
        let req = c.request(reqwest::Method::POST, path);
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        async move { req.send().await.expect("post").status().as_u16() }
    };
    let made = c
        .put(format!("{}{base}/subscription/replay", urls[1]))
        .json(&json!("latest"))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(made.status().as_u16(), 204);
    let at = |stats: &Value| -> Vec<Value> {
        stats["partitions"]
            .as_object()
            .expect("by partition")
            .values()
            .map(|p| p["cursors"]["replay"]["markDeleteOffset"].clone())
            .collect()
    };
    let internal = get_json(&c, &format!("{}{base}/internalStats", urls[1])).await;
    assert_eq!(at(&internal), vec![json!(1); 3], "{internal}");
    let reset = format!("{}{base}/subscription/replay/resetcursor", urls[1]);
    assert_eq!(post(reset, Some(json!({ "offset": 0 }))).await, 204);
    let internal = get_json(&c, &format!("{}{base}/internalStats", urls[1])).await;
    assert_eq!(at(&internal), vec![json!(0); 3], "{internal}");
}
