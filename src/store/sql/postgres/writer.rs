//! The connections group commit's write statements run on: tokio-postgres
//! itself, below diesel, because only there does a failed statement keep
//! its SQLSTATE. diesel-async maps eight codes to a `DatabaseErrorKind` and
//! every other one (a trigger's `RAISE EXCEPTION`, a deadlock, a statement
//! timeout) to `Unknown`, and diesel's error exposes no code: a row the
//! database refuses could not be told from the database failing. With the
//! code, a refusal is isolated to its row and a failure of the database is
//! never split (see `writes`).
//!
//! The connections are set up as diesel's are (timeouts, isolation, custom
//! plans), and each prepares the write statements once.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool::managed::{self, Metrics, Pool, RecycleError, RecycleResult};
use tokio_postgres::{Client, NoTls, Statement};

use crate::error::StoreError;
use crate::store::config::StoreConfig;

/// A connection for write statements, with the statements it has prepared.
pub(super) struct WriterConnection {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
}

impl WriterConnection {
    /// `sql`, prepared on this connection the first time it is asked for.
    pub(super) async fn statement(&mut self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.prepared.insert(sql, statement.clone());
        Ok(statement)
    }

    pub(super) fn client(&self) -> &Client {
        &self.client
    }
}

/// Opens and checks writer connections.
pub(super) struct WriterManager {
    url: String,
    /// The session settings every connection starts with.
    setup: String,
}

impl managed::Manager for WriterManager {
    type Type = WriterConnection;
    type Error = tokio_postgres::Error;

    async fn create(&self) -> Result<WriterConnection, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls).await?;
        // The connection's I/O runs as a task of the store's runtime; it
        // ends when the client is dropped.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "a writer connection closed");
            }
        });
        client.batch_execute(&self.setup).await?;
        Ok(WriterConnection {
            client,
            prepared: HashMap::new(),
        })
    }

    async fn recycle(&self, connection: &mut WriterConnection, _: &Metrics) -> RecycleResult<tokio_postgres::Error> {
        if connection.client.is_closed() {
            return Err(RecycleError::message("the connection is closed"));
        }
        Ok(())
    }
}

/// The pool of writer connections: as many as the store's pool size.
pub(super) type WriterPool = Pool<WriterManager>;

/// A pool of writer connections to `url`, each set up with `setup`.
pub(super) fn writer_pool(url: &str, setup: String, config: &StoreConfig) -> Result<WriterPool, StoreError> {
    config.build_pool(WriterManager {
        url: url.to_owned(),
        setup,
    })
}

/// What became of a write statement that did not succeed.
///
/// An error the server reported carries a SQLSTATE: the statement rolled
/// back, and the code says whether it was refused for what it wrote or the
/// database failed. One without (the connection broke mid-statement) leaves
/// the outcome unknown.
pub(super) fn sent_write_error(error: tokio_postgres::Error) -> StoreError {
    match error.code() {
        Some(code) => StoreError::Refused {
            sqlstate: code.code().to_owned(),
            source: Arc::new(error),
        },
        None => StoreError::OutcomeUnknown(Arc::new(error)),
    }
}
