//! The actors: one [`UserStateActor`] per user, and the [`UserStateManager`]
//! that routes commands to them and hides their passivation from callers.

mod manager;
mod user_state_actor;

pub use manager::{GetManagerStats, ManagerStats, UserCommand, UserStateManager};
pub use user_state_actor::UserStateActor;
