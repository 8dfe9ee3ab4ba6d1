//! The user state wired into the machinery: the generic actors, handle,
//! feed and errors instantiated for [`UserState`], under the names
//! applications already use, and the messages the user actor takes.

use actix::prelude::*;

use crate::actors::{Entities, EntityActor, EntityCommand, EntityManager, Execute};
use crate::domain::{Command, Event, UserState};
use crate::error::CommandError;
use crate::feed::{EntityFeed, StateChange};
use crate::store::StoredState;

/// The typed handle to the user states.
pub type UserStates = Entities<UserState>;

/// Why a user's command was not applied.
pub type UserCommandError = CommandError<UserState>;

/// The change feed of the user states.
pub type ChangeFeed = EntityFeed<UserState>;

/// One committed revision of a user's state, as the change feed delivers it.
pub type UserStateChange = StateChange<UserState>;

/// A user's state as committed.
pub type StoredUserState = StoredState<UserState>;

/// Keeps one user's state; an [`EntityActor`] of [`UserState`]. Takes a
/// [`Command`] or an [`Event`] directly.
pub type UserStateActor = EntityActor<UserState>;

/// Routes each [`UserCommand`] to its user's actor; an [`EntityManager`] of [`UserState`].
pub type UserStateManager = EntityManager<UserState>;

/// A command for one user, sent to the [`UserStateManager`]:
/// `UserCommand::new(key, Command::UserLogin)`.
pub type UserCommand = EntityCommand<UserState>;

impl Message for Command {
    type Result = Result<UserState, UserCommandError>;
}

impl Message for Event {
    type Result = Result<UserState, UserCommandError>;
}

impl Handler<Command> for UserStateActor {
    type Result = ResponseFuture<Result<UserState, UserCommandError>>;

    fn handle(&mut self, command: Command, ctx: &mut Self::Context) -> Self::Result {
        self.handle(Execute(command.into()), ctx)
    }
}

impl Handler<Event> for UserStateActor {
    type Result = ResponseFuture<Result<UserState, UserCommandError>>;

    fn handle(&mut self, event: Event, ctx: &mut Self::Context) -> Self::Result {
        self.handle(Execute(event), ctx)
    }
}
