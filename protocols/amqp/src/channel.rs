//! Channel state that needs no I/O: assembling published content from its
//! method, header and body frames, and the delivery-tag bookkeeping behind
//! ack, nack, reject and recover.

use std::collections::BTreeMap;

use amq_protocol::frame::AMQPContentHeader;
use amq_protocol::protocol::basic;
use bytes::{Bytes, BytesMut};

use crate::codec::{Frame, CLASS_BASIC};
use crate::error::{Exception, FRAME_ERROR, UNEXPECTED_FRAME};
use crate::props::Published;

/// The most reserved for a body before its bytes arrive.
const BODY_RESERVE_MAX: usize = 1 << 20;

/// A publish whose content is still arriving.
#[derive(Debug)]
struct Partial {
    method: basic::Publish,
    header: Option<AMQPContentHeader>,
    body: BytesMut,
}

/// Frames of one channel's publishes, in, whole messages out.
#[derive(Debug, Default)]
pub struct Assembler {
    partial: Option<Partial>,
}

/// A complete publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub mandatory: bool,
    pub message: Published,
}

impl Assembler {
    /// Whether content frames are expected next: any method now is a
    /// protocol error.
    pub fn is_receiving(&self) -> bool {
        self.partial.is_some()
    }

    pub fn start(&mut self, method: basic::Publish) -> Result<(), Exception> {
        if self.partial.is_some() {
            return Err(Exception::new(
                UNEXPECTED_FRAME,
                "expected content header or body, got basic.publish",
            ));
        }
        self.partial = Some(Partial {
            method,
            header: None,
            body: BytesMut::new(),
        });
        Ok(())
    }

    /// Feeds a header or body frame. `max_body` bounds the body size a
    /// header may announce (RabbitMQ's max_message_size).
    pub fn feed(&mut self, frame: Frame, max_body: u64) -> Result<Option<Publish>, Exception> {
        let Some(p) = self.partial.as_mut() else {
            return Err(Exception::new(
                UNEXPECTED_FRAME,
                "content frame without a basic.publish",
            ));
        };
        match frame {
            Frame::Header(_, h) if p.header.is_none() => {
                if h.class_id != CLASS_BASIC {
                    return Err(Exception::new(
                        FRAME_ERROR,
                        format!("content header for class {}", h.class_id),
                    ));
                }
                if h.body_size > max_body {
                    return Err(Exception::new(
                        crate::error::PRECONDITION_FAILED,
                        format!(
                            "message size {} is larger than the configured maximum {max_body}",
                            h.body_size
                        ),
                    ));
                }
                // Reserve what is announced only up to a bound: the space
                // for the rest comes with the bytes, so a peer announcing
                // large bodies on every channel and sending none holds
                // nothing.
                p.body.reserve((h.body_size as usize).min(BODY_RESERVE_MAX));
                p.header = Some(*h);
            }
            Frame::Body(_, b) => {
                let Some(h) = &p.header else {
                    return Err(Exception::new(
                        UNEXPECTED_FRAME,
                        "content body before the content header",
                    ));
                };
                if (p.body.len() + b.len()) as u64 > h.body_size {
                    return Err(Exception::new(
                        FRAME_ERROR,
                        format!("content body exceeds the announced {} bytes", h.body_size),
                    ));
                }
                p.body.extend_from_slice(&b);
            }
            _ => return Err(Exception::new(UNEXPECTED_FRAME, "expected content body")),
        }
        let done = p
            .header
            .as_ref()
            .is_some_and(|h| p.body.len() as u64 == h.body_size);
        if !done {
            return Ok(None);
        }
        let Some(p) = self.partial.take() else {
            return Ok(None);
        };
        let header = p.header.unwrap_or_else(|| unreachable!("checked above"));
        Ok(Some(Publish {
            mandatory: p.method.mandatory,
            message: Published {
                exchange: p.method.exchange.as_str().to_owned(),
                routing_key: p.method.routing_key.as_str().to_owned(),
                properties: header.properties,
                body: Bytes::from(p.body),
            },
        }))
    }
}

/// Delivery tags handed out on a channel and not yet settled, with what
/// each one settles.
#[derive(Debug)]
pub struct Tags<T> {
    next: u64,
    unacked: BTreeMap<u64, T>,
}

impl<T> Default for Tags<T> {
    fn default() -> Self {
        Tags {
            next: 1,
            unacked: BTreeMap::new(),
        }
    }
}

impl<T> Tags<T> {
    /// A new tag; `track` keeps it for a later ack (not for no-ack).
    pub fn issue(&mut self, item: Option<T>) -> u64 {
        let tag = self.next;
        self.next += 1;
        if let Some(item) = item {
            self.unacked.insert(tag, item);
        }
        tag
    }

