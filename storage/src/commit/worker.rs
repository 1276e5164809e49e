//! The committer thread's plumbing: the worker and its per-batch state, the
//! batch loop (block for one op, drain what is ready, one write), one op's
//! savepoint and rollback, seqs and message ids, the bounded seq map, and
//! the delivery thread. The rules of each op live in a file of their own
//! beside this one (`send`, `recall`, `read`, `ack`, `group`, `link`, `revoke`).

use super::*;

pub(super) struct Worker {
    pub(super) storage: Arc<Storage>,
    pub(super) options: CommitOptions,
    pub(super) next_seq: SeqCache,
    pub(super) last_msg_id: u64,
    /// The current op's savepoint and journals (reused, cleared per op).
    pub(super) undo: OpUndo,
    /// `ferry_commit_failures_total`: batches whose write failed.
    pub(super) failures: metrics::Counter,
    /// `ferry_commit_seq_cache_entries`.
    pub(super) seq_cache_gauge: metrics::Gauge,
    /// Cluster mode: what the current op staged for other nodes.
    pub(super) op_remote: link::OpRemote,
    /// Last link seq assigned per peer (loaded lazily from `meta`).
    pub(super) link_out: HashMap<NodeId, u64, RandomState>,
    /// (epoch, last seq applied) per origin (loaded lazily from `meta`).
    pub(super) link_in: HashMap<NodeId, (u64, u64), RandomState>,
    /// This data dir's link epoch (cluster mode; 0 otherwise).
    pub(super) link_epoch: u64,
    /// The lowest seq an inbox may get next: 0, or after a restore from a
    /// backup the restore's generation (see `crate::backup`), so that no
    /// seq the lost tail may have used is handed out again.
    pub(super) seq_floor: u64,
}

/// The per-user next seq, bounded: two generations of at most half the
/// bound each between batches. Lookups try the current generation, then
/// the previous one (moving a hit back to the current one).
pub(super) struct SeqCache {
    pub(super) current: HashMap<Arc<str>, u64, RandomState>,
    pub(super) previous: HashMap<Arc<str>, u64, RandomState>,
    pub(super) max_entries: usize,
}

impl SeqCache {
    pub(super) fn new(max_entries: usize) -> SeqCache {
        SeqCache {
            current: HashMap::default(),
            previous: HashMap::default(),
            max_entries,
        }
    }

    pub(super) fn get(&mut self, user: &Arc<str>) -> Option<u64> {
        if let Some(v) = self.current.get(user) {
            return Some(*v);
        }
        let (user, v) = self.previous.remove_entry(user)?;
        self.current.insert(user, v);
        Some(v)
    }

    pub(super) fn insert(&mut self, user: Arc<str>, next: u64) {
        self.current.insert(user, next);
    }

    pub(super) fn remove(&mut self, user: &Arc<str>) {
        self.current.remove(user);
        self.previous.remove(user);
    }

