//! Transparent huge pages, turned off for the server process.
//!
//! mimalloc asks for huge pages on its arenas (`madvise(MADV_HUGEPAGE)`),
//! and with the override it holds RocksDB's memory too. A 2 MiB huge page
//! stays resident while any of it is in use, and khugepaged collapses
//! partly freed 2 MiB ranges back into whole huge pages (by default it
//! does so with a single page in use), so memory that mimalloc gave back
//! returns. Measured in the soak (docs/BENCHMARKS.md, "soak"): with huge
//! pages, RSS net of the block cache was twice as high and kept growing in
//! steps after compactions. Databases generally advise turning them off
//! (RocksDB, Redis, MongoDB); this does it for ferry's process only.

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`):
/// for mappings made before and after. Returns whether they were on.
pub fn disable() -> std::io::Result<bool> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let before = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
    if before < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if before == 1 {
        return Ok(false);
    }
    // SAFETY: as above.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}