    /// Settles `tag`, or with `multiple` every tag up to it (tag 0 with
    /// multiple: all). An unknown tag is PRECONDITION_FAILED, as RabbitMQ
    /// ("unknown delivery tag").
    pub fn settle(&mut self, tag: u64, multiple: bool) -> Result<Vec<T>, Exception> {
        Ok(self
            .settle_tagged(tag, multiple)?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    /// Like [`Tags::settle`], keeping the tags, so that a rolled-back
    /// transaction can put them back.
    pub fn settle_tagged(&mut self, tag: u64, multiple: bool) -> Result<Vec<(u64, T)>, Exception> {
        if multiple {
            if tag != 0 && tag >= self.next {
                return Err(unknown_tag(tag));
            }
            let upto = if tag == 0 { u64::MAX } else { tag };
            let keep = self.unacked.split_off(&upto.saturating_add(1));
            let settled = std::mem::replace(&mut self.unacked, keep);
            return Ok(settled.into_iter().collect());
        }
        self.unacked
            .remove(&tag)
            .map(|t| vec![(tag, t)])
            .ok_or_else(|| unknown_tag(tag))
    }

    /// Puts back a tag settled inside a transaction that was rolled back.
    pub fn restore(&mut self, tag: u64, item: T) {
        self.unacked.insert(tag, item);
    }

    /// Everything unsettled, for recover and channel close.
    pub fn drain(&mut self) -> Vec<T> {
        std::mem::take(&mut self.unacked).into_values().collect()
    }

    pub fn len(&self) -> usize {
        self.unacked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }

    pub fn retain(&mut self, f: impl FnMut(&u64, &mut T) -> bool) {
        self.unacked.retain(f);
    }
}

fn unknown_tag(tag: u64) -> Exception {
    Exception::new(
        crate::error::PRECONDITION_FAILED,
        format!("unknown delivery tag {tag}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic::AMQPProperties;

    fn header(size: u64) -> Frame {
        Frame::Header(
            1,
            Box::new(AMQPContentHeader {
                class_id: CLASS_BASIC,
                body_size: size,
                properties: AMQPProperties::default(),
            }),
        )
    }

    fn publish() -> basic::Publish {
        basic::Publish {
            exchange: "x".into(),
            routing_key: "k".into(),
            mandatory: true,
            immediate: false,
        }
    }

    #[test]
    fn content_assembles_over_several_bodies() {
        let mut a = Assembler::default();
        a.start(publish()).expect("ok");
        assert!(a.feed(header(5), 100).expect("ok").is_none());
        assert!(a
            .feed(Frame::Body(1, Bytes::from_static(b"he")), 100)
            .expect("ok")
            .is_none());
        let p = a
            .feed(Frame::Body(1, Bytes::from_static(b"llo")), 100)
            .expect("ok")
            .expect("ok");
        assert!(p.mandatory);
        assert_eq!(p.message.exchange, "x");
        assert_eq!(&p.message.body[..], b"hello");
        assert!(!a.is_receiving());
    }

    #[test]
    fn empty_bodies_complete_on_the_header() {
        let mut a = Assembler::default();
        a.start(publish()).expect("ok");
        let p = a.feed(header(0), 100).expect("ok").expect("ok");
        assert!(p.message.body.is_empty());
    }

    #[test]
    fn content_errors() {
        let mut a = Assembler::default();
        assert_eq!(
            a.feed(header(1), 100).expect_err("an error").code,
            UNEXPECTED_FRAME
        );
        a.start(publish()).expect("ok");
        assert_eq!(
            a.start(publish()).expect_err("an error").code,
            UNEXPECTED_FRAME
        );
        assert_eq!(
            a.feed(Frame::Body(1, Bytes::new()), 100)
                .expect_err("an error")
                .code,
            UNEXPECTED_FRAME
        );
        let mut a = Assembler::default();
        a.start(publish()).expect("ok");
        assert_eq!(a.feed(header(1000), 100).expect_err("an error").code, 406);
        let mut a = Assembler::default();
        a.start(publish()).expect("ok");
        a.feed(header(2), 100).expect("ok");
        assert_eq!(
            a.feed(Frame::Body(1, Bytes::from_static(b"abc")), 100)
                .expect_err("an error")
                .code,
            FRAME_ERROR
        );
    }

    #[test]
    fn tags_settle_singly_and_multiply() {
        let mut t: Tags<u64> = Tags::default();
        for i in 0..5 {
            t.issue(Some(i * 10));
        }
        let no_ack = t.issue(None);
        assert_eq!(no_ack, 6);
        assert_eq!(t.settle(2, false).expect("ok"), vec![10]);
        assert_eq!(t.settle(2, false).expect_err("an error").code, 406);
        assert_eq!(t.settle(4, true).expect("ok"), vec![0, 20, 30]);
        assert_eq!(t.settle(99, true).expect_err("an error").code, 406);
        assert_eq!(t.settle(0, true).expect("ok"), vec![40]);
        assert!(t.is_empty());
    }
}
