//! The user-state actors: the generic actors instantiated for [`UserState`],
//! under the names applications already use, and the messages they take.

use actix::prelude::*;

use super::entity_actor::{EntityActor, Execute};
use super::manager::EntityManager;
use super::messages::EntityCommand;
use crate::domain::{Command, Event, UserState};
use crate::error::CommandError;

/// Keeps one user's state; an [`EntityActor`] of [`UserState`]. Takes a
/// [`Command`] or an [`Event`] directly.
pub type UserStateActor = EntityActor<UserState>;

/// Routes each [`UserCommand`] to its user's actor; an [`EntityManager`] of [`UserState`].
pub type UserStateManager = EntityManager<UserState>;

/// A command for one user, sent to the [`UserStateManager`]:
/// `UserCommand::new(key, Command::UserLogin)`.
pub type UserCommand = EntityCommand<UserState>;

impl Message for Command {
    type Result = Result<UserState, CommandError>;
}

impl Message for Event {
    type Result = Result<UserState, CommandError>;
}

impl Handler<Command> for UserStateActor {
    type Result = ResponseFuture<Result<UserState, CommandError>>;

    fn handle(&mut self, command: Command, ctx: &mut Self::Context) -> Self::Result {
        self.handle(Execute(command.into()), ctx)
    }
}

impl Handler<Event> for UserStateActor {
    type Result = ResponseFuture<Result<UserState, CommandError>>;

    fn handle(&mut self, event: Event, ctx: &mut Self::Context) -> Self::Result {
        self.handle(Execute(event), ctx)
    }
}
