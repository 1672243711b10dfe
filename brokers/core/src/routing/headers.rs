//! Headers-exchange matching.
//!
//! A binding's arguments are a pattern over the message headers; `x-match`
//! picks whether every pattern entry (`all`) or at least one (`any`) has to
//! hold. Like RabbitMQ, each headers binding is evaluated in turn: the
//! patterns are arbitrary sets of key/value pairs, so there is no index that
//! would beat a scan for the binding counts headers exchanges see.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::BrokerError;

/// A typed header value, independent of the protocol that carried it.
///
/// The derived `PartialEq` is structural (`Int(1) != Float(1.0)`): it is what
/// tells two bindings apart. Matching a message against a binding uses the
/// looser [`HeaderValue::matches`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HeaderValue {
    Void,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
}

impl HeaderValue {
    /// Whether a message header holding `other` satisfies a binding entry
    /// holding `self` (a `Void` binding entry is handled by the caller: it
    /// only asks for the header to be present).
    pub fn matches(&self, other: &HeaderValue) -> bool {
        use HeaderValue::{Bool, Float, Int, Void};
        match (self, other) {
            (Void, Void) => true,
            (Bool(a), Bool(b)) => a == b,
            (Int(a), Int(b)) => a == b,
            // NaN never matches anything, itself included: a NaN header
            // carries no value a binding could sensibly ask for.
            (Float(a), Float(b)) => a == b,
            // RabbitMQ compares with Erlang's `==`, under which 1 == 1.0,
            // so AMQP's many integer widths and its float/double types all
            // meet on the numeric value. We keep that, but compare exactly:
            // no rounding of large integers through f64.
            (Int(i), Float(f)) | (Float(f), Int(i)) => int_eq_float(*i, *f),
            // AMQP long strings and byte arrays are both binaries in
            // RabbitMQ and compare equal on the same bytes; protocols that
            // cannot tell text from bytes must not lose matches over it.
            _ => match (self.as_bytes(), other.as_bytes()) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            },
        }
    }

    fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            HeaderValue::Str(s) => Some(s.as_bytes()),
            HeaderValue::Bytes(b) => Some(b),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            HeaderValue::Void => "void",
            HeaderValue::Bool(_) => "bool",
            HeaderValue::Int(_) => "int",
            HeaderValue::Float(_) => "float",
            HeaderValue::Str(_) => "string",
            HeaderValue::Bytes(_) => "bytes",
        }
    }

    fn rank(&self) -> u8 {
        match self {
            HeaderValue::Void => 0,
            HeaderValue::Bool(_) => 1,
            HeaderValue::Int(_) => 2,
            HeaderValue::Float(_) => 3,
            HeaderValue::Str(_) => 4,
            HeaderValue::Bytes(_) => 5,
        }
    }

    /// A total order used only to key stored bindings; it is structural,
    /// like `PartialEq`, so `Int(1)` and `Float(1.0)` stay distinct bindings.
    pub(super) fn total_cmp(&self, other: &HeaderValue) -> Ordering {
        match (self, other) {
            (HeaderValue::Bool(a), HeaderValue::Bool(b)) => a.cmp(b),
            (HeaderValue::Int(a), HeaderValue::Int(b)) => a.cmp(b),
            (HeaderValue::Float(a), HeaderValue::Float(b)) => a.total_cmp(b),
            (HeaderValue::Str(a), HeaderValue::Str(b)) => a.cmp(b),
            (HeaderValue::Bytes(a), HeaderValue::Bytes(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl fmt::Display for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderValue::Void => f.write_str("void"),
            HeaderValue::Bool(b) => write!(f, "{b}"),
            HeaderValue::Int(i) => write!(f, "{i}"),
            HeaderValue::Float(x) => write!(f, "{x}"),
            HeaderValue::Str(s) => f.write_str(s),
            HeaderValue::Bytes(b) => f.write_str(&String::from_utf8_lossy(b)),
        }
    }
}

impl From<bool> for HeaderValue {
    fn from(v: bool) -> Self {
        HeaderValue::Bool(v)
    }
}

impl From<i64> for HeaderValue {
    fn from(v: i64) -> Self {
        HeaderValue::Int(v)
    }
}

impl From<f64> for HeaderValue {
    fn from(v: f64) -> Self {
        HeaderValue::Float(v)
    }
}

impl From<&str> for HeaderValue {
    fn from(v: &str) -> Self {
        HeaderValue::Str(v.to_owned())
    }
}

impl From<String> for HeaderValue {
    fn from(v: String) -> Self {
        HeaderValue::Str(v)
    }
}

impl From<Vec<u8>> for HeaderValue {
    fn from(v: Vec<u8>) -> Self {
        HeaderValue::Bytes(v)
    }
}

fn int_eq_float(i: i64, f: f64) -> bool {
    // 2^63: the first float above i64::MAX; -2^63 itself is an i64.
    const BOUND: f64 = 9_223_372_036_854_775_808.0;
    // Within the bound an integral float converts to i64 exactly, so the
    // comparison happens in integers and cannot be fooled by f64 rounding.
    f.is_finite() && f.fract() == 0.0 && (-BOUND..BOUND).contains(&f) && f as i64 == i
}

const X_MATCH: &str = "x-match";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

impl XMatch {
    fn parse(value: &HeaderValue) -> Option<XMatch> {
        match value.as_bytes()? {
            b"all" => Some(XMatch::All),
            b"any" => Some(XMatch::Any),
            b"all-with-x" => Some(XMatch::AllWithX),
            b"any-with-x" => Some(XMatch::AnyWithX),
            _ => None,
        }
    }

    fn of(args: &[(String, HeaderValue)]) -> XMatch {
        // Bindings are validated on the way in; the fallback only covers
        // restored state, and mirrors RabbitMQ's legacy default.
        lookup(args, X_MATCH)
            .and_then(XMatch::parse)
            .unwrap_or(XMatch::All)
    }
}

fn lookup<'a>(args: &'a [(String, HeaderValue)], key: &str) -> Option<&'a HeaderValue> {
    args.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// Rejects an `x-match` RabbitMQ would reject (406 on bind).
