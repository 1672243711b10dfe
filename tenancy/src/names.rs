//! Names of namespaces and topics, parsed and validated in one place.
//!
//! A topic is written `persistent://tenant/namespace/local`, as in Pulsar.
//! The short forms `local` (in `public/default`) and `tenant/namespace/local`
//! are accepted too, since that is what Kafka, AMQP and MQTT clients send.
//! A partition of a partitioned topic is the topic `local-partition-N`.

use std::fmt;
use std::str::FromStr;

use crate::error::{Result, TenancyError};
use crate::store::{DEFAULT_NAMESPACE, DEFAULT_TENANT};

/// Longest tenant or namespace name; keeps metadata keys and URLs short.
pub const MAX_SEGMENT_LEN: usize = 128;
/// Longest local topic name, in bytes. AMQP queue names go up to 255 bytes
/// and Kafka topic names up to 249, so both fit.
pub const MAX_LOCAL_NAME_LEN: usize = 255;
const PARTITION_SUFFIX: &str = "-partition-";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TopicDomain {
    Persistent,
    NonPersistent,
}

impl TopicDomain {
    pub fn as_str(self) -> &'static str {
        match self {
            TopicDomain::Persistent => "persistent",
            TopicDomain::NonPersistent => "non-persistent",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "persistent" => Ok(TopicDomain::Persistent),
            "non-persistent" => Ok(TopicDomain::NonPersistent),
            other => Err(TenancyError::InvalidName(format!(
                "unknown topic domain {other:?}; expected persistent or non-persistent"
            ))),
        }
    }
}

impl fmt::Display for TopicDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tenant and namespace names follow Pulsar's rule: letters, digits and
/// `-=:._`.
pub fn validate_segment(kind: &str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(TenancyError::InvalidName(format!("{kind} name is empty")));
    }
    if s.len() > MAX_SEGMENT_LEN {
        return Err(TenancyError::InvalidName(format!(
            "{kind} name is longer than {MAX_SEGMENT_LEN} bytes"
        )));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-=:._".contains(*c)))
    {
        return Err(TenancyError::InvalidName(format!(
            "{kind} name {s:?} contains {c:?}; allowed are letters, digits and -=:._"
        )));
    }
    if s == "." || s == ".." {
        return Err(TenancyError::InvalidName(format!(
            "{kind} name {s:?} is reserved"
        )));
    }
    Ok(())
}

