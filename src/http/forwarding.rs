//! Cluster mode's forwarding between nodes, over HTTP: a command for an
//! entity another node owns is sent to that node's route
//! (`POST /_persist_durable/forward/<entity type>`, mounted with
//! [`cluster_routes`]) and its answer comes back as the same
//! `Result<E, CommandError<E>>`. The client is awc, actix's own, on a thread
//! of its own, so that any thread may forward.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::actors::{Answer, Forward, Records};
use crate::cluster::Owner;
use crate::entity::{DurableEntity, EntityEvent, EntityKey, EventId, InvalidInput, RecordOrigin, Revision};
use crate::error::{CommandError, StoreError};
use crate::Entities;

/// An entity whose commands and answers travel between nodes: its commands
/// and its rejections are serde types (for an entity whose commands are
/// never refused, use [`Never`](crate::Never) as its rejection).
pub trait Forwardable:
    DurableEntity<Command: Serialize + DeserializeOwned, Rejection: Serialize + DeserializeOwned>
{
}

impl<E> Forwardable for E where
    E: DurableEntity<Command: Serialize + DeserializeOwned, Rejection: Serialize + DeserializeOwned>
{
}

/// Where a node takes the commands other nodes forward for `E`.
fn route<E: DurableEntity>() -> String {
    format!("/_persist_durable/forward/{}", E::ENTITY_TYPE)
}

/// Where a node takes the ingested records other nodes forward for `E`.
fn records_route<E: DurableEntity>() -> String {
    format!("{}/records", route::<E>())
}

/// How long a forwarded command is waited for before its outcome is unknown.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);

/// The route other nodes forward `entities`' commands to, in cluster mode:
/// mount it on every node's actix-web application beside its own routes.
pub fn cluster_routes<E: Forwardable>(entities: Entities<E>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        let entities = web::Data::new(entities);
        config
            .service(
                super::resource(&route::<E>(), "POST")
                    .app_data(entities.clone())
                    .route(web::post().to(receive::<E>)),
            )
            .service(
                super::resource(&records_route::<E>(), "POST")
                    .app_data(entities)
                    .route(web::post().to(receive_records::<E>)),
            );
    }
}

/// `entities`, forwarding each command for an entity another node owns to
/// that node (its [`cluster_routes`]) in cluster mode.
pub fn forward_to_owners<E: Forwardable>(entities: Entities<E>) -> Entities<E> {
    entities.with_forwarder(Arc::new(HttpForwarder))
}

/// A forwarded command.
#[derive(Serialize, Deserialize)]
struct Forwarded {
    entity_id: String,
    command: serde_json::Value,
    event_id: Option<EventId>,
    event_time: Option<DateTime<Utc>>,
}

/// Ingested records for one entity, forwarded with where each came from.
#[derive(Serialize, Deserialize)]
struct ForwardedRecords {
    entity_id: String,
    records: Vec<ForwardedRecord>,
}

#[derive(Serialize, Deserialize)]
struct ForwardedRecord {
    command: serde_json::Value,
    event_id: Option<EventId>,
    event_time: Option<DateTime<Utc>>,
    partition: String,
    offset: i64,
    dead_lettered: bool,
}

/// Its answer.
#[derive(Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
enum Reply {
    Applied { state: serde_json::Value },
    Failed(Failure),
}

/// A failure, with what rebuilds it on the other side.
#[derive(Serialize, Deserialize)]
struct Failure {
    kind: String,
    message: String,
    #[serde(default)]
    rejection: Option<serde_json::Value>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    expected: Option<u64>,
    #[serde(default)]
    schema: Option<(u32, u32)>,
}

async fn receive<E: Forwardable>(entities: web::Data<Entities<E>>, body: web::Bytes) -> HttpResponse {
    let forwarded: Forwarded = match serde_json::from_slice(&body) {
        Ok(forwarded) => forwarded,
        Err(error) => return bad_request(error.to_string()),
    };
    let key = match E::Key::from_entity_id(&forwarded.entity_id) {
        Ok(key) => key,
        Err(invalid) => return bad_request(invalid.to_string()),
    };
    let command: E::Command = match serde_json::from_value(forwarded.command) {
        Ok(command) => command,
        Err(error) => return bad_request(error.to_string()),
    };
    let event = EntityEvent {
        command,
        event_id: forwarded.event_id,
        event_time: forwarded.event_time,
    };
    let answer = entities.send_here(key, event).await;
    HttpResponse::Ok().json(encode(answer))
}

