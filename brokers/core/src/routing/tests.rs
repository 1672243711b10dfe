use std::collections::BTreeSet;
use std::time::Instant;

use super::*;

// ---- helpers ----------------------------------------------------------

fn table_with(exchanges: &[(&str, ExchangeKind)], queues: &[&str]) -> RoutingTable {
    let mut t = RoutingTable::new();
    for &(name, kind) in exchanges {
        t.declare_exchange(ExchangeDef::new(name, kind), false)
            .expect("declare exchange");
    }
    for q in queues {
        t.declare_queue(q).expect("declare queue");
    }
    t
}

fn bind_q(t: &mut RoutingTable, x: &str, q: &str, key: &str) {
    t.bind(Binding::queue(x, q, key)).expect("bind");
}

fn route_keys(t: &RoutingTable, x: &str, key: &str) -> Vec<String> {
    t.route(x, key, &[])
        .expect("route")
        .queues
        .into_iter()
        .collect()
}

fn hdrs(pairs: &[(&str, HeaderValue)]) -> Vec<(String, HeaderValue)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

fn is_not_found(r: Result<impl std::fmt::Debug, BrokerError>) -> bool {
    matches!(r, Err(BrokerError::NotFound(_)))
}

fn is_access_refused(r: Result<impl std::fmt::Debug, BrokerError>) -> bool {
    matches!(r, Err(BrokerError::AccessRefused(_)))
}

fn is_precondition_failed(r: Result<impl std::fmt::Debug, BrokerError>) -> bool {
    matches!(r, Err(BrokerError::PreconditionFailed(_)))
}

/// Straightforward recursive matcher over word lists: the specification the
/// trie is checked against.
fn reference_match(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| reference_match(rest, &key[skip..])),
        Some((&"*", rest)) => !key.is_empty() && reference_match(rest, &key[1..]),
        Some((word, rest)) => key.first() == Some(word) && reference_match(rest, &key[1..]),
    }
}

fn ref_matches(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = trie::words(pattern).collect();
    let k: Vec<&str> = trie::words(key).collect();
    reference_match(&p, &k)
}

/// Small deterministic PRNG so randomized tests need no extra crate and
/// replay identically.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn random_key(rng: &mut XorShift, alphabet: &[&str], max_words: usize) -> String {
    let n = rng.below(max_words + 1);
    (0..n)
        .map(|_| alphabet[rng.below(alphabet.len())])
        .collect::<Vec<_>>()
        .join(".")
}

// ---- topic: RabbitMQ's own matching table ------------------------------

/// The binding set and expectations of rabbitmq-server's topic-exchange
/// unit test (binding key -> queue, then routing key -> expected queues),
/// re-expressed against this table.
const RABBIT_TOPIC_BINDINGS: [(&str, &str); 26] = [
    ("a.b.c", "t1"),
    ("a.*.c", "t2"),
    ("a.#.b", "t3"),
    ("a.b.b.c", "t4"),
    ("#", "t5"),
    ("#.#", "t6"),
    ("#.b", "t7"),
    ("*.*", "t8"),
    ("a.*", "t9"),
    ("*.b.c", "t10"),
    ("a.#", "t11"),
    ("a.#.#", "t12"),
    ("b.b.c", "t13"),
    ("a.b.b", "t14"),
    ("a.b", "t15"),
    ("b.c", "t16"),
    ("", "t17"),
    ("*.*.*", "t18"),
    ("vodka.martini", "t19"),
    ("a.b.c", "t20"),
    ("*.#", "t21"),
    ("#.*.#", "t22"),
    ("*.#.#", "t23"),
    ("#.#.#", "t24"),
    ("*", "t25"),
    ("#.b.#", "t26"),
];

fn rabbit_topic_table() -> RoutingTable {
    let mut t = table_with(&[("topic_matching", ExchangeKind::Topic)], &[]);
    for q in 1..=27 {
        t.declare_queue(&format!("t{q}")).expect("queue");
    }
    for (key, q) in RABBIT_TOPIC_BINDINGS {
        bind_q(&mut t, "topic_matching", q, key);
    }
    // Two bindings that differ only in their arguments: both stored, one
    // delivery.
    for v in ["bar", "baz"] {
        let b = Binding::queue("topic_matching", "t27", "args-test")
            .with_arguments(hdrs(&[("foo", HeaderValue::from(v))]));
        assert!(t.bind(b).expect("bind"));
    }
    t
}

fn check_topic_expectations(t: &RoutingTable, cases: &[(&str, &[&str])]) {
    for (key, expected) in cases {
        let got = t.route("topic_matching", key, &[]).expect("route").queues;
        assert_eq!(got, set(expected), "routing key {key:?}");
    }
}

