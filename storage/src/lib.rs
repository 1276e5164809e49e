//! ferry storage on RocksDB (filled in by the durable-messaging work).
