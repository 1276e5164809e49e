//! Retention: removing what is older than the retention period.
//!
//! - `msgs` and `dedup`: compaction filters (installed at open) drop expired
//!   entries whenever RocksDB compacts them, at no extra I/O.
//! - `inbox`: a background sweep walks the inbox in small chunks, with a
//!   pause between chunks so it never competes with live traffic, and
//!   deletes expired entries, except each user's newest one. That entry
//!   anchors the user's seq: the next seq is always computed from the last
//!   inbox key, so keeping it keeps seqs strictly increasing forever, with
//!   no separate counter to write on every message.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use rocksdb::{IteratorMode, WriteBatch};

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
        for item in self.db.iterator_cf(inbox, IteratorMode::Start) {
            let (key, value) = item?;
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
        }
        self.db.write(batch)?;
        Ok(report)
    }

    /// The cutoff for the configured retention, at this moment.
    pub fn retention_cutoff_ms(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        now.saturating_sub(self.retention_days() as u64 * 86_400_000)
    }
}

/// Runs the inbox sweep every `every` on a background thread (first run
/// after one period), until the storage is the last reference left.
pub fn spawn_sweeper(storage: Arc<Storage>, every: Duration) -> std::io::Result<()> {
    let weak = Arc::downgrade(&storage);
    drop(storage);
    std::thread::Builder::new()
        .name("ferry-retention".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(storage) = weak.upgrade() else {
                    return;
                };
                let cutoff = storage.retention_cutoff_ms();
                match storage.sweep_inbox(cutoff, 1000, Duration::from_millis(20)) {
                    Ok(r) => {
                        tracing::info!(scanned = r.scanned, removed = r.removed, "retention sweep")
                    }
                    Err(e) => tracing::warn!(error = %e, "retention sweep failed"),
                }
            }
        })?;
    Ok(())
}
