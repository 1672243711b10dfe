//! Sans-I/O framing: bytes in, typed frames out, and back.
//!
//! The frame layout (type, channel, size, payload, frame-end) is split
//! here, so that a frame larger than the negotiated `frame_max` is refused
//! from its 7-byte header before its payload is buffered, and so that body
//! payloads stay [`Bytes`] slices of the read buffer instead of copies.
//! Method and content-header payloads are decoded and encoded by
//! `amq-protocol`, which is generated from the AMQP 0-9-1 spec with
//! RabbitMQ's field-table types.

use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic::AMQPProperties, parse_class, AMQPClass};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// What a client sends first: "AMQP", 0, then version 0-9-1.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
/// Frame type, channel and size, then the payload and the end octet.
pub const FRAME_OVERHEAD: usize = 8;
/// The smallest frame_max a peer may ask for (the spec's frame-min-size).
pub const FRAME_MIN_SIZE: u32 = 4096;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// The basic class, the only one with content.
pub const CLASS_BASIC: u16 = 60;

/// A decoded frame. Bodies keep the bytes they arrived in.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Method(u16, Box<AMQPClass>),
    Header(u16, Box<AMQPContentHeader>),
    Body(u16, Bytes),
    Heartbeat(u16),
}

impl Frame {
    pub fn channel(&self) -> u16 {
        match self {
            Frame::Method(c, _) | Frame::Header(c, _) | Frame::Body(c, _) | Frame::Heartbeat(c) => {
                *c
            }
        }
    }
}