pub(super) fn validate_binding_args(args: &[(String, HeaderValue)]) -> Result<(), BrokerError> {
    match lookup(args, X_MATCH) {
        None => Ok(()),
        Some(v @ (HeaderValue::Str(_) | HeaderValue::Bytes(_))) => match XMatch::parse(v) {
            Some(_) => Ok(()),
            None => Err(BrokerError::PreconditionFailed(format!(
                "invalid x-match field value '{v}'; expected all, any, all-with-x, or any-with-x"
            ))),
        },
        Some(v) => Err(BrokerError::PreconditionFailed(format!(
            "invalid x-match field type {} (value '{v}'); expected a string",
            v.type_name()
        ))),
    }
}

/// Bindings are persisted as JSON, which has no NaN or infinity: such a
/// value would serialise as `null` and make the whole snapshot unreadable.
pub(super) fn check_storable(args: &[(String, HeaderValue)]) -> Result<(), BrokerError> {
    for (key, value) in args {
        if let HeaderValue::Float(f) = value {
            if !f.is_finite() {
                return Err(BrokerError::InvalidArgument(format!(
                    "binding argument '{key}' is not a finite number"
                )));
            }
        }
    }
    Ok(())
}

/// Message headers indexed once per routed message, so that each headers
/// binding costs one hash lookup per pattern entry.
pub(super) struct MessageHeaders<'a> {
    by_key: HashMap<&'a str, &'a HeaderValue>,
}

impl<'a> MessageHeaders<'a> {
    pub(super) fn new(headers: &'a [(String, HeaderValue)]) -> Self {
        let mut by_key = HashMap::with_capacity(headers.len());
        for (key, value) in headers {
            // A repeated key keeps its first value, as RabbitMQ's stable
            // sort-then-merge over the header table does.
            by_key.entry(key.as_str()).or_insert(value);
        }
        MessageHeaders { by_key }
    }
}

/// RabbitMQ's headers matching: `x-match` itself is never a pattern entry,
/// other `x-` keys only count under the `-with-x` variants, a `Void` entry
/// asks for presence alone, and an empty pattern is vacuously true for `all`
/// and false for `any`.
pub(super) fn headers_match(args: &[(String, HeaderValue)], headers: &MessageHeaders<'_>) -> bool {
    let mode = XMatch::of(args);
    let with_x = matches!(mode, XMatch::AllWithX | XMatch::AnyWithX);
    let all = matches!(mode, XMatch::All | XMatch::AllWithX);
    for (key, want) in args {
        if key == X_MATCH || (!with_x && key.starts_with("x-")) {
            continue;
        }
        let hit = match headers.by_key.get(key.as_str()) {
            None => false,
            Some(got) => matches!(want, HeaderValue::Void) || want.matches(got),
        };
        if all && !hit {
            return false;
        }
        if !all && hit {
            return true;
        }
    }
    all
}
