//! The scenarios. Each has an `Args` struct (its command-line options) and
//! a `run` that prints its tables and returns its figures; those that use
//! worker processes also have a `Job` and a `worker`.

pub mod churn;
pub mod conns;
pub mod direct;
pub mod floor;
pub mod group;
pub mod soak;
pub mod suite;