/// Why bytes could not be framed. The first four are FRAME_ERROR (501),
/// the last SYNTAX_ERROR (502); both close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {size} bytes exceeds the negotiated frame_max {max}")]
    TooLarge { size: u64, max: u32 },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame does not end with 0xCE (found {0:#x})")]
    BadFrameEnd(u8),
    #[error("bad protocol header {0:?}")]
    BadProtocolHeader([u8; 8]),
    #[error("malformed {what} frame: {reason}")]
    Malformed { what: &'static str, reason: String },
}

impl CodecError {
    /// The AMQP reply code this error closes the connection with.
    pub fn reply_code(&self) -> u16 {
        match self {
            CodecError::Malformed { .. } => crate::error::SYNTAX_ERROR,
            _ => crate::error::FRAME_ERROR,
        }
    }
}

/// Checks the 8-byte protocol header once it has fully arrived.
/// `Ok(None)`: more bytes are needed.
pub fn decode_protocol_header(buf: &mut BytesMut) -> Result<Option<()>, CodecError> {
    if buf.len() < PROTOCOL_HEADER.len() {
        // A peer speaking something else may send less; judge what we have.
        if !PROTOCOL_HEADER.starts_with(&buf[..]) {
            let mut got = [0u8; 8];
            got[..buf.len()].copy_from_slice(buf);
            return Err(CodecError::BadProtocolHeader(got));
        }
        return Ok(None);
    }
    let mut got = [0u8; 8];
    got.copy_from_slice(&buf[..8]);
    buf.advance(8);
    if got == PROTOCOL_HEADER {
        Ok(Some(()))
    } else {
        Err(CodecError::BadProtocolHeader(got))
    }
}

/// Takes one frame off the front of `buf`. `Ok(None)`: more bytes are
/// needed. `frame_max` bounds the whole frame, as the spec counts it.
pub fn decode_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, CodecError> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if !matches!(
        kind,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(CodecError::UnknownType(kind));
    }
    let total = size as u64 + FRAME_OVERHEAD as u64;
    if frame_max > 0 && total > u64::from(frame_max) {
        return Err(CodecError::TooLarge {
            size: total,
            max: frame_max,
        });
    }
    if buf.len() < size + FRAME_OVERHEAD {
        buf.reserve(size + FRAME_OVERHEAD - buf.len());
        return Ok(None);
    }
    let end = buf[7 + size];
    if end != FRAME_END {
        return Err(CodecError::BadFrameEnd(end));
    }
    buf.advance(7);
    let payload = buf.split_to(size).freeze();
    buf.advance(1);
    let frame = match kind {
        FRAME_METHOD => {
            let (rest, class) = parse_class(&payload[..]).map_err(|e| CodecError::Malformed {
                what: "method",
                reason: format!("{e:?}"),
            })?;
            if !rest.is_empty() {
                return Err(CodecError::Malformed {
                    what: "method",
                    reason: format!("{} bytes after the arguments", rest.len()),
                });
            }
            Frame::Method(channel, Box::new(class))
        }
        FRAME_HEADER => {
            let (rest, header) = amq_protocol::frame::parsing::parse_content_header(&payload[..])
                .map_err(|e| CodecError::Malformed {
                what: "content header",
                reason: format!("{e:?}"),
            })?;
            if !rest.is_empty() {
                return Err(CodecError::Malformed {
                    what: "content header",
                    reason: format!("{} bytes after the properties", rest.len()),
                });
            }
            Frame::Header(channel, Box::new(header))
        }
        FRAME_BODY => Frame::Body(channel, payload),
        _ => Frame::Heartbeat(channel),
    };
    Ok(Some(frame))
}

fn generate(frame: &AMQPFrame, out: &mut BytesMut) {
    // The generators write into anything `Write + BackToTheBuffer`; a Vec
    // is the simplest such sink. Encoding a well-formed value cannot fail
    // but for a short string over 255 bytes, which callers never build
    // from untrusted input; such a frame is dropped rather than sent torn.
    match gen_frame(frame)(WriteContext::from(Vec::with_capacity(64))) {
        Ok(ctx) => out.extend_from_slice(&ctx.write),
        Err(e) => tracing::error!("cannot encode {frame}: {e:?}"),
    }
}

pub fn encode_method(out: &mut BytesMut, channel: u16, method: AMQPClass) {
    generate(&AMQPFrame::Method(channel, method), out);
}

pub fn encode_heartbeat(out: &mut BytesMut) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// A method with content (deliver, get-ok, return): the method frame, the
/// content header, and the body split to fit `frame_max`.
pub fn encode_content(
    out: &mut BytesMut,
    channel: u16,
    method: AMQPClass,
    properties: AMQPProperties,
    body: &[u8],
    frame_max: u32,
) {
    encode_method(out, channel, method);
    generate(
        &AMQPFrame::Header(
            channel,
            AMQPContentHeader {
                class_id: CLASS_BASIC,
                body_size: body.len() as u64,
                properties,
            },
        ),
        out,
    );
    let chunk = (frame_max.max(FRAME_MIN_SIZE) as usize) - FRAME_OVERHEAD;
    for part in body.chunks(chunk) {
        out.reserve(part.len() + FRAME_OVERHEAD);
        out.put_u8(FRAME_BODY);
        out.put_u16(channel);
        out.put_u32(part.len() as u32);
        out.put_slice(part);
        out.put_u8(FRAME_END);
    }
}

/// Encodes a frame the way a client would; for tests and tools.
pub fn encode_frame(out: &mut BytesMut, frame: &Frame) {
    match frame {
        Frame::Method(c, m) => encode_method(out, *c, (**m).clone()),
        Frame::Header(c, h) => generate(&AMQPFrame::Header(*c, (**h).clone()), out),
        Frame::Body(c, b) => {
            out.put_u8(FRAME_BODY);
            out.put_u16(*c);
            out.put_u32(b.len() as u32);
            out.put_slice(b);
            out.put_u8(FRAME_END);
        }
        Frame::Heartbeat(c) => {
            out.put_u8(FRAME_HEARTBEAT);
            out.put_u16(*c);
            out.put_u32(0);
            out.put_u8(FRAME_END);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::{basic, queue};
    use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
    use proptest::prelude::*;

    fn declare(name: &str, ttl: i32) -> AMQPClass {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(ttl));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("dlx")),
        );
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: ShortString::from(name),
            durable: true,
            arguments: args,
            ..Default::default()
        }))
    }

    #[test]
    fn methods_round_trip() {
        let mut buf = BytesMut::new();
        encode_method(&mut buf, 3, declare("orders", 500));
        let f = decode_frame(&mut buf, 131_072).expect("ok").expect("ok");
        assert_eq!(f, Frame::Method(3, Box::new(declare("orders", 500))));
        assert!(buf.is_empty());
    }

    #[test]
    fn content_is_split_by_frame_max_and_reassembles() {
        let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut buf = BytesMut::new();
        let deliver = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "c".into(),
            delivery_tag: 7,
            redelivered: true,
            exchange: "".into(),
            routing_key: "q".into(),
        }));
        let props = AMQPProperties::default().with_content_type("text/plain".into());
        encode_content(&mut buf, 1, deliver.clone(), props.clone(), &body, 4096);
        let mut frames = Vec::new();
        while let Some(f) = decode_frame(&mut buf, 4096).expect("ok") {
            frames.push(f);
        }
        assert_eq!(frames.len(), 2 + 3);
        assert_eq!(frames[0], Frame::Method(1, Box::new(deliver)));
        match &frames[1] {
            Frame::Header(1, h) => {
                assert_eq!(h.body_size, 10_000);
                assert_eq!(h.properties, props);
            }
            other => panic!("{other:?}"),
        }
        let mut joined = Vec::new();
        for f in &frames[2..] {
            match f {
                Frame::Body(1, b) => joined.extend_from_slice(b),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(joined, body);
    }

    #[test]
    fn oversized_frames_are_refused_from_their_header() {
        let mut buf = BytesMut::from(&[FRAME_BODY, 0, 1, 0, 0x10, 0, 0][..]);
        assert_eq!(
            decode_frame(&mut buf, 131_072),
            Err(CodecError::TooLarge {
                size: 0x10_0000 + 8,
                max: 131_072
            })
        );
    }

    #[test]
    fn bad_frame_end_and_type_are_frame_errors() {
        let mut buf = BytesMut::from(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, 0xCD][..]);
        let e = decode_frame(&mut buf, 0).expect_err("an error");
        assert_eq!(e, CodecError::BadFrameEnd(0xCD));
        assert_eq!(e.reply_code(), 501);
        let mut buf = BytesMut::from(&[9u8, 0, 0, 0, 0, 0, 0, 0xCE][..]);
        assert_eq!(decode_frame(&mut buf, 0), Err(CodecError::UnknownType(9)));
    }

    #[test]
    fn garbage_methods_are_syntax_errors() {
        // class 60, method 999: no such method.
        let mut buf = BytesMut::from(&[FRAME_METHOD, 0, 1, 0, 0, 0, 4, 0, 60, 3, 231, 0xCE][..]);
        let e = decode_frame(&mut buf, 0).expect_err("an error");
        assert_eq!(e.reply_code(), 502, "{e}");
    }

    #[test]
    fn protocol_header_is_checked_as_it_arrives() {
        let mut buf = BytesMut::from(&b"AMQ"[..]);
        assert_eq!(decode_protocol_header(&mut buf), Ok(None));
        let mut buf = BytesMut::from(&b"GET / HT"[..]);
        assert!(decode_protocol_header(&mut buf).is_err());
        let mut buf = BytesMut::from(&b"AMQP\x00\x00\x09\x01\x01"[..]);
        assert_eq!(decode_protocol_header(&mut buf), Ok(Some(())));
        assert_eq!(&buf[..], &[1]);
    }

    /// `depth` field arrays nested in one another, as a field value
    /// (type octet, then the array): 5 bytes a level.
    pub(crate) fn nested_arrays(depth: usize) -> Vec<u8> {
        let mut v: Vec<u8> = Vec::new();
        for _ in 0..depth {
            let mut outer = vec![b'A'];
            outer.extend_from_slice(&(v.len() as u32).to_be_bytes());
            outer.extend_from_slice(&v);
            v = outer;
        }
        v
    }

    /// A `connection.start-ok` whose client-properties hold one key with
    /// `depth` nested arrays: what an unauthenticated peer can send.
    fn start_ok_frame(depth: usize) -> BytesMut {
        let mut table = vec![1u8, b'x'];
        table.extend_from_slice(&nested_arrays(depth));
        let mut args = (table.len() as u32).to_be_bytes().to_vec();
        args.extend_from_slice(&table);
        args.extend_from_slice(b"\x05PLAIN");
        args.extend_from_slice(&4u32.to_be_bytes());
        args.extend_from_slice(b"\0u\0p");
        args.extend_from_slice(b"\x05en_US");
        let mut payload = vec![0, 10, 0, 11];
        payload.extend_from_slice(&args);
        let mut frame = vec![FRAME_METHOD, 0, 0];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(FRAME_END);
        BytesMut::from(&frame[..])
    }

    /// Runs `f` on a thread with a small stack, so that a decoder that
    /// recursed with the input would overflow here rather than pass.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(f)
            .expect("spawn")
            .join()
            .expect("no panic")
    }

    #[test]
    fn deep_field_tables_are_refused_not_recursed_into() {
        // 25,000 levels: 125 KB, under the pre-tune frame_max.
        let e = on_small_stack(|| {
            let mut buf = start_ok_frame(25_000);
            decode_frame(&mut buf, 131_072).expect_err("refused")
        });
        assert_eq!(e.reply_code(), 502, "{e}");
        // Far deeper than the limit, but inside it, still decodes.
        let ok = on_small_stack(|| {
            let mut buf = start_ok_frame(60);
            decode_frame(&mut buf, 131_072).map(|f| f.is_some())
        });
        assert_eq!(ok, Ok(true));
        let e = on_small_stack(|| {
            let mut buf = start_ok_frame(65);
            decode_frame(&mut buf, 131_072).expect_err("refused")
        });
        assert_eq!(e.reply_code(), 502, "{e}");
    }

    #[test]
    fn deep_headers_in_a_content_header_are_refused() {
        let e = on_small_stack(|| {
            // basic class, body size 0, flags: headers only (bit 13).
            let mut table = vec![1u8, b'h'];
            table.extend_from_slice(&nested_arrays(20_000));
            let mut payload = vec![0, 60, 0, 0];
            payload.extend_from_slice(&0u64.to_be_bytes());
            payload.extend_from_slice(&(1u16 << 13).to_be_bytes());
            payload.extend_from_slice(&(table.len() as u32).to_be_bytes());
            payload.extend_from_slice(&table);
            let mut frame = vec![FRAME_HEADER, 0, 1];
            frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            frame.extend_from_slice(&payload);
            frame.push(FRAME_END);
            let mut buf = BytesMut::from(&frame[..]);
            decode_frame(&mut buf, 0).expect_err("refused")
        });
        assert_eq!(e.reply_code(), 502, "{e}");
    }

    proptest! {
        /// Whatever the bytes, the decoder returns frames, asks for more
        /// or names an error: it never panics and never loops.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..600 {
                match decode_frame(&mut buf, 131_072) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        /// Valid method frames with arbitrary bytes spliced in decode or
        /// fail cleanly.
        #[test]
        fn mutated_methods_never_panic(
            name in "[a-z.]{0,40}",
            ttl in any::<i32>(),
            at in 0usize..200,
            byte in any::<u8>(),
        ) {
            let mut clean = BytesMut::new();
            encode_method(&mut clean, 1, declare(&name, ttl));
            let mut bytes = clean.to_vec();
            let i = at % bytes.len();
            bytes[i] = byte;
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_frame(&mut buf, 131_072);
        }

        #[test]
        fn bodies_round_trip(channel in 1u16.., body in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let mut buf = BytesMut::new();
            let f = Frame::Body(channel, Bytes::from(body));
            encode_frame(&mut buf, &f);
            prop_assert_eq!(decode_frame(&mut buf, 4096).expect("ok"), Some(f));
        }
    }
}