#[test]
fn rabbitmq_topic_matching_table() {
    let mut t = rabbit_topic_table();
    assert_eq!(t.binding_count(), 28);
    check_topic_expectations(
        &t,
        &[
            (
                "a.b.c",
                &[
                    "t1", "t2", "t5", "t6", "t10", "t11", "t12", "t18", "t20", "t21", "t22", "t23",
                    "t24", "t26",
                ],
            ),
            (
                "a.b",
                &[
                    "t3", "t5", "t6", "t7", "t8", "t9", "t11", "t12", "t15", "t21", "t22", "t23",
                    "t24", "t26",
                ],
            ),
            (
                "a.b.b",
                &[
                    "t3", "t5", "t6", "t7", "t11", "t12", "t14", "t18", "t21", "t22", "t23", "t24",
                    "t26",
                ],
            ),
            ("", &["t5", "t6", "t17", "t24"]),
            (
                "b.c.c",
                &["t5", "t6", "t18", "t21", "t22", "t23", "t24", "t26"],
            ),
            (
                "a.a.a.a.a",
                &["t5", "t6", "t11", "t12", "t21", "t22", "t23", "t24"],
            ),
            ("vodka.gin", &["t5", "t6", "t8", "t21", "t22", "t23", "t24"]),
            (
                "vodka.martini",
                &["t5", "t6", "t8", "t19", "t21", "t22", "t23", "t24"],
            ),
            (
                "b.b.c",
                &[
                    "t5", "t6", "t10", "t13", "t18", "t21", "t22", "t23", "t24", "t26",
                ],
            ),
            (
                "nothing.here.at.all",
                &["t5", "t6", "t21", "t22", "t23", "t24"],
            ),
            ("oneword", &["t5", "t6", "t21", "t22", "t23", "t24", "t25"]),
            (
                "args-test",
                &["t5", "t6", "t21", "t22", "t23", "t24", "t25", "t27"],
            ),
        ],
    );

    // Remove "a.b.c"->t1, "#"->t5, "a.#"->t11, "vodka.martini"->t19,
    // "*.#"->t21 and the second of the two aliased t27 bindings.
    for (key, q) in [
        ("a.b.c", "t1"),
        ("#", "t5"),
        ("a.#", "t11"),
        ("vodka.martini", "t19"),
        ("*.#", "t21"),
    ] {
        let removed = t
            .unbind(&Binding::queue("topic_matching", q, key))
            .expect("unbind");
        assert_eq!(removed.bindings.len(), 1);
    }
    let aliased = Binding::queue("topic_matching", "t27", "args-test")
        .with_arguments(hdrs(&[("foo", HeaderValue::from("baz"))]));
    assert_eq!(t.unbind(&aliased).expect("unbind").bindings.len(), 1);
    assert_eq!(t.binding_count(), 22);

    check_topic_expectations(
        &t,
        &[
            (
                "a.b.c",
                &[
                    "t2", "t6", "t10", "t12", "t18", "t20", "t22", "t23", "t24", "t26",
                ],
            ),
            (
                "a.b",
                &[
                    "t3", "t6", "t7", "t8", "t9", "t12", "t15", "t22", "t23", "t24", "t26",
                ],
            ),
            (
                "a.b.b",
                &[
                    "t3", "t6", "t7", "t12", "t14", "t18", "t22", "t23", "t24", "t26",
                ],
            ),
            ("", &["t6", "t17", "t24"]),
            ("b.c.c", &["t6", "t18", "t22", "t23", "t24", "t26"]),
            ("a.a.a.a.a", &["t6", "t12", "t22", "t23", "t24"]),
            ("vodka.gin", &["t6", "t8", "t22", "t23", "t24"]),
            ("vodka.martini", &["t6", "t8", "t22", "t23", "t24"]),
            (
                "b.b.c",
                &["t6", "t10", "t13", "t18", "t22", "t23", "t24", "t26"],
            ),
            ("nothing.here.at.all", &["t6", "t22", "t23", "t24"]),
            ("oneword", &["t6", "t22", "t23", "t24", "t25"]),
            // t27 still reachable through its remaining "foo=bar" binding.
            ("args-test", &["t6", "t22", "t23", "t24", "t25", "t27"]),
        ],
    );

    let removed = t.delete_exchange("topic_matching", false).expect("delete");
    assert_eq!(removed.bindings.len(), 22);
    assert_eq!(removed.exchanges.len(), 1);
    assert!(is_not_found(t.route("topic_matching", "a.b.c", &[])));
    assert_eq!(t.binding_count(), 0);
    assert!((1..=27).all(|q| t.bindings_for_queue(&format!("t{q}")).next().is_none()));
}

#[test]
fn rabbitmq_topic_table_agrees_with_reference_matcher() {
    let t = rabbit_topic_table();
    for key in [
        "a.b.c",
        "a.b",
        "a.b.b",
        "",
        "b.c.c",
        "a.a.a.a.a",
        "vodka.gin",
        "oneword",
        "a",
        "b",
        "a.b.b.c",
    ] {
        let expected: BTreeSet<String> = RABBIT_TOPIC_BINDINGS
            .iter()
            .filter(|(pattern, _)| ref_matches(pattern, key))
            .map(|(_, q)| (*q).to_owned())
            .chain(ref_matches("args-test", key).then(|| "t27".to_owned()))
            .collect();
        assert_eq!(
            t.route("topic_matching", key, &[]).expect("route").queues,
            expected,
            "key {key:?}"
        );
    }
}

// ---- topic: edge cases --------------------------------------------------

#[test]
fn topic_edge_cases() {
    // (binding key, routing key, matches)
    let cases: &[(&str, &str, bool)] = &[
        // The empty key is zero words.
        ("", "", true),
        ("", "a", false),
        ("a", "", false),
        ("*", "", false),
        ("#", "", true),
        ("#.#", "", true),
        ("#.*", "", false),
        ("*.#", "", false),
        // Empty words are words.
        ("a..b", "a..b", true),
        ("a.*.b", "a..b", true),
        ("a.b", "a..b", false),
        ("*.*", ".", true),
        ("*", ".", false),
        ("#", ".", true),
        ("a.", "a.", true),
        ("a.", "a", false),
        ("a.*", "a.", true),
        ("a.#", "a.", true),
        (".a", ".a", true),
        ("*.a", ".a", true),
        // `#` at start, middle and end, alone and combined.
        ("#.a", "a", true),
        ("#.a", "x.y.a", true),
        ("#.a", "a.b", false),
        ("a.#", "a", true),
        ("a.#", "a.b.c", true),
        ("a.#", "b.a", false),
        ("a.#.b", "a.b", true),
        ("a.#.b", "a.x.y.b", true),
        ("a.#.b", "a.b.x", false),
        ("a.#.#.b", "a.b", true),
        ("#.#", "a.b.c", true),
        ("#.*", "a", true),
        ("#.*", "a.b.c", true),
        ("*.#", "a", true),
        ("a.*.#", "a", false),
        ("a.*.#", "a.b", true),
        ("#.a.#", "b.a.c", true),
        ("#.a.#", "a", true),
        ("#.a.#", "b.c", false),
        ("#.b.#", "b", true),
        ("#.*.#.*.#", "a.b", true),
        ("#.*.#.*.#", "a", false),
        ("*.*.#.*", "a.b", false),
        ("*.*.#.*", "a.b.c", true),
        ("#.a.*.b.#", "x.a.z.b", true),
        ("#.a.*.b.#", "a.b", false),
        ("#.a.*.b.#", "x.y.a.z.z.b.w", false),
        // Wildcards in a routing key are plain words.
        ("a.b", "a.*", false),
        ("a.b", "a.#", false),
        ("*", "*", true),
        ("a.*", "a.#", true),
        ("a.#", "a.#", true),
        // Partial-word wildcards are literal words too.
        ("a*", "ab", false),
        ("a*", "a*", true),
        ("a.b#", "a.b", false),
    ];
    for &(pattern, key, expected) in cases {
        assert_eq!(
            ref_matches(pattern, key),
            expected,
            "reference: {pattern:?} vs {key:?}"
        );
        let mut t = table_with(&[("t", ExchangeKind::Topic)], &["q"]);
        bind_q(&mut t, "t", "q", pattern);
        let routed = t.route("t", key, &[]).expect("route");
        assert_eq!(!routed.is_empty(), expected, "trie: {pattern:?} vs {key:?}");
    }
}

