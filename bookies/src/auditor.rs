//! Re-replication, as BookKeeper's auditor does it.
//!
//! Every bookie runs this task; the one that holds the ephemeral
//! `/bookies/auditor` key does the work. A bookie that was registered once
//! and has been gone longer than the grace period is lost: for every closed
//! ledger with a segment on it, the entries it held are read from the other
//! replicas and written to a replacement, and then the segment's ensemble is
//! updated, so that each entry has Qw live copies again. Open ledgers are
//! left to their writer's ensemble change or to recovery.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use magnetar_metadata::{MetaClient, MetaError};
use rand::seq::IndexedRandom;
use tokio::sync::watch;

use crate::client::LedgerClient;
use crate::error::Result;
use crate::meta::{self, LedgerState};

#[derive(Debug, Clone)]
pub struct AuditorConfig {
    /// How long a bookie must be gone before its ledgers are re-replicated.
    pub grace: Duration,
    /// How often the auditor looks.
    pub interval: Duration,
}

impl Default for AuditorConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(60),
            interval: Duration::from_secs(5),
        }
    }
}

pub async fn run(
    me: u64,
    meta_client: MetaClient,
    cfg: AuditorConfig,
    mut stop: watch::Receiver<bool>,
) {
    let client = LedgerClient::new(meta_client.clone());
    loop {
        // Contend for the auditor key.
        let session = match meta_client.grant_session(Duration::from_secs(5)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "auditor: no session");
                tokio::select! {
                    _ = tokio::time::sleep(cfg.interval) => continue,
                    _ = crate::server::stopped(&mut stop) => return,
                }
            }
        };
        match session.create(meta::AUDITOR_KEY, me.to_string()).await {
            Ok(_) => {}
            Err(MetaError::Conflict { .. }) => {
                drop(session);
                tokio::select! {
                    _ = tokio::time::sleep(cfg.interval) => continue,
                    _ = crate::server::stopped(&mut stop) => return,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "auditor: cannot take the auditor key");
                tokio::select! {
                    _ = tokio::time::sleep(cfg.interval) => continue,
                    _ = crate::server::stopped(&mut stop) => return,
                }
            }
        }
        tracing::info!(bookie = me, "running the auditor");
        let mut missing_since: HashMap<u64, Instant> = HashMap::new();
        while session.is_alive() {
            if let Err(e) = audit(&client, &cfg, &mut missing_since).await {
                tracing::warn!(error = %e, "audit pass failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.interval) => {}
                _ = crate::server::stopped(&mut stop) => {
                    let _ = session.revoke().await;
                    return;
                }
            }
        }
    }
}

async fn audit(
    client: &LedgerClient,
    cfg: &AuditorConfig,
    missing_since: &mut HashMap<u64, Instant>,
) -> Result<()> {
    let pool = client.pool();
    let available: HashSet<u64> = pool.available().await?.iter().map(|b| b.id).collect();
    let known: Vec<u64> = pool.known().await?.iter().map(|b| b.id).collect();
    missing_since.retain(|id, _| !available.contains(id));
    let now = Instant::now();
    for id in known {
        if !available.contains(&id) {
            missing_since.entry(id).or_insert(now);
        }
    }
    let lost: HashSet<u64> = missing_since
        .iter()
        .filter(|(_, since)| now.duration_since(**since) >= cfg.grace)
        .map(|(id, _)| *id)
        .collect();
    if lost.is_empty() {
        return Ok(());
    }
    for ledger in client.list().await? {
        if let Err(e) = rereplicate(client, ledger, &lost).await {
            tracing::warn!(ledger, error = %e, "re-replication failed; will retry");
        }
    }
    Ok(())
}

/// Copies what `lost` bookies held of one closed ledger to replacements.
async fn rereplicate(client: &LedgerClient, ledger: u64, lost: &HashSet<u64>) -> Result<()> {
    let (md, version) = match client.metadata(ledger).await {
        Ok(m) => m,
        Err(crate::BookieError::NoLedger(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    if md.state != LedgerState::Closed || !md.all_bookies().iter().any(|b| lost.contains(b)) {
        return Ok(());
    }
    let avoid: Vec<u64> = lost.iter().copied().collect();
    let mut new_md = md.clone();
    for s in 0..md.segments.len() {
        let seg = &md.segments[s];
        let last = match md.segments.get(s + 1) {
            Some(next) => next.first_entry as i64 - 1,
            None => md.last_entry,
        };
        for idx in 0..seg.bookies.len() {
            if !lost.contains(&seg.bookies[idx]) {
                continue;
            }
            let candidates = client.pool().writable(&new_md.segments[s].bookies).await?;
            let Some(&replacement) = candidates.choose(&mut rand::rng()) else {
                tracing::warn!(ledger, "no bookie to re-replicate to");
                return Ok(());
            };
            let mut copied = 0usize;
            let mut e = seg.first_entry as i64;
            while e <= last {
                let hi = (e + 999).min(last);
                let wanted: Vec<u64> = (e as u64..=hi as u64)
                    .filter(|&x| md.write_set(x).contains(&idx))
                    .collect();
                if !wanted.is_empty() {
                    let entries = client.read_entries(&md, &wanted, &avoid).await?;
                    copied += entries.len();
                    client.replicate_to(replacement, ledger, entries).await?;
                }
                e = hi + 1;
            }
            new_md.segments[s].bookies[idx] = replacement;
            tracing::info!(
                ledger,
                segment = s,
                lost = seg.bookies[idx],
                replacement,
                entries = copied,
                "re-replicated a lost bookie's entries"
            );
        }
    }
    match client
        .pool()
        .meta()
        .compare_and_put(&meta::ledger_key(ledger), version, new_md.to_json())
        .await
    {
        Ok(_) => Ok(()),
        // Changed meanwhile (deleted, or another auditor); the next pass
        // looks again.
        Err(MetaError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
