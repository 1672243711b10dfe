//! What a connection's helper tasks report (deliveries, confirms,
//! consumer ends, alarms), sending deliveries under prefetch, and what a
//! connection leaves behind when it ends.

use super::*;

impl Conn {
    pub(super) fn on_event(&mut self, ev: Event) -> Result<(), Exception> {
        match ev {
            Event::Deliver {
                channel,
                gen,
                consumer,
                control,
                delivery,
            } => self.deliver(
                channel,
                Held {
                    gen,
                    consumer,
                    control,
                    delivery,
                },
            ),
            Event::ConsumerEnded {
                channel,
                gen,
                consumer,
            } => {
                let Some(c) = self.channels.get_mut(&channel).filter(|c| c.gen == gen) else {
                    return Ok(());
                };
                let Some(e) = c.consumers.remove(&consumer) else {
                    return Ok(());
                };
                self.release_consumer(&e.queue, channel, &consumer);
                // consumer_cancel_notify: the client learns its queue went.
                self.send_method(
                    channel,
                    AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                        consumer_tag: short(&consumer),
                        nowait: true,
                    })),
                );
                Ok(())
            }
            Event::Reply {
                channel,
                gen,
                consumer,
                message,
            } => {
                let frame_max = self.frame_max;
                let Some(c) = self
                    .channels
                    .get_mut(&channel)
                    .filter(|c| c.gen == gen && !c.closing)
                else {
                    return Ok(());
                };
                let tag = c.tags.issue(None);
                let mut b = BytesMut::with_capacity(message.body.len() + 256);
                codec::encode_content(
                    &mut b,
                    channel,
                    AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                        consumer_tag: short(&consumer),
                        delivery_tag: tag,
                        redelivered: false,
                        exchange: short(""),
                        routing_key: short(&message.routing_key),
                    })),
                    message.properties,
                    &message.body,
                    frame_max,
                );
                self.send(b);
                Ok(())
            }
            Event::Confirmed {
                channel,
                gen,
                seq,
                multiple,
                ok,
            } => {
                if !self
                    .channels
                    .get(&channel)
                    .is_some_and(|c| c.gen == gen && !c.closing)
                {
                    return Ok(());
                }
                let m = if ok {
                    basic::AMQPMethod::Ack(basic::Ack {
                        delivery_tag: seq,
                        multiple,
                    })
                } else {
                    basic::AMQPMethod::Nack(basic::Nack {
                        delivery_tag: seq,
                        multiple,
                        requeue: false,
                    })
                };
                self.send_method(channel, AMQPClass::Basic(m));
                Ok(())
            }
        }
    }

    pub(super) fn deliver(&mut self, ch: u16, h: Held) -> Result<(), Exception> {
        if let Some(c) = self.channels.get_mut(&ch).filter(|c| c.gen == h.gen) {
            // Held in order behind earlier ones, so that none overtakes.
            let no_ack = c.consumers.get(&h.consumer).is_none_or(|e| e.no_ack);
            if channels::waits(!c.held.is_empty(), c.at_global_limit(), no_ack) {
                c.held.push_back(h);
                return Ok(());
            }
        }
        self.deliver_now(ch, h)
    }

    pub(super) fn deliver_now(&mut self, ch: u16, h: Held) -> Result<(), Exception> {
        let Held {
            gen,
            consumer,
            control,
            delivery: d,
        } = h;
        let frame_max = self.frame_max;
        let entry = self
            .channels
            .get(&ch)
            .filter(|c| c.gen == gen && !c.closing)
            .and_then(|c| c.consumers.get(&consumer));
        let consuming = entry.map(|e| delivery::Consuming {
            queue: &e.def,
            no_ack: e.no_ack,
            limited: e.limited,
        });
        let send = match delivery::verdict(consuming, &d, now_ms()) {
            Verdict::Return => {
                control.nack(vec![d.offset], Duration::ZERO);
                return Ok(());
            }
            Verdict::DeadLetter(reason) => {
                if let Some(e) = entry {
                    let def = Arc::clone(&e.def);
                    self.spawn_dead_letter(def, d.message, reason, control.clone(), d.offset);
                }
                control.flow(1);
                return Ok(());
            }
            Verdict::Send(send) => send,
        };
        let queue = entry.map(|e| e.queue.clone()).unwrap_or_default();
        let Some(c) = self.channels.get_mut(&ch) else {
            return Ok(());
        };
        let tag = if send.ack_now {
            control.ack(vec![d.offset]);
            c.tags.issue(None)
        } else {
            c.tags.issue(Some(Unacked {
                control: control.clone(),
                offset: d.offset,
                credit: !send.credit_now,
                queue: queue.clone(),
                message: send.keep_message.then(|| d.message.clone()),
            }))
        };
        if send.credit_now {
            self.return_credit(&control);
        }
        let mut delivered = props::from_record(&d.message, &queue);
        if let Some(offset) = send.stream_offset {
            // Where this message sits in the stream, as RabbitMQ tells it.
            let mut h = delivered.properties.headers().clone().unwrap_or_default();
            h.insert(
                "x-stream-offset".into(),
                AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX)),
            );
            delivered.properties = delivered.properties.with_headers(h);
        }
        let mut b = BytesMut::with_capacity(delivered.body.len() + 256);
        codec::encode_content(
            &mut b,
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: short(&consumer),
                delivery_tag: tag,
                redelivered: send.redelivered,
                exchange: short(&delivered.exchange),
                routing_key: short(&delivered.routing_key),
            })),
            delivered.properties,
            &delivered.body,
            frame_max,
        );
        self.send(b);
        Ok(())
    }

    pub(super) async fn cleanup(&mut self) {
        let chans: Vec<u16> = self.channels.keys().copied().collect();
        for ch in chans {
            self.close_channel_resources(ch, false);
        }
        self.channels.clear();
        for q in std::mem::take(&mut self.exclusive_queues) {
            let _ = self.delete_queue(&q).await;
        }
    }
}

/// Forwards a consumer's deliveries to its connection until stopped;
/// returns the consumer so that its unsettled deliveries stay its own.
pub(super) async fn forward_deliveries(
    mut consumer: Consumer,
    mut stop: oneshot::Receiver<()>,
    events: mpsc::UnboundedSender<Event>,
    channel: u16,
    gen: u64,
    tag: String,
) -> Consumer {
    let control = consumer.control();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => return consumer,
            d = consumer.recv() => match d {
                Some(delivery) => {
                    let ev = Event::Deliver {
                        channel,
                        gen,
                        consumer: tag.clone(),
                        control: control.clone(),
                        delivery,
                    };
                    if events.send(ev).is_err() {
                        return consumer;
                    }
                }
                None => {
                    let _ = events.send(Event::ConsumerEnded { channel, gen, consumer: tag });
                    return consumer;
                }
            }
        }
    }
}