#[test]
fn topic_trie_matches_reference_on_random_bindings() {
    let pattern_words = ["a", "b", "c", "", "*", "#"];
    let key_words = ["a", "b", "c", "", "*", "d"];
    for seed in 1..=12u64 {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x1000_0000_01B3));
        let mut t = table_with(&[("t", ExchangeKind::Topic)], &[]);
        let mut bound: Vec<(String, String)> = Vec::new();
        for i in 0..150 {
            let q = format!("q{}", i % 60);
            let _ = t.declare_queue(&q).expect("queue");
            let pattern = random_key(&mut rng, &pattern_words, 6);
            if t.bind(Binding::queue("t", q.as_str(), pattern.as_str()))
                .expect("bind")
            {
                bound.push((pattern, q));
            }
        }
        let check = |t: &RoutingTable, bound: &[(String, String)], rng: &mut XorShift| {
            for _ in 0..400 {
                let key = random_key(rng, &key_words, 7);
                let expected: BTreeSet<String> = bound
                    .iter()
                    .filter(|(p, _)| ref_matches(p, &key))
                    .map(|(_, q)| q.clone())
                    .collect();
                assert_eq!(
                    t.route("t", &key, &[]).expect("route").queues,
                    expected,
                    "seed {seed} key {key:?}"
                );
            }
        };
        check(&t, &bound, &mut rng);
        // Remove about half, in random order, and check pruning kept the
        // rest intact.
        let mut kept = Vec::new();
        for (pattern, q) in bound {
            if rng.below(2) == 0 {
                let removed = t
                    .unbind(&Binding::queue("t", q.as_str(), pattern.as_str()))
                    .expect("unbind");
                assert_eq!(removed.bindings.len(), 1);
            } else {
                kept.push((pattern, q));
            }
        }
        check(&t, &kept, &mut rng);
        for (pattern, q) in &kept {
            t.unbind(&Binding::queue("t", q.as_str(), pattern.as_str()))
                .expect("unbind");
        }
        assert_eq!(t.binding_count(), 0);
        let Some(Exchange {
            matcher: Matcher::Topic(trie),
            ..
        }) = t.exchanges.get("t")
        else {
            panic!("topic exchange missing");
        };
        assert_eq!(trie.live_nodes(), 1, "trie not pruned back to its root");
    }
}

#[test]
fn topic_survives_huge_keys_and_hash_chains() {
    let mut t = table_with(&[("t", ExchangeKind::Topic)], &["deep", "hashes", "x"]);
    // A binding key far deeper than any sane stack could recurse.
    let deep: String = vec!["w"; 200_000].join(".");
    bind_q(&mut t, "t", "deep", &deep);
    bind_q(&mut t, "t", "hashes", &vec!["#"; 64].join("."));
    bind_q(&mut t, "t", "x", "#.x.#.x.#");
    let start = Instant::now();
    assert_eq!(route_keys(&t, "t", &deep), ["deep", "hashes"]);
    let long_key = format!(
        "{}.x.{}.x",
        vec!["y"; 5_000].join("."),
        vec!["y"; 5_000].join(".")
    );
    assert_eq!(route_keys(&t, "t", &long_key), ["hashes", "x"]);
    assert!(
        start.elapsed().as_secs() < 20,
        "hash chains went super-linear"
    );
    t.unbind(&Binding::queue("t", "deep", deep.as_str()))
        .expect("unbind");
    assert_eq!(route_keys(&t, "t", &deep), ["hashes"]);
    // Dropping a table with a deep trie must not recurse either.
    bind_q(&mut t, "t", "deep", &deep);
    drop(t);
}

// ---- direct / fanout / default ----------------------------------------

#[test]
fn direct_exchange_matches_exact_keys_only() {
    let mut t = table_with(&[("d", ExchangeKind::Direct)], &["q1", "q2", "q3"]);
    bind_q(&mut t, "d", "q1", "orders");
    bind_q(&mut t, "d", "q2", "orders");
    bind_q(&mut t, "d", "q3", "orders.eu");
    bind_q(&mut t, "d", "q3", "");
    assert_eq!(route_keys(&t, "d", "orders"), ["q1", "q2"]);
    assert_eq!(route_keys(&t, "d", "orders.eu"), ["q3"]);
    assert_eq!(route_keys(&t, "d", ""), ["q3"]);
    assert!(route_keys(&t, "d", "order").is_empty());
    assert!(route_keys(&t, "d", "Orders").is_empty());
    // Wildcards mean nothing to a direct exchange.
    bind_q(&mut t, "d", "q1", "#");
    assert_eq!(route_keys(&t, "d", "anything"), Vec::<String>::new());
    assert_eq!(route_keys(&t, "d", "#"), ["q1"]);
}

#[test]
fn bindings_differing_in_arguments_are_distinct_but_route_once() {
    let mut t = table_with(
        &[("d", ExchangeKind::Direct), ("f", ExchangeKind::Fanout)],
        &["q"],
    );
    for x in ["d", "f"] {
        let plain = Binding::queue(x, "q", "k");
        let with_args = plain
            .clone()
            .with_arguments(hdrs(&[("v", HeaderValue::Int(1))]));
        let with_float = plain
            .clone()
            .with_arguments(hdrs(&[("v", HeaderValue::Float(1.0))]));
        assert!(t.bind(plain.clone()).expect("bind"));
        assert!(!t.bind(plain.clone()).expect("rebind is idempotent"));
        assert!(t.bind(with_args.clone()).expect("bind"));
        // Structural identity: Int(1) and Float(1.0) are different bindings.
        assert!(t.bind(with_float.clone()).expect("bind"));
        assert_eq!(route_keys(&t, x, "k"), ["q"]);
        t.unbind(&plain).expect("unbind");
        t.unbind(&with_float).expect("unbind");
        assert_eq!(route_keys(&t, x, "k"), ["q"]);
        t.unbind(&with_args).expect("unbind");
        assert!(route_keys(&t, x, "k").is_empty());
    }
    assert_eq!(t.binding_count(), 0);
}

#[test]
fn argument_order_does_not_make_a_new_binding() {
    let mut t = table_with(&[("h", ExchangeKind::Headers)], &["q"]);
    let ab = Binding::queue("h", "q", "").with_arguments(hdrs(&[
        ("a", HeaderValue::Int(1)),
        ("b", HeaderValue::Int(2)),
    ]));
    let ba = Binding::queue("h", "q", "").with_arguments(hdrs(&[
        ("b", HeaderValue::Int(2)),
        ("a", HeaderValue::Int(1)),
    ]));
    assert!(t.bind(ab).expect("bind"));
    assert!(!t.bind(ba.clone()).expect("bind"));
    assert_eq!(t.unbind(&ba).expect("unbind").bindings.len(), 1);
    assert_eq!(t.binding_count(), 0);
}

#[test]
fn fanout_ignores_the_key() {
    let mut t = table_with(&[("f", ExchangeKind::Fanout)], &["q1", "q2"]);
    bind_q(&mut t, "f", "q1", "ignored");
    bind_q(&mut t, "f", "q2", "");
    assert_eq!(route_keys(&t, "f", "whatever"), ["q1", "q2"]);
    assert_eq!(route_keys(&t, "f", ""), ["q1", "q2"]);
    assert_eq!(route_keys(&t, "amq.fanout", "x"), Vec::<String>::new());
}

