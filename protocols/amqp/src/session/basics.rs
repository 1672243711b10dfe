//! basic: qos, consume and cancel, get, publish and its routing, acks
//! and rejects, recover, and tx.

use super::events::forward_deliveries;
use super::*;

impl Conn {
    pub(super) async fn on_basic(
        &mut self,
        ch: u16,
        m: basic::AMQPMethod,
    ) -> Result<(), Exception> {
        use basic::AMQPMethod as M;
        match m {
            M::Qos(q) => {
                // As RabbitMQ (per_consumer_qos): global=false limits each
                // consumer started afterwards, global=true the channel.
                self.chan(ch)?.prefetch.qos(q.prefetch_count, q.global);
                self.send_method(ch, AMQPClass::Basic(M::QosOk(basic::QosOk {})));
                self.release_held(ch)?;
            }
            M::Consume(c) => {
                self.grants.check(AuthAction::Consume, || {
                    format!("queue \'{}\'", c.queue.as_str())
                })?;
                self.consume(ch, c).await?
            }
            M::Cancel(c) => {
                let tag = c.consumer_tag.as_str().to_owned();
                self.cancel(ch, &tag).await;
                if !c.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Basic(M::CancelOk(basic::CancelOk {
                            consumer_tag: c.consumer_tag,
                        })),
                    );
                }
            }
            M::Publish(p) => {
                self.grants.check(AuthAction::Produce, || {
                    format!("exchange \'{}\'", p.exchange.as_str())
                })?;
                self.chan(ch)?.assembler.start(p)?;
            }
            M::Get(g) => {
                self.grants.check(AuthAction::Consume, || {
                    format!("queue \'{}\'", g.queue.as_str())
                })?;
                self.get(ch, g).await?
            }
            M::Ack(a) => self.settle_tags(ch, a.delivery_tag, a.multiple, TxSettle::Ack)?,
            M::Nack(n) => self.settle_tags(
                ch,
                n.delivery_tag,
                n.multiple,
                TxSettle::Reject { requeue: n.requeue },
            )?,
            M::Reject(r) => self.settle_tags(
                ch,
                r.delivery_tag,
                false,
                TxSettle::Reject { requeue: r.requeue },
            )?,
            M::Recover(_) | M::RecoverAsync(_) => {
                let all = self.chan(ch)?.tags.drain();
                settle(all, Settle::Requeue);
                self.send_method(ch, AMQPClass::Basic(M::RecoverOk(basic::RecoverOk {})));
                self.release_held(ch)?;
            }
            other => {
                return Err(Exception::new(
                    error::COMMAND_INVALID,
                    format!("{other:?} is a server method"),
                ))
            }
        }
        Ok(())
    }

    pub(super) fn settle_tags(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        how: TxSettle,
    ) -> Result<(), Exception> {
        let chan = self.chan(ch)?;
        let settled = chan.tags.settle_tagged(tag, multiple)?;
        let Some((how, settled)) = chan.modes.settle((how, settled)) else {
            return Ok(());
        };
        self.apply_settle(how, settled.into_iter().map(|(_, u)| u).collect());
        self.release_held(ch)
    }

    /// Sends held deliveries while the channel is under its channel-wide
    /// limit.
    pub(super) fn release_held(&mut self, ch: u16) -> Result<(), Exception> {
        loop {
            let Some(c) = self.channels.get_mut(&ch) else {
                return Ok(());
            };
            if c.at_global_limit() {
                return Ok(());
            }
            let Some(h) = c.held.pop_front() else {
                return Ok(());
            };
            self.deliver_now(ch, h)?;
        }
    }

    pub(super) fn apply_settle(&mut self, how: TxSettle, settled: Vec<Unacked>) {
        match how {
            TxSettle::Ack => settle(settled, Settle::Ack),
            TxSettle::Reject { requeue } => self.reject(settled, requeue),
        }
    }

    pub(super) fn reject(&mut self, settled: Vec<Unacked>, requeue: bool) {
        if requeue {
            settle(settled, Settle::Requeue);
            return;
        }
        // Without a dead-letter exchange a rejected message is dropped;
        // with one it is acknowledged once republished there.
        for u in settled {
            if u.credit {
                u.control.flow(1);
            }
            match (u.message, self.ctx.known_def(&self.ns, &u.queue)) {
                (Some(m), Some(def)) => {
                    self.spawn_dead_letter(def, m, Reason::Rejected, u.control, u.offset);
                }
                _ => u.control.ack(vec![u.offset]),
            }
        }
    }

    pub(super) fn spawn_dead_letter(
        &self,
        def: Arc<QueueDef>,
        message: Message,
        reason: Reason,
        control: ConsumerControl,
        offset: u64,
    ) {
        let ctx = Arc::clone(&self.ctx);
        let ns = self.ns.clone();
        tokio::spawn(async move {
            match ctx.dead_letter(&ns, &def, &message, reason).await {
                Ok(()) => control.ack(vec![offset]),
                Err(e) => {
                    // Not republished: it stays in its queue.
                    debug!(queue = %def.name, "dead-lettering failed: {e}");
                    control.nack(vec![offset], Duration::from_secs(1));
                }
            }
        });
    }

    pub(super) async fn consume(&mut self, ch: u16, c: basic::Consume) -> Result<(), Exception> {
        if c.queue.as_str() == REPLY_TO {
            return self.consume_replies(ch, c);
        }
        // A stream consumer's `next` or `last` counts the channel's
        // earlier publishes as there.
        self.publishes_settled(ch).await?;
        let (name, def) = self.require_queue(ch, c.queue.as_str()).await?;
        let tag = {
            let chan = self.chan(ch)?;
            let n = if c.consumer_tag.as_str().is_empty() {
                chan.next_ctag += 1;
                chan.next_ctag
            } else {
                0
            };
            consumers::tag(c.consumer_tag.as_str(), n, &random_suffix(), |t| {
                chan.consumers.contains_key(t)
            })?
        };
        {
            let mut reg = self.ctx.registry();
            let info = reg
                .queues
                .get_mut(&(self.ns.clone(), name.clone()))
                .ok_or_else(|| self.not_found(&name))?;
            if !info.uses.admit(c.exclusive) {
                return Err(Exception::new(
                    error::ACCESS_REFUSED,
                    format!("queue '{name}' in vhost '{}' in exclusive use", self.vhost),
                ));
            }
        }
        let stream = def.args.queue_type == QueueType::Stream;
        let sub = if stream {
            self.stream_subscription(ch, &def, &tag, &c.arguments).await
        } else {
            self.queue_subscription(&def).await
        };
        let sub = match sub {
            Ok(s) => s,
            Err(e) => {
                self.release_consumer(&name, ch, &tag);
                return Err(e);
            }
        };
        let consumer = match sub
            .add_consumer(ConsumerOptions {
                name: tag.clone(),
                priority: consumers::priority(&c.arguments),
                ack_timeout: None,
            })
            .await
        {
            Ok(c) => c,
            Err(e) => {
                self.release_consumer(&name, ch, &tag);
                return Err(exception_of(&e));
            }
        };
        let chan = self.chan(ch)?;
        let (credit, limited) = consumers::credit(chan.prefetch.consumer_credit(), c.no_ack);
        let control = consumer.control();
        // With a single active consumer, later ones wait without credit.
        let active = !def.args.single_active_consumer || {
            let mut reg = self.ctx.registry();
            match reg.queues.get_mut(&(self.ns.clone(), name.clone())) {
                Some(info) => info
                    .sac
                    .join((self.id, ch, tag.clone()), (control.clone(), credit))
                    .is_some(),
                None => true,
            }
        };
        if active {
            control.flow(credit);
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let gen = self.chan(ch)?.gen;
        let task = tokio::spawn(forward_deliveries(
            consumer,
            stop_rx,
            self.events_tx.clone(),
            ch,
            gen,
            tag.clone(),
        ));
        if !c.nowait {
            self.send_method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: short(&tag),
                })),
            );
        }
        self.chan(ch)?.consumers.insert(
            tag,
            ConsumerEntry {
                queue: name,
                def,
                no_ack: c.no_ack,
                limited,
                stop: Some(stop_tx),
                task,
            },
        );
        Ok(())
    }

    pub(super) fn stream_subscription_name(&self, ch: u16, tag: &str) -> String {
        format!("amqp-stream-{}-{ch}-{tag}", self.id)
    }

    /// A stream queue is read, not consumed: each consumer gets its own
    /// non-durable cursor from `x-stream-offset` (first, last, next, an
    /// offset, or a timestamp in seconds), and acknowledgements only
    /// return credit.
    pub(super) async fn stream_subscription(
        &mut self,
        ch: u16,
        def: &QueueDef,
        tag: &str,
        args: &FieldTable,
    ) -> Result<magnetar_broker::subscription::Subscription, Exception> {
        if self.chan(ch)?.prefetch.per_consumer == 0 {
            return Err(Exception::new(
                error::PRECONDITION_FAILED,
                "consumer prefetch count is not set for stream queue",
            ));
        }
        let topic = self.queue_topic(def)?;
        let t = self
            .ctx
            .broker
            .topic(&topic, true)
            .await
            .map_err(Exception::from)?;
        let (start, end) = (t.log().start_offset(), t.log().end_offset());
        let at = match consumers::stream_start(args.inner().get("x-stream-offset"), start, end)? {
            StreamStart::Offset(at) => at,
            StreamStart::Timestamp(ms) => {
                t.offset_for_timestamp(ms).await.map_err(Exception::from)?
            }
        };
        let name = self.stream_subscription_name(ch, tag);
        let sub = t
            .get_or_create_subscription(
                &name,
                SubscriptionOptions {
                    sub_type: SubscriptionType::Exclusive,
                    initial_position: InitialPosition::Earliest,
                    durable: false,
                    ..SubscriptionOptions::default()
                },
            )
            .await
            .map_err(Exception::from)?;
        sub.reset(magnetar_broker::ResetTo::Offset(at))
            .await
            .map_err(Exception::from)?;
        Ok(sub)
    }

    /// Removes a stream consumer's cursor once the consumer is gone.
    pub(super) fn drop_stream_subscription(&self, ch: u16, def: &QueueDef, tag: &str) {
        if def.args.queue_type != QueueType::Stream {
            return;
        }
        let name = self.stream_subscription_name(ch, tag);
        let Ok(topic) = self.queue_topic(def) else {
            return;
        };
        let broker = self.ctx.broker.clone();
        tokio::spawn(async move {
            if let Ok(t) = broker.topic(&topic, false).await {
                let _ = t.unsubscribe(&name, true).await;
            }
        });
    }

    /// Direct reply-to: a no-ack consumer of the pseudo-queue, fed by
    /// publishes to `amq.rabbitmq.reply-to.<token>` without any queue.
    pub(super) fn consume_replies(&mut self, ch: u16, c: basic::Consume) -> Result<(), Exception> {
        if !c.no_ack {
            return Err(Exception::new(
                error::PRECONDITION_FAILED,
                "reply consumer cannot acknowledge",
            ));
        }
        let events = self.events_tx.clone();
        let conn = self.id;
        let chan = self.chan(ch)?;
        if chan.reply_to.is_some() {
            return Err(Exception::new(
                error::PRECONDITION_FAILED,
                "reply consumer already set",
            ));
        }
        let tag = if c.consumer_tag.as_str().is_empty() {
            format!("amq.ctag-{}", random_suffix())
        } else {
            c.consumer_tag.as_str().to_owned()
        };
        let token = format!("{conn}.{ch}.{}", random_suffix());
        chan.reply_to = Some((tag.clone(), token.clone()));
        let target = ReplyTarget {
            events,
            channel: ch,
            gen: chan.gen,
            consumer: tag.clone(),
        };
        self.ctx.registry().replies.insert(token, target);
        if !c.nowait {
            self.send_method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: short(&tag),
                })),
            );
        }
        Ok(())
    }

    pub(super) async fn cancel(&mut self, ch: u16, tag: &str) {
        let Some(c) = self.channels.get_mut(&ch) else {
            return;
        };
        if c.reply_to.as_ref().is_some_and(|(t, _)| t == tag) {
            if let Some((_, token)) = c.reply_to.take() {
                self.ctx.registry().replies.remove(&token);
            }
            return;
        }
        let Some(mut e) = c.consumers.remove(tag) else {
            return;
        };
        let (mine, others): (VecDeque<Held>, VecDeque<Held>) =
            c.held.drain(..).partition(|h| h.consumer == tag);
        c.held = others;
        for h in mine {
            h.control.nack(vec![h.delivery.offset], Duration::ZERO);
        }
        if let Some(stop) = e.stop.take() {
            let _ = stop.send(());
        }
        if let Ok(mut consumer) = e.task.await {
            // Credited but not yet sent: back to the queue.
            let mut back = Vec::new();
            while let Some(d) = consumer.try_recv() {
                back.push(d.offset);
            }
            if !back.is_empty() {
                consumer.nack(back, Duration::ZERO);
            }
            let c = self.channels.get_mut(&ch);
            if let Some(c) = c {
                let id = consumer.id();
                let holds = {
                    let mut any = false;
                    c.tags.retain(|_, u| {
                        any |= u.control.id() == id;
                        true
                    });
                    any
                };
                if holds {
                    c.retired.push(consumer);
                }
            }
        }
        self.drop_stream_subscription(ch, &e.def, tag);
        self.release_consumer(&e.queue, ch, tag);
    }

    pub(super) async fn get(&mut self, ch: u16, g: basic::Get) -> Result<(), Exception> {
        self.publishes_settled(ch).await?;
        let (name, def) = self.require_queue(ch, g.queue.as_str()).await?;
        if def.args.queue_type == QueueType::Stream {
            return Err(Exception::new(
                error::PRECONDITION_FAILED,
                "basic.get is not supported by stream queues",
            ));
        }
        if !self.chan(ch)?.getters.contains_key(&name) {
            let sub = self.queue_subscription(&def).await?;
            let consumer = sub
                .add_consumer(ConsumerOptions {
                    name: format!("basic.get-{}-{ch}", self.id),
                    ..Default::default()
                })
                .await
                .map_err(Exception::from)?;
            self.chan(ch)?.getters.insert(name.clone(), consumer);
        }
        let got = loop {
            let Some(consumer) = self.chan(ch)?.getters.get_mut(&name) else {
                return Ok(());
            };
            let got = match consumer.get_one().await {
                Ok(true) => consumer.try_recv().map(|d| (d, consumer.control())),
                Ok(false) => None,
                Err(e) => {
                    self.chan(ch)?.getters.remove(&name);
                    return Err(exception_of(&e));
                }
            };
            // Expired or past the delivery limit: dead-lettered, not given.
            let Some((d, control)) = got else {
                break None;
            };
            let over_limit = def
                .args
                .delivery_limit
                .is_some_and(|l| u64::from(d.redelivery_count) > l);
            let expired = channels::expired(&d.message, def.args.message_ttl_ms, now_ms());
            if !over_limit && !expired {
                break Some((d, control));
            }
            let reason = if expired {
                Reason::Expired
            } else {
                Reason::DeliveryLimit
            };
            self.spawn_dead_letter(Arc::clone(&def), d.message, reason, control, d.offset);
        };
        let Some((d, control)) = got else {
            self.send_method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
            return Ok(());
        };
        let (remaining, _) = self.queue_counts(&def).await;
        let delivered = props::from_record(&d.message, &name);
        let chan = self.chan(ch)?;
        let tag = if g.no_ack {
            control.ack(vec![d.offset]);
            chan.tags.issue(None)
        } else {
            chan.tags.issue(Some(Unacked {
                control,
                offset: d.offset,
                credit: false,
                queue: name.clone(),
                message: def
                    .args
                    .dead_letter_exchange
                    .is_some()
                    .then(|| d.message.clone()),
            }))
        };
        let mut b = BytesMut::with_capacity(delivered.body.len() + 256);
        codec::encode_content(
            &mut b,
            ch,
            AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag: tag,
                redelivered: d.redelivery_count > 0,
                exchange: short(&delivered.exchange),
                routing_key: short(&delivered.routing_key),
                message_count: remaining,
            })),
            delivered.properties,
            &delivered.body,
            self.frame_max,
        );
        self.send(b);
        Ok(())
    }

    pub(super) async fn publish(&mut self, ch: u16, p: Publish) -> Result<(), Exception> {
        self.publisher = true;
        if self.producer.is_none() {
            self.producer = Some(self.ctx.broker.metrics().producer(&self.ns));
        }
        let arrived = std::time::Instant::now();
        let Publishing::Store { publish: p, seq } = self.chan(ch)?.modes.publish(p) else {
            return Ok(());
        };
        let stored = self.route_and_store(ch, p).await?;
        let chan = self.chan(ch)?;
        let pipeline = chan.pipeline.clone();
        chan.published += 1;
        // A full pipeline holds this connection's reads: backpressure.
        let _ = pipeline.send((seq, stored, arrived)).await;
        Ok(())
    }

    /// Routes a message and queues it for every queue it reaches; returns
    /// the wait for all of them to be durable.
    pub(super) async fn route_and_store(
        &mut self,
        ch: u16,
        mut p: Publish,
    ) -> Result<Pending, Exception> {
        if p.message
            .properties
            .reply_to()
            .as_ref()
            .is_some_and(|r| r.as_str() == REPLY_TO)
        {
            let Some((_, token)) = self.chan(ch)?.reply_to.clone() else {
                return Err(Exception::new(
                    error::PRECONDITION_FAILED,
                    "fast reply consumer does not exist",
                ));
            };
            let props = p.message.properties.clone();
            p.message.properties = props.with_reply_to(short(&format!("{REPLY_TO}.{token}")));
        }
        if p.message.exchange.is_empty() {
            if let Some(token) = p.message.routing_key.strip_prefix(&format!("{REPLY_TO}.")) {
                return self.publish_reply(ch, token.to_owned(), p).await;
            }
        }
        let msg = &p.message;
        if let Some(Err(e)) = props::expiration_ms(&msg.properties) {
            return Err(Exception::new(error::PRECONDITION_FAILED, e));
        }
        let routes = self.route(msg).await?;
        let record = props::to_record(msg);
        let mut pending: Vec<Pending> = Vec::with_capacity(routes.len());
        let expires = msg.properties.expiration().is_some();
        let mut rejected = false;
        let mut record = record;
        let last = routes.len().saturating_sub(1);
        for (i, (q, topic)) in routes.iter().enumerate() {
            // The last queue takes the record itself; only fan-out copies.
            let own = |r: &mut Message| {
                if i == last {
                    std::mem::take(r)
                } else {
                    r.clone()
                }
            };
            let def = match self.ctx.known_def(&self.ns, q) {
                Some(d) => Some(d),
                None => self.lookup_queue(q).await.ok().flatten(),
            };
            let Some(def) = def else {
                pending.push(self.submit(topic, own(&mut record)));
                continue;
            };
            if expires {
                self.ctx.ensure_sweeper(&self.ns, &def);
            }
            if def.args.max_length.is_none() && def.args.max_length_bytes.is_none() {
                pending.push(self.submit(topic, own(&mut record)));
                continue;
            }
            match def.args.overflow {
                Overflow::RejectPublish | Overflow::RejectPublishDlx => {
                    if self.is_full(&def).await {
                        rejected = true;
                        if def.args.overflow == Overflow::RejectPublishDlx {
                            let ctx = Arc::clone(&self.ctx);
                            let ns = self.ns.clone();
                            let record = record.clone();
                            tokio::spawn(async move {
                                let _ = ctx.dead_letter(&ns, &def, &record, Reason::MaxLen).await;
                            });
                        }
                        continue;
                    }
                    pending.push(self.submit(topic, own(&mut record)));
                }
                Overflow::DropHead => {
                    let stored = self.submit(topic, own(&mut record));
                    let sub = self.queue_subscription(&def).await?;
                    let ctx = Arc::clone(&self.ctx);
                    let ns = self.ns.clone();
                    pending.push(
                        async move {
                            stored.await?;
                            ctx.drop_head(&ns, &def, &sub).await
                        }
                        .boxed(),
                    );
                }
            }
        }
        if rejected {
            pending.push(
                async {
                    Err(BrokerError::QuotaExceeded(
                        "queue is at its max-length".into(),
                    ))
                }
                .boxed(),
            );
        }
        if routes.is_empty() && p.mandatory {
            let mut b = BytesMut::with_capacity(msg.body.len() + 256);
            codec::encode_content(
                &mut b,
                ch,
                AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: error::NO_ROUTE,
                    reply_text: short("NO_ROUTE"),
                    exchange: short(&msg.exchange),
                    routing_key: short(&msg.routing_key),
                })),
                msg.properties.clone(),
                &msg.body,
                self.frame_max,
            );
            self.send(b);
        }
        if pending.len() == 1 {
            if let Some(one) = pending.pop() {
                return Ok(one);
            }
        }
        Ok(async move {
            for r in futures::future::join_all(pending).await {
                r?;
            }
            Ok(())
        }
        .boxed())
    }

    /// The queues a message reaches. Routes of messages without headers
    /// (which only a headers exchange would look at) are cached until the
    /// broker's routing changes.
    pub(super) async fn route(&mut self, msg: &props::Published) -> Result<Routes, Exception> {
        let cacheable = msg.properties.headers().is_none();
        let generation = self.ctx.broker.routing_generation();
        if cacheable {
            if generation != self.route_generation {
                self.route_cache.clear();
                self.route_generation = generation;
            }
            let key = (msg.exchange.clone(), msg.routing_key.clone());
            if let Some(r) = self.route_cache.get(&key) {
                return Ok(Arc::clone(r));
            }
        }
        let headers = msg
            .properties
            .headers()
            .as_ref()
            .map(props::header_values)
            .unwrap_or_default();
        let routes = Arc::new(
            self.ctx
                .broker
                .route(&self.ns, &msg.exchange, &msg.routing_key, &headers)
                .await
                .map_err(|e| self.vhost_text(e))?,
        );
        if cacheable && generation == self.route_generation {
            if self.route_cache.len() >= 4096 {
                self.route_cache.clear();
            }
            self.route_cache.insert(
                (msg.exchange.clone(), msg.routing_key.clone()),
                Arc::clone(&routes),
            );
        }
        Ok(routes)
    }

    /// A reply goes straight to the channel that waits for it; it is not
    /// stored, as in RabbitMQ, so it is confirmed at once.
    pub(super) async fn publish_reply(
        &mut self,
        ch: u16,
        token: String,
        p: Publish,
    ) -> Result<Pending, Exception> {
        let target = self.ctx.registry().replies.get(&token).cloned();
        let delivered = match target {
            Some(t) => t
                .events
                .send(Event::Reply {
                    channel: t.channel,
                    gen: t.gen,
                    consumer: t.consumer,
                    message: Box::new(p.message.clone()),
                })
                .is_ok(),
            None => false,
        };
        if !delivered && p.mandatory {
            let mut b = BytesMut::with_capacity(p.message.body.len() + 256);
            codec::encode_content(
                &mut b,
                ch,
                AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: error::NO_ROUTE,
                    reply_text: short("NO_ROUTE"),
                    exchange: short(""),
                    routing_key: short(&p.message.routing_key),
                })),
                p.message.properties.clone(),
                &p.message.body,
                self.frame_max,
            );
            self.send(b);
        }
        Ok(async { Ok(()) }.boxed())
    }

    /// Queues a message for a queue's topic, in order, and returns the
    /// wait for its durability.
    pub(super) fn submit(&self, topic: &TopicName, record: Message) -> Pending {
        let stored = self.ctx.publisher(topic).publish(record);
        async move { stored.await.map(drop) }.boxed()
    }

    /// Transactions as RabbitMQ has them: publishes and acknowledgements
    /// of a channel in tx mode wait for commit, which returns once the
    /// publishes are durable; rollback drops the publishes and leaves the
    /// acknowledged deliveries unacknowledged.
    pub(super) async fn on_tx(&mut self, ch: u16, m: tx::AMQPMethod) -> Result<(), Exception> {
        use tx::AMQPMethod as M;
        let reply = match m {
            M::Select(_) => {
                self.chan(ch)?.modes.select_tx()?;
                M::SelectOk(tx::SelectOk {})
            }
            M::Commit(_) => {
                let buffer = self.chan(ch)?.modes.commit()?;
                let mut stored = Vec::with_capacity(buffer.publishes.len());
                for p in buffer.publishes {
                    stored.push(self.route_and_store(ch, p).await?);
                }
                for r in futures::future::join_all(stored).await {
                    r.map_err(|e| exception_of(&e))?;
                }
                for (how, settled) in buffer.settles {
                    self.apply_settle(how, settled.into_iter().map(|(_, u)| u).collect());
                }
                self.release_held(ch)?;
                M::CommitOk(tx::CommitOk {})
            }
            M::Rollback(_) => {
                let chan = self.chan(ch)?;
                for (_, settled) in chan.modes.rollback()? {
                    for (tag, u) in settled {
                        chan.tags.restore(tag, u);
                    }
                }
                M::RollbackOk(tx::RollbackOk {})
            }
            other => {
                return Err(Exception::new(
                    error::COMMAND_INVALID,
                    format!("{other:?} is a server method"),
                ))
            }
        };
        self.send_method(ch, AMQPClass::Tx(reply));
        Ok(())
    }
}
