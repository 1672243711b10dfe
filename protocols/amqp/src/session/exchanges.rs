//! exchange.declare, delete, bind and unbind.

use super::*;

impl Conn {
    pub(super) async fn on_exchange(
        &mut self,
        ch: u16,
        m: exchange::AMQPMethod,
    ) -> Result<(), Exception> {
        use exchange::AMQPMethod as M;
        let b = self.ctx.broker.clone();
        // Changing the vhost's exchanges is configuring it (RabbitMQ's
        // configure permission): the namespace admin's.
        let configured = match &m {
            M::Delete(d) => Some(&d.exchange),
            M::Bind(x) => Some(&x.destination),
            M::Unbind(x) => Some(&x.destination),
            _ => None,
        };
        if let Some(x) = configured {
            self.grants.check(AuthAction::Admin, || {
                format!("exchange '{}' in vhost '{}'", x.as_str(), self.vhost)
            })?;
        }
        match m {
            M::Declare(d) => {
                let name = d.exchange.as_str();
                let kind = channels::exchange_kind(name, d.kind.as_str(), d.passive, &self.vhost)?;
                // Declaring an exchange is configuring the vhost (RabbitMQ's
                // configure permission): the namespace admin's, though any
                // role may declare one that exists, as applications do at
                // start; the declare then checks it is equivalent.
                if !d.passive && !self.grants.admin {
                    let exists = b
                        .declare_exchange(&self.ns, ExchangeDef::new(name, kind), true)
                        .await;
                    if exists.is_err() {
                        self.grants.check(AuthAction::Admin, || {
                            format!("exchange '{name}' in vhost '{}'", self.vhost)
                        })?;
                    }
                }
                let mut def = ExchangeDef::new(name, kind);
                def.durable = d.durable;
                def.auto_delete = d.auto_delete;
                def.internal = d.internal;
                for (k, v) in &d.arguments {
                    let text = String::from_utf8_lossy(&props::value_text(v)).into_owned();
                    if k.as_str() == "alternate-exchange" {
                        def.alternate_exchange = Some(text);
                    } else {
                        def.arguments.insert(k.as_str().to_owned(), text);
                    }
                }
                b.declare_exchange(&self.ns, def, d.passive)
                    .await
                    .map_err(|e| self.vhost_text(e))?;
                if !d.nowait {
                    self.send_method(
                        ch,
                        AMQPClass::Exchange(M::DeclareOk(exchange::DeclareOk {})),
                    );
                }
            }
            M::Delete(d) => {
                b.delete_exchange(&self.ns, d.exchange.as_str(), d.if_unused)
                    .await
                    .map_err(|e| self.vhost_text(e))?;
                if !d.nowait {
                    self.send_method(ch, AMQPClass::Exchange(M::DeleteOk(exchange::DeleteOk {})));
                }
            }
            M::Bind(x) => {
                let binding =
                    exchange_binding(&x.source, &x.destination, &x.routing_key, &x.arguments);
                b.bind(&self.ns, binding)
                    .await
                    .map_err(|e| self.vhost_text(e))?;
                if !x.nowait {
                    self.send_method(ch, AMQPClass::Exchange(M::BindOk(exchange::BindOk {})));
                }
            }
            M::Unbind(x) => {
                let binding =
                    exchange_binding(&x.source, &x.destination, &x.routing_key, &x.arguments);
                b.unbind(&self.ns, &binding)
                    .await
                    .map_err(|e| self.vhost_text(e))?;
                if !x.nowait {
                    self.send_method(ch, AMQPClass::Exchange(M::UnbindOk(exchange::UnbindOk {})));
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

    /// A broker error as an exception, its text in RabbitMQ's words.
    pub(super) fn vhost_text(&self, e: BrokerError) -> Exception {
        let mut ex = exception_of(&e);
        ex.text = ex
            .text
            .replace("in namespace", &format!("in vhost '{}'", self.vhost));
        ex
    }
}

/// exchange.bind and exchange.unbind name the same binding.
fn exchange_binding(
    source: &ShortString,
    destination: &ShortString,
    key: &ShortString,
    args: &FieldTable,
) -> Binding {
    Binding::exchange(source.as_str(), destination.as_str(), key.as_str())
        .with_arguments(props::header_values(args))
}
