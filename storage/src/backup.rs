//! Backups and restore (docs/OPERATIONS.md, "Backups and restore").
//!
//! A backup is RocksDB's `BackupEngine` over the live database: it flushes
//! the memtables and copies the files of one consistent point in time into
//! the backup dir, sharing the table files already there with earlier
//! backups (incremental). Writes go on while it runs; every write
//! acknowledged before the call is in it.
//!
//! A restore copies a backup into an empty data dir and then marks the
//! data dir as restored, so that it never hands out a seq or a message id
//! that the lost tail (everything acknowledged after the backup) may have
//! handed out already, and that clients may hold:
//!
//! ```text
//! meta  b"seq_floor"          → lowest seq an inbox may get next (u64); each restore
//!                               raises it to the next multiple of SEQ_GENERATION
//!       b"msg_id_high_water"  → raised to the restoring machine's clock, so new ids
//!                               are minted after anything minted before the restore
//!       b"link_epoch"         → renewed; outbox rows re-stamped with it and
//!       b"link_prev"[peer]      the old epoch recorded per link, so that peers take
//!                               this node's links on where they stand (cluster)
//! ```
//!
//! Seqs: a user's next seq is the larger of "last seq in the inbox + 1"
//! and the floor. Every restore moves the floor to the next generation,
//! `(g + 1) · 2^40` where `g` is the generation of the floor in the backup:
//! all the seqs handed out since the backup's data dir was last restored
//! are below that, unless one user received 2^40 (a trillion) entries, so
//! no seq is handed out twice. Clients see one jump in their inbox's seqs,
//! which sync already handles as a gap.
//!
//! Message ids are `[ms:42][node:10][counter:12]` and strictly increase
//! from the stored high-water mark (`crate::model::mint_msg_id`): a
//! restored node mints ids above the restoring machine's clock, which is
//! after every id minted before the crash as long as that clock is not
//! behind the crashed node's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::backup::{BackupEngine, BackupEngineOptions, RestoreOptions};
use rocksdb::{Env, WriteBatch, WriteOptions};

use crate::db::{Storage, StorageOptions, cf};
use crate::model::MSG_ID_TIME_SHIFT;
use crate::{StorageError, keys};

/// Seqs per restore generation: a restore moves the seq floor to the next
/// multiple of this.
pub const SEQ_GENERATION: u64 = 1 << 40;

/// One backup in a backup dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// The backup's id (increasing within its backup dir).
    pub id: u32,
    /// When it was made, Unix seconds.
    pub timestamp: i64,
    /// Bytes of its files (shared files counted in every backup holding them).
    pub size: u64,
    /// How many files it has.
    pub files: u32,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The backup restored.
    pub backup: BackupInfo,
    /// The seq floor now in force (see the module doc).
    pub seq_floor: u64,
    /// The message-id high-water mark now in force.
    pub msg_id_high_water: u64,
}

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> StorageError {
    StorageError::Io(format!("{what} {}: {e}", path.display()))
}

fn engine(dir: &Path) -> Result<BackupEngine, StorageError> {
    std::fs::create_dir_all(dir).map_err(|e| io("creating backup dir", dir, e))?;
    let options = BackupEngineOptions::new(dir)?;
    let env = Env::new()?;
    Ok(BackupEngine::open(&options, &env)?)
}

fn infos(engine: &BackupEngine) -> Vec<BackupInfo> {
    engine
        .get_backup_info()
        .into_iter()
        .map(|i| BackupInfo {
            id: i.backup_id,
            timestamp: i.timestamp,
            size: i.size,
            files: i.num_files,
        })
        .collect()
}

/// The backups in `dir`, oldest first.
pub fn list_backups(dir: &Path) -> Result<Vec<BackupInfo>, StorageError> {
    if !dir.join("meta").exists() {
        return Ok(Vec::new());
    }
    Ok(infos(&engine(dir)?))
}

impl Storage {
    /// Backs up the database into `dir` (created if missing) while it
    /// serves, and returns the new backup. Incremental: table files already
    /// in `dir` are not copied again. Blocking (seconds for a large
    /// database): call it from a blocking thread. Backups into one dir are
    /// made one at a time (a second caller waits). Once the new backup is
    /// verified, only the newest `keep` backups in `dir` are kept (0: all);
    /// files still shared with a kept backup stay.
    pub fn backup(&self, dir: &Path, keep: usize) -> Result<BackupInfo, StorageError> {
        let _one_at_a_time = self.backup_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut engine = engine(dir)?;
        // Flush first: the backup then holds every acknowledged write in
        // its table files, not only in a WAL copy.
        engine.create_new_backup_flush(&*self.db, true)?;
        let newest = infos(&engine)
            .into_iter()
            .max_by_key(|i| i.id)
            .ok_or_else(|| StorageError::Io("backup made but not listed".into()))?;
        engine.verify_backup(newest.id)?;
        if keep > 0 {
            engine.purge_old_backups(keep)?;
        }
        Ok(newest)
    }

    /// The lowest seq an inbox may get next (0 until a restore; see the
    /// module doc).
    pub fn seq_floor(&self) -> Result<u64, StorageError> {
        self.meta_u64(keys::META_SEQ_FLOOR)
    }

