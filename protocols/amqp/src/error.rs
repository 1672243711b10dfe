//! AMQP reply codes, the crate's error type, and how broker errors become
//! channel or connection exceptions with RabbitMQ's codes and texts.

use magnetar_broker::BrokerError;

pub const REPLY_SUCCESS: u16 = 200;
pub const CONTENT_TOO_LARGE: u16 = 311;
pub const NO_ROUTE: u16 = 312;
pub const CONNECTION_FORCED: u16 = 320;
pub const ACCESS_REFUSED: u16 = 403;
pub const NOT_FOUND: u16 = 404;
pub const RESOURCE_LOCKED: u16 = 405;
pub const PRECONDITION_FAILED: u16 = 406;
pub const FRAME_ERROR: u16 = 501;
pub const SYNTAX_ERROR: u16 = 502;
pub const COMMAND_INVALID: u16 = 503;
pub const CHANNEL_ERROR: u16 = 504;
pub const UNEXPECTED_FRAME: u16 = 505;
pub const RESOURCE_ERROR: u16 = 506;
pub const NOT_ALLOWED: u16 = 530;
pub const NOT_IMPLEMENTED: u16 = 540;
pub const INTERNAL_ERROR: u16 = 541;

/// The name RabbitMQ puts before a reply text, e.g.
/// `NOT_FOUND - no queue 'q' in vhost '/'`.
pub fn code_name(code: u16) -> &'static str {
    match code {
        REPLY_SUCCESS => "OK",
        CONTENT_TOO_LARGE => "CONTENT_TOO_LARGE",
        NO_ROUTE => "NO_ROUTE",
        CONNECTION_FORCED => "CONNECTION_FORCED",
        ACCESS_REFUSED => "ACCESS_REFUSED",
        NOT_FOUND => "NOT_FOUND",
        RESOURCE_LOCKED => "RESOURCE_LOCKED",
        PRECONDITION_FAILED => "PRECONDITION_FAILED",
        FRAME_ERROR => "FRAME_ERROR",
        SYNTAX_ERROR => "SYNTAX_ERROR",
        COMMAND_INVALID => "COMMAND_INVALID",
        CHANNEL_ERROR => "CHANNEL_ERROR",
        UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        RESOURCE_ERROR => "RESOURCE_ERROR",
        NOT_ALLOWED => "NOT_ALLOWED",
        NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    }
}

/// Hard errors close the connection; soft ones only the channel.
pub fn is_hard(code: u16) -> bool {
    !matches!(
        code,
        CONTENT_TOO_LARGE
            | NO_ROUTE
            | ACCESS_REFUSED
            | NOT_FOUND
            | RESOURCE_LOCKED
            | PRECONDITION_FAILED
    )
}

/// An AMQP exception: what a channel.close or connection.close carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} - {text}", code_name(*.code))]
pub struct Exception {
    pub code: u16,
    pub text: String,
    /// The method that failed (class and method id), or 0/0.
    pub class_id: u16,
    pub method_id: u16,
}

impl Exception {
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        Exception {
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }

    pub fn on(mut self, class_id: u16, method_id: u16) -> Self {
        self.class_id = class_id;
        self.method_id = method_id;
        self
    }

    /// The reply text as RabbitMQ writes it, code name first.
    pub fn reply_text(&self) -> String {
        let t = format!("{} - {}", code_name(self.code), self.text);
        // A short string holds 255 bytes; cut on a char boundary.
        if t.len() <= 255 {
            return t;
        }
        let mut end = 255;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t[..end].to_owned()
    }

    pub fn is_hard(&self) -> bool {
        is_hard(self.code)
    }
}

/// The crate's error type.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    #[error(transparent)]
    Exception(#[from] Exception),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

pub type Result<T, E = AmqpError> = std::result::Result<T, E>;

/// The exception a broker error raises. NotFound, AccessRefused and
/// PreconditionFailed carry RabbitMQ's own texts from the routing table.
pub fn exception_of(e: &BrokerError) -> Exception {
    let (code, text) = match e {
        BrokerError::NotFound(t) => (NOT_FOUND, t.clone()),
        BrokerError::AccessRefused(t) | BrokerError::Unauthenticated(t) => {
            (ACCESS_REFUSED, t.clone())
        }
        BrokerError::PreconditionFailed(t) | BrokerError::InvalidArgument(t) => {
            (PRECONDITION_FAILED, t.clone())
        }
        BrokerError::AlreadyExists(t) => (PRECONDITION_FAILED, t.clone()),
        BrokerError::ConsumerBusy(t) => (ACCESS_REFUSED, format!("queue '{t}' in exclusive use")),
        BrokerError::QuotaExceeded(t) => (RESOURCE_ERROR, t.clone()),
        other => (INTERNAL_ERROR, other.to_string()),
    };
    Exception::new(code, text)
}

impl From<BrokerError> for Exception {
    fn from(e: BrokerError) -> Self {
        exception_of(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_errors_map_to_rabbitmq_codes_and_severity() {
        let cases = [
            (BrokerError::NotFound("q".into()), NOT_FOUND, false),
            (
                BrokerError::AccessRefused("x".into()),
                ACCESS_REFUSED,
                false,
            ),
            (
                BrokerError::PreconditionFailed("p".into()),
                PRECONDITION_FAILED,
                false,
            ),
            (BrokerError::ConsumerBusy("q".into()), ACCESS_REFUSED, false),
            (
                BrokerError::QuotaExceeded("full".into()),
                RESOURCE_ERROR,
                true,
            ),
            (
                BrokerError::TopicUnavailable("down".into()),
                INTERNAL_ERROR,
                true,
            ),
            (
                BrokerError::CorruptBatch("bad".into()),
                INTERNAL_ERROR,
                true,
            ),
        ];
        for (e, code, hard) in cases {
            let x = exception_of(&e);
            assert_eq!((x.code, x.is_hard()), (code, hard), "{e}");
            assert!(x.reply_text().starts_with(code_name(code)));
        }
    }

    #[test]
    fn reply_texts_fit_a_short_string() {
        let x = Exception::new(INTERNAL_ERROR, "é".repeat(300));
        let t = x.reply_text();
        assert!(t.len() <= 255 && t.starts_with("INTERNAL_ERROR - "));
    }
}
