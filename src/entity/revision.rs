use std::fmt;

/// The version of an entity's stored state: how many state-changing commands
/// it has had. [`Revision::NONE`] means nothing is stored yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

impl Revision {
    /// No state stored yet.
    pub const NONE: Revision = Revision(0);

    /// The revision a write based on this one produces.
    pub fn next(self) -> Revision {
        Revision(self.0 + 1)
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
