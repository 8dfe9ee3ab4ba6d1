//! A ready key for entities identified by one string: [`Id`].

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::key::validate;
use super::{DurableEntity, EntityKey, IdField, InvalidInput};

/// The key of an entity identified by one validated string: what most
/// entities need, without writing a key type. `type Key = Id<Self>;` in the
/// entity's [`DurableEntity`] implementation, then `Id::new("visits")?`.
///
/// The id is validated when the key is made (non-empty, at most
/// [`MAX_ID_BYTES`](crate::MAX_ID_BYTES) bytes, no control characters), so a
/// key that reached the store always reads back. It is its own entity id, and
/// cloning it is a reference-count increment. In JSON it is a string,
/// validated when decoded.
///
/// ```
/// use persist_durable::{EntityKey, Id, InvalidInput};
/// # use persist_durable::DurableEntity;
/// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
/// # struct Counter { value: i64 }
/// # impl DurableEntity for Counter {
/// #     const ENTITY_TYPE: &'static str = "Counter";
/// #     const MANIFEST: &'static str = "Counter/v1";
/// #     type Key = Id<Counter>;
/// #     type Command = i64;
/// #     type Settings = ();
/// #     type Rejection = std::convert::Infallible;
/// #     fn apply(&self, n: &i64, _: chrono::DateTime<chrono::Utc>, _: &()) -> Result<Option<Self>, Self::Rejection> {
/// #         Ok(Some(Counter { value: self.value + n }))
/// #     }
/// # }
/// let visits: Id<Counter> = Id::new("visits")?;
/// assert_eq!(visits.persistence_id().as_str(), "Counter|visits");
/// assert!(matches!(Id::<Counter>::new(""), Err(InvalidInput::EmptyId { .. })));
/// # Ok::<(), InvalidInput>(())
/// ```
pub struct Id<E> {
    id: Arc<str>,
    entity: PhantomData<fn() -> E>,
}

impl<E: DurableEntity> Id<E> {
    /// Validates `id`; the error names the field after the entity type
    /// in lower case ("counter id").
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidInput> {
        let id: String = id.into();
        validate(IdField::Named(field_name::<E>()), &id)?;
        Ok(Self {
            id: id.into(),
            entity: PhantomData,
        })
    }
}

impl<E> Id<E> {
    /// The id as given.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

/// "Counter id": the entity type's name and "id", made once per type.
fn field_name<E: DurableEntity>() -> &'static str {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashMap<&'static str, &'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    names
        .entry(E::ENTITY_TYPE)
        .or_insert_with(|| Box::leak(format!("{} id", E::ENTITY_TYPE.to_lowercase()).into_boxed_str()))
}

impl<E: DurableEntity<Key = Id<E>>> EntityKey for Id<E> {
    type Entity = E;

    fn entity_id(&self) -> String {
        self.id.to_string()
    }

    fn from_entity_id(id: &str) -> Result<Self, InvalidInput> {
        Self::new(id)
    }
}

impl<E> Clone for Id<E> {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            entity: PhantomData,
        }
    }
}

impl<E> PartialEq for Id<E> {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl<E> Eq for Id<E> {}

impl<E> PartialOrd for Id<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Id<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.id.cmp(&other.id)
    }
}

impl<E> Hash for Id<E> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl<E> fmt::Debug for Id<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.id, f)
    }
}

impl<E> fmt::Display for Id<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl<E> Serialize for Id<E> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.id)
    }
}

impl<'de, E: DurableEntity> Deserialize<'de> for Id<E> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = String::deserialize(deserializer)?;
        Self::new(id).map_err(serde::de::Error::custom)
    }
}

impl<E: DurableEntity> TryFrom<String> for Id<E> {
    type Error = InvalidInput;

    fn try_from(id: String) -> Result<Self, InvalidInput> {
        Self::new(id)
    }
}

impl<E: DurableEntity> TryFrom<&str> for Id<E> {
    type Error = InvalidInput;

    fn try_from(id: &str) -> Result<Self, InvalidInput> {
        Self::new(id)
    }
}