#[test]
fn default_exchange_routes_by_queue_name_and_refuses_bindings() {
    let mut t = table_with(&[], &["jobs"]);
    assert_eq!(route_keys(&t, "", "jobs"), ["jobs"]);
    assert!(route_keys(&t, "", "missing").is_empty());
    assert!(route_keys(&t, "", "").is_empty());
    assert!(is_access_refused(
        t.bind(Binding::queue("", "jobs", "jobs"))
    ));
    assert!(is_access_refused(
        t.unbind(&Binding::queue("", "jobs", "jobs"))
    ));
    assert!(is_access_refused(t.bind(Binding::exchange(
        "amq.direct",
        "",
        "k"
    ))));
    assert!(is_access_refused(t.delete_exchange("", false)));
    assert!(is_access_refused(t.declare_exchange(
        ExchangeDef::new("", ExchangeKind::Direct),
        false
    )));
    assert!(!t
        .declare_exchange(ExchangeDef::new("", ExchangeKind::Topic), true)
        .expect("passive"));
    let removed = t.delete_queue("jobs");
    assert!(removed.is_empty());
    assert!(route_keys(&t, "", "jobs").is_empty());
    assert!(t.declare_queue("").is_err());
}

// ---- headers ------------------------------------------------------------

fn headers_table(args: &[(&str, HeaderValue)]) -> RoutingTable {
    let mut t = table_with(&[("h", ExchangeKind::Headers)], &["q"]);
    t.bind(Binding::queue("h", "q", "ignored").with_arguments(hdrs(args)))
        .expect("bind");
    t
}

fn headers_route(t: &RoutingTable, headers: &[(&str, HeaderValue)]) -> bool {
    !t.route("h", "any key", &hdrs(headers))
        .expect("route")
        .is_empty()
}

#[test]
fn headers_all_is_the_default() {
    use HeaderValue::{Int, Str};
    let t = headers_table(&[
        ("format", Str("pdf".into())),
        ("type", Str("report".into())),
    ]);
    assert!(headers_route(
        &t,
        &[
            ("format", Str("pdf".into())),
            ("type", Str("report".into()))
        ]
    ));
    assert!(headers_route(
        &t,
        &[
            ("type", Str("report".into())),
            ("extra", Int(1)),
            ("format", Str("pdf".into()))
        ]
    ));
    assert!(!headers_route(&t, &[("format", Str("pdf".into()))]));
    assert!(!headers_route(
        &t,
        &[("format", Str("pdf".into())), ("type", Str("log".into()))]
    ));
    assert!(!headers_route(&t, &[]));

    let explicit = headers_table(&[
        ("x-match", Str("all".into())),
        ("format", Str("pdf".into())),
    ]);
    assert!(headers_route(&explicit, &[("format", Str("pdf".into()))]));
    assert!(!headers_route(&explicit, &[("format", Str("zip".into()))]));
}

#[test]
fn headers_any() {
    use HeaderValue::Str;
    let t = headers_table(&[
        ("x-match", Str("any".into())),
        ("format", Str("pdf".into())),
        ("type", Str("report".into())),
    ]);
    assert!(headers_route(&t, &[("format", Str("pdf".into()))]));
    assert!(headers_route(
        &t,
        &[
            ("type", Str("report".into())),
            ("format", Str("zip".into()))
        ]
    ));
    assert!(!headers_route(&t, &[("format", Str("zip".into()))]));
    assert!(!headers_route(&t, &[]));
}

#[test]
fn headers_x_prefixed_keys_need_with_x() {
    use HeaderValue::{Int, Str};
    let all = headers_table(&[("x-tenant", Str("acme".into())), ("k", Int(1))]);
    // x- entries are ignored under plain all/any...
    assert!(headers_route(&all, &[("k", Int(1))]));
    assert!(headers_route(
        &all,
        &[("k", Int(1)), ("x-tenant", Str("other".into()))]
    ));

    let any = headers_table(&[
        ("x-match", Str("any".into())),
        ("x-tenant", Str("acme".into())),
    ]);
    assert!(!headers_route(&any, &[("x-tenant", Str("acme".into()))]));

    // ...and count under the -with-x variants.
    let all_x = headers_table(&[
        ("x-match", Str("all-with-x".into())),
        ("x-tenant", Str("acme".into())),
        ("k", Int(1)),
    ]);
    assert!(headers_route(
        &all_x,
        &[("k", Int(1)), ("x-tenant", Str("acme".into()))]
    ));
    assert!(!headers_route(&all_x, &[("k", Int(1))]));
    assert!(!headers_route(
        &all_x,
        &[("k", Int(1)), ("x-tenant", Str("other".into()))]
    ));

    let any_x = headers_table(&[
        ("x-match", Str("any-with-x".into())),
        ("x-tenant", Str("acme".into())),
    ]);
    assert!(headers_route(&any_x, &[("x-tenant", Str("acme".into()))]));
    assert!(!headers_route(&any_x, &[("x-tenant", Str("other".into()))]));
    // x-match itself is never an entry, even with -with-x.
    assert!(!headers_route(
        &any_x,
        &[("x-match", Str("any-with-x".into()))]
    ));
}

#[test]
fn headers_void_means_presence() {
    use HeaderValue::{Bool, Int, Str, Void};
    let t = headers_table(&[("trace", Void)]);
    assert!(headers_route(&t, &[("trace", Str("yes".into()))]));
    assert!(headers_route(&t, &[("trace", Int(0))]));
    assert!(headers_route(&t, &[("trace", Void)]));
    assert!(!headers_route(&t, &[("other", Bool(true))]));
    // A void message header only satisfies a void binding entry.
    let valued = headers_table(&[("trace", Str("yes".into()))]);
    assert!(!headers_route(&valued, &[("trace", Void)]));
}

#[test]
fn headers_empty_patterns() {
    use HeaderValue::{Int, Str};
    let all = headers_table(&[]);
    assert!(headers_route(&all, &[]));
    assert!(headers_route(&all, &[("k", Int(1))]));
    let all_only_x = headers_table(&[("x-match", Str("all".into())), ("x-ignored", Int(1))]);
    assert!(headers_route(&all_only_x, &[]));
    let any = headers_table(&[("x-match", Str("any".into()))]);
    assert!(!headers_route(&any, &[("k", Int(1))]));
}