async fn receive_records<E: Forwardable>(entities: web::Data<Entities<E>>, body: web::Bytes) -> HttpResponse {
    let forwarded: ForwardedRecords = match serde_json::from_slice(&body) {
        Ok(forwarded) => forwarded,
        Err(error) => return bad_request(error.to_string()),
    };
    let key = match E::Key::from_entity_id(&forwarded.entity_id) {
        Ok(key) => key,
        Err(invalid) => return bad_request(invalid.to_string()),
    };
    let mut records = Vec::with_capacity(forwarded.records.len());
    for record in forwarded.records {
        let command: E::Command = match serde_json::from_value(record.command) {
            Ok(command) => command,
            Err(error) => return bad_request(error.to_string()),
        };
        let origin = RecordOrigin::new(record.partition.into(), record.offset);
        let origin = if record.dead_lettered {
            origin.dead_lettered()
        } else {
            origin
        };
        let event = EntityEvent {
            command,
            event_id: record.event_id,
            event_time: record.event_time,
        };
        records.push((event, origin));
    }
    let answers: Vec<Reply> = entities
        .send_records_here(key, records)
        .await
        .into_iter()
        .map(encode)
        .collect();
    HttpResponse::Ok().json(answers)
}

fn bad_request(reason: String) -> HttpResponse {
    HttpResponse::BadRequest().json(Reply::Failed(Failure {
        kind: "bad_request".into(),
        message: reason,
        rejection: None,
        owner: None,
        expected: None,
        schema: None,
    }))
}

fn encode<E: Forwardable>(answer: Answer<E>) -> Reply {
    let error = match answer {
        Ok(state) => match serde_json::to_value(&state) {
            Ok(state) => return Reply::Applied { state },
            Err(error) => {
                return Reply::Failed(Failure {
                    kind: "unstorable".into(),
                    message: error.to_string(),
                    rejection: None,
                    owner: None,
                    expected: None,
                    schema: None,
                })
            }
        },
        Err(error) => error,
    };
    // The key's `Display` is the application's code.
    let message = catch_unwind(AssertUnwindSafe(|| error.to_string())).unwrap_or_else(|_| error.kind().to_owned());
    Reply::Failed(Failure {
        kind: error.kind().to_owned(),
        message,
        rejection: match &error {
            CommandError::Rejected { reason, .. } => serde_json::to_value(reason).ok(),
            _ => None,
        },
        owner: match &error {
            CommandError::NotOwner { owner, .. } => owner.clone(),
            _ => None,
        },
        expected: match &error {
            CommandError::Conflict { expected, .. } => Some(expected.0),
            _ => None,
        },
        schema: match &error {
            CommandError::NewerSchema { stored, known, .. } => Some((*stored, *known)),
            _ => None,
        },
    })
}

