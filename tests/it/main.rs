//! The integration tests that need no process of their own, one module per
//! topic, linked into one binary. Tests that install a global metrics recorder
//! or tracing subscriber (observability, retention, shards) and the Kafka tests
//! keep binaries of their own.

#[path = "../common/mod.rs"]
mod common;

mod adoption;
mod cart;
mod change_feed;
mod child;
mod cluster;
mod commands;
mod conflicts;
mod deadlock;
mod delete;
mod entities;
mod group_commit;
mod hostile_input;
mod http;
mod isolation;
mod keys;
mod outages;
mod outcomes;
mod panics;
mod passivation;
mod raw_statements;
mod reliability;
mod restart;
mod schema_evolution;
mod several_nodes;
mod startup;
mod testkit;
mod timers;
mod unencodable_state;
mod upgrade;