#[test]
fn headers_value_equality() {
    use HeaderValue::{Bool, Bytes, Float, Int, Str, Void};
    assert!(Int(1).matches(&Float(1.0)));
    assert!(Float(-3.0).matches(&Int(-3)));
    assert!(!Int(1).matches(&Float(1.5)));
    assert!(Int(i64::MIN).matches(&Float(-9_223_372_036_854_775_808.0)));
    // i64::MAX rounds to 2^63 in f64; exact comparison keeps them apart.
    assert!(!Int(i64::MAX).matches(&Float(i64::MAX as f64)));
    assert!(!Int((1 << 53) + 1).matches(&Float((1u64 << 53) as f64)));
    assert!(!Float(f64::NAN).matches(&Float(f64::NAN)));
    assert!(!Int(0).matches(&Float(f64::NAN)));
    assert!(Str("ab".into()).matches(&Bytes(b"ab".to_vec())));
    assert!(!Str("ab".into()).matches(&Bytes(b"abc".to_vec())));
    assert!(!Bool(true).matches(&Int(1)));
    assert!(!Bool(true).matches(&Str("true".into())));
    assert!(!Str("1".into()).matches(&Int(1)));
    assert!(!Void.matches(&Str(String::new())));

    let t = headers_table(&[("n", Int(5))]);
    assert!(headers_route(&t, &[("n", Float(5.0))]));
    assert!(!headers_route(&t, &[("n", Str("5".into()))]));
    // A repeated message header: the first occurrence counts.
    assert!(headers_route(&t, &[("n", Int(5)), ("n", Int(6))]));
    assert!(!headers_route(&t, &[("n", Int(6)), ("n", Int(5))]));
}

#[test]
fn headers_binding_validation() {
    use HeaderValue::{Float, Int, Str};
    let mut t = table_with(
        &[("h", ExchangeKind::Headers), ("d", ExchangeKind::Direct)],
        &["q"],
    );
    let bad_value =
        Binding::queue("h", "q", "").with_arguments(hdrs(&[("x-match", Str("some".into()))]));
    assert!(is_precondition_failed(t.bind(bad_value.clone())));
    let bad_type = Binding::queue("h", "q", "").with_arguments(hdrs(&[("x-match", Int(1))]));
    assert!(is_precondition_failed(t.bind(bad_type)));
    let bytes_ok = Binding::queue("h", "q", "")
        .with_arguments(hdrs(&[("x-match", HeaderValue::Bytes(b"any".to_vec()))]));
    assert!(t.bind(bytes_ok).expect("bytes x-match"));
    // x-match only means something to headers exchanges.
    assert!(t
        .bind(Binding {
            source: "d".into(),
            ..bad_value
        })
        .expect("direct ignores x-match"));
    // Non-finite floats could not be persisted.
    let nan = Binding::queue("d", "q", "k").with_arguments(hdrs(&[("v", Float(f64::NAN))]));
    assert!(matches!(t.bind(nan), Err(BrokerError::InvalidArgument(_))));
    // ...but are harmless in message headers.
    let t2 = headers_table(&[("v", Float(1.0))]);
    assert!(!headers_route(&t2, &[("v", Float(f64::INFINITY))]));
}

#[test]
fn amq_headers_and_amq_match_are_headers_exchanges() {
    let mut t = table_with(&[], &["q"]);
    for x in ["amq.headers", "amq.match"] {
        t.bind(Binding::queue(x, "q", "").with_arguments(hdrs(&[("k", HeaderValue::Int(1))])))
            .expect("bind");
        assert_eq!(
            t.route(x, "", &hdrs(&[("k", HeaderValue::Int(1))]))
                .expect("route")
                .queues,
            set(&["q"])
        );
        assert!(t.route(x, "", &[]).expect("route").is_empty());
    }
}

// ---- exchange-to-exchange and alternates --------------------------------

#[test]
fn exchange_to_exchange_bindings_are_followed() {
    let mut t = table_with(
        &[
            ("front", ExchangeKind::Topic),
            ("eu", ExchangeKind::Direct),
            ("all", ExchangeKind::Fanout),
        ],
        &["eu-orders", "audit"],
    );
    t.bind(Binding::exchange("front", "eu", "*.eu"))
        .expect("bind");
    t.bind(Binding::exchange("front", "all", "#"))
        .expect("bind");
    bind_q(&mut t, "eu", "eu-orders", "orders.eu");
    bind_q(&mut t, "all", "audit", "");
    assert_eq!(route_keys(&t, "front", "orders.eu"), ["audit", "eu-orders"]);
    assert_eq!(route_keys(&t, "front", "orders.us"), ["audit"]);
    // The key is passed on unchanged: "eu" sees "x.eu", not its binding key.
    assert_eq!(route_keys(&t, "front", "x.eu"), ["audit"]);
    assert_eq!(
        t.bindings_for_destination(&Destination::Exchange("eu".into()))
            .count(),
        1
    );
}

#[test]
fn exchange_cycles_terminate_and_deliver_once() {
    let mut t = table_with(
        &[("a", ExchangeKind::Fanout), ("b", ExchangeKind::Fanout)],
        &["q"],
    );
    t.bind(Binding::exchange("a", "b", "")).expect("bind");
    t.bind(Binding::exchange("b", "a", "")).expect("bind");
    t.bind(Binding::exchange("a", "a", ""))
        .expect("self-binding");
    bind_q(&mut t, "a", "q", "");
    bind_q(&mut t, "b", "q", "");
    assert_eq!(route_keys(&t, "a", "k"), ["q"]);
    assert_eq!(route_keys(&t, "b", "k"), ["q"]);
    // Deleting one end of the cycle removes bindings in both directions.
    let removed = t.delete_exchange("b", false).expect("delete");
    assert_eq!(removed.bindings.len(), 3);
    assert_eq!(t.binding_count(), 2);
    assert_eq!(route_keys(&t, "a", "k"), ["q"]);
}

#[test]
fn internal_exchanges_only_take_bound_traffic() {
    let mut t = table_with(&[("pub", ExchangeKind::Fanout)], &["q"]);
    let internal = ExchangeDef {
        internal: true,
        ..ExchangeDef::new("inner", ExchangeKind::Fanout)
    };
    t.declare_exchange(internal, false).expect("declare");
    t.bind(Binding::exchange("pub", "inner", "")).expect("bind");
    bind_q(&mut t, "inner", "q", "");
    assert!(is_access_refused(t.route("inner", "k", &[])));
    assert_eq!(route_keys(&t, "pub", "k"), ["q"]);
}

fn with_alternate(name: &str, kind: ExchangeKind, alternate: &str) -> ExchangeDef {
    ExchangeDef {
        alternate_exchange: Some(alternate.to_owned()),
        ..ExchangeDef::new(name, kind)
    }
}

#[test]
fn alternate_exchange_takes_unroutable_messages() {
    let mut t = table_with(&[("unrouted", ExchangeKind::Fanout)], &["main", "lost"]);
    t.declare_exchange(with_alternate("x", ExchangeKind::Direct, "unrouted"), false)
        .expect("declare");
    bind_q(&mut t, "x", "main", "k");
    bind_q(&mut t, "unrouted", "lost", "");
    assert_eq!(route_keys(&t, "x", "k"), ["main"]);
    assert_eq!(route_keys(&t, "x", "other"), ["lost"]);
}

