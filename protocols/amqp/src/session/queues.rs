//! queue.declare, bind, unbind, purge and delete, and queue lookup with
//! exclusive ownership.

use super::*;

impl Conn {
    /// The queue a method names: "" is the channel's last declared queue.
    pub(super) fn queue_name(&mut self, ch: u16, name: &str) -> Result<String, Exception> {
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
        channels::queue_name(name, &self.chan(ch)?.last_queue)
    }

    pub(super) fn not_found(&self, queue: &str) -> Exception {
        Exception::new(
            error::NOT_FOUND,
            format!("no queue '{queue}' in vhost '{}'", self.vhost),
        )
    }

    pub(super) fn locked(&self, queue: &str) -> Exception {
        Exception::new(
            error::RESOURCE_LOCKED,
            format!(
                "cannot obtain exclusive access to locked queue '{queue}' in vhost '{}'. \
                 It could be originally declared on another connection or the exclusive \
                 property value does not match that of the original declaration.",
                self.vhost
            ),
        )
    }

    /// The queue's definition, if it exists, checking exclusive ownership.
    pub(super) async fn lookup_queue(
        &self,
        name: &str,
    ) -> Result<Option<Arc<QueueDef>>, Exception> {
        let key = (self.ns.clone(), name.to_owned());
        self.ctx.deleted(&key).await;
        {
            let mut reg = self.ctx.registry();
            if let Some(info) = reg.queues.get_mut(&key) {
                if info.owner.is_some_and(|o| o != self.id) {
                    return Err(self.locked(name));
                }
                info.last_used = Instant::now();
                return Ok(Some(Arc::clone(&info.def)));
            }
        }
        let b = &self.ctx.broker;
        if !b
            .queue_exists(&self.ns, name)
            .await
            .map_err(Exception::from)?
        {
            return Ok(None);
        }
        let def = match qdef::load(&self.ctx.store, &self.ns, name)
            .await
            .map_err(Exception::from)?
        {
            Some(d) => d,
            None => {
                let transient = b
                    .queue_is_transient(&self.ns, name)
                    .await
                    .map_err(Exception::from)?;
                QueueDef::implicit(name, !transient)
            }
        };
        let def = {
            let mut reg = self.ctx.registry();
            let info = reg.queues.entry(key).or_insert(QueueInfo {
                def: Arc::new(def),
                owner: None,
                uses: Default::default(),
                sac: Default::default(),
                last_used: Instant::now(),
                deleting: None,
            });
            Arc::clone(&info.def)
        };
        if def.args.message_ttl_ms.is_some() {
            self.ctx.ensure_sweeper(&self.ns, &def);
        }
        if def.args.expires_ms.is_some() {
            self.ctx.ensure_expirer(&self.ns, &def);
        }
        Ok(Some(def))
    }

    pub(super) async fn require_queue(
        &mut self,
        ch: u16,
        name: &str,
    ) -> Result<(String, Arc<QueueDef>), Exception> {
        let name = self.queue_name(ch, name)?;
        match self.lookup_queue(&name).await? {
            Some(def) => Ok((name, def)),
            None => Err(self.not_found(&name)),
        }
    }

    pub(super) fn queue_topic(&self, def: &QueueDef) -> Result<TopicName, Exception> {
        self.ctx
            .broker
            .queue_topic(&self.ns, &def.name, def.durable)
            .map_err(Exception::from)
    }

    /// The queue's shared subscription, started if need be.
    pub(super) async fn queue_subscription(
        &self,
        def: &QueueDef,
    ) -> Result<magnetar_broker::subscription::Subscription, Exception> {
        let topic = self.queue_topic(def)?;
        let t = self
            .ctx
            .broker
            .topic(&topic, true)
            .await
            .map_err(Exception::from)?;
        t.get_or_create_subscription(
            QUEUE_SUBSCRIPTION,
            SubscriptionOptions {
                sub_type: SubscriptionType::Shared,
                initial_position: InitialPosition::Earliest,
                durable: def.durable,
                dead_letter: None,
                priority: def.args.max_priority.map(|max| MessagePriority {
                    header: props::H_PRIORITY.into(),
                    max,
                }),
            },
        )
        .await
        .map_err(Exception::from)
    }

    /// Whether a queue is at one of its length limits, where
    /// reject-publish refuses more (RabbitMQ: at, not only over).
    pub(super) async fn is_full(&self, def: &QueueDef) -> bool {
        if let Some(max) = def.args.max_length {
            let (ready, _) = self.queue_counts(def).await;
            if u64::from(ready) >= max {
                return true;
            }
        }
        if let Some(max) = def.args.max_length_bytes {
            if let Ok(sub) = self.queue_subscription(def).await {
                if sub.ready_bytes().await.is_ok_and(|b| b >= max) {
                    return true;
                }
            }
        }
        false
    }