    /// Drops the older generation once the newer one holds half the bound.
    /// Only between batches and after a successful write: an entry of a
    /// batch in progress holds seqs the database does not have yet.
    pub(super) fn evict(&mut self) {
        let half = self.max_entries / 2;
        if self.current.len() > half {
            self.previous = std::mem::take(&mut self.current);
            if self.previous.len() > half {
                // One batch touched more users than half the bound.
                self.previous.clear();
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// What the current op changed, to undo it if it is refused or fails.
#[derive(Default)]
pub(super) struct OpUndo {
    /// `writes.puts.len()` before the op.
    pub(super) puts: usize,
    /// `entries` before the op.
    pub(super) entries: usize,
    /// `last_msg_id` before the op.
    pub(super) last_msg_id: u64,
    /// (user, next seq before) for every seq the op assigned, in order.
    pub(super) seqs: Vec<(Arc<str>, Option<u64>)>,
    /// Dedup records the op added to the batch.
    pub(super) dedup: Vec<(Arc<str>, u64)>,
    /// (group, batch snapshot before) for every snapshot the op set.
    pub(super) groups: Vec<(String, Option<Option<Arc<Group>>>)>,
    /// (cursor, batch value before) for every cursor the op moved.
    pub(super) cursors: Vec<(CursorKey, Option<u64>)>,
    /// (origin, link position before) for a link batch the op applied.
    pub(super) link_in: Vec<(NodeId, Option<(u64, u64)>)>,
}

pub(super) type CursorKey = (Arc<str>, Arc<str>);

/// What one batch has changed so far, for ops later in the same batch and
/// for rollback.
#[derive(Default)]
pub(super) struct BatchState {
    pub(super) writes: SortedWrites,
    pub(super) entries: usize,
    /// First-touch values of `next_seq`, restored if the write fails.
    /// One entry per user: a map, since a batch can touch tens of
    /// thousands of users and a linear scan made batching quadratic.
    pub(super) seq_journal: HashMap<Arc<str>, Option<u64>, RandomState>,
    pub(super) dedup: HashMap<(Arc<str>, u64), DedupValue, RandomState>,
    pub(super) groups: HashMap<String, Option<Arc<Group>>, RandomState>,
    /// Cursors moved by this batch's acks; written once each at commit, so
    /// several acks of one device in a batch make one put.
    pub(super) cursors: HashMap<CursorKey, u64, RandomState>,
    /// Whether an op other than an ack was applied: only then does the
    /// batch need its WAL synced.
    pub(super) needs_sync: bool,
    /// Cluster mode: items for each peer node, sealed into link batches at commit.
    pub(super) remote: std::collections::BTreeMap<NodeId, link::RemoteItems>,
    /// First-touch values of `link_out`, restored if the write fails.
    pub(super) link_out_journal: HashMap<NodeId, u64, RandomState>,
    /// First-touch values of `link_in`, restored if the write fails.
    pub(super) link_in_journal: HashMap<NodeId, Option<(u64, u64)>, RandomState>,
}

/// A batch's puts, kept aside and sorted by column family and key before
/// they go into the `WriteBatch`.
///
/// The memtable is a skiplist, and inserting keys in order lets each insert
/// start from where the previous one ended instead of searching from the
/// top: in the random order the ops arrive in (one inbox after another),
/// the skiplist search was most of the committer's CPU time.
#[derive(Default)]
pub(super) struct SortedWrites {
    pub(super) puts: Vec<PendingWrite>,
}

/// (column family, key, value); a `None` value deletes the key.
pub(super) type PendingWrite = (&'static str, Vec<u8>, Option<Vec<u8>>);

impl SortedWrites {
    pub(super) fn put(
        &mut self,
        cf: &'static str,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) {
        self.puts.push((cf, key.into(), Some(value.into())));
    }

    pub(super) fn delete(&mut self, cf: &'static str, key: impl Into<Vec<u8>>) {
        self.puts.push((cf, key.into(), None));
    }

    /// The batch to write. The sort is stable, so two puts of one key keep
    /// their order and the later one wins, as in the order they were made.
    pub(super) fn into_write_batch(mut self, storage: &Storage) -> WriteBatch {
        self.puts
            .sort_by(|a, b| a.0.cmp(b.0).then_with(|| a.1.cmp(&b.1)));
        let mut batch = WriteBatch::default();
        let mut current: Option<(&'static str, &rocksdb::ColumnFamily)> = None;
        for (name, key, value) in &self.puts {
            let handle = match current {
                Some((n, h)) if n == *name => h,
                _ => {
                    let h = storage.cf(name);
                    current = Some((name, h));
                    h
                }
            };
            match value {
                Some(value) => batch.put_cf(handle, key, value),
                None => batch.delete_cf(handle, key),
            }
        }
        batch
    }
}

impl BatchState {
    pub(super) fn put(
        &mut self,
        cf: &'static str,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) {
        self.writes.put(cf, key, value);
    }
}

/// The delivery thread: hands each committed batch to the sink, and
/// releases barriers once everything before them has been through it.
pub(super) fn deliver<T>(
    batches: std::sync::mpsc::Receiver<Delivery<T>>,
    mut sink: impl FnMut(Vec<(T, Outcome)>, Vec<LinkOut>),
) {
    let sink_seconds = metrics::histogram!("ferry_commit_sink_seconds");
    for delivery in batches {
        match delivery {
            Delivery::Batch(results, links) => {
                let started = std::time::Instant::now();
                sink(results, links);
                sink_seconds.record(started.elapsed());
            }
            Delivery::Barrier(done) => {
                let _ = done.send(());
            }
            Delivery::Stop(done) => {
                drop(sink);
                let _ = done.send(());
                return;
            }
        }
    }
}

impl Worker {
    pub(super) fn new(storage: Arc<Storage>, options: CommitOptions, last_msg_id: u64) -> Worker {
        Worker {
            storage,
            next_seq: SeqCache::new(options.seq_cache_entries),
            options,
            last_msg_id,
            undo: OpUndo::default(),
            failures: metrics::counter!("ferry_commit_failures_total"),
            seq_cache_gauge: metrics::gauge!("ferry_commit_seq_cache_entries"),
            op_remote: link::OpRemote::default(),
            link_out: HashMap::default(),
            link_in: HashMap::default(),
            link_epoch: 0,
            seq_floor: 0,
        }
    }

    pub(super) fn run<T>(
        &mut self,
        mut rx: mpsc::Receiver<Request<T>>,
        deliveries: std::sync::mpsc::SyncSender<Delivery<T>>,
    ) -> Option<oneshot::Sender<()>> {
        // Resolved once: the recorder is installed before the committer
        // starts, and a handle records with atomics only.
        let batch_ops = metrics::histogram!("ferry_commit_batch_ops");
        let commit_seconds = metrics::histogram!("ferry_commit_seconds");
        let apply_seconds = metrics::histogram!("ferry_commit_apply_seconds");
        let queue_depth = metrics::gauge!("ferry_commit_queue_depth");
        let mut barriers = Vec::new();
        let mut stop = None;
        while let Some(first) = rx.blocking_recv() {
            let started = std::time::Instant::now();
            let mut state = BatchState::default();
            let mut results = Vec::new();
            let mut next = Some(first);
            while let Some(request) = next.take() {
                match request {
                    Request::Op(op, tag) => {
                        let outcome = self.apply(op, &mut state);
                        results.push((tag, outcome));
                    }
                    Request::Barrier(done) => barriers.push(done),
                    Request::Stop(done) => {
                        stop = Some(done);
                        break;
                    }
                }
                if state.entries >= self.options.max_batch_entries {
                    break;
                }
                next = rx.try_recv().ok();
            }
            // What arrived while this batch was applied waits for the next.
            queue_depth.set(rx.len() as f64);
            if !results.is_empty() {
                let ops = results.len();
                let entries = state.entries;
                batch_ops.record(ops as f64);
                let applied = std::time::Instant::now();
                apply_seconds.record(applied - started);
                let links = self.commit(state, &mut results);
                let committed = std::time::Instant::now();
                commit_seconds.record(committed - applied);
                tracing::debug!(
                    ops,
                    entries,
                    apply_us = (applied - started).as_micros() as u64,
                    write_us = (committed - applied).as_micros() as u64,
                    "batch committed"
                );
                if deliveries.send(Delivery::Batch(results, links)).is_err() {
                    return None;
                }
            }
            for done in barriers.drain(..) {
                if deliveries.send(Delivery::Barrier(done)).is_err() {
                    return None;
                }
            }
            if let Some(done) = stop {
                // The delivery thread answers once it has dropped the sink;
                // the caller drops this worker (and its storage) next.
                let (delivered, wait) = oneshot::channel();
                if deliveries.send(Delivery::Stop(delivered)).is_ok() {
                    drop(deliveries);
                    let _ = wait.blocking_recv();
                }
                rx.close();
                return Some(done);
            }
        }
        None
    }

    /// Writes the batch (one `WriteBatch`, one WAL write), then installs
    /// its group changes in the cache and trims the seq map; or, if the
    /// write fails, rolls the seq map back and fails every op that was not
    /// refused.
    pub(super) fn commit<T>(
        &mut self,
        mut state: BatchState,
        results: &mut [(T, Outcome)],
    ) -> Vec<LinkOut> {
        let links = match self.seal_links(&mut state) {
            Ok(links) => links,
            Err(e) => {
                self.fail_batch(&e, state, results);
                return Vec::new();
            }
        };
        state.put(
            cf::META,
            keys::META_MSG_ID_HIGH_WATER,
            self.last_msg_id.to_be_bytes(),
        );
        for ((user, device), seq) in state.cursors.drain() {
            state.writes.put(
                cf::CURSORS,
                keys::cursor_key(&user, &device),
                seq.to_be_bytes(),
            );
        }
        let sync = self.sync_batch(&state);
        let groups = std::mem::take(&mut state.groups);
        let writes = std::mem::take(&mut state.writes);
        let batch = writes.into_write_batch(&self.storage);
        match self.write(batch, sync) {
            Ok(()) => {
                self.storage.writes_failing.store(false, Ordering::Relaxed);
                if !groups.is_empty() {
                    self.storage.cache_groups(groups);
                }
                self.next_seq.evict();
                self.seq_cache_gauge.set(self.next_seq.len() as f64);
                links
            }
            Err(e) => {
                self.fail_batch(&e, state, results);
                Vec::new()
            }
        }
    }

    /// The batch could not be written: every in-memory position it moved
    /// (seqs, link seqs and positions) goes back, and every op that was not
    /// refused fails.
    pub(super) fn fail_batch<T>(
        &mut self,
        e: &StorageError,
        state: BatchState,
        results: &mut [(T, Outcome)],
    ) {
        tracing::error!(error = %e, "commit failed; the batch is refused");
        self.failures.increment(1);
        self.storage.writes_failing.store(true, Ordering::Relaxed);
        for (user, old) in state.seq_journal {
            match old {
                Some(v) => self.next_seq.insert(user, v),
                None => self.next_seq.remove(&user),
            };
        }
        for (peer, old) in state.link_out_journal {
            self.link_out.insert(peer, old);
        }
        for (origin, old) in state.link_in_journal {
            match old {
                Some(p) => self.link_in.insert(origin, p),
                None => self.link_in.remove(&origin),
            };
        }
        for (_, outcome) in results.iter_mut() {
            if !matches!(outcome, Outcome::Refused(_)) {
                *outcome = Outcome::Failed(e.to_string());
            }
        }
    }

    /// Whether the batch's write waits for the WAL to reach the disk.
    ///
    /// With `Fsync` durability the acks wait for it, once for the whole
    /// batch. A batch of nothing but device acks (`Op::Ack`) is not synced:
    /// it only moves cursors, which recall alone reads, and a cursor lost
    /// to a power cut only makes a device receive again entries it already
    /// has and drops by seq. The next synced batch syncs it anyway.
    pub(super) fn sync_batch(&self, state: &BatchState) -> bool {
        self.options.durability == Durability::Fsync && state.needs_sync
    }

    pub(super) fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        #[cfg(test)]
        if self.storage.faults.fail_writes.load(Ordering::Relaxed) {
            return Err(StorageError::Io("injected write fault".into()));
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.storage.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// A new group id. In cluster mode it is one this node owns (ids are
    /// minted until one hashes here: about as many tries as there are
    /// nodes), so that a group created without an id is created here.
    pub(super) fn new_group_id(&mut self) -> String {
        loop {
            let id = format!("g{:x}", self.next_msg_id());
            match &self.options.homes {
                Some(homes) if homes.owner_of_group(&id) != homes.this_node() => continue,
                _ => return id,
            }
        }
    }

    pub(super) fn next_msg_id(&mut self) -> u64 {
        self.last_msg_id = mint_msg_id(self.last_msg_id, now_ms(), self.options.node_id);
        self.last_msg_id
    }

    pub(super) fn assign_seq(
        &mut self,
        user: &Arc<str>,
        state: &mut BatchState,
    ) -> Result<u64, StorageError> {
        let previous = self.next_seq.get(user);
        let current = match previous {
            Some(v) => v,
            None => (self.storage.max_seq(user)? + 1).max(self.seq_floor),
        };
        self.next_seq.insert(user.clone(), current + 1);
        self.undo.seqs.push((user.clone(), previous));
        if !state.seq_journal.contains_key(user) {
            state.seq_journal.insert(user.clone(), previous);
        }
        Ok(current)
    }

    /// Starts an op: its savepoint.
    pub(super) fn savepoint(&mut self, state: &BatchState) {
        let undo = &mut self.undo;
        undo.puts = state.writes.puts.len();
        undo.entries = state.entries;
        undo.last_msg_id = self.last_msg_id;
        undo.seqs.clear();
        undo.dedup.clear();
        undo.groups.clear();
        undo.cursors.clear();
        undo.link_in.clear();
        self.op_remote.clear();
    }

    /// Undoes everything the current op staged or changed since its
    /// savepoint, newest first.
    pub(super) fn rollback(&mut self, state: &mut BatchState) {
        let undo = &mut self.undo;
        state.writes.puts.truncate(undo.puts);
        state.entries = undo.entries;
        self.last_msg_id = undo.last_msg_id;
        for (user, previous) in undo.seqs.drain(..).rev() {
            match previous {
                Some(v) => self.next_seq.insert(user, v),
                None => self.next_seq.remove(&user),
            }
        }
        // The batch's seq journal keeps what it had: a user first touched by
        // this op was journaled with the value just restored.
        for key in undo.dedup.drain(..) {
            state.dedup.remove(&key);
        }
        for (id, previous) in undo.groups.drain(..).rev() {
            match previous {
                Some(g) => state.groups.insert(id, g),
                None => state.groups.remove(&id),
            };
        }
        for (key, previous) in undo.cursors.drain(..).rev() {
            match previous {
                Some(seq) => state.cursors.insert(key, seq),
                None => state.cursors.remove(&key),
            };
        }
        for (origin, previous) in undo.link_in.drain(..).rev() {
            match previous {
                Some(p) => self.link_in.insert(origin, p),
                None => self.link_in.remove(&origin),
            };
        }
        self.op_remote.clear();
    }

    /// Records a dedup record in the batch (journaled).
    pub(super) fn stage_dedup(
        &mut self,
        key: (Arc<str>, u64),
        record: DedupValue,
        state: &mut BatchState,
    ) {
        if state.dedup.insert(key.clone(), record).is_none() {
            self.undo.dedup.push(key);
        }
    }

    /// Records a group snapshot in the batch (journaled); `None`: dissolved.
    pub(super) fn stage_group(
        &mut self,
        id: String,
        group: Option<Arc<Group>>,
        state: &mut BatchState,
    ) {
        let previous = state.groups.insert(id.clone(), group);
        self.undo.groups.push((id, previous));
    }

    pub(super) fn put_inbox(
        &mut self,
        user: &Arc<str>,
        value: &InboxValue,
        state: &mut BatchState,
    ) -> Result<u64, StorageError> {
        let seq = self.assign_seq(user, state)?;
        state.put(cf::INBOX, keys::inbox_key(user, seq), value.encode_to_vec());
        state.entries += 1;
        Ok(seq)
    }

    /// Applies one op to the batch, all or nothing: a refused or failed op
    /// leaves the batch as it found it.
    pub(super) fn apply(&mut self, op: Op, state: &mut BatchState) -> Outcome {
        self.savepoint(state);
        let is_ack = matches!(op, Op::Ack { .. });
        let outcome = match check_op(&op, &self.options) {
            Ok(()) => self.apply_checked(op, state),
            Err(refusal) => Outcome::Refused(refusal),
        };
        match outcome {
            Outcome::Refused(_) | Outcome::Failed(_) => self.rollback(state),
            _ if !is_ack => {
                self.keep_op_remote(state);
                state.needs_sync = true;
            }
            _ => {}
        }
        outcome
    }

    pub(super) fn apply_checked(&mut self, op: Op, state: &mut BatchState) -> Outcome {
        let result = match op {
            Op::Send {
                from,
                client_msg_id,
                to,
                content_type,
                body,
                system,
            } => self.send(from, client_msg_id, to, content_type, body, system, state),
            Op::Recall {
                from,
                to,
                msg_id,
                window_ms,
            } => self.recall(from, to, msg_id, window_ms, state),
            Op::Read {
                from,
                to,
                up_to_msg_id,
            } => self.read(from, to, up_to_msg_id, state),
            Op::Ack { user, device, seq } => self.ack(user, device, seq, state),
            Op::Group { actor, change } => self.group_change(actor, change, state),
            Op::ApplyLink {
                from,
                epoch,
                batch,
                head,
            } => self.apply_link(from, epoch, batch, &head, state),
            Op::Revoke {
                user,
                device,
                issued_before,
            } => self.revoke(user, device, issued_before, state),
        };
        result.unwrap_or_else(|e| Outcome::Failed(e.to_string()))
    }

    pub(super) fn group_in_batch(
        &self,
        id: &str,
        state: &BatchState,
    ) -> Result<Option<Arc<Group>>, StorageError> {
        match state.groups.get(id) {
            Some(g) => Ok(g.clone()),
            None => self.storage.group(id),
        }
    }
}
