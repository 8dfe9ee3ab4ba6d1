use std::fmt;
use std::sync::Arc;

use super::EntityKey;
use super::{IdField, InvalidInput};

/// The longest id accepted, in bytes, for mall ids, user ids, product ids,
/// event ids and the ids entity keys validate with [`validate_id`].
///
/// Ids end up in primary keys and log lines; a bound keeps both cheap and
/// turns a runaway producer into a clear error instead of a bloated row.
pub const MAX_ID_BYTES: usize = 128;

pub(crate) fn validate(field: IdField, value: &str) -> Result<(), InvalidInput> {
    if value.is_empty() {
        return Err(InvalidInput::EmptyId { field });
    }
    if value.len() > MAX_ID_BYTES {
        return Err(InvalidInput::IdTooLong {
            field,
            len: value.len(),
            max: MAX_ID_BYTES,
        });
    }
    if let Some(position) = value.chars().position(char::is_control) {
        return Err(InvalidInput::ControlCharacter { field, position });
    }
    Ok(())
}

/// Validates one id of an entity key the way the crate's own ids are:
/// non-empty, at most [`MAX_ID_BYTES`] bytes, no control characters. The
/// error names the id as `field` ("cart id").
pub fn validate_id(field: &'static str, value: &str) -> Result<(), InvalidInput> {
    validate(IdField::Named(field), value)
}

/// The entity id of a key of several ids: each id with `%` and `-`
/// percent-escaped, joined by `-`. Injective: `("a-b", "c")` becomes
/// `a%2Db-c` and `("a", "b-c")` becomes `a-b%2Dc`; ordinary ids read as
/// they are (`mall001-user001`).
pub(crate) fn join_parts<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut id = String::new();
    for (i, part) in parts.into_iter().enumerate() {
        if i > 0 {
            id.push('-');
        }
        for c in part.chars() {
            match c {
                '%' => id.push_str("%25"),
                '-' => id.push_str("%2D"),
                c => id.push(c),
            }
        }
    }
    id
}

/// The ids [`join_parts`] joined, unescaped.
pub(crate) fn split_parts(id: &str) -> impl Iterator<Item = String> + '_ {
    id.split('-').map(|part| part.replace("%2D", "-").replace("%25", "%"))
}

/// `key`'s persistence id, once its entity id reads back as `key`: what every
/// key must do for its row, its feed rows and its place in `entity_keys` to
/// be read again. A key type whose constructor skips validation is refused
/// here, before anything reaches the store.
pub(crate) fn checked_persistence_id<K: EntityKey>(key: &K) -> Result<PersistenceId, InvalidInput> {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    // The key's own code: a panic in it refuses the key, as bad input.
    let checked = catch_unwind(AssertUnwindSafe(|| {
        let id = key.entity_id();
        match K::from_entity_id(&id) {
            Ok(decoded) if decoded == *key => Ok(key.persistence_id()),
            Ok(_) => Err(InvalidInput::MalformedKey {
                entity_id: id,
                reason: "it decodes to another key: the encoding is not injective",
            }),
            Err(invalid) => Err(invalid),
        }
    }));
    checked.unwrap_or_else(|_| {
        Err(InvalidInput::MalformedKey {
            entity_id: String::new(),
            reason: "encoding or decoding the key panicked",
        })
    })
}

/// The row key of one entity: `<entity type>|<entity id>`, Pekko's form.
///
/// Errors of the store name the entity by it. It compares equal to the typed
/// key it was made from, so a test can match `StoreError::Conflict { key, .. }
/// if key == &user`. Cloning is a reference-count increment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PersistenceId {
    id: Arc<str>,
    /// The length of the entity type prefix.
    type_len: usize,
}

impl PersistenceId {
    pub(crate) fn new(entity_type: &str, entity_id: &str) -> Self {
        let mut id = String::with_capacity(entity_type.len() + 1 + entity_id.len());
        id.push_str(entity_type);
        id.push('|');
        id.push_str(entity_id);
        Self {
            id: id.into(),
            type_len: entity_type.len(),
        }
    }

    /// Splits a stored persistence id; `None` without the `|` separator.
    pub(crate) fn parse(id: &str) -> Option<Self> {
        let type_len = id.find('|')?;
        Some(Self {
            id: id.into(),
            type_len,
        })
    }

    /// The whole id, as the `persistence_id` column holds it.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The entity type part.
    pub fn entity_type(&self) -> &str {
        &self.id[..self.type_len]
    }

    /// The entity id part, as [`EntityKey::entity_id`] encoded it.
    pub fn entity_id(&self) -> &str {
        &self.id[self.type_len + 1..]
    }

    /// The entity's [`Slice`](super::Slice).
    pub fn slice(&self) -> super::Slice {
        super::Slice::of(&self.id)
    }

    /// The typed key, if this id belongs to `K`'s entity type and decodes.
    pub fn key<K: EntityKey>(&self) -> Option<K> {
        use super::DurableEntity;
        (self.entity_type() == K::Entity::ENTITY_TYPE)
            .then(|| K::from_entity_id(self.entity_id()).ok())
            .flatten()
    }
}

impl<K: EntityKey> PartialEq<K> for PersistenceId {
    fn eq(&self, key: &K) -> bool {
        self.key::<K>().as_ref() == Some(key)
    }
}

impl fmt::Display for PersistenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for PersistenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.id, f)
    }
}