    /// Ready messages and consumers of a queue, for declare-ok and get-ok.
    pub(super) async fn queue_counts(&self, def: &QueueDef) -> (u32, u32) {
        let consumers = {
            let reg = self.ctx.registry();
            reg.queues
                .get(&(self.ns.clone(), def.name.clone()))
                .map_or(0, |i| i.uses.consumers)
        };
        if def.args.queue_type == QueueType::Stream {
            return (0, consumers);
        }
        let ready = match self.queue_subscription(def).await {
            Ok(s) => s
                .stats()
                .await
                .map(|st| st.msg_backlog.saturating_sub(st.unacked_messages))
                .unwrap_or(0),
            Err(_) => 0,
        };
        (u32::try_from(ready).unwrap_or(u32::MAX), consumers)
    }

    pub(super) async fn on_queue(
        &mut self,
        ch: u16,
        m: queue::AMQPMethod,
    ) -> Result<(), Exception> {
        // Counts, purges and deletes see the channel's earlier publishes.
        self.publishes_settled(ch).await?;
        use queue::AMQPMethod as M;
        // A binding decides what a queue receives, and purging consumes
        // it all: its readers' (RabbitMQ's read permission).
        let read = match &m {
            M::Bind(x) => Some(&x.queue),
            M::Unbind(x) => Some(&x.queue),
            M::Purge(p) => Some(&p.queue),
            _ => None,
        };
        if let Some(q) = read {
            self.grants.check(AuthAction::Consume, || {
                format!("queue '{}' in vhost '{}'", q.as_str(), self.vhost)
            })?;
        }
        match m {
            M::Declare(d) => {
                let (name, msgs, consumers) = self.queue_declare(&d).await?;
                self.chan(ch)?.last_queue = name.clone();
                if !d.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Queue(M::DeclareOk(queue::DeclareOk {
                            queue: short(&name),
                            message_count: msgs,
                            consumer_count: consumers,
                        })),
                    );
                }
            }
            M::Bind(x) => {
                let (name, _) = self.require_queue(ch, x.queue.as_str()).await?;
                let key = if x.routing_key.as_str().is_empty() && x.queue.as_str().is_empty() {
                    name.clone()
                } else {
                    x.routing_key.as_str().to_owned()
                };
                let binding = Binding::queue(x.exchange.as_str(), name, key)
                    .with_arguments(props::header_values(&x.arguments));
                self.ctx
                    .broker
                    .bind(&self.ns, binding)
                    .await
                    .map_err(|e| self.vhost_text(e))?;
                if !x.nowait {
                    self.send_method(ch, AMQPClass::Queue(M::BindOk(queue::BindOk {})));
                }
            }
            M::Unbind(x) => {
                let (name, _) = self.require_queue(ch, x.queue.as_str()).await?;
                let binding = Binding::queue(x.exchange.as_str(), name, x.routing_key.as_str())
                    .with_arguments(props::header_values(&x.arguments));
                self.ctx
                    .broker
                    .unbind(&self.ns, &binding)
                    .await
                    .map_err(|e| self.vhost_text(e))?;
                self.send_method(ch, AMQPClass::Queue(M::UnbindOk(queue::UnbindOk {})));
            }
            M::Purge(p) => {
                let (_, def) = self.require_queue(ch, p.queue.as_str()).await?;
                let (ready, _) = self.queue_counts(&def).await;
                let sub = self.queue_subscription(&def).await?;
                // Everything not delivered goes; delivered messages stay
                // with their consumers, as in RabbitMQ.
                sub.reset(magnetar_broker::ResetTo::End)
                    .await
                    .map_err(Exception::from)?;
                if !p.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Queue(M::PurgeOk(queue::PurgeOk {
                            message_count: ready,
                        })),
                    );
                }
            }
            M::Delete(d) => {
                let name = self.queue_name(ch, d.queue.as_str())?;
                // Deleting a queue deletes its topic, which may be another
                // application's (a queue named `orders-partition-0` is a
                // Kafka partition): the namespace admin's, but for the
                // connection's own exclusive queues.
                if !self.exclusive_queues.contains(&name) {
                    self.grants.check(AuthAction::Admin, || {
                        format!("queue '{name}' in vhost '{}'", self.vhost)
                    })?;
                }
                let count = match self.lookup_queue(&name).await? {
                    None => 0,
                    Some(def) => {
                        let (ready, consumers) = self.queue_counts(&def).await;
                        if d.if_unused && consumers > 0 {
                            return Err(Exception::new(
                                error::PRECONDITION_FAILED,
                                format!("queue '{name}' in vhost '{}' in use", self.vhost),
                            ));
                        }
                        if d.if_empty && ready > 0 {
                            return Err(Exception::new(
                                error::PRECONDITION_FAILED,
                                format!("queue '{name}' in vhost '{}' is not empty", self.vhost),
                            ));
                        }
                        self.delete_queue(&name).await?;
                        ready
                    }
                };
                if !d.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Queue(M::DeleteOk(queue::DeleteOk {
                            message_count: count,
                        })),
                    );
                }
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

    pub(super) async fn queue_declare(
        &mut self,
        d: &queue::Declare,
    ) -> Result<(String, u32, u32), Exception> {
        let mut name = d.queue.as_str().to_owned();
        if name.is_empty() {
            if d.passive {
                return Err(self.not_found(""));
            }
            name = format!("amq.gen-{}", random_suffix());
        } else if name.starts_with("amq.") && !d.passive {
            return Err(Exception::new(
                error::ACCESS_REFUSED,
                format!("queue name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        let wanted = QueueDef::new(
            &name,
            d.durable,
            d.exclusive,
            d.auto_delete,
            d.arguments.clone(),
        )?;
        if let Some(existing) = self.lookup_queue(&name).await? {
            if !d.passive {
                existing.check_equivalent(&wanted, &self.vhost)?;
            }
            let (msgs, consumers) = self.queue_counts(&existing).await;
            return Ok((name, msgs, consumers));
        }
        if d.passive {
            return Err(self.not_found(&name));
        }
        self.ctx
            .broker
            .declare_queue(&self.ns, &name, d.durable)
            .await
            .map_err(|e| self.vhost_text(e))?;
        if d.durable && !d.exclusive {
            qdef::save(&self.ctx.store, &self.ns, &wanted)
                .await
                .map_err(Exception::from)?;
        }
        {
            let mut reg = self.ctx.registry();
            reg.queues.insert(
                (self.ns.clone(), name.clone()),
                QueueInfo {
                    def: Arc::new(wanted.clone()),
                    owner: d.exclusive.then_some(self.id),
                    uses: Default::default(),
                    sac: Default::default(),
                    last_used: Instant::now(),
                    deleting: None,
                },
            );
        }
        if d.exclusive {
            self.exclusive_queues.push(name.clone());
        }
        // The subscription exists from the declare on, so that what is
        // published before the first consumer waits for it. A stream keeps
        // its messages by retention, not by a subscription.
        if wanted.args.queue_type != QueueType::Stream {
            self.queue_subscription(&wanted).await?;
        }
        if wanted.args.message_ttl_ms.is_some() {
            self.ctx.ensure_sweeper(&self.ns, &wanted);
        }
        if wanted.args.expires_ms.is_some() {
            self.ctx.ensure_expirer(&self.ns, &wanted);
        }
        Ok((name, 0, 0))
    }

    pub(super) async fn delete_queue(&mut self, name: &str) -> Result<(), Exception> {
        // A background deletion under way (an auto-delete queue that lost
        // its last consumer) finishes the job.
        let key = (self.ns.clone(), name.to_owned());
        let underway = self
            .ctx
            .registry()
            .queues
            .get(&key)
            .is_some_and(|i| i.deleting.is_some());
        if underway {
            self.ctx.deleted(&key).await;
            self.exclusive_queues.retain(|q| q != name);
            return Ok(());
        }
        self.ctx
            .broker
            .delete_queue(&self.ns, name)
            .await
            .map_err(Exception::from)?;
        qdef::remove(&self.ctx.store, &self.ns, name)
            .await
            .map_err(Exception::from)?;
        self.ctx
            .registry()
            .queues
            .remove(&(self.ns.clone(), name.to_owned()));
        self.exclusive_queues.retain(|q| q != name);
        Ok(())
    }

    /// One consumer of `queue` went away; an auto-delete queue left
    /// without consumers is deleted.
    pub(super) fn release_consumer(&mut self, queue: &str, ch: u16, tag: &str) {
        let key = (self.ns.clone(), queue.to_owned());
        let me: ConsumerId = (self.id, ch, tag.to_owned());
        let doomed = {
            let mut reg = self.ctx.registry();
            match reg.queues.get_mut(&key) {
                Some(info) => {
                    let none_left = info.uses.leave();
                    info.last_used = Instant::now();
                    // The next in line becomes active and gets its credit.
                    if let Some((control, credit)) = info.sac.leave(&me) {
                        control.flow(credit);
                    }
                    (none_left && info.def.auto_delete && info.deleting.is_none())
                        .then(|| Ctx::mark_deleting(info))
                }
                None => None,
            }
        };
        if let Some(done) = doomed {
            let ctx = Arc::clone(&self.ctx);
            tokio::spawn(async move {
                ctx.delete_marked(&key, done).await;
            });
        }
    }
}
