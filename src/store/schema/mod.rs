//! diesel's `table!` schema of each backend: exactly what `diesel
//! print-schema` prints for a database migrated with that backend's
//! migrations. Do not edit them by hand: `postgres.rs` comes from diesel.toml,
//! `sqlite.rs` from diesel-sqlite.toml here (with sqlite.patch, which widens
//! SQLite's 64-bit INTEGER columns to `BigInt`); CI regenerates both from
//! fresh databases and fails on any difference.
//!
//! There are two because the backends' column types differ (`TIMESTAMPTZ`,
//! `BYTEA` and `BIGINT` on PostgreSQL are `TEXT`, `BLOB` and `INTEGER` on
//! SQLite). They live beside the backends that use them and are
//! crate-private: the tables are the stores' business, not the library's API.
//! rustfmt skips them, so that `cargo fmt` never changes what print-schema
//! wrote.

#[cfg(feature = "postgres")]
#[rustfmt::skip]
pub(crate) mod postgres;
#[cfg(feature = "sqlite")]
#[rustfmt::skip]
pub(crate) mod sqlite;
