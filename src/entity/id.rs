//! Ready keys: [`Id`] for entities identified by one string,
//! [`CompositeId`] for those identified by several.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::key::{join_parts, split_parts, validate};
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

/// The key of an entity identified by several validated strings, in order:
/// a mall id and a user id, a tenant and an order. `type Key =
/// CompositeId<Self, 2>;` in the entity's [`DurableEntity`] implementation,
/// then `CompositeId::new(["mall001", "user001"])?`.
///
/// Each id is validated as [`Id`]'s is, and named in errors after the
/// entity type and its place ("price watch id 2"). The entity id is the ids
/// joined by `-`, with `%` and `-` inside them percent-escaped (as
/// [`UserKey`](crate::UserKey)'s), so `["a-b", "c"]` and `["a", "b-c"]` are
/// two entities. In JSON it is an array of `N` strings, validated when
/// decoded; shown, the ids joined by `-`.
///
/// ```
/// use persist_durable::{CompositeId, EntityKey, InvalidInput};
/// # use persist_durable::DurableEntity;
/// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
/// # struct PriceWatch { below: Option<u64> }
/// # impl DurableEntity for PriceWatch {
/// #     const ENTITY_TYPE: &'static str = "PriceWatch";
/// #     const MANIFEST: &'static str = "PriceWatch/v1";
/// #     type Key = CompositeId<PriceWatch, 2>;
/// #     type Command = u64;
/// #     type Settings = ();
/// #     type Rejection = std::convert::Infallible;
/// #     fn apply(&self, n: &u64, _: chrono::DateTime<chrono::Utc>, _: &()) -> Result<Option<Self>, Self::Rejection> {
/// #         Ok(Some(PriceWatch { below: Some(*n) }))
/// #     }
/// # }
/// let watch: CompositeId<PriceWatch, 2> = CompositeId::new(["mall001", "user-7"])?;
/// assert_eq!(watch.part(1), "user-7");
/// assert_eq!(watch.persistence_id().as_str(), "PriceWatch|mall001-user%2D7");
/// assert!(matches!(CompositeId::<PriceWatch, 2>::new(["mall001", ""]), Err(InvalidInput::EmptyId { .. })));
/// # Ok::<(), InvalidInput>(())
/// ```
pub struct CompositeId<E, const N: usize> {
    parts: Arc<[Box<str>; N]>,
    entity: PhantomData<fn() -> E>,
}

impl<E: DurableEntity, const N: usize> CompositeId<E, N> {
    /// Validates each id.
    pub fn new<S: Into<String>>(parts: [S; N]) -> Result<Self, InvalidInput> {
        const { assert!(N > 0, "a composite id has at least one part") };
        let mut index = 0;
        let parts = parts.map(|part| {
            index += 1;
            (index, part.into())
        });
        for (index, part) in &parts {
            validate(IdField::Named(part_name::<E>(*index)), part)?;
        }
        Ok(Self {
            parts: Arc::new(parts.map(|(_, part)| part.into_boxed_str())),
            entity: PhantomData,
        })
    }
}

impl<E, const N: usize> CompositeId<E, N> {
    /// The id at `index` (from 0). Panics past the last, as indexing does.
    pub fn part(&self, index: usize) -> &str {
        &self.parts[index]
    }

    /// Every id, in order.
    pub fn parts(&self) -> [&str; N] {
        std::array::from_fn(|index| &*self.parts[index])
    }
}

/// "price watch id 2": the entity type's name, "id" and the place, made once
/// per type and place.
fn part_name<E: DurableEntity>(index: usize) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashMap<(&'static str, usize), &'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    names.entry((E::ENTITY_TYPE, index)).or_insert_with(|| {
        let name = format!("{} {index}", field_name::<E>());
        Box::leak(name.into_boxed_str())
    })
}

impl<E: DurableEntity<Key = CompositeId<E, N>>, const N: usize> EntityKey for CompositeId<E, N> {
    type Entity = E;

    fn entity_id(&self) -> String {
        join_parts(self.parts())
    }