    pub(crate) fn meta_u64(&self, key: &[u8]) -> Result<u64, StorageError> {
        Ok(self
            .db
            .get_cf(self.cf(cf::META), key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes))
    }
}

/// Backs up the database of a stopped node at `db_path` into `dir`,
/// keeping the newest `keep` backups there (0: all). Fails if a node is
/// running on it (RocksDB's lock).
pub fn backup_stopped(db_path: &Path, dir: &Path, keep: usize) -> Result<BackupInfo, StorageError> {
    if !db_path.join("CURRENT").exists() {
        return Err(io("no database in", db_path, "CURRENT not found"));
    }
    let storage = Storage::open(db_path, StorageOptions::default())?;
    let info = storage.backup(dir, keep);
    storage.close()?;
    info
}

/// Restores backup `id` (the newest when `None`) from `dir` into
/// `db_path`, which must not hold a database, then marks it restored (see
/// the module doc). Run it with the node stopped; start the node after.
pub fn restore(dir: &Path, db_path: &Path, id: Option<u32>) -> Result<Restored, StorageError> {
    if db_path.join("CURRENT").exists() {
        return Err(io(
            "refusing to restore over the database in",
            db_path,
            "move it away first",
        ));
    }
    let mut engine = engine(dir)?;
    let all = infos(&engine);
    let backup = match id {
        Some(id) => all.into_iter().find(|i| i.id == id),
        None => all.into_iter().max_by_key(|i| i.id),
    }
    .ok_or_else(|| io("no such backup in", dir, format!("{id:?}")))?;
    std::fs::create_dir_all(db_path).map_err(|e| io("creating", db_path, e))?;
    engine.restore_from_backup(db_path, db_path, &RestoreOptions::default(), backup.id)?;
    drop(engine);

    let storage = Storage::open(db_path, StorageOptions::default())?;
    let marked = mark_restored(&storage, crate::now_ms());
    let closed = storage.close();
    let (seq_floor, msg_id_high_water) = marked?;
    closed?;
    Ok(Restored {
        backup,
        seq_floor,
        msg_id_high_water,
    })
}

/// Raises the seq floor to the next generation and the message-id
/// high-water mark to `now_ms`, and renews the link epoch, in one synced
/// write. Returns the new floor and high-water mark.
fn mark_restored(storage: &Arc<Storage>, now_ms: u64) -> Result<(u64, u64), StorageError> {
    let floor = storage.seq_floor()?;
    let seq_floor = (floor / SEQ_GENERATION + 1) * SEQ_GENERATION;
    let high_water = storage
        .meta_u64(keys::META_MSG_ID_HIGH_WATER)?
        .max(now_ms << MSG_ID_TIME_SHIFT);
    let mut batch = WriteBatch::default();
    let meta = storage.cf(cf::META);
    batch.put_cf(meta, keys::META_SEQ_FLOOR, seq_floor.to_be_bytes());
    batch.put_cf(meta, keys::META_MSG_ID_HIGH_WATER, high_water.to_be_bytes());
    let mut wo = WriteOptions::default();
    // The marker must be on disk before the node can hand out anything.
    wo.set_sync(true);
    storage.db.write_opt(batch, &wo)?;
    storage.continue_links_in_new_epoch()?;
    Ok((seq_floor, high_water))
}

/// Where `ferry backup`/`restore` and the admin call find a database: the
/// data dir's `db` subdirectory.
pub fn db_path_of(data_dir: &Path) -> PathBuf {
    data_dir.join("db")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_restore_moves_the_floor_one_generation_and_ids_past_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        assert_eq!(storage.seq_floor().unwrap(), 0);
        let (floor, hw) = mark_restored(&storage, 1_000).unwrap();
        assert_eq!(floor, SEQ_GENERATION);
        assert_eq!(hw, 1_000 << MSG_ID_TIME_SHIFT);
        let (floor, hw) = mark_restored(&storage, 500).unwrap();
        assert_eq!(floor, 2 * SEQ_GENERATION);
        assert_eq!(hw, 1_000 << MSG_ID_TIME_SHIFT, "never moves back");
        assert_eq!(storage.seq_floor().unwrap(), 2 * SEQ_GENERATION);
    }

    #[test]
    fn backups_beyond_keep_are_pruned_oldest_first_and_zero_keeps_all() {
        let dir = tempfile::tempdir().unwrap();
        let backups = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let ids = |keep| {
            storage
                .db
                .put_cf(storage.cf(cf::META), b"test", b"x")
                .unwrap();
            storage.backup(backups.path(), keep).unwrap();
            let listed = list_backups(backups.path()).unwrap();
            listed.iter().map(|b| b.id).collect::<Vec<_>>()
        };
        assert_eq!(ids(0), [1]);
        assert_eq!(ids(0), [1, 2]);
        assert_eq!(ids(0), [1, 2, 3]);
        assert_eq!(ids(2), [3, 4], "the newest two stay");
        assert_eq!(ids(2), [4, 5]);
        assert_eq!(ids(0), [4, 5, 6]);
        // What is kept still restores.
        let restored = tempfile::tempdir().unwrap();
        let r = restore(backups.path(), &restored.path().join("db"), Some(4)).unwrap();
        assert_eq!(r.backup.id, 4);
    }
}
