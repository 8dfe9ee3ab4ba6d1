//! Not a test: the entry point of the child processes other tests start
//! ([`ChildProcess`](crate::common::ChildProcess)), ignored unless run as one.

use persist_durable::{StateStoreExt, UserState};

use crate::common::{key, test_store_config};

/// Runs the task named by `PERSIST_DURABLE_CHILD` with the arguments in
/// `PERSIST_DURABLE_CHILD_ARGS`, printing what it did on lines of its own.
#[test]
#[ignore = "run only as a child process of another test"]
fn child_process() {
    let task = std::env::var("PERSIST_DURABLE_CHILD").expect("started as a child process");
    let args = std::env::var("PERSIST_DURABLE_CHILD_ARGS").unwrap_or_default();
    let args: Vec<&str> = args.split('\u{1f}').collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match task.as_str() {
            // Opens the store at args[0] (a PostgreSQL URL or a SQLite
            // path; migrating it), writes one row of its own (args[1] names
            // it) and says so.
            "open-and-write" => {
                let store = persist_durable::open_with(args[0], test_store_config().with_change_feed(true))
                    .await
                    .unwrap_or_else(|error| panic!("opening the store failed: {error:?}"));
                let user = key("started", args[1]);
                let revision = store
                    .write(
                        &user,
                        persist_durable::Revision::NONE,
                        persist_durable::Revision(1),
                        &UserState::default(),
                    )
                    .await
                    .unwrap();
                println!("written {user} at {revision}");
            }
            other => panic!("no child task {other}"),
        }
    });
}
