//! A shard's retention: every [`Config::retention_check_interval`], the
//! rows of its entity type not written for [`Config::retention`] are
//! purged, in chunks, except those of resident entities.
//!
//! A purge run walks the type's idle rows in persistence id order, one chunk
//! at a time, and never overlaps another run of the shard. From each chunk
//! it drops the keys of other shards (each shard purges its own, knowing
//! which of them are resident) and the keys that have an actor (resident or passivating: the actor holds the
//! state). While a chunk's delete is in flight, commands for its keys wait
//! here for its answer, as during a passivation: an actor started meanwhile
//! would restore a row about to disappear. After the answer they go to a new
//! actor, which finds the entity gone (default state) or, if the statement
//! kept the row (written meanwhile by another node), the row. The statement
//! itself checks each row's revision and age, so writes from other nodes are
//! never lost to a purge.
//!
//! [`Config::retention_check_interval`]: crate::Config::retention_check_interval
//! [`Config::retention`]: crate::Config::retention

use actix::prelude::*;
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::super::entity_actor::at_least_a_millisecond;
use super::super::messages::PurgeIdle;
use super::delivery::{Delivery, Held};
use super::{held_commands, Shard};
use crate::entity::{DurableEntity, PersistenceId, Revision};
use crate::error::StoreError;
use crate::store::ext::{purge_counted, written_before};
use crate::store::ChangeLogExt;

type PurgeReply = oneshot::Sender<Result<u64, StoreError>>;

/// A purge run under way.
pub(super) struct PurgeRun {
    /// Rows last written before this are purged: fixed for the whole run,
    /// so rows written during it are never candidates.
    written_before: DateTime<Utc>,
    /// The last candidate of the previous chunk: the next starts after it.
    after: Option<PersistenceId>,
    /// Rows removed so far.
    purged: u64,
    /// Who waits for this run's count.
    replies: Vec<PurgeReply>,
}

/// The manager's retention state.
pub(super) struct Retention<E: DurableEntity> {
    /// The run under way, if any.
    run: Option<PurgeRun>,
    /// Who asked for a purge while a run was under way: the next run answers them.
    next: Vec<PurgeReply>,
    /// The keys whose rows the delete in flight may remove, each with the
    /// commands that arrived for it meanwhile.
    purging: std::collections::HashMap<E::Key, Vec<Held<E>>>,
    /// A feed trim is running.
    trimming: bool,
}

impl<E: DurableEntity> Default for Retention<E> {
    fn default() -> Self {
        Self {
            run: None,
            next: Vec::new(),
            purging: std::collections::HashMap::new(),
            trimming: false,
        }
    }
}

impl<E: DurableEntity> Handler<PurgeIdle> for Shard<E> {
    type Result = ResponseFuture<Result<u64, StoreError>>;

    fn handle(&mut self, _: PurgeIdle, ctx: &mut Self::Context) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.request_purge(Some(reply), ctx);
        Box::pin(async move { answer.await.unwrap_or(Err(StoreError::Stopped)) })
    }
}

impl<E: DurableEntity> Shard<E> {
    /// With retention on, purges every check interval; with feed retention
    /// on, the first shard trims the feed every its interval.
    pub(super) fn schedule_retention(&mut self, ctx: &mut Context<Self>) {
        if self.shared.config.retention.is_some() {
            let every = at_least_a_millisecond(self.shared.config.retention_check_interval);
            ctx.run_interval(every, |manager, ctx| manager.request_purge(None, ctx));
        }
        if let Some(feed_retention) = self.shared.config.feed_retention.filter(|_| self.placement.is_first()) {
            ctx.run_interval(at_least_a_millisecond(feed_retention.every), move |shard, ctx| {
                shard.trim_feed(feed_retention, ctx)
            });
        }
    }

