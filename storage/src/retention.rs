//! Retention: removing what is older than the retention period.
//!
//! - `msgs` and `dedup`: compaction filters (installed at open) drop expired
//!   entries whenever RocksDB compacts them, at no extra I/O.
//! - `inbox`: a background sweep walks the inbox in small chunks, with a
//!   pause between chunks so it never competes with live traffic, and
//!   deletes expired entries, except each user's newest one. That entry
//!   anchors the user's seq: the next seq is always computed from the last
//!   inbox key, so keeping it keeps seqs strictly increasing forever, with
//!   no separate counter to write on every message. The sweep reads past
//!   the block cache (every block once: caching them would evict what live
//!   lookups reuse; under the soak's load a sweep took a 128 MiB cache
//!   from 104 to 128 MiB in 20 s), and opens a new iterator for each
//!   chunk, so no version of the tables stays pinned for the whole sweep.
//!
//! The sweeper thread belongs to its [`Storage`]: [`Storage::close`] stops
//! it and waits for it to end, so no sweep touches RocksDB while the
//! process exits.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use prost::Message;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};

use crate::db::{Storage, cf};

use crate::StorageError;
use crate::model::{InboxValue, msg_id_time_ms};

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Inbox keys looked at.
    pub scanned: u64,
    /// Inbox entries removed.
    pub removed: u64,
}

fn entry_time_ms(value: &[u8]) -> Option<u64> {
    let v = InboxValue::decode(value).ok()?;
    Some(match v.inline {
        Some(entry) => entry.server_time_ms,
        None => msg_id_time_ms(v.msg_id),
    })
}

impl Storage {
    /// One pass over the inbox: removes entries older than `cutoff_ms`
    /// (ms since the epoch), keeping every user's newest entry. Works in
    /// chunks of `chunk` keys with `pause` between them.
    pub fn sweep_inbox(
        &self,
        cutoff_ms: u64,
        chunk: usize,
        pause: Duration,
    ) -> Result<SweepReport, StorageError> {
        let inbox = self.cf(cf::INBOX);
        let mut report = SweepReport::default();
        // The previous key, if it was expired: deleted once we know it is
        // not its user's newest entry.
        let mut prev: Option<(Vec<u8>, bool)> = None;
        let mut batch = WriteBatch::default();
        let mut in_chunk = 0usize;
        // Where the next chunk's iterator starts: the last key seen (read
        // again and skipped), none for the first.
        let mut resume: Option<Vec<u8>> = None;
        loop {
            let mut read = ReadOptions::default();
            read.fill_cache(false);
            let mode = match &resume {
                Some(key) => IteratorMode::From(key, Direction::Forward),
                None => IteratorMode::Start,
            };
            let mut chunk_done = false;
            for item in self.db.iterator_cf_opt(inbox, read, mode) {
                let (key, value) = item?;
                if resume.as_deref() == Some(&*key) {
                    continue;
                }
                report.scanned += 1;
                let user_len = key.first().map_or(0, |l| *l as usize + 1);
                if let Some((prev_key, prev_old)) = prev.take() {
                    let same_user =
                        prev_key.len() >= user_len && prev_key[..user_len] == key[..user_len];
                    if same_user && prev_old {
                        batch.delete_cf(inbox, prev_key);
                        report.removed += 1;
                    }
                }
                let old = entry_time_ms(&value).is_some_and(|t| t < cutoff_ms);
                prev = Some((key.to_vec(), old));
                in_chunk += 1;
                if in_chunk >= chunk {
                    resume = Some(key.to_vec());
                    chunk_done = true;
                    break;
                }
            }
            if !chunk_done {
                break;
            }
            // Between chunks, with no iterator open.
            // Deletes need no fsync: if lost, the next sweep redoes them.
            self.db.write(std::mem::take(&mut batch))?;
            in_chunk = 0;
            if self.closing.load(std::sync::atomic::Ordering::Relaxed) {
                // Shutting down: the next start's sweep finishes the job.
                return Ok(report);
            }
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        self.db.write(batch)?;
        Ok(report)
    }

    /// The cutoff for the configured retention, at this moment.
    pub fn retention_cutoff_ms(&self) -> u64 {
        crate::retention_cutoff_ms(crate::now_ms(), self.retention_days())
    }

    /// Stops the sweeper thread, if one runs, and waits for it to end.
    pub(crate) fn stop_sweeper(&self) {
        let handle = self
            .sweeper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            // Dropping the sender wakes the thread from its wait.
            drop(handle.stop);
            if handle.thread.thread().id() != std::thread::current().id() {
                let _ = handle.thread.join();
            }
        }
    }
}

