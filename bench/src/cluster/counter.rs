//! The entity the cluster scenario drives: a counter of distinct adds.
//!
//! Each add carries an event id of its own, so an add sent again (as an
//! at-least-once client does when it got no answer) is recognised by the
//! library and not counted twice: the stored value must equal the number of
//! distinct adds acknowledged. Every state also names the node that applied
//! it, so that the harness can compare, at each commit, the writer with the
//! slice's owner (see `ownership::AUDIT`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use persist_durable::{DurableEntity, Id, Never};
use serde::{Deserialize, Serialize};

/// A counter's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counter {
    /// Distinct adds applied since the counter was created or last deleted.
    #[serde(default)]
    pub(crate) value: u64,
    /// The node that applied the last add; empty in a deleted counter.
    #[serde(default)]
    pub(crate) writer: String,
}

/// What can be asked of a counter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum CounterCommand {
    /// Counts one more add (the event id that makes it distinct travels beside it).
    Add,
    /// Changes nothing: answers the value.
    Read,
    /// Erases the counter: its value is 0 again.
    Delete,
}

/// The transition's setting: the node applying it, recorded in the state.
#[derive(Debug, Clone, Default)]
pub(crate) struct AppliedBy(pub(crate) Arc<str>);

/// A counter's key.
pub(crate) type CounterId = Id<Counter>;

/// The entity type, as the `entity_type` column holds it.
pub(crate) const ENTITY_TYPE: &str = "ClusterCounter";

impl DurableEntity for Counter {
    const ENTITY_TYPE: &'static str = ENTITY_TYPE;
    const MANIFEST: &'static str = "ClusterCounter/v1";
    type Key = CounterId;
    type Command = CounterCommand;
    type Settings = AppliedBy;
    type Rejection = Never;

    fn apply(&self, command: &CounterCommand, _at: DateTime<Utc>, node: &AppliedBy) -> Result<Option<Self>, Never> {
        Ok(match command {
            CounterCommand::Add => Some(Counter {
                value: self.value + 1,
                writer: node.0.to_string(),
            }),
            CounterCommand::Read => None,
            // Committed as a tombstone by the machinery, never applied here.
            CounterCommand::Delete => Some(Counter::default()),
        })
    }

    fn is_delete(command: &CounterCommand) -> bool {
        matches!(command, CounterCommand::Delete)
    }

    fn command_name(command: &CounterCommand) -> &'static str {
        match command {
            CounterCommand::Add => "add",
            CounterCommand::Read => "read",
            CounterCommand::Delete => "delete",
        }
    }
}

/// The name of counter `index`.
pub(crate) fn counter_name(index: usize) -> String {
    format!("counter-{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_add_counts_one_and_names_its_node_and_a_read_changes_nothing() {
        let node = AppliedBy("b".into());
        let added = Counter::default()
            .apply(&CounterCommand::Add, Utc::now(), &node)
            .unwrap();
        assert_eq!(
            added,
            Some(Counter {
                value: 1,
                writer: "b".into()
            })
        );
        let read = Counter::default()
            .apply(&CounterCommand::Read, Utc::now(), &node)
            .unwrap();
        assert_eq!(read, None);
        assert!(Counter::is_delete(&CounterCommand::Delete));
    }
}