#[test]
fn alternate_chains_and_cycles() {
    let mut t = table_with(&[], &["end"]);
    t.declare_exchange(with_alternate("a", ExchangeKind::Direct, "b"), false)
        .expect("a");
    t.declare_exchange(with_alternate("b", ExchangeKind::Direct, "c"), false)
        .expect("b");
    t.declare_exchange(ExchangeDef::new("c", ExchangeKind::Fanout), false)
        .expect("c");
    bind_q(&mut t, "c", "end", "");
    assert_eq!(route_keys(&t, "a", "k"), ["end"]);

    // a <-> b with nothing bound: must terminate, routing nowhere.
    let mut t = table_with(&[], &[]);
    t.declare_exchange(with_alternate("a", ExchangeKind::Direct, "b"), false)
        .expect("a");
    t.declare_exchange(with_alternate("b", ExchangeKind::Direct, "a"), false)
        .expect("b");
    assert!(route_keys(&t, "a", "k").is_empty());
    // An alternate pointing at itself, or at nothing, is harmless too.
    t.declare_exchange(with_alternate("self", ExchangeKind::Topic, "self"), false)
        .expect("self");
    t.declare_exchange(
        with_alternate("dangling", ExchangeKind::Topic, "nope"),
        false,
    )
    .expect("dangling");
    assert!(route_keys(&t, "self", "k").is_empty());
    assert!(route_keys(&t, "dangling", "k").is_empty());
}

#[test]
fn alternate_applies_per_exchange_on_the_path() {
    let mut t = table_with(&[("ae", ExchangeKind::Fanout)], &["q", "fallback"]);
    t.declare_exchange(ExchangeDef::new("front", ExchangeKind::Fanout), false)
        .expect("front");
    t.declare_exchange(with_alternate("inner", ExchangeKind::Direct, "ae"), false)
        .expect("inner");
    t.bind(Binding::exchange("front", "inner", ""))
        .expect("bind");
    bind_q(&mut t, "inner", "q", "k");
    bind_q(&mut t, "ae", "fallback", "");
    assert_eq!(route_keys(&t, "front", "k"), ["q"]);
    // "inner" (reached through a binding) matches nothing: its alternate runs.
    assert_eq!(route_keys(&t, "front", "other"), ["fallback"]);

    // An exchange that matched a binding to an exchange counts as routed,
    // even if that exchange delivers nowhere: its own alternate is skipped.
    let mut t = table_with(
        &[("ae", ExchangeKind::Fanout), ("sink", ExchangeKind::Direct)],
        &["fallback"],
    );
    t.declare_exchange(with_alternate("x", ExchangeKind::Fanout, "ae"), false)
        .expect("x");
    t.bind(Binding::exchange("x", "sink", "")).expect("bind");
    bind_q(&mut t, "ae", "fallback", "");
    assert!(route_keys(&t, "x", "k").is_empty());
    // The default exchange may serve as an alternate.
    let mut t = table_with(&[], &["k"]);
    t.declare_exchange(with_alternate("y", ExchangeKind::Direct, ""), false)
        .expect("y");
    assert_eq!(route_keys(&t, "y", "k"), ["k"]);
}

// ---- declare / delete ---------------------------------------------------

#[test]
fn predeclared_exchanges() {
    let t = RoutingTable::new();
    let names: Vec<&str> = t.exchanges().map(|x| x.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "",
            "amq.direct",
            "amq.fanout",
            "amq.headers",
            "amq.match",
            "amq.topic"
        ]
    );
    assert!(t
        .exchanges()
        .all(|x| x.durable && !x.auto_delete && !x.internal));
    assert_eq!(
        t.exchange("amq.topic").map(|x| x.kind),
        Some(ExchangeKind::Topic)
    );
    assert_eq!(
        t.exchange("amq.match").map(|x| x.kind),
        Some(ExchangeKind::Headers)
    );
    assert_eq!(t.exchange("").map(|x| x.kind), Some(ExchangeKind::Direct));
    assert!(t.is_empty());
    assert!(t.to_snapshot().exchanges.is_empty());
}

#[test]
fn exchange_kind_names() {
    for kind in [
        ExchangeKind::Direct,
        ExchangeKind::Fanout,
        ExchangeKind::Topic,
        ExchangeKind::Headers,
    ] {
        assert_eq!(ExchangeKind::parse(kind.as_str()).expect("parse"), kind);
        assert_eq!(kind.to_string(), kind.as_str());
    }
    assert!(matches!(
        ExchangeKind::parse("x-consistent-hash"),
        Err(BrokerError::InvalidArgument(_))
    ));
    assert!(matches!(
        ExchangeKind::parse("Topic"),
        Err(BrokerError::InvalidArgument(_))
    ));
    assert_eq!(
        serde_json::to_string(&ExchangeKind::Topic).expect("json"),
        "\"topic\""
    );
}

#[test]
fn redeclare_must_be_equivalent() {
    let mut t = RoutingTable::new();
    let def = ExchangeDef {
        durable: true,
        ..ExchangeDef::new("logs", ExchangeKind::Topic)
    };
    assert!(t.declare_exchange(def.clone(), false).expect("declare"));
    assert!(!t.declare_exchange(def.clone(), false).expect("redeclare"));
    // Plain arguments are not part of equivalence (as RabbitMQ).
    let mut with_args = def.clone();
    with_args.arguments.insert("x-note".into(), "hi".into());
    assert!(!t
        .declare_exchange(with_args, false)
        .expect("redeclare with args"));

    let changes: [fn(&mut ExchangeDef); 5] = [
        |d| d.kind = ExchangeKind::Direct,
        |d| d.durable = false,
        |d| d.auto_delete = true,
        |d| d.internal = true,
        |d| d.alternate_exchange = Some("ae".into()),
    ];
    for change in changes {
        let mut other = def.clone();
        change(&mut other);
        let err = t.declare_exchange(other, false);
        assert!(
            matches!(&err, Err(BrokerError::PreconditionFailed(m)) if m.contains("inequivalent arg")),
            "{err:?}"
        );
    }
    assert_eq!(t.exchange("logs"), Some(&def));
}

#[test]
fn passive_declare_checks_existence_only() {
    let mut t = RoutingTable::new();
    let err = t.declare_exchange(ExchangeDef::new("nope", ExchangeKind::Direct), true);
    assert!(
        matches!(&err, Err(BrokerError::NotFound(m)) if m == "no exchange 'nope' in namespace")
    );
    assert!(!t.has_exchange("nope"));
    assert!(!t
        .declare_exchange(ExchangeDef::new("amq.topic", ExchangeKind::Fanout), true)
        .expect("passive ignores the definition"));
}

