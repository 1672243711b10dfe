//! What a client sends after CONNECT: topic aliases of its publishes,
//! its Receive Maximum budget, DISCONNECT's session expiry and AUTH
//! re-authentication.

use std::collections::HashMap;

use bytestring::ByteString;
use rmqtt_codec::types::Publish;
use rmqtt_codec::v5;

use crate::error::MqttError;

/// The topic aliases a client set (MQTT 5, 3.3.2.3.4), up to the
/// maximum the broker announced.
#[derive(Debug)]
pub(crate) struct AliasesIn {
    max: u16,
    set: HashMap<u16, ByteString>,
}

impl AliasesIn {
    pub fn new(max: u16) -> Self {
        AliasesIn {
            max,
            set: HashMap::new(),
        }
    }

    /// Gives `p` its topic: an alias with a topic sets the alias, one
    /// without uses it. The property is taken off: the broker routes by
    /// topic, and aliases are per connection and direction.
    pub fn resolve(&mut self, p: &mut Publish) -> Result<(), MqttError> {
        let Some(a) = p.properties.as_mut().and_then(|pr| pr.topic_alias.take()) else {
            return Ok(());
        };
        if a.get() > self.max {
            return Err(MqttError::TopicAlias(format!("alias {a} over the maximum")));
        }
        if p.topic.is_empty() {
            p.topic = self
                .set
                .get(&a.get())
                .cloned()
                .ok_or_else(|| MqttError::TopicAlias(format!("alias {a} is not set")))?;
        } else {
            self.set.insert(a.get(), p.topic.clone());
        }
        Ok(())
    }
}

/// QoS 1 and 2 publishes of a client not yet acknowledged (QoS 2: not
/// yet released), against the Receive Maximum the broker announced.
#[derive(Debug)]
pub(crate) struct Receiving {
    max: u16,
    count: usize,
    /// Receive Maximum is MQTT 5's: a 3.1.1 client was never told one,
    /// and is slowed down instead of refused.
    enforced: bool,
}

impl Receiving {
    pub fn new(max: u16, v5: bool) -> Self {
        Receiving {
            max,
            count: 0,
            enforced: v5,
        }
    }

    /// One more: an error (DISCONNECT 0x93) for a v5 client over the
    /// maximum.
    pub fn start(&mut self) -> Result<(), MqttError> {
        self.count += 1;
        if self.enforced && self.count > usize::from(self.max) {
            return Err(MqttError::ReceiveMaximum);
        }
        Ok(())
    }

    /// One acknowledged (or released).
    pub fn finish(&mut self) {
        self.count = self.count.saturating_sub(1);
    }

    /// Whether to read more of a client (those without a Receive Maximum
    /// wait in TCP instead).
    pub fn has_room(&self, stored: usize) -> bool {
        stored < usize::from(self.max)
    }
}

/// The session expiry after a DISCONNECT that sets `asked`, from
/// `current`: setting one after 0 on CONNECT is a protocol error (MQTT 5,
/// 3.14.2.2.2).
pub(crate) fn disconnect_expiry(current: u32, asked: Option<u32>) -> Result<u32, MqttError> {
    match asked {
        None => Ok(current),
        Some(e) if current == 0 && e != 0 => Err(MqttError::Protocol(
            "session expiry set on DISCONNECT after 0 on CONNECT".into(),
        )),
        Some(e) => Ok(e),
    }
}

/// Checks an AUTH packet as a re-authentication with CONNECT's `method`
/// (MQTT 5, 4.12.1): the method the same, the reason 0x19.
pub(crate) fn reauth(method: Option<&ByteString>, a: &v5::Auth) -> Result<ByteString, MqttError> {
    let Some(method) = method else {
        return Err(MqttError::Protocol(
            "AUTH without an authentication method".into(),
        ));
    };
    if a.auth_method.as_ref() != Some(method) {
        return Err(MqttError::Protocol(
            "AUTH with another authentication method than CONNECT's".into(),
        ));
    }
    if a.reason_code != v5::AuthReasonCode::ReAuth {
        return Err(MqttError::Protocol(
            "AUTH other than re-authenticate".into(),
        ));
    }
    Ok(method.clone())
}
