//! Opening the database and everything that reads it.
//!
//! Reads are plain RocksDB point lookups and range scans on an `Arc<DB>`;
//! they are blocking calls, so async callers run them on blocking threads.
//! Writes all go through the [`crate::commit`] group committer.
//!
//! Every public reader that takes an id first checks it against
//! [`MAX_ID_BYTES`]: the committer never stores a longer one, so the answer
//! is the natural "nothing stored" one ([`Storage::max_seq`] and
//! [`Storage::cursor`] 0, [`Storage::read_inbox`] and [`Storage::history`]
//! an empty page, [`Storage::message`], [`Storage::dedup`] and
//! [`Storage::group`] `None`), without building a key: a key's length byte
//! could not hold such an id, and a truncated one could name another id.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ferry_protocol::limits::MAX_ID_BYTES;
use ferry_protocol::proto;
use prost::Message;
use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions,
};

use crate::StorageError;
use crate::groups::GroupCache;
use crate::keys::{self, ConvKey};
use crate::model::{DedupValue, InboxValue, StoredMessage, msg_id_time_ms};

/// Column family names.
pub mod cf {
    /// Per-user inboxes: (user, seq) → entry.
    pub const INBOX: &str = "inbox";
    /// Conversation logs: (conversation, msg id) → message. Bodies live here once.
    pub const MSGS: &str = "msgs";
    /// Dedup records: (sender, client msg id) → first ack.
    pub const DEDUP: &str = "dedup";
    /// Per-device acked cursors.
    pub const CURSORS: &str = "cursors";
    /// Groups and memberships.
    pub const GROUPS: &str = "groups";
    /// Schema version, id high-water mark.
    pub const META: &str = "meta";
    /// Link batches for peer nodes, kept until the peer confirms them
    /// (cluster mode only; empty on a single node).
    pub const OUTBOX: &str = "outbox";
    /// All of them, in creation order.
    pub const ALL: [&str; 7] = [INBOX, MSGS, DEDUP, CURSORS, GROUPS, META, OUTBOX];
}

/// The on-disk layout this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Storage tuning that the configuration decides.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Messages older than this are removed in the background.
    pub retention_days: u32,
    /// Files RocksDB may keep open (these share the process's fd budget
    /// with client connections).
    pub max_open_files: i32,
    /// Bound of the group cache, in members: each cached group costs its
    /// member count plus one, each id known to be absent one. About 100
    /// bytes a member, so the default bounds the cache near 200 MB.
    pub group_cache_members: usize,
    /// RocksDB's memory budget: one block cache shared by every column
    /// family, of this capacity, into which the memtables are charged too
    /// (at most half of it). Also bounds the write-ahead log: past this
    /// size, the column families holding its oldest file are flushed.
    pub memory_budget_bytes: usize,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            retention_days: 30,
            max_open_files: 512,
            group_cache_members: 2_000_000,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES,
        }
    }
}

/// Default of [`StorageOptions::memory_budget_bytes`]: 128 MiB.
pub const DEFAULT_MEMORY_BUDGET_BYTES: usize = 128 << 20;

/// The least [`StorageOptions::memory_budget_bytes`] accepted: below it,
/// memtables flush every few hundred KiB of writes.
pub const MIN_MEMORY_BUDGET_BYTES: usize = 16 << 20;

/// What RocksDB holds in memory and on disk now ([`Storage::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageUsage {
    /// The shared block cache: data, index and filter blocks plus the
    /// memtables' reservations. Bounded by the memory budget (RocksDB may
    /// exceed it briefly while blocks are pinned by readers).
    pub cache_bytes: u64,
    /// The block cache's capacity: the memory budget.
    pub cache_capacity_bytes: u64,
    /// Memtables, mutable and being flushed (counted inside `cache_bytes`
    /// through their reservations).
    pub memtable_bytes: u64,
    /// Table readers' memory outside the cache (index and filter blocks
    /// live in the cache, so this stays small).
    pub table_reader_bytes: u64,
    /// Live table files on disk.
    pub sst_bytes: u64,
    /// Write-ahead log files on disk.
    pub wal_bytes: u64,
    /// What the block cache holds, by kind of entry: bytes charged per
    /// [`CACHE_ROLES`] name, in that order (RocksDB's census of the cache,
    /// which it redoes when asked and the last is over 10 s old; zeros when
    /// it is unavailable).
    pub cache_roles: [u64; CACHE_ROLES.len()],
}