#[test]
fn amq_prefix_is_reserved() {
    let mut t = RoutingTable::new();
    let err = t.declare_exchange(ExchangeDef::new("amq.custom", ExchangeKind::Direct), false);
    assert!(matches!(&err, Err(BrokerError::AccessRefused(m)) if m.contains("reserved prefix")));
    let same = ExchangeDef {
        durable: true,
        ..ExchangeDef::new("amq.topic", ExchangeKind::Topic)
    };
    assert!(!t
        .declare_exchange(same, false)
        .expect("identical redeclare of amq.topic"));
    // Not identical: 406 like any inequivalent redeclare.
    assert!(is_precondition_failed(t.declare_exchange(
        ExchangeDef::new("amq.topic", ExchangeKind::Topic),
        false
    )));
    assert!(is_access_refused(t.delete_exchange("amq.topic", false)));
    assert!(is_access_refused(t.delete_exchange("amq.whatever", false)));
    assert!(t.has_exchange("amq.topic"));
}

#[test]
fn delete_exchange_semantics() {
    let mut t = table_with(
        &[("src", ExchangeKind::Direct), ("dst", ExchangeKind::Fanout)],
        &["q"],
    );
    // Missing exchange: succeeds, nothing removed.
    assert!(t
        .delete_exchange("missing", true)
        .expect("missing is ok")
        .is_empty());
    t.bind(Binding::exchange("src", "dst", "k")).expect("bind");
    bind_q(&mut t, "dst", "q", "");
    bind_q(&mut t, "src", "q", "direct");
    let err = t.delete_exchange("src", true);
    assert!(
        matches!(&err, Err(BrokerError::PreconditionFailed(m)) if m == "exchange 'src' in use")
    );
    // "dst" is a source too; once unbound it is only a destination, which
    // does not count as in use.
    t.unbind(&Binding::queue("dst", "q", "")).expect("unbind");
    let removed = t.delete_exchange("dst", true).expect("only a destination");
    assert_eq!(removed.bindings, vec![Binding::exchange("src", "dst", "k")]);
    assert_eq!(removed.exchanges.len(), 1);
    assert_eq!(removed.exchanges[0].name, "dst");
    let removed = t.delete_exchange("src", false).expect("forced");
    assert_eq!(removed.bindings, vec![Binding::queue("src", "q", "direct")]);
    assert_eq!(t.binding_count(), 0);
    assert!(t.bindings_for_queue("q").next().is_none());
}

#[test]
fn bind_and_unbind_errors() {
    let mut t = table_with(&[("x", ExchangeKind::Direct)], &["q"]);
    let err = t.bind(Binding::queue("nope", "q", "k"));
    assert!(
        matches!(&err, Err(BrokerError::NotFound(m)) if m == "no exchange 'nope' in namespace")
    );
    let err = t.bind(Binding::queue("x", "ghost", "k"));
    assert!(matches!(&err, Err(BrokerError::NotFound(m)) if m == "no queue 'ghost' in namespace"));
    assert!(is_not_found(t.bind(Binding::exchange("x", "nope", "k"))));
    assert!(is_not_found(t.unbind(&Binding::queue("x", "ghost", "k"))));
    assert!(is_not_found(t.unbind(&Binding::queue("nope", "q", "k"))));
    // Unbinding something never bound is fine.
    assert!(t
        .unbind(&Binding::queue("x", "q", "k"))
        .expect("ok")
        .is_empty());
    assert_eq!(t.binding_count(), 0);
}

#[test]
fn delete_queue_removes_its_bindings() {
    let mut t = table_with(
        &[("d", ExchangeKind::Direct), ("tp", ExchangeKind::Topic)],
        &["q", "other"],
    );
    bind_q(&mut t, "d", "q", "a");
    bind_q(&mut t, "tp", "q", "a.#");
    bind_q(&mut t, "tp", "other", "a.#");
    assert_eq!(t.bindings_for_queue("q").count(), 2);
    let removed = t.delete_queue("q");
    assert_eq!(removed.bindings.len(), 2);
    assert!(removed.exchanges.is_empty());
    assert!(!t.has_queue("q"));
    assert!(route_keys(&t, "d", "a").is_empty());
    assert_eq!(route_keys(&t, "tp", "a.b"), ["other"]);
    assert!(t.delete_queue("q").is_empty());
    // A queue of the same name comes back with no bindings.
    t.declare_queue("q").expect("redeclare");
    assert!(route_keys(&t, "d", "a").is_empty());
}

#[test]
fn auto_delete_exchanges_go_with_their_last_binding() {
    let auto = |name: &str, kind| ExchangeDef {
        auto_delete: true,
        ..ExchangeDef::new(name, kind)
    };
    let mut t = table_with(&[], &["q1", "q2"]);
    t.declare_exchange(auto("ad", ExchangeKind::Fanout), false)
        .expect("declare");
    // Never bound: survives.
    assert!(t.delete_queue("nothing").is_empty());
    assert!(t.has_exchange("ad"));
    bind_q(&mut t, "ad", "q1", "");
    bind_q(&mut t, "ad", "q2", "");
    assert!(t.delete_queue("q1").exchanges.is_empty());
    assert!(t.has_exchange("ad"));
    let removed = t.delete_queue("q2");
    assert_eq!(
        removed
            .exchanges
            .iter()
            .map(|x| x.name.as_str())
            .collect::<Vec<_>>(),
        ["ad"]
    );
    assert!(!t.has_exchange("ad"));

    // Unbinding the last binding deletes too.
    t.declare_queue("q").expect("queue");
    t.declare_exchange(auto("ad2", ExchangeKind::Direct), false)
        .expect("declare");
    bind_q(&mut t, "ad2", "q", "k");
    let removed = t.unbind(&Binding::queue("ad2", "q", "k")).expect("unbind");
    assert_eq!(removed.exchanges.len(), 1);
    assert!(!t.has_exchange("ad2"));

    // Cascade: outer -(e2e)-> inner -> q; both auto-delete, plus a plain
    // exchange bound into inner, which survives without its binding.
    t.declare_exchange(auto("outer", ExchangeKind::Fanout), false)
        .expect("outer");
    t.declare_exchange(auto("inner", ExchangeKind::Fanout), false)
        .expect("inner");
    t.declare_exchange(ExchangeDef::new("plain", ExchangeKind::Fanout), false)
        .expect("plain");
    t.bind(Binding::exchange("outer", "inner", ""))
        .expect("bind");
    t.bind(Binding::exchange("plain", "inner", ""))
        .expect("bind");
    bind_q(&mut t, "inner", "q", "");
    let removed = t.delete_queue("q");
    let mut gone: Vec<&str> = removed.exchanges.iter().map(|x| x.name.as_str()).collect();
    gone.sort_unstable();
    assert_eq!(gone, ["inner", "outer"]);
    assert_eq!(removed.bindings.len(), 3);
    assert!(t.has_exchange("plain"));
    assert_eq!(t.binding_count(), 0);
    assert!(!t.is_empty());
    t.delete_exchange("plain", false).expect("delete");
    assert!(t.is_empty());
}

