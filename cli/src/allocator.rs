//! mimalloc's settings for `ferry serve`: a process that runs for months
//! and whose RocksDB block cache frees and allocates all day.

use tracing::info;

/// mimalloc's `mi_option_purge_delay` (its `mi_option_t` value: the crate
/// does not export it; a test checks it against the documented default).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The environment variable that sets the same option (and wins over us).
const PURGE_DELAY_ENV: &str = "MIMALLOC_PURGE_DELAY";

/// Makes mimalloc give freed pages back to the OS at once instead of a
/// second later (its default). In two hour-long soaks of the same sitting
/// the server's RSS net of RocksDB's cache rose +12.5 MiB/h with immediate
/// purging against +19.3 MiB/h with the delay, at the same CPU
/// (docs/BENCHMARKS.md, "soak"). An operator's `MIMALLOC_PURGE_DELAY` is kept.
pub fn tune_for_a_server() {
    if std::env::var_os(PURGE_DELAY_ENV).is_some() {
        info!("{PURGE_DELAY_ENV} set: mimalloc's purge delay left as given");
        return;
    }
    // SAFETY: sets one integer in mimalloc's option table; mimalloc reads
    // it at its next purge decision. Called before the server's threads
    // start (the call is not synchronised).
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is the purge delay's: before anything sets it,
    /// it holds mimalloc 3's default of 1000 ms.
    #[test]
    fn the_purge_delay_option_is_the_one_we_set() {
        if std::env::var_os(PURGE_DELAY_ENV).is_some() {
            return;
        }
        // SAFETY: reads one integer of mimalloc's option table.
        let default = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        assert_eq!(default, 1000, "option {PURGE_DELAY} is not the purge delay");
        tune_for_a_server();
        // SAFETY: as above.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }, 0);
    }
}