/// The kinds of block cache entry [`StorageUsage::cache_roles`] counts:
/// RocksDB's role names, hyphenated as in its statistics. Roles ferry's
/// options never create (blob, compression dictionary, ...) are `misc`.
pub const CACHE_ROLES: [&str; 5] = [
    "data-block",
    "index-block",
    "filter-block",
    "write-buffer",
    "misc",
];

/// Parses the census line of RocksDB's `rocksdb.block-cache-entry-stats`
/// property (`Block cache entry stats(count,size,portion): DataBlock(12,48.00
/// KB,0.03%) ...`) into bytes per [`CACHE_ROLES`] entry. Sizes are printed
/// to 0.01 of their unit, so a figure is exact to 0.5% at worst.
fn parse_cache_roles(stats: &str) -> [u64; CACHE_ROLES.len()] {
    let mut roles = [0u64; CACHE_ROLES.len()];
    let Some((_, census)) = stats.split_once("Block cache entry stats(count,size,portion):") else {
        return roles;
    };
    for item in census.split(')') {
        let Some((name, fields)) = item.trim().split_once('(') else {
            continue;
        };
        let mut fields = fields.split(',');
        let (Some(_count), Some(size)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((number, unit)) = size.trim().split_once(' ') else {
            continue;
        };
        let Ok(number) = number.parse::<f64>() else {
            continue;
        };
        let scale = match unit {
            "KB" => 1u64 << 10,
            "MB" => 1 << 20,
            "GB" => 1 << 30,
            "TB" => 1 << 40,
            _ => continue,
        };
        let role = match name {
            "DataBlock" => "data-block",
            "IndexBlock" => "index-block",
            "FilterBlock" | "FilterMetaBlock" | "DeprecatedFilterBlock" => "filter-block",
            "WriteBuffer" => "write-buffer",
            _ => "misc",
        };
        let i = CACHE_ROLES
            .iter()
            .position(|r| *r == role)
            .expect("a listed role");
        roles[i] += (number * scale as f64).round() as u64;
    }
    roles
}

/// One page of an inbox.
#[derive(Debug, Clone, Default)]
pub struct InboxPage {
    /// Entries, oldest first, with their seq.
    pub entries: Vec<proto::Deliver>,
    /// Whether more entries follow the last one.
    pub has_more: bool,
    /// The last seq scanned (entries whose message expired are skipped but
    /// still advance this).
    pub last_seq: u64,
}

/// The database.
pub struct Storage {
    pub(crate) db: Arc<DB>,
    /// The block cache every column family shares (memtables charged in).
    cache: rocksdb::Cache,
    /// Its capacity, bytes.
    cache_capacity: usize,
    pub(crate) groups: RwLock<GroupCache>,
    pub(crate) options: StorageOptions,
    /// Set by [`Storage::close`]: background sweeps stop at their next chunk.
    pub(crate) closing: AtomicBool,
    /// The retention sweeper thread, stopped and joined by [`Storage::close`].
    pub(crate) sweeper: Mutex<Option<crate::retention::SweeperHandle>>,
    /// Set by the committer when a batch write fails, cleared by the next
    /// one that succeeds.
    pub(crate) writes_failing: AtomicBool,
    /// Held while a backup runs: backups are made one at a time.
    pub(crate) backup_lock: Mutex<()>,
    /// Test-only fault injection (compiled out of every other build).
    #[cfg(test)]
    pub(crate) faults: Faults,
}

/// Faults a unit test can inject into reads and writes.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Faults {
    /// Reads of this kind (`"max_seq"`, `"dedup"`, `"cursor"`, `"group"`,
    /// `"tombstone"`) naming this id fail.
    pub fail_reads_of: Mutex<Option<(&'static str, String)>>,
    /// Batch writes fail.
    pub fail_writes: AtomicBool,
    /// Runs in [`Storage::group`] between the database load and the cache
    /// fill (to make a race deterministic).
    #[allow(clippy::type_complexity)]
    pub after_group_load: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// Whether `id` can be in a key: ids the committer stores are at most
/// [`MAX_ID_BYTES`] long.
pub(crate) fn storable(id: &str) -> bool {
    id.len() <= MAX_ID_BYTES
}

pub(crate) fn storable_conv(conv: &ConvKey) -> bool {
    match conv {
        ConvKey::Direct(a, b) => storable(a) && storable(b),
        ConvKey::Group(g) => storable(g),
    }
}

impl Storage {
    /// Opens (or creates) the database in `path`. Refuses a data dir written
    /// by an incompatible schema.
    pub fn open(path: &Path, options: StorageOptions) -> Result<Arc<Storage>, StorageError> {
        std::fs::create_dir_all(path).map_err(|e| StorageError::Io(e.to_string()))?;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_open_files(options.max_open_files);
        db_opts.increase_parallelism(2);
        db_opts.set_max_background_jobs(2);
        // One committer writes; pipelining overlaps its WAL and memtable work.
        db_opts.set_enable_pipelined_write(true);
        db_opts.set_keep_log_file_num(4);
        // One memory budget for the whole database: without a shared cache
        // every column family gets its own 32 MiB block cache, and without a
        // write buffer manager each its own memtables (7 × 2 × 32 MiB).
        let budget = options.memory_budget_bytes.max(MIN_MEMORY_BUDGET_BYTES);
        let cache = rocksdb::Cache::new_lru_cache(budget);
        // No stall: past its half of the budget RocksDB flushes the column
        // family with the oldest memtable; it never blocks the committer.
        let write_buffers = rocksdb::WriteBufferManager::new_write_buffer_manager_with_cache(
            budget / 2,
            false,
            cache.clone(),
        );
        db_opts.set_write_buffer_manager(&write_buffers);
        // A rarely written column family (groups, meta) would otherwise pin
        // every WAL file since its last flush (463 MiB of WAL for 92 MiB of
        // tables in the hour-long soak): past this, the column families
        // holding the oldest WAL file are flushed.
        db_opts.set_max_total_wal_size(budget as u64);

        let retention = options.retention_days;
        let cfs = cf::ALL.iter().map(|name| {
            let mut o = Options::default();
            let mut table = BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            table.set_block_cache(&cache);
            table.set_cache_index_and_filter_blocks(true);
            // L0 files are read by every lookup: keep their index and
            // filter in the cache rather than loading them per read.
            table.set_pin_l0_filter_and_index_blocks_in_cache(true);
            o.set_block_based_table_factory(&table);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            o.set_write_buffer_size(32 << 20);
            match *name {
                cf::MSGS => {
                    // Expired messages disappear as compaction meets them;
                    // the key ends with the msg id, whose high bits are time.
                    o.set_compaction_filter("ferry-msgs-retention", move |_, key, _| {
                        let old = keys::trailing_u64(key).is_some_and(|id| {
                            msg_id_time_ms(id)
                                < crate::retention_cutoff_ms(crate::now_ms(), retention)
                        });
                        if old {
                            rocksdb::CompactionDecision::Remove
                        } else {
                            rocksdb::CompactionDecision::Keep
                        }
                    });
                }
                cf::DEDUP => {
                    // Every send looks its key up and almost never finds it:
                    // a memtable bloom filter answers most of those misses
                    // without searching the skiplist.
                    o.set_memtable_prefix_bloom_ratio(0.05);
                    o.set_memtable_whole_key_filtering(true);
                    o.set_compaction_filter("ferry-dedup-retention", move |_, _, value| {
                        let old = DedupValue::decode(value).is_ok_and(|v| {
                            v.server_time_ms
                                < crate::retention_cutoff_ms(crate::now_ms(), retention)
                        });
                        if old {
                            rocksdb::CompactionDecision::Remove
                        } else {
                            rocksdb::CompactionDecision::Keep
                        }
                    });
                }
                _ => {}
            }
            ColumnFamilyDescriptor::new(*name, o)
        });
        let db = DB::open_cf_descriptors(&db_opts, path, cfs)?;
        let storage = Storage {
            db: Arc::new(db),
            cache,
            cache_capacity: budget,
            groups: RwLock::new(GroupCache::new(options.group_cache_members)),
            options,
            closing: AtomicBool::new(false),
            sweeper: Mutex::new(None),
            writes_failing: AtomicBool::new(false),
            backup_lock: Mutex::new(()),
            #[cfg(test)]
            faults: Faults::default(),
        };
        storage.check_schema()?;
        Ok(Arc::new(storage))
    }

    fn check_schema(&self) -> Result<(), StorageError> {
        let meta = self.cf(cf::META);
        match self.db.get_cf(meta, keys::META_SCHEMA_VERSION)? {
            None => {
                // A new database: anything in it other than meta means a
                // foreign or damaged data dir.
                let has_data = cf::ALL.iter().filter(|n| **n != cf::META).any(|n| {
                    self.db
                        .iterator_cf(self.cf(n), IteratorMode::Start)
                        .next()
                        .is_some()
                });
                if has_data {
                    return Err(StorageError::Schema(
                        "data dir has ferry column families but no schema version".into(),
                    ));
                }
                let mut wo = rocksdb::WriteOptions::default();
                // Written once at creation; sync so it is never half there.
                wo.set_sync(true);
                let mut batch = rocksdb::WriteBatch::default();
                batch.put_cf(
                    meta,
                    keys::META_SCHEMA_VERSION,
                    SCHEMA_VERSION.to_be_bytes(),
                );
                self.db.write_opt(batch, &wo)?;
                Ok(())
            }
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_slice())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StorageError::Schema("unreadable schema version".into()))?;
                if found != SCHEMA_VERSION {
                    return Err(StorageError::Schema(format!(
                        "data dir has schema version {found}, this ferry reads version \
                         {SCHEMA_VERSION}; use a matching ferry release or a new data dir"
                    )));
                }
                Ok(())
            }
        }
    }

    pub(crate) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is created at open")
    }

    /// What RocksDB holds in memory (cache, memtables, table readers) and
    /// on disk (tables, WAL) now. Lists the data dir: call it off the
    /// reactor threads.
    pub fn usage(&self) -> StorageUsage {
        let memory =
            rocksdb::perf::get_memory_usage_stats(Some(&[self.db.as_ref()]), Some(&[&self.cache]))
                .ok();
        let sst_bytes = cf::ALL
            .iter()
            .filter_map(|name| {
                self.db
                    .property_int_value_cf(self.cf(name), "rocksdb.live-sst-files-size")
                    .ok()
                    .flatten()
            })
            .sum();
        // WAL files are `<number>.log` in the data dir (the info log is `LOG`).
        let wal_bytes = std::fs::read_dir(self.db.path())
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        // Of a column family that uses the shared cache (the default one,
        // which ferry leaves empty, has a cache of its own).
        let cache_roles = self
            .db
            .property_value_cf(self.cf(cf::MSGS), "rocksdb.block-cache-entry-stats")
            .ok()
            .flatten()
            .map_or([0; CACHE_ROLES.len()], |stats| parse_cache_roles(&stats));
        StorageUsage {
            cache_roles,
            cache_bytes: self.cache.get_usage() as u64,
            cache_capacity_bytes: self.cache_capacity as u64,
            memtable_bytes: memory.as_ref().map_or(0, |m| m.mem_table_total),
            table_reader_bytes: memory.as_ref().map_or(0, |m| m.mem_table_readers_total),
            sst_bytes,
            wal_bytes,
        }
    }

    /// The retention period in days.
    pub fn retention_days(&self) -> u32 {
        self.options.retention_days
    }

    /// Whether the last batch write failed (set by the committer, cleared by
    /// its next successful write): the server then cannot accept writes,
    /// and readiness should say so.
    pub fn writes_failing(&self) -> bool {
        self.writes_failing.load(Ordering::Relaxed)
    }

    /// Fails a read naming `id` when a unit test asked for it; nothing in
    /// other builds.
    #[inline(always)]
    pub(crate) fn read_fault(&self, _what: &str, _id: &str) -> Result<(), StorageError> {
        #[cfg(test)]
        if self
            .faults
            .fail_reads_of
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|(what, id)| *what == _what && id == _id)
        {
            return Err(StorageError::Io(format!(
                "injected {_what} read fault on {_id}"
            )));
        }
        Ok(())
    }

    /// Highest seq in `user`'s inbox (0 when empty, and for an id longer
    /// than [`MAX_ID_BYTES`]).
    pub fn max_seq(&self, user: &str) -> Result<u64, StorageError> {
        if !storable(user) {
            return Ok(0);
        }
        self.read_fault("max_seq", user)?;
        let prefix = keys::inbox_prefix(user);
        let mut it = self.db.raw_iterator_cf(self.cf(cf::INBOX));
        it.seek_for_prev(keys::inbox_key(user, u64::MAX));
        it.status()?;
        Ok(match it.key() {
            Some(k) if k.starts_with(&prefix) && k.len() == prefix.len() + 8 => {
                keys::trailing_u64(k).unwrap_or(0)
            }
            _ => 0,
        })
    }

    /// Up to `limit` inbox entries of `user` with seq > `after`, oldest first
    /// (an empty page for an id longer than [`MAX_ID_BYTES`]).
    pub fn read_inbox(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<InboxPage, StorageError> {
        if !storable(user) {
            return Ok(InboxPage {
                last_seq: after,
                ..Default::default()
            });
        }
        let prefix = keys::inbox_prefix(user);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::inbox_key(user, u64::MAX));
        // Past the block cache (a scan, in RocksDB's terms): a sync reads
        // one user's newest entries once, and caching the blocks it passes
        // would only evict what the point lookups (cursors, dedup) reuse.
        // Blocks already cached are still used; the OS page cache keeps
        // the files' recent pages either way.
        ro.fill_cache(false);
        let start = keys::inbox_key(user, after.saturating_add(1));
        let it = self.db.iterator_cf_opt(
            self.cf(cf::INBOX),
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        // Grown as entries come, not reserved for `limit`: an entry with an
        // inline Deliver is ~200 bytes, so reserving a page cost ~40 KiB per
        // login sync even for an empty inbox, and a reconnect storm of such
        // transient allocations left the allocator holding about 6 KiB per
        // connection afterwards (issue 13 #20).
        let mut raw = Vec::new();
        let mut has_more = false;
        for item in it {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if raw.len() == limit {
                has_more = true;
                break;
            }
            let seq = keys::trailing_u64(&k).unwrap_or(0);
            raw.push((seq, InboxValue::decode(&*v)?));
        }
        let last_seq = raw.last().map_or(after, |(s, _)| *s);
        let entries = self.resolve(user, raw)?;
        Ok(InboxPage {
            entries,
            has_more,
            last_seq,
        })
    }

    /// Turns inbox values into entries, fetching pointed-to messages in one
    /// multi-get. Pointers whose message expired are skipped.
    fn resolve(
        &self,
        user: &str,
        raw: Vec<(u64, InboxValue)>,
    ) -> Result<Vec<proto::Deliver>, StorageError> {
        let msgs = self.cf(cf::MSGS);
        let pointer_keys: Vec<Vec<u8>> = raw
            .iter()
            .filter(|(_, v)| v.inline.is_none())
            .map(|(_, v)| keys::msg_key(&v.conv, v.msg_id))
            .collect();
        // Past the block cache too, as the inbox read (see `read_inbox`).
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        let mut fetched = self
            .db
            .batched_multi_get_cf_opt(msgs, pointer_keys.iter(), false, &ro)
            .into_iter();
        let mut out = Vec::with_capacity(raw.len());
        for (seq, value) in raw {
            if let Some(mut entry) = value.inline {
                entry.seq = seq;
                out.push(entry);
                continue;
            }
            let Some(found) = fetched.next() else { break };
            let Some(bytes) = found? else { continue };
            let Some(conv) = ConvKey::decode(&value.conv) else {
                continue;
            };
            let msg = StoredMessage::decode(&*bytes)?;
            out.push(message_entry(user, seq, value.msg_id, &conv, msg));
        }
        Ok(out)
    }

    /// One stored message of a conversation (`None` also for a
    /// conversation named by an id longer than [`MAX_ID_BYTES`]).
    pub fn message(
        &self,
        conv: &ConvKey,
        msg_id: u64,
    ) -> Result<Option<StoredMessage>, StorageError> {
        if !storable_conv(conv) {
            return Ok(None);
        }
        let key = keys::msg_key(&conv.encode(), msg_id);
        match self.db.get_pinned_cf(self.cf(cf::MSGS), key)? {
            Some(bytes) => Ok(Some(StoredMessage::decode(&*bytes)?)),
            None => Ok(None),
        }
    }

    /// Whether `conv` has any stored message (one seek).
    pub(crate) fn has_messages(&self, conv: &ConvKey) -> Result<bool, StorageError> {
        if !storable_conv(conv) {
            return Ok(false);
        }
        let prefix = conv.encode();
        let mut it = self.db.raw_iterator_cf(self.cf(cf::MSGS));
        it.seek(&prefix);
        it.status()?;
        Ok(it
            .key()
            .is_some_and(|k| k.starts_with(&prefix) && k.len() == prefix.len() + 8))
    }

    /// Up to `limit` messages of `conv` with msg id < `before` (0: newest),
    /// newest first, as `viewer` sees them (seq 0). Also whether older exist.
    /// Empty for a conversation named by an id longer than [`MAX_ID_BYTES`].
    pub fn history(
        &self,
        viewer: &str,
        conv: &ConvKey,
        before: u64,
        limit: usize,
    ) -> Result<(Vec<proto::Deliver>, bool), StorageError> {
        if !storable_conv(conv) {
            return Ok((Vec::new(), false));
        }
        let prefix = conv.encode();
        let before = if before == 0 { u64::MAX } else { before };
        let mut it = self.db.raw_iterator_cf(self.cf(cf::MSGS));
        it.seek_for_prev(keys::msg_key(&prefix, before.saturating_sub(1)));
        let mut out = Vec::new();
        let mut has_more = false;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            if out.len() == limit {
                has_more = true;
                break;
            }
            let msg_id = keys::trailing_u64(k).unwrap_or(0);
            let msg = StoredMessage::decode(v)?;
            out.push(message_entry(viewer, 0, msg_id, conv, msg));
            it.prev();
        }
        it.status()?;
        Ok((out, has_more))
    }

    /// The acked cursor of one device (0 if never acked, and for ids longer
    /// than [`MAX_ID_BYTES`]).
    pub fn cursor(&self, user: &str, device: &str) -> Result<u64, StorageError> {
        if !storable(user) || !storable(device) {
            return Ok(0);
        }
        self.read_fault("cursor", user)?;
        Ok(self
            .db
            .get_pinned_cf(self.cf(cf::CURSORS), keys::cursor_key(user, device))?
            .and_then(|v| <[u8; 8]>::try_from(&*v).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// The dedup record of (sender, client msg id), if any (`None` for a
    /// sender id longer than [`MAX_ID_BYTES`]).
    pub fn dedup(
        &self,
        sender: &str,
        client_msg_id: u64,
    ) -> Result<Option<DedupValue>, StorageError> {
        if !storable(sender) {
            return Ok(None);
        }
        self.read_fault("dedup", sender)?;
        match self
            .db
            .get_pinned_cf(self.cf(cf::DEDUP), keys::dedup_key(sender, client_msg_id))?
        {
            Some(v) => Ok(Some(DedupValue::decode(&*v)?)),
            None => Ok(None),
        }
    }

    /// Flushes memtables (used at shutdown so the next start replays less WAL).
    pub fn flush(&self) -> Result<(), StorageError> {
        for name in cf::ALL {
            self.db.flush_cf(self.cf(name))?;
        }
        Ok(())
    }

    /// Prepares for process exit: stops the retention sweeper (an
    /// in-progress sweep stops at its next chunk) and waits for its thread
    /// to end, flushes memtables, then stops RocksDB's background flushes
    /// and compactions and waits for the running ones.
    ///
    /// The process exits without dropping the database (the committer
    /// thread still holds it), and C++ static destructors run at exit: a
    /// compaction, or a sweeper thread, still running then would lock a
    /// destroyed mutex and abort the process. Writes after this call may
    /// stall; make none. Blocking: call it from a blocking thread.
    pub fn close(&self) -> Result<(), StorageError> {
        self.closing.store(true, Ordering::Relaxed);
        self.stop_sweeper();
        let flushed = self.flush();
        self.db.cancel_all_background_work(true);
        flushed
    }

    /// Compacts every column family now (retention tests, ops).
    pub fn compact_all(&self) {
        for name in cf::ALL {
            self.db
                .compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
    }
}

/// Builds the entry `viewer` sees for a stored message.
pub fn message_entry(
    viewer: &str,
    seq: u64,
    msg_id: u64,
    conv: &ConvKey,
    msg: StoredMessage,
) -> proto::Deliver {
    let (kind, id) = match conv {
        ConvKey::Direct(..) => (proto::ConversationKind::Direct, conv.peer_of(viewer)),
        ConvKey::Group(g) => (proto::ConversationKind::Group, g.as_str()),
    };
    let own = msg.from == viewer;
    proto::Deliver {
        seq,
        msg_id,
        from: msg.from,
        conversation: Some(proto::Conversation {
            kind: kind as i32,
            id: id.to_owned(),
        }),
        content_type: if msg.recalled {
            String::new()
        } else {
            msg.content_type
        },
        body: if msg.recalled {
            bytes::Bytes::new()
        } else {
            msg.body
        },
        server_time_ms: msg.server_time_ms,
        kind: if msg.recalled {
            proto::EntryKind::Recall as i32
        } else {
            msg.kind
        },
        ref_msg_id: if msg.recalled { msg_id } else { 0 },
        client_msg_id: if own { msg.client_msg_id } else { 0 },
        group_event: msg.group_event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `total` bytes of 64 KiB values into `cf_name`, unsynced.
    fn fill(storage: &Storage, cf_name: &str, total: usize) {
        let value = vec![7u8; 64 << 10];
        for i in 0..total / value.len() {
            let key = format!("fill-{i:08}");
            storage
                .db
                .put_cf(storage.cf(cf_name), key.as_bytes(), &value)
                .unwrap();
        }
    }

    #[test]
    fn the_cache_census_is_read_by_role() {
        let stats = "Block cache LRUCache@0x55d0 #1 capacity: 128.00 MB seed: 1 usage: 50.00 MB \
                     table_size: 4096 occupancy: 87 collections: 3 last_copies: 0 last_secs: 0.01 \
                     secs_since: 4\nBlock cache entry stats(count,size,portion): \
                     DataBlock(120,1.50 MB,1.17%) FilterBlock(4,12.25 KB,0.01%) \
                     FilterMetaBlock(1,0.50 KB,0%) IndexBlock(9,36.00 KB,0.03%) \
                     WriteBuffer(48,48.00 MB,37.5%) Misc(1,0.00 KB,0%) BlobValue(2,2.00 KB,0%)\n";
        assert_eq!(
            parse_cache_roles(stats),
            [3 << 19, 36 << 10, 12_544 + 512, 48 << 20, 2 << 10]
        );
        assert_eq!(parse_cache_roles("no census here"), [0; 5]);
    }

    #[test]
    fn the_cache_census_of_a_live_database_sees_its_memtables() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        fill(&storage, cf::MSGS, 4 << 20);
        let usage = storage.usage();
        // The census may be older than the writes (RocksDB redoes it at
        // most every so often), but it is of the shared cache, where the
        // memtables reserve their memory from the start.
        assert!(usage.cache_roles[3] > 0, "{usage:?}");
        assert!(
            usage.cache_roles.iter().sum::<u64>() <= usage.cache_bytes,
            "{usage:?}"
        );
    }

    /// Sync pages are read past the block cache: a reconnect storm's syncs
    /// would otherwise fill it with blocks read once.
    #[test]
    fn inbox_reads_leave_the_block_cache_as_it_was() {
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
        // The tables' index and filter blocks come in at the first reads.
        storage.read_inbox(&users[0], 0, 1).unwrap();
        let before = storage.usage().cache_bytes;

        for user in &users {
            let page = storage.read_inbox(user, 0, 100).unwrap();
            assert_eq!(page.entries.len(), 20);
        }
        // 200 users × 20 entries of ~230 bytes: ~900 KiB of data blocks.
        let after = storage.usage().cache_bytes;
        assert!(
            after < before + (64 << 10),
            "reads filled the cache: {before} -> {after} bytes"
        );
    }

    #[test]
    fn memtables_and_the_wal_stay_within_the_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        let budget = MIN_MEMORY_BUDGET_BYTES;
        let storage = Storage::open(
            dir.path(),
            StorageOptions {
                memory_budget_bytes: budget,
                ..Default::default()
            },
        )
        .unwrap();
        // One small write to a rarely written column family first: its
        // memtable holds on to the oldest WAL file until it is flushed.
        storage
            .db
            .put_cf(storage.cf(cf::GROUPS), b"g", b"members")
            .unwrap();
        // Four budgets' worth into two busy column families.
        fill(&storage, cf::MSGS, 2 * budget);
        fill(&storage, cf::INBOX, 2 * budget);
        storage.db.flush_wal(true).unwrap();
        // The writes only schedule the flushes that bring the memtables back
        // under the budget (the manager never stalls a writer): wait for
        // them, as a busy machine may not have run them yet.
        let mut settled = rocksdb::WaitForCompactOptions::default();
        settled.set_timeout(60_000_000);
        storage.db.wait_for_compact(&settled).unwrap();

        let usage = storage.usage();
        assert!(usage.sst_bytes > 0, "{usage:?}");
        assert_eq!(usage.cache_capacity_bytes, budget as u64);
        assert!(
            usage.memtable_bytes <= budget as u64,
            "memtables beyond the budget: {usage:?}"
        );
        assert!(
            usage.cache_bytes <= 2 * budget as u64,
            "cache beyond the budget: {usage:?}"
        );
        // Without the WAL bound every file since the groups write stays.
        assert!(
            usage.wal_bytes <= 2 * budget as u64,
            "WAL not bounded: {usage:?}"
        );
    }
}
