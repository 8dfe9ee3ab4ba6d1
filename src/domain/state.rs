use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Command, Event, ProductId, UserKey};
use crate::entity::{DurableEntity, Never};
use crate::timers::Timer;

/// The latest known state of one user.
///
/// Stored as JSON. Every field has a default, so a row written by an older
/// version (with fewer fields) still loads, and fields this version does not
/// know are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UserState {
    /// When the user last logged in.
    pub last_login: Option<DateTime<Utc>>,
    /// When the user last used the cart.
    pub last_cart_use: Option<DateTime<Utc>>,
    /// Recently viewed products, most recent first, without duplicates.
    pub recent_products: Vec<ProductId>,
    /// Whether the user agreed to marketing messages; `false` until they do.
    pub marketing_opt_in: bool,
    /// When the last state-changing event for this user happened.
    pub last_event_time: Option<DateTime<Utc>>,
    /// The cart the user last used was found abandoned: they were not seen
    /// for the [cart reminder](StatePolicy::with_cart_reminder)'s delay
    /// after. Cleared when they use the cart again. (A flag, not a time: it
    /// fits the state's padding, and a resident user stays within its
    /// memory budget; the change feed says when.)
    pub cart_abandoned: bool,
}

/// The user state as an entity: keyed by [`UserKey`], changed by [`Command`]s,
/// stored under the entity type `UserState`.
impl DurableEntity for UserState {
    const ENTITY_TYPE: &'static str = "UserState";
    const MANIFEST: &'static str = "UserState/v1";
    type Key = UserKey;
    type Command = Command;
    type Settings = StatePolicy;
    type Rejection = Never;

    fn apply(&self, command: &Command, at: DateTime<Utc>, policy: &StatePolicy) -> Result<Option<Self>, Never> {
        Ok(transition(self, command, at, policy))
    }

    fn command_name(command: &Command) -> &'static str {
        command.name()
    }

    fn is_delete(command: &Command) -> bool {
        matches!(command, Command::DeleteUser)
    }

    /// With a [cart reminder](StatePolicy::with_cart_reminder): a user who
    /// used the cart gets [`Command::CartAbandoned`] that long after their
    /// last event, unless they were reminded since they last used it. Every
    /// event moves it on.
    fn timers(&self, policy: &StatePolicy) -> Vec<Timer<Command>> {
        let (Some(delay), Some(used)) = (policy.cart_reminder, self.last_cart_use) else {
            return Vec::new();
        };
        if self.cart_abandoned {
            return Vec::new();
        }
        let seen = self.last_event_time.unwrap_or(used).max(used);
        match chrono::Duration::from_std(delay)
            .ok()
            .and_then(|delay| seen.checked_add_signed(delay))
        {
            Some(due) => vec![Timer::at(Self::CART_REMINDER, due, Command::CartAbandoned)],
            None => Vec::new(),
        }
    }
}

impl UserState {
    /// The name of the cart reminder's timer.
    pub const CART_REMINDER: &'static str = "cart-abandoned";
}

/// The knobs of the state transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatePolicy {
    /// How many recently viewed products are kept.
    pub recent_products_limit: usize,
    /// How long after their last event a user who used the cart gets
    /// [`Command::CartAbandoned`]; `None` (the default): never.
    pub cart_reminder: Option<Duration>,
}

impl Default for StatePolicy {
    fn default() -> Self {
        Self {
            recent_products_limit: 3,
            cart_reminder: None,
        }
    }
}

impl StatePolicy {
    /// Keeps `limit` recently viewed products.
    pub fn with_recent_products_limit(mut self, limit: usize) -> Self {
        self.recent_products_limit = limit;
        self
    }

    /// Reminds of an abandoned cart: a user who used the cart and was not
    /// seen for `after` gets [`Command::CartAbandoned`], delivered by a
    /// durable timer (see [`timers`](crate::timers)).
    pub fn with_cart_reminder(mut self, after: Duration) -> Self {
        self.cart_reminder = Some(after);
        self
    }
}

/// The state after `command` is applied at `now`. [`Command::GetUserState`]
/// returns the state unchanged, and so does [`Command::DeleteUser`] here: a
/// delete is the machinery's (a tombstone), not a transition of the state.
pub fn apply(state: &UserState, command: &Command, now: DateTime<Utc>, policy: &StatePolicy) -> UserState {
    transition(state, command, now, policy).unwrap_or_else(|| state.clone())
}

/// The state after `event`, or `None` when it changes nothing (a read). The
/// event happened at its `event_time`, or at `now` without one; a late event
/// never moves a recorded time backwards.
///
/// Redelivery (the same `event_id` again) is recognised by the actors, which
/// keep the applied ids beside the state, not by this function.
pub fn apply_event(state: &UserState, event: &Event, now: DateTime<Utc>, policy: &StatePolicy) -> Option<UserState> {
    transition(state, &event.command, event.event_time.unwrap_or(now), policy)
}