/// The answer `owner` gave, as this node's caller gets it.
fn decode<E: Forwardable>(owner: &str, key: E::Key, reply: Reply) -> Answer<E> {
    let failure = match reply {
        Reply::Applied { state } => {
            return serde_json::from_value(state).map_err(|error| CommandError::Unstorable {
                key: key.clone(),
                source: remote(owner, "unstorable", &error.to_string()),
            })
        }
        Reply::Failed(failure) => failure,
    };
    let source = || remote(owner, &failure.kind, &failure.message);
    Err(match failure.kind.as_str() {
        "conflict" => CommandError::Conflict {
            key,
            expected: Revision(failure.expected.unwrap_or(0)),
        },
        "corrupt_state" => CommandError::CorruptState { key, source: source() },
        "outcome_unknown" => CommandError::OutcomeUnknown { key, source: source() },
        "overloaded" => CommandError::Overloaded {
            key,
            reason: failure.message,
        },
        "not_delivered" => CommandError::NotDelivered {
            key,
            reason: failure.message,
        },
        "rejected" => match failure.rejection.map(serde_json::from_value) {
            Some(Ok(reason)) => CommandError::Rejected { key, reason },
            _ => CommandError::Unstorable { key, source: source() },
        },
        "newer_schema" => {
            let (stored, known) = failure.schema.unwrap_or_default();
            CommandError::NewerSchema { key, stored, known }
        }
        "unstorable" => CommandError::Unstorable { key, source: source() },
        "panicked" => CommandError::Panicked {
            key,
            message: failure.message,
        },
        "refused_before" => CommandError::RefusedBefore {
            key,
            reason: failure.message,
        },
        "invalid_timer" => CommandError::InvalidTimer {
            key,
            source: crate::timers::TimerError::Remote(failure.message),
        },
        "not_owner" => CommandError::NotOwner {
            key,
            owner: failure.owner,
        },
        "invalid_key" | "bad_request" => CommandError::InvalidKey {
            key,
            source: InvalidInput::MalformedKey {
                entity_id: String::new(),
                reason: "refused by the owner",
            },
        },
        // "store_unavailable", and a kind of a newer release.
        _ => CommandError::StoreUnavailable { key, source: source() },
    })
}

fn remote(node: &str, kind: &str, message: &str) -> StoreError {
    StoreError::Remote {
        node: node.to_owned(),
        kind: kind.to_owned(),
        message: message.to_owned(),
    }
}

/// Forwards over HTTP through the process's client thread.
struct HttpForwarder;

impl<E: Forwardable> Forward<E> for HttpForwarder {
    fn forward_records(
        &self,
        owner: Owner,
        key: E::Key,
        records: Records<E>,
    ) -> Pin<Box<dyn Future<Output = Vec<Answer<E>>> + Send>> {
        Box::pin(Self::send_records::<E>(owner, key, records))
    }

    fn forward(
        &self,
        owner: Owner,
        key: E::Key,
        event: EntityEvent<E::Command>,
    ) -> Pin<Box<dyn Future<Output = Answer<E>> + Send>> {
        Box::pin(async move {
            let command = match serde_json::to_value(&event.command) {
                Ok(command) => command,
                Err(error) => {
                    return Err(CommandError::NotDelivered {
                        key,
                        reason: format!("the command cannot be sent to its owner: {error}"),
                    })
                }
            };
            let forwarded = Forwarded {
                entity_id: key.entity_id(),
                command,
                event_id: event.event_id,
                event_time: event.event_time,
            };
            let url = format!("{}{}", owner.address.trim_end_matches('/'), route::<E>());
            let body = serde_json::to_vec(&forwarded).unwrap_or_default();
            match client().post(url, body).await {
                Ok(reply) => match serde_json::from_slice(&reply) {
                    Ok(reply) => decode(&owner.address, key, reply),
                    Err(error) => Err(CommandError::OutcomeUnknown {
                        key,
                        source: remote(
                            &owner.address,
                            "outcome_unknown",
                            &format!("unreadable answer: {error}"),
                        ),
                    }),
                },
                // Never sent: not applied.
                Err(Sending::NotSent(reason)) => Err(CommandError::NotDelivered {
                    key,
                    reason: format!("the owner {} could not be reached: {reason}", owner.address),
                }),
                Err(Sending::Unknown(reason)) => Err(CommandError::OutcomeUnknown {
                    key,
                    source: remote(&owner.address, "outcome_unknown", &reason),
                }),
            }
        })
    }
}

