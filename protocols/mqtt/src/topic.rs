//! MQTT topic names and filters, and how they map onto `amq.topic`.
//!
//! As RabbitMQ's MQTT plugin does: `/` and `.` swap places, `+` is `*`
//! and `#` stays `#`. Routing on the exchange is a first, broader pass;
//! a session matches each message against its own filters again with
//! MQTT's exact rules (the `$` rule, subscription options).

use crate::error::MqttError;

/// A topic name a client may publish to.
pub fn check_name(topic: &str) -> Result<(), MqttError> {
    if topic.is_empty() {
        return Err(MqttError::TopicName("empty topic".into()));
    }
    if topic.contains(['+', '#']) {
        return Err(MqttError::TopicName(format!("wildcard in {topic:?}")));
    }
    if topic.contains('\0') {
        return Err(MqttError::TopicName("NUL in topic".into()));
    }
    Ok(())
}

/// A topic filter a client may subscribe with.
pub fn check_filter(filter: &str) -> Result<(), MqttError> {
    if filter.is_empty() || filter.contains('\0') {
        return Err(MqttError::TopicFilter(format!("{filter:?}")));
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        let bad = (l.contains('#') && (*l != "#" || i + 1 != levels.len()))
            || (l.contains('+') && *l != "+");
        if bad {
            return Err(MqttError::TopicFilter(format!("{filter:?}")));
        }
    }
    Ok(())
}

/// A shared subscription's group and filter, from `$share/{group}/{filter}`.
pub fn parse_share(filter: &str) -> Result<Option<(&str, &str)>, MqttError> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Ok(None);
    };
    let Some((group, f)) = rest.split_once('/') else {
        return Err(MqttError::TopicFilter(format!("{filter:?}: no filter")));
    };
    if group.is_empty() || group.contains(['+', '#']) {
        return Err(MqttError::TopicFilter(format!("{filter:?}: bad group")));
    }
    check_filter(f)?;
    Ok(Some((group, f)))
}

fn swap(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '/' => '.',
            '.' => '/',
            c => c,
        })
        .collect()
}

/// The routing key of a publish to `topic`.
pub fn routing_key(topic: &str) -> String {
    swap(topic)
}

/// The MQTT topic of a message routed with `key` (by AMQP, say).
pub fn topic_of_key(key: &str) -> String {
    swap(key)
}

/// The binding key on `amq.topic` that covers `filter`.
pub fn binding_key(filter: &str) -> String {
    filter
        .split('/')
        .map(|l| match l {
            "+" => "*".to_owned(),
            l => l.replace('.', "/"),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether `topic` matches `filter`, with MQTT's rules: `+` is one level,
/// a trailing `#` is any number (the parent too), and topics starting with
/// `$` are not matched by a wildcard in the first level.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_filters_are_checked() {
        assert!(check_name("a/b").is_ok());
        assert!(check_name("a/+").is_err());
        assert!(check_name("").is_err());
        for ok in ["#", "+", "a/#", "+/b/+", "/", "a//b", "$SYS/#"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "##"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_share("$share/g/a/+").expect("ok"), Some(("g", "a/+")));
        assert_eq!(parse_share("a/b").expect("ok"), None);
        assert!(parse_share("$share/g").is_err());
        assert!(parse_share("$share//a").is_err());
    }

    #[test]
    fn mapping_swaps_separators_as_rabbitmq_does() {
        assert_eq!(routing_key("sensors/room1/temp"), "sensors.room1.temp");
        assert_eq!(routing_key("v1.2/x"), "v1/2.x");
        assert_eq!(topic_of_key("sensors.room2.temp"), "sensors/room2/temp");
        assert_eq!(binding_key("sensors/+/temp"), "sensors.*.temp");
        assert_eq!(binding_key("a/#"), "a.#");
    }

    #[test]
    fn matching_follows_mqtt() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("+", ""));
        assert!(matches("+/+", "/x"));
        assert!(!matches("+", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }

    proptest::proptest! {
        #[test]
        fn a_topic_matches_itself_and_hash(levels in proptest::collection::vec("[a-z0-9]{0,4}", 1..6)) {
            let topic = levels.join("/");
            proptest::prop_assert!(matches(&topic, &topic));
            proptest::prop_assert!(matches("#", &topic));
            proptest::prop_assert_eq!(topic_of_key(&routing_key(&topic)), topic);
        }
    }
}
