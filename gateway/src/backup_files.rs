//! Backups of a node's data dir: the database (through
//! [`ferry_storage::backup`], RocksDB's BackupEngine) and, beside it in the
//! backup dir, the data dir's generated secret files (`jwt.secret`,
//! `admin.token`), which never change and without which a restored node
//! would refuse every token minted before. `ferry backup` / `ferry
//! restore` and `POST /admin/backup` use these (docs/OPERATIONS.md,
//! "Backups and restore").

use std::path::Path;

use ferry_storage::StorageError;
use ferry_storage::backup::{self, BackupInfo, Restored};

use crate::auth::{ADMIN_TOKEN_FILE, SECRET_FILE};

/// Copies the secret files that exist in `from` into `to` (mode kept,
/// 0600), replacing files there when `overwrite`, else keeping them.
/// Returns the names copied.
pub fn copy_secret_files(
    from: &Path,
    to: &Path,
    overwrite: bool,
) -> std::io::Result<Vec<&'static str>> {
    let mut copied = Vec::new();
    for name in [SECRET_FILE, ADMIN_TOKEN_FILE] {
        let source = from.join(name);
        let target = to.join(name);
        if !source.exists() || (!overwrite && target.exists()) {
            continue;
        }
        std::fs::create_dir_all(to)?;
        // Through a temporary name: a crash never leaves half a secret.
        let partial = to.join(format!(".{name}.partial"));
        std::fs::copy(&source, &partial)?;
        std::fs::File::open(&partial)?.sync_all()?;
        std::fs::rename(&partial, &target)?;
        copied.push(name);
    }
    Ok(copied)
}

/// `ferry backup`: backs up the database of a stopped node's `data_dir`
/// into `to`, with its secret files, keeping the newest `keep` backups
/// there (0: all). Fails if the node is running (the database is locked):
/// use `POST /admin/backup` then.
pub fn backup_stopped(
    data_dir: &Path,
    to: &Path,
    keep: usize,
) -> Result<(BackupInfo, Vec<&'static str>), StorageError> {
    let info = backup::backup_stopped(&backup::db_path_of(data_dir), to, keep)?;
    let copied = copy_secret_files(data_dir, to, true)
        .map_err(|e| StorageError::Io(format!("copying the secret files: {e}")))?;
    Ok((info, copied))
}

/// `ferry restore`: restores backup `id` (the newest when `None`) from
/// `from` into `data_dir`, which must hold no database, and the secret
/// files the data dir lacks; the database is marked restored (see
/// [`ferry_storage::backup`]: seqs and message ids go on past anything
/// handed out before).
pub fn restore(
    from: &Path,
    data_dir: &Path,
    id: Option<u32>,
) -> Result<(Restored, Vec<&'static str>), StorageError> {
    let restored = backup::restore(from, &backup::db_path_of(data_dir), id)?;
    let copied = copy_secret_files(from, data_dir, false)
        .map_err(|e| StorageError::Io(format!("copying the secret files: {e}")))?;
    Ok((restored, copied))
}

/// The backups in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<BackupInfo>, StorageError> {
    backup::list_backups(dir)
}
