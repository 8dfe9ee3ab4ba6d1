//! Restarting the whole manager, in a new actix System with a new store on
//! the same database, restores every user's committed state.

use std::collections::BTreeMap;

use crate::common::{key, Backend, TestDb};
use actix::Actor;
use persist_durable::{Command, Config, ProductId, UserCommand, UserKey, UserState, UserStateManager};
use rstest::rstest;

#[rstest]
fn restarting_the_manager_restores_every_users_committed_state(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(db) = actix::System::new().block_on(TestDb::open(backend)) else {
        return;
    };
    let users: Vec<UserKey> = (0..25)
        .map(|i| key(&format!("mall{}", i % 3), &format!("user{i}")))
        .collect();

    let acknowledged: BTreeMap<UserKey, UserState> = actix::System::new().block_on(async {
        let manager = UserStateManager::new(db.connect().await, Config::default()).start();
        let mut acknowledged = BTreeMap::new();
        for (i, user) in users.iter().enumerate() {
            let commands = [
                Command::UserLogin,
                Command::ViewProduct {
                    product_id: ProductId::new(format!("p{i}")).unwrap(),
                },
                Command::SetMarketingOptIn { opt_in: i % 2 == 0 },
            ];
            for command in commands.into_iter().take(1 + i % 3) {
                let state = manager
                    .send(UserCommand::new(user.clone(), command))
                    .await
                    .unwrap()
                    .unwrap();
                acknowledged.insert(user.clone(), state);
            }
        }
        acknowledged
    });

    let restored: BTreeMap<UserKey, UserState> = actix::System::new().block_on(async {
        let manager = UserStateManager::new(db.connect().await, Config::default()).start();
        let mut restored = BTreeMap::new();
        for user in &users {
            let state = manager
                .send(UserCommand::new(user.clone(), Command::GetUserState))
                .await
                .unwrap()
                .unwrap();
            restored.insert(user.clone(), state);
        }
        restored
    });

    assert_eq!(restored.len(), 25);
    assert_eq!(restored, acknowledged);
}