/// Local topic names may hold any printable text, `/` included, because
/// AMQP queue names and MQTT-derived names do; they are percent-encoded
/// wherever they become a path.
pub fn validate_local_name(s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(TenancyError::InvalidName("topic name is empty".into()));
    }
    if s.len() > MAX_LOCAL_NAME_LEN {
        return Err(TenancyError::InvalidName(format!(
            "topic name is longer than {MAX_LOCAL_NAME_LEN} bytes"
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(TenancyError::InvalidName(format!(
            "topic name {s:?} contains a control character"
        )));
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceName {
    tenant: String,
    namespace: String,
}

impl NamespaceName {
    pub fn new(tenant: &str, namespace: &str) -> Result<Self> {
        validate_segment("tenant", tenant)?;
        validate_segment("namespace", namespace)?;
        Ok(NamespaceName {
            tenant: tenant.into(),
            namespace: namespace.into(),
        })
    }

    /// `public/default`.
    pub fn default_namespace() -> Self {
        NamespaceName {
            tenant: DEFAULT_TENANT.into(),
            namespace: DEFAULT_NAMESPACE.into(),
        }
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn topic(&self, domain: TopicDomain, local: &str) -> Result<TopicName> {
        validate_local_name(local)?;
        Ok(TopicName {
            domain,
            namespace: self.clone(),
            local: local.into(),
        })
    }
}

impl FromStr for NamespaceName {
    type Err = TenancyError;

    fn from_str(s: &str) -> Result<Self> {
        match s.split_once('/') {
            Some((t, ns)) if !ns.contains('/') => NamespaceName::new(t, ns),
            _ => Err(TenancyError::InvalidName(format!(
                "namespace {s:?} is not of the form tenant/namespace"
            ))),
        }
    }
}

impl fmt::Display for NamespaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.namespace)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName {
    domain: TopicDomain,
    namespace: NamespaceName,
    local: String,
}

impl TopicName {
    pub fn new(domain: TopicDomain, namespace: NamespaceName, local: &str) -> Result<Self> {
        namespace.topic(domain, local)
    }

    pub fn domain(&self) -> TopicDomain {
        self.domain
    }

    pub fn namespace(&self) -> &NamespaceName {
        &self.namespace
    }

    pub fn local_name(&self) -> &str {
        &self.local
    }

    pub fn is_persistent(&self) -> bool {
        self.domain == TopicDomain::Persistent
    }

    /// The partition index, if this names one partition of a partitioned
    /// topic.
    pub fn partition_index(&self) -> Option<u32> {
        let (_, n) = self.local.rsplit_once(PARTITION_SUFFIX)?;
        if n.is_empty() || (n.len() > 1 && n.starts_with('0')) {
            return None;
        }
        n.parse().ok()
    }

    /// The partitioned topic this partition belongs to, or itself.
    pub fn base(&self) -> TopicName {
        match (
            self.partition_index(),
            self.local.rsplit_once(PARTITION_SUFFIX),
        ) {
            (Some(_), Some((base, _))) => TopicName {
                local: base.into(),
                ..self.clone()
            },
            _ => self.clone(),
        }
    }

    /// Partition `i` of this topic.
    pub fn partition(&self, i: u32) -> TopicName {
        TopicName {
            local: format!("{}{PARTITION_SUFFIX}{i}", self.base().local),
            ..self.clone()
        }
    }

    /// `tenant/namespace/domain/encoded-local`: a path with exactly four
    /// segments, for metadata keys.
    pub fn path(&self) -> String {
        format!(
            "{}/{}/{}",
            self.namespace,
            self.domain,
            encode_segment(&self.local)
        )
    }

    /// Inverse of [`TopicName::path`].
    pub fn from_path(path: &str) -> Result<Self> {
        let mut it = path.splitn(4, '/');
        let (Some(t), Some(ns), Some(d), Some(local)) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(TenancyError::InvalidName(format!("topic path {path:?}")));
        };
        let local = decode_segment(local)?;
        NamespaceName::new(t, ns)?.topic(TopicDomain::parse(d)?, &local)
    }
}

impl FromStr for TopicName {
    type Err = TenancyError;

    /// Accepts `domain://tenant/namespace/local`, `tenant/namespace/local`
    /// and a bare `local` (in `public/default`), as Pulsar clients do.
    fn from_str(s: &str) -> Result<Self> {
        let (domain, rest) = match s.split_once("://") {
            Some((d, rest)) => (TopicDomain::parse(d)?, rest),
            None if !s.contains('/') => {
                return NamespaceName::default_namespace().topic(TopicDomain::Persistent, s);
            }
            None => (TopicDomain::Persistent, s),
        };
        let mut it = rest.splitn(3, '/');
        match (it.next(), it.next(), it.next()) {
            (Some(t), Some(ns), Some(local)) => NamespaceName::new(t, ns)?.topic(domain, local),
            _ => Err(TenancyError::InvalidName(format!(
                "topic {s:?} is not of the form [domain://]tenant/namespace/topic"
            ))),
        }
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}/{}", self.domain, self.namespace, self.local)
    }
}

/// Percent-encodes everything but `A-Za-z0-9-._~`, so that a name with `/`
/// or `%` stays one path segment and round-trips exactly.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn decode_segment(s: &str) -> Result<String> {
    let bad = || TenancyError::InvalidName(format!("bad percent-encoding in {s:?}"));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(s: &str) -> TopicName {
        s.parse().expect("valid topic")
    }

    #[test]
    fn short_and_full_forms_agree() {
        assert_eq!(topic("orders"), topic("persistent://public/default/orders"));
        assert_eq!(topic("t/ns/x"), topic("persistent://t/ns/x"));
        assert_eq!(
            topic("non-persistent://t/ns/x").to_string(),
            "non-persistent://t/ns/x"
        );
        assert_eq!(
            topic("orders").to_string(),
            "persistent://public/default/orders"
        );
    }

    #[test]
    fn local_names_may_hold_slashes_and_round_trip_through_paths() {
        let t = topic("persistent://t/ns/a/b c%d");
        assert_eq!(t.local_name(), "a/b c%d");
        assert_eq!(t.path(), "t/ns/persistent/a%2Fb%20c%25d");
        assert_eq!(TopicName::from_path(&t.path()).expect("path"), t);
    }

    #[test]
    fn invalid_names_are_refused() {
        for bad in [
            "",
            "a/b",
            "persistent://t/ns",
            "persistent://t/ns/",
            "bogus://t/ns/x",
            "persistent://t!/ns/x",
            "persistent://t/n s/x",
            "persistent://../ns/x",
            "x\ny",
        ] {
            assert!(bad.parse::<TopicName>().is_err(), "{bad:?} accepted");
        }
        let long = "x".repeat(MAX_LOCAL_NAME_LEN + 1);
        assert!(long.parse::<TopicName>().is_err());
        assert!("t".parse::<NamespaceName>().is_err());
        assert!("t/ns/x".parse::<NamespaceName>().is_err());
        assert!("t/ns".parse::<NamespaceName>().is_ok());
    }

    #[test]
    fn partitions() {
        let base = topic("t/ns/orders");
        let p = base.partition(3);
        assert_eq!(p.local_name(), "orders-partition-3");
        assert_eq!(p.partition_index(), Some(3));
        assert_eq!(p.base(), base);
        assert_eq!(p.partition(4).local_name(), "orders-partition-4");
        assert_eq!(base.partition_index(), None);
        assert_eq!(topic("t/ns/x-partition-").partition_index(), None);
        assert_eq!(topic("t/ns/x-partition-01").partition_index(), None);
    }

    #[test]
    fn segment_codec_rejects_garbage() {
        assert!(decode_segment("%4").is_err());
        assert!(decode_segment("%zz").is_err());
        assert!(decode_segment("%FF").is_err());
        assert_eq!(decode_segment("%E2%82%AC").expect("utf8"), "€");
    }
}