/// The running sweeper: dropping `stop` ends it at its next wait or chunk.
pub(crate) struct SweeperHandle {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

/// Runs the inbox sweep every `every` on a background thread (first run
/// after one period) until [`Storage::close`], which stops the thread and
/// waits for it, or until the storage is dropped. A second call replaces
/// (and stops) the first sweeper.
pub fn spawn_sweeper(storage: Arc<Storage>, every: Duration) -> std::io::Result<()> {
    let weak = Arc::downgrade(&storage);
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("ferry-retention".into())
        .spawn(move || {
            loop {
                match stopped.recv_timeout(every) {
                    Err(RecvTimeoutError::Timeout) => {}
                    // Stopped by close, or the storage (holding the sender)
                    // is gone.
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
                let Some(storage) = weak.upgrade() else {
                    return;
                };
                if storage.closing.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let cutoff = storage.retention_cutoff_ms();
                match storage.sweep_inbox(cutoff, 1000, Duration::from_millis(20)) {
                    Ok(r) => {
                        tracing::info!(scanned = r.scanned, removed = r.removed, "retention sweep")
                    }
                    Err(e) => tracing::warn!(error = %e, "retention sweep failed"),
                }
            }
        })?;
    storage.stop_sweeper();
    *storage.sweeper.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(SweeperHandle { stop, thread });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StorageOptions;

    #[test]
    fn a_sweep_reads_past_the_block_cache_in_chunks() {
        use crate::keys;
        use ferry_protocol::proto;
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let inbox = storage.cf(cf::INBOX);
        let users: Vec<String> = (0..200).map(|u| format!("user-{u:04}")).collect();
        for user in &users {
            for seq in 1..=20u64 {
                let value = InboxValue {
                    conv: Vec::new(),
                    msg_id: seq,
                    inline: Some(proto::Deliver {
                        from: "someone".into(),
                        body: vec![b'x'; 200].into(),
                        server_time_ms: 1_000 + seq,
                        ..Default::default()
                    }),
                };
                storage
                    .db
                    .put_cf(inbox, keys::inbox_key(user, seq), value.encode_to_vec())
                    .unwrap();
            }
        }
        storage.flush().unwrap();
        // The tables' index and filter blocks come in at the first read.
        storage.read_inbox(&users[0], 0, 1).unwrap();
        let before = storage.usage().cache_bytes;

        // A sweep that deletes nothing (deletes would grow the memtables'
        // reservation in the same cache): 4,000 entries of ~230 bytes,
        // ~900 KiB of data blocks read, none of them kept.
        let report = storage.sweep_inbox(0, 1000, Duration::ZERO).unwrap();
        assert_eq!((report.scanned, report.removed), (200 * 20, 0));
        let after = storage.usage().cache_bytes;
        assert!(
            after < before + (64 << 10),
            "the sweep filled the cache: {before} -> {after} bytes"
        );

        // Entries 1..=10 of each user expire; chunks of 7 keys, so chunks
        // end inside users and between them.
        let report = storage.sweep_inbox(1_011, 7, Duration::ZERO).unwrap();
        assert_eq!((report.scanned, report.removed), (200 * 20, 200 * 10));
        for user in [&users[0], &users[1], &users[199]] {
            let page = storage.read_inbox(user, 0, 100).unwrap();
            let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (11..=20).collect::<Vec<u64>>(), "{user}");
        }
    }

    #[test]
    fn close_stops_and_joins_the_sweeper_thread() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        spawn_sweeper(storage.clone(), Duration::from_secs(3600)).unwrap();
        // The thread holds a weak reference for as long as it runs.
        assert_eq!(Arc::weak_count(&storage), 1);
        storage.close().unwrap();
        assert_eq!(
            Arc::weak_count(&storage),
            0,
            "close returned while the sweeper thread still ran"
        );
    }
}