    /// Trims the change feed, unless the last trim is still running.
    fn trim_feed(&mut self, retention: crate::FeedRetention, ctx: &mut Context<Self>) {
        if std::mem::replace(&mut self.retention.trimming, true) {
            return;
        }
        let store = self.shared.store.clone();
        ctx.spawn(
            async move { store.trim_feed(&retention).await }
                .into_actor(self)
                .map(|trimmed, shard, _| {
                    shard.retention.trimming = false;
                    match trimmed {
                        Ok(trimmed) => debug!(trimmed, "change feed trimmed"),
                        Err(error) => warn!(%error, "trimming the change feed failed; the next run goes on"),
                    }
                }),
        );
    }

    /// Whether a command for `key` must wait for the delete in flight.
    pub(super) fn is_being_purged(&self, key: &E::Key) -> bool {
        !self.retention.purging.is_empty() && self.retention.purging.contains_key(key)
    }

    /// Holds a command for an entity whose row the delete in flight may
    /// remove, within the same bound as a passivating entity's.
    pub(super) fn hold_during_purge<D: Delivery<E>>(&mut self, key: E::Key, delivery: D) {
        let max_held = self.shared.config.max_queued_per_entity;
        let len = delivery.len();
        match self.retention.purging.get_mut(&key) {
            Some(held) if held_commands(held) + len <= max_held => held.push(delivery.held()),
            _ => self.refuse(
                key,
                delivery,
                format!("{max_held} commands are already queued for this entity while its row is purged"),
            ),
        }
    }

    /// Starts a purge run, or (for a caller waiting on a count) queues one
    /// after the run under way. A periodic tick during a run is skipped.
    fn request_purge(&mut self, reply: Option<PurgeReply>, ctx: &mut Context<Self>) {
        let Some(retention) = self.shared.config.retention else {
            if let Some(reply) = reply {
                let _ = reply.send(Err(StoreError::InvalidConfig(
                    "retention is off: set Config::with_retention to purge".into(),
                )));
            }
            return;
        };
        if self.draining.is_some() {
            if let Some(reply) = reply {
                let _ = reply.send(Err(StoreError::Stopped));
            }
            return;
        }
        if self.retention.run.is_some() {
            self.retention.next.extend(reply);
            return;
        }
        let replies = reply.into_iter().collect();
        self.start_purge(retention, replies, ctx);
    }

    fn start_purge(&mut self, retention: std::time::Duration, replies: Vec<PurgeReply>, ctx: &mut Context<Self>) {
        let Some(written_before) = written_before(retention) else {
            // Nothing can be that old.
            for reply in replies {
                let _ = reply.send(Ok(0));
            }
            return;
        };
        self.retention.run = Some(PurgeRun {
            written_before,
            after: None,
            purged: 0,
            replies,
        });
        self.purge_next_chunk(ctx);
    }

    fn purge_next_chunk(&mut self, ctx: &mut Context<Self>) {
        let Some(run) = &self.retention.run else {
            return;
        };
        let limit = self.shared.config.retention_chunk_size.max(1);
        let (store, after, written_before) = (self.shared.store.clone(), run.after.clone(), run.written_before);
        ctx.spawn(
            async move {
                store
                    .purge_candidates(E::ENTITY_TYPE, written_before, after.as_ref(), limit)
                    .await
            }
            .into_actor(self)
            .map(move |found, manager, ctx| match found {
                Ok(candidates) => manager.purge_candidates_found(candidates, limit, ctx),
                Err(error) => manager.finish_purge(Err(error), ctx),
            }),
        );
    }