    fn from_entity_id(id: &str) -> Result<Self, InvalidInput> {
        let mut split = split_parts(id);
        let parts: [Option<String>; N] = std::array::from_fn(|_| split.next());
        if split.next().is_some() || parts.iter().any(Option::is_none) {
            return Err(InvalidInput::MalformedKey {
                entity_id: id.to_owned(),
                reason: "not as many ids joined by `-` as the key has parts",
            });
        }
        Self::new(parts.map(Option::unwrap_or_default))
    }
}

impl<E, const N: usize> Clone for CompositeId<E, N> {
    fn clone(&self) -> Self {
        Self {
            parts: self.parts.clone(),
            entity: PhantomData,
        }
    }
}

impl<E, const N: usize> PartialEq for CompositeId<E, N> {
    fn eq(&self, other: &Self) -> bool {
        self.parts == other.parts
    }
}

impl<E, const N: usize> Eq for CompositeId<E, N> {}

impl<E, const N: usize> PartialOrd for CompositeId<E, N> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E, const N: usize> Ord for CompositeId<E, N> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.parts.cmp(&other.parts)
    }
}

impl<E, const N: usize> Hash for CompositeId<E, N> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts.hash(state);
    }
}

impl<E, const N: usize> fmt::Debug for CompositeId<E, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.parts()).finish()
    }
}

impl<E, const N: usize> fmt::Display for CompositeId<E, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.parts().join("-"))
    }
}

impl<E, const N: usize> Serialize for CompositeId<E, N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.parts().serialize(serializer)
    }
}

impl<'de, E: DurableEntity, const N: usize> Deserialize<'de> for CompositeId<E, N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let parts: Vec<String> = Vec::deserialize(deserializer)?;
        let parts: [String; N] = parts
            .try_into()
            .map_err(|parts: Vec<String>| serde::de::Error::invalid_length(parts.len(), &"one string per id"))?;
        Self::new(parts).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A composite id encodes as the user key does, so a user keyed by it
    /// would have the same rows.
    #[test]
    fn a_composite_id_encodes_injectively_and_reads_back() {
        for parts in [["mall001", "user001"], ["a-b", "c"], ["a", "b-c"], ["50%", "x-%2D"]] {
            let id: CompositeId<Probe, 2> = CompositeId::new(parts).unwrap();
            let user = crate::UserKey::new(parts[0], parts[1]).unwrap();
            assert_eq!(id.entity_id(), user.entity_id(), "{parts:?}");
            assert_eq!(CompositeId::<Probe, 2>::from_entity_id(&id.entity_id()).unwrap(), id);
        }
        assert_ne!(
            CompositeId::<Probe, 2>::new(["a-b", "c"]).unwrap().entity_id(),
            CompositeId::<Probe, 2>::new(["a", "b-c"]).unwrap().entity_id()
        );
        assert!(CompositeId::<Probe, 2>::from_entity_id("a-b-c").is_err());
        assert!(CompositeId::<Probe, 2>::from_entity_id("abc").is_err());
    }

    #[test]
    fn each_id_is_validated_and_named_by_its_place() {
        let error = CompositeId::<Probe, 3>::new(["a", "b", ""]).unwrap_err();
        assert_eq!(error.to_string(), "the probe id 3 is empty");
        let json = serde_json::to_string(&CompositeId::<Probe, 2>::new(["m", "u"]).unwrap()).unwrap();
        assert_eq!(json, r#"["m","u"]"#);
        assert!(serde_json::from_str::<CompositeId<Probe, 2>>(r#"["m"]"#).is_err());
        assert!(serde_json::from_str::<CompositeId<Probe, 2>>(r#"["m", ""]"#).is_err());
    }

    #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
    struct Probe;

    impl DurableEntity for Probe {
        const ENTITY_TYPE: &'static str = "Probe";
        const MANIFEST: &'static str = "Probe/v1";
        type Key = CompositeId<Probe, 2>;
        type Command = ();
        type Settings = ();
        type Rejection = std::convert::Infallible;
        fn apply(&self, _: &(), _: chrono::DateTime<chrono::Utc>, _: &()) -> Result<Option<Self>, Self::Rejection> {
            Ok(None)
        }
    }
}