// ---- persistence --------------------------------------------------------

fn sample_table() -> RoutingTable {
    let mut t = table_with(
        &[
            ("orders", ExchangeKind::Topic),
            ("fan", ExchangeKind::Fanout),
            ("h", ExchangeKind::Headers),
        ],
        &["q1", "q2", "q3"],
    );
    let durable_ae = ExchangeDef {
        durable: true,
        auto_delete: true,
        internal: true,
        alternate_exchange: Some("fan".into()),
        arguments: [("x-note".to_owned(), "kept".to_owned())]
            .into_iter()
            .collect(),
        ..ExchangeDef::new("withae", ExchangeKind::Direct)
    };
    t.declare_exchange(durable_ae, false).expect("declare");
    bind_q(&mut t, "orders", "q1", "eu.#");
    bind_q(&mut t, "orders", "q2", "*.us");
    bind_q(&mut t, "fan", "q3", "");
    bind_q(&mut t, "withae", "q1", "k");
    t.bind(Binding::exchange("orders", "withae", "#"))
        .expect("bind");
    t.bind(Binding::exchange("amq.topic", "orders", "#"))
        .expect("bind");
    t.bind(Binding::queue("h", "q2", "").with_arguments(hdrs(&[
        ("x-match", HeaderValue::from("any")),
        ("f", HeaderValue::Float(2.5)),
        ("b", HeaderValue::Bytes(vec![0, 255])),
        ("v", HeaderValue::Void),
        ("t", HeaderValue::Bool(true)),
        ("i", HeaderValue::Int(-7)),
    ])))
    .expect("bind");
    t
}

#[test]
fn snapshot_round_trips_through_json() {
    let t = sample_table();
    let snapshot = t.to_snapshot();
    let json = serde_json::to_string(&snapshot).expect("serialize");
    let back: RoutingSnapshot = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, snapshot);
    let restored = RoutingTable::from_snapshot(back).expect("restore");
    assert_eq!(restored.to_snapshot(), snapshot);
    assert_eq!(restored.binding_count(), t.binding_count());
    for (x, key) in [
        ("orders", "eu.x"),
        ("orders", "fr.us"),
        ("orders", "none"),
        ("amq.topic", "eu.1"),
        ("fan", ""),
    ] {
        assert_eq!(
            restored.route(x, key, &[]).expect("route"),
            t.route(x, key, &[]).expect("route")
        );
    }
    let h = hdrs(&[("i", HeaderValue::Float(-7.0))]);
    assert_eq!(
        restored.route("h", "", &h).expect("route").queues,
        set(&["q2"])
    );
    assert_eq!(restored.exchange("withae"), t.exchange("withae"));
}

#[test]
fn snapshot_restore_rejects_inconsistent_state() {
    let mut snapshot = sample_table().to_snapshot();
    snapshot.queues.retain(|q| q != "q3");
    assert!(is_not_found(RoutingTable::from_snapshot(snapshot)));

    let clash = RoutingSnapshot {
        exchanges: vec![ExchangeDef::new("amq.topic", ExchangeKind::Direct)],
        ..RoutingSnapshot::default()
    };
    assert!(is_precondition_failed(RoutingTable::from_snapshot(clash)));

    // Definitions imported with other amq.* names are accepted on restore.
    let imported = RoutingSnapshot {
        exchanges: vec![ExchangeDef::new("amq.imported", ExchangeKind::Direct)],
        ..RoutingSnapshot::default()
    };
    assert!(RoutingTable::from_snapshot(imported)
        .expect("restore")
        .has_exchange("amq.imported"));
}

#[test]
fn binding_json_shape_is_stable() {
    let b = Binding::queue("x", "q", "k").with_arguments(hdrs(&[("n", HeaderValue::Int(1))]));
    let json = serde_json::to_value(&b).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "source": "x",
            "destination": {"Queue": "q"},
            "routing_key": "k",
            "arguments": [["n", {"Int": 1}]],
        })
    );
    let minimal: Binding =
        serde_json::from_str(r#"{"source":"x","destination":{"Exchange":"y"},"routing_key":""}"#)
            .expect("parse");
    assert_eq!(minimal, Binding::exchange("x", "y", ""));
}

// ---- scale ----------------------------------------------------------------

#[test]
fn topic_routing_does_not_scan_bindings() {
    // 100k bindings; a full scan per route would make this test crawl.
    let mut t = table_with(&[("t", ExchangeKind::Topic)], &[]);
    for i in 0..1_000 {
        t.declare_queue(&format!("q{i}")).expect("queue");
    }
    for i in 0..100_000u32 {
        let key = format!("dev{}.sensor{}.reading", i % 5_000, i / 5_000);
        bind_q(&mut t, "t", &format!("q{}", i % 1_000), &key);
    }
    bind_q(&mut t, "t", "q0", "dev7.#");
    assert_eq!(t.binding_count(), 100_001);
    let start = Instant::now();
    for round in 0..20_000u32 {
        let key = format!("dev{}.sensor{}.reading", round % 5_000, round % 20);
        let routed = t.route("t", &key, &[]).expect("route");
        assert!(!routed.is_empty());
    }
    assert!(start.elapsed().as_secs() < 30);
}

#[test]
#[ignore = "micro-benchmark; run with --ignored --nocapture"]
fn bench_topic_routing_100k_bindings() {
    let mut t = table_with(&[("t", ExchangeKind::Topic)], &[]);
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    for i in 0..1_000 {
        t.declare_queue(&format!("q{i}")).expect("queue");
    }
    let build = Instant::now();
    for i in 0..100_000u32 {
        let mut words: Vec<String> = (0..4).map(|_| format!("w{}", rng.below(20))).collect();
        match rng.below(10) {
            0 => words[1] = "*".into(),
            1 => words[3] = "#".into(),
            2 => words[0] = "#".into(),
            _ => {}
        }
        bind_q(&mut t, "t", &format!("q{}", i % 1_000), &words.join("."));
    }
    println!(
        "built {} bindings in {:?}",
        t.binding_count(),
        build.elapsed()
    );
    let keys: Vec<String> = (0..10_000)
        .map(|_| {
            (0..4)
                .map(|_| format!("w{}", rng.below(20)))
                .collect::<Vec<_>>()
                .join(".")
        })
        .collect();
    let start = Instant::now();
    let mut delivered = 0usize;
    let rounds = 10;
    for _ in 0..rounds {
        for key in &keys {
            delivered += t.route("t", key, &[]).expect("route").queues.len();
        }
    }
    let elapsed = start.elapsed();
    let routes = keys.len() * rounds;
    println!(
        "{routes} routes in {elapsed:?}: {:.0} routes/s, {:.1} queues per route",
        routes as f64 / elapsed.as_secs_f64(),
        delivered as f64 / routes as f64
    );
}