    /// Deletes the candidates that have no actor, holding commands for them
    /// until the delete answers.
    fn purge_candidates_found(
        &mut self,
        candidates: Vec<(PersistenceId, Revision)>,
        limit: usize,
        ctx: &mut Context<Self>,
    ) {
        let more = candidates.len() >= limit;
        let Some(run) = &mut self.retention.run else {
            return;
        };
        run.after = candidates.last().map(|(id, _)| id.clone());
        let written_before = run.written_before;
        let ownership = self
            .shared
            .config
            .cluster
            .as_ref()
            .map(|cluster| cluster.ownership().clone());
        let mut rows = Vec::with_capacity(candidates.len());
        for (id, revision) in candidates {
            // In cluster mode, each slice's owner purges its rows: the only
            // node where its entities can be resident.
            if ownership.as_ref().is_some_and(|ownership| !ownership.owns(id.slice())) {
                continue;
            }
            match id.key::<E::Key>() {
                // Another shard's: that shard purges it.
                Some(key) if !self.placement.owns(&key) => continue,
                // Resident or passivating: its actor holds the state.
                Some(key) if self.children.contains_key(&key) => continue,
                Some(key) => {
                    self.retention.purging.insert(key, Vec::new());
                }
                // No key encodes to this id, so no actor can hold it: the
                // first shard purges it.
                None if !self.placement.is_first() => continue,
                None => {}
            }
            rows.push((id, revision));
        }
        if rows.is_empty() {
            self.purge_chunk_done(0, more, ctx);
            return;
        }
        let store = self.shared.store.clone();
        ctx.spawn(
            async move {
                match (&ownership, store.leases()) {
                    (Some(ownership), Some(leases)) => {
                        // Fenced: a slice that moved meanwhile loses nothing.
                        let fenced = rows
                            .into_iter()
                            .filter_map(|(id, revision)| {
                                let fence = ownership.fence(id.slice())?;
                                Some((id, revision, fence))
                            })
                            .collect();
                        let purged = leases.purge_rows_fenced(fenced, written_before).await?;
                        metrics::counter!("persist_durable_purged_total", "entity" => E::ENTITY_TYPE)
                            .increment(purged.len() as u64);
                        Ok(purged)
                    }
                    _ => purge_counted::<E, _>(store.as_ref(), rows, written_before).await,
                }
            }
            .into_actor(self)
            .map(move |purged, manager, ctx| {
                manager.release_purging();
                match purged {
                    Ok(ids) => manager.purge_chunk_done(ids.len() as u64, more, ctx),
                    Err(error) => manager.finish_purge(Err(error), ctx),
                }
            }),
        );
    }

    fn purge_chunk_done(&mut self, purged: u64, more: bool, ctx: &mut Context<Self>) {
        self.stats.purged += purged;
        if let Some(run) = &mut self.retention.run {
            run.purged += purged;
        }
        if more {
            self.purge_next_chunk(ctx);
        } else {
            self.finish_purge(Ok(()), ctx);
        }
    }

    /// Sends the commands held during a delete to new actors, which restore
    /// whatever the delete left; none once the shard is stopping.
    fn release_purging(&mut self) {
        let purging = std::mem::take(&mut self.retention.purging);
        if self.draining.is_some() {
            return;
        }
        for (key, held) in purging {
            if !held.is_empty() {
                self.start_with(key, held);
            }
        }
    }

    /// Drops the commands held for rows a purge is deleting: they never
    /// reached an actor, and their callers hear `NotDelivered`.
    pub(super) fn drop_held_during_purge(&mut self) {
        for held in self.retention.purging.values_mut() {
            held.clear();
        }
    }

    /// Answers the run's callers and starts the run they queued meanwhile, if any.
    fn finish_purge(&mut self, outcome: Result<(), StoreError>, ctx: &mut Context<Self>) {
        let Some(run) = self.retention.run.take() else {
            return;
        };
        let answer = match outcome {
            Ok(()) => {
                debug!(entity = E::ENTITY_TYPE, purged = run.purged, "retention purge done");
                Ok(run.purged)
            }
            Err(error) => {
                warn!(entity = E::ENTITY_TYPE, purged = run.purged, %error, "retention purge failed; the next one goes on");
                Err(error)
            }
        };
        for reply in run.replies {
            let _ = reply.send(answer.clone());
        }
        if !self.retention.next.is_empty() {
            let replies = std::mem::take(&mut self.retention.next);
            match self.shared.config.retention {
                Some(retention) => self.start_purge(retention, replies, ctx),
                None => drop(replies),
            }
        }
    }
}