/// The whole domain logic: the state after `command` happened at `at`, or
/// `None` for a read. Pure, so the actors can apply it again after a conflict.
fn transition(state: &UserState, command: &Command, at: DateTime<Utc>, policy: &StatePolicy) -> Option<UserState> {
    let latest = |recorded: Option<DateTime<Utc>>| Some(recorded.map_or(at, |recorded| recorded.max(at)));
    let mut next = state.clone();
    match command {
        // Reads change nothing; a delete is the machinery's (is_delete).
        Command::GetUserState | Command::DeleteUser => return None,
        // Not the user's own doing: not an event of theirs.
        Command::CartAbandoned => {
            next.cart_abandoned = true;
            return Some(next);
        }
        Command::UserLogin => next.last_login = latest(next.last_login),
        Command::UseCart => {
            next.last_cart_use = latest(next.last_cart_use);
            next.cart_abandoned = false;
        }
        Command::ViewProduct { product_id } => {
            next.recent_products.retain(|seen| seen != product_id);
            next.recent_products.insert(0, product_id.clone());
            next.recent_products.truncate(policy.recent_products_limit);
        }
        Command::SetMarketingOptIn { opt_in } => next.marketing_opt_in = *opt_in,
    }
    next.last_event_time = latest(next.last_event_time);
    Some(next)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 12, minute, 0).unwrap()
    }

    fn view(id: &str) -> Command {
        Command::ViewProduct {
            product_id: ProductId::new(id).unwrap(),
        }
    }

    fn products(state: &UserState) -> Vec<&str> {
        state.recent_products.iter().map(ProductId::as_str).collect()
    }

    #[test]
    fn a_new_user_starts_empty_and_opted_out() {
        let state = UserState::default();
        assert_eq!(state.last_login, None);
        assert_eq!(state.last_cart_use, None);
        assert!(state.recent_products.is_empty());
        assert!(!state.marketing_opt_in);
        assert_eq!(state.last_event_time, None);
    }

    #[test]
    fn login_records_login_and_event_time() {
        let next = apply(
            &UserState::default(),
            &Command::UserLogin,
            at(1),
            &StatePolicy::default(),
        );
        assert_eq!(next.last_login, Some(at(1)));
        assert_eq!(next.last_event_time, Some(at(1)));
        assert_eq!(next.last_cart_use, None);
    }

    #[test]
    fn cart_use_records_cart_and_event_time() {
        let next = apply(&UserState::default(), &Command::UseCart, at(2), &StatePolicy::default());
        assert_eq!(next.last_cart_use, Some(at(2)));
        assert_eq!(next.last_event_time, Some(at(2)));
        assert_eq!(next.last_login, None);
    }

    #[test]
    fn viewed_products_keep_the_three_most_recent_first() {
        let policy = StatePolicy::default();
        let state = ["p1", "p2", "p3", "p4"]
            .iter()
            .fold(UserState::default(), |s, id| apply(&s, &view(id), at(3), &policy));
        assert_eq!(products(&state), ["p4", "p3", "p2"]);
    }

    #[test]
    fn viewing_a_listed_product_moves_it_to_the_front() {
        let policy = StatePolicy::default();
        let state = ["p1", "p2", "p3", "p1"]
            .iter()
            .fold(UserState::default(), |s, id| apply(&s, &view(id), at(3), &policy));
        assert_eq!(products(&state), ["p1", "p3", "p2"]);
    }

    #[test]
    fn the_recent_products_limit_is_configurable() {
        let policy = StatePolicy::default().with_recent_products_limit(5);
        let state = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .fold(UserState::default(), |s, id| apply(&s, &view(id), at(3), &policy));
        assert_eq!(products(&state), ["f", "e", "d", "c", "b"]);
    }

    #[test]
    fn marketing_opt_in_can_be_set_and_withdrawn() {
        let policy = StatePolicy::default();
        let on = apply(
            &UserState::default(),
            &Command::SetMarketingOptIn { opt_in: true },
            at(4),
            &policy,
        );
        assert!(on.marketing_opt_in);
        let off = apply(&on, &Command::SetMarketingOptIn { opt_in: false }, at(5), &policy);
        assert!(!off.marketing_opt_in);
        assert_eq!(off.last_event_time, Some(at(5)));
    }

    #[test]
    fn reading_the_state_changes_nothing() {
        let policy = StatePolicy::default();
        let state = apply(&UserState::default(), &Command::UserLogin, at(1), &policy);
        assert_eq!(apply(&state, &Command::GetUserState, at(9), &policy), state);
    }

    #[test]
    fn a_late_event_never_moves_recorded_times_backwards() {
        let policy = StatePolicy::default();
        let newer = apply_event(
            &UserState::default(),
            &Event::from(Command::UserLogin).at(at(10)),
            at(30),
            &policy,
        )
        .unwrap();
        let late_login = apply_event(&newer, &Event::from(Command::UserLogin).at(at(5)), at(31), &policy).unwrap();
        assert_eq!(late_login.last_login, Some(at(10)));
        assert_eq!(late_login.last_event_time, Some(at(10)));
        let late_cart = apply_event(&newer, &Event::from(Command::UseCart).at(at(7)), at(32), &policy).unwrap();
        assert_eq!(
            late_cart.last_cart_use,
            Some(at(7)),
            "the first cart use is recorded even if late"
        );
        assert_eq!(late_cart.last_event_time, Some(at(10)));
    }

    #[test]
    fn an_event_without_a_time_happens_now() {
        let next = apply_event(
            &UserState::default(),
            &Command::UseCart.into(),
            at(4),
            &StatePolicy::default(),
        )
        .unwrap();
        assert_eq!(next.last_cart_use, Some(at(4)));
    }

    #[test]
    fn a_row_from_an_older_version_with_fewer_fields_loads() {
        let state: UserState = serde_json::from_str(r#"{"marketing_opt_in":true}"#).unwrap();
        assert!(state.marketing_opt_in);
        assert!(state.recent_products.is_empty());
    }

    #[test]
    fn a_row_from_a_newer_version_with_more_fields_loads() {
        let state: UserState = serde_json::from_str(r#"{"recent_products":["p1"],"loyalty_tier":"gold"}"#).unwrap();
        assert_eq!(products(&state), ["p1"]);
    }

    #[test]
    fn state_round_trips_through_json() {
        let policy = StatePolicy::default();
        let state = apply(
            &apply(&UserState::default(), &Command::UserLogin, at(1), &policy),
            &view("p1"),
            at(2),
            &policy,
        );
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<UserState>(&json).unwrap(), state);
    }
}