impl HttpForwarder {
    async fn send_records<E: Forwardable>(owner: Owner, key: E::Key, records: Records<E>) -> Vec<Answer<E>> {
        let len = records.len();
        let undelivered = |reason: String| -> Vec<Answer<E>> {
            (0..len)
                .map(|_| {
                    Err(CommandError::NotDelivered {
                        key: key.clone(),
                        reason: reason.clone(),
                    })
                })
                .collect()
        };
        let mut forwarded = Vec::with_capacity(len);
        for (event, origin) in records {
            let command = match serde_json::to_value(&event.command) {
                Ok(command) => command,
                Err(error) => return undelivered(format!("a record cannot be sent to its owner: {error}")),
            };
            forwarded.push(ForwardedRecord {
                command,
                event_id: event.event_id,
                event_time: event.event_time,
                partition: origin.partition.to_string(),
                offset: origin.offset,
                dead_lettered: origin.dead_lettered,
            });
        }
        let body = ForwardedRecords {
            entity_id: key.entity_id(),
            records: forwarded,
        };
        let url = format!("{}{}", owner.address.trim_end_matches('/'), records_route::<E>());
        let body = serde_json::to_vec(&body).unwrap_or_default();
        match client().post(url, body).await {
            Ok(reply) => match serde_json::from_slice::<Vec<Reply>>(&reply) {
                Ok(replies) if replies.len() == len => replies
                    .into_iter()
                    .map(|reply| decode(&owner.address, key.clone(), reply))
                    .collect(),
                _ => (0..len)
                    .map(|_| {
                        Err(CommandError::OutcomeUnknown {
                            key: key.clone(),
                            source: remote(&owner.address, "outcome_unknown", "an unreadable answer"),
                        })
                    })
                    .collect(),
            },
            Err(Sending::NotSent(reason)) => {
                undelivered(format!("the owner {} could not be reached: {reason}", owner.address))
            }
            Err(Sending::Unknown(reason)) => (0..len)
                .map(|_| {
                    Err(CommandError::OutcomeUnknown {
                        key: key.clone(),
                        source: remote(&owner.address, "outcome_unknown", &reason),
                    })
                })
                .collect(),
        }
    }
}

/// Why a forwarded request has no answer.
enum Sending {
    /// It was never sent (the owner could not be reached).
    NotSent(String),
    /// It was sent; no answer came back.
    Unknown(String),
}

/// The process's forwarding client: awc on a thread of its own.
struct Client {
    requests: mpsc::UnboundedSender<Post>,
}

/// A request for the client's thread: where, what, and where the answer goes.
type Post = (String, Vec<u8>, oneshot::Sender<Result<Vec<u8>, Sending>>);

fn client() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let (requests, mut received) = mpsc::unbounded_channel::<Post>();
        let started = std::thread::Builder::new()
            .name("persist-durable-forward".into())
            .spawn(move || {
                actix_rt::System::new().block_on(async move {
                    let client = awc::Client::builder().timeout(FORWARD_TIMEOUT).finish();
                    while let Some((url, body, reply)) = received.recv().await {
                        let client = client.clone();
                        actix_rt::spawn(async move {
                            let _ = reply.send(post(&client, &url, body).await);
                        });
                    }
                });
            });
        if let Err(error) = started {
            tracing::error!(%error, "the forwarding client could not start");
        }
        Client { requests }
    })
}

impl Client {
    async fn post(&self, url: String, body: Vec<u8>) -> Result<Vec<u8>, Sending> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((url, body, reply))
            .map_err(|_| Sending::NotSent("the forwarding client has stopped".into()))?;
        answer
            .await
            .map_err(|_| Sending::Unknown("the forwarding client stopped before the answer".into()))?
    }
}

async fn post(client: &awc::Client, url: &str, body: Vec<u8>) -> Result<Vec<u8>, Sending> {
    use awc::error::SendRequestError;
    let mut response = client
        .post(url)
        .insert_header(("content-type", "application/json"))
        .send_body(body)
        .await
        .map_err(|error| match error {
            SendRequestError::Connect(_) | SendRequestError::Url(_) => Sending::NotSent(error.to_string()),
            other => Sending::Unknown(other.to_string()),
        })?;
    let status = response.status();
    let body = response
        .body()
        .limit(64 * 1024 * 1024)
        .await
        .map_err(|error| Sending::Unknown(error.to_string()))?;
    if status.is_success() || status == awc::http::StatusCode::BAD_REQUEST {
        Ok(body.to_vec())
    } else {
        // No such route (not a node of this cluster): nothing applied.
        Err(Sending::NotSent(format!("it answered {status}")))
    }
}
