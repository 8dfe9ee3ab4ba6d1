//! The application's code the machinery calls besides `apply` (a command's
//! name, a key's `Display`), each call with its panic contained: a panic
//! there fails the one command it concerns, or shows in a log line, and
//! never stops an actor, a shard or a manager.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::entity::DurableEntity;

/// `command`'s name ([`DurableEntity::command_name`]), or what its panic said.
pub(crate) fn command_name<E: DurableEntity>(command: &E::Command) -> Result<&'static str, String> {
    catch_unwind(AssertUnwindSafe(|| E::command_name(command))).map_err(|panic| panic_message(&panic))
}

/// The name metrics count a command under when its own panicked.
pub(crate) const UNNAMED: &str = "unnamed";

/// The name metrics count a timer's fire under.
pub(crate) const TIMER: &str = "timer";

/// A key shown in a log line: its `Display`, or a note that it panicked.
pub(crate) struct Shown<'a, K>(pub(crate) &'a K);

impl<K: fmt::Display> fmt::Display for Shown<'_, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = String::new();
        let written = catch_unwind(AssertUnwindSafe(|| {
            use fmt::Write;
            write!(shown, "{}", self.0)
        }));
        match written {
            Ok(Ok(())) => f.write_str(&shown),
            Ok(Err(_)) | Err(_) => f.write_str("<a key whose Display failed>"),
        }
    }
}

/// What a panic said, if it said it in text.
pub(crate) fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(text), _) => (*text).to_owned(),
        (_, Some(text)) => text.clone(),
        _ => "a panic without a message".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Panicking;

    impl fmt::Display for Panicking {
        fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
            panic!("no display for you")
        }
    }

    #[test]
    fn a_key_whose_display_panics_is_shown_as_such() {
        assert_eq!(Shown(&Panicking).to_string(), "<a key whose Display failed>");
        assert_eq!(Shown(&"m-u").to_string(), "m-u");
    }
}
