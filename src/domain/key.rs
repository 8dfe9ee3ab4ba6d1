use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::UserState;
use crate::entity::{join_parts, split_parts, validate, EntityKey, IdField, InvalidInput};

/// The fields of a user's ids, as errors name them.
pub(crate) const MALL_ID: IdField = IdField::Named("mall id");
pub(crate) const USER_ID: IdField = IdField::Named("user id");
const PRODUCT_ID: IdField = IdField::Named("product id");

/// Identifies one shop user: a mall id plus a user id, both validated.
///
/// The pair is the identity, not a joined string: `("a-b", "c")` and
/// `("a", "b-c")` are different users and never share state. Cloning is a
/// reference-count increment: keys travel with every message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Ids", into = "Ids")]
pub struct UserKey(Arc<Ids>);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
struct Ids {
    mall_id: String,
    user_id: String,
}

impl TryFrom<Ids> for UserKey {
    type Error = InvalidInput;

    fn try_from(ids: Ids) -> Result<Self, Self::Error> {
        UserKey::new(ids.mall_id, ids.user_id)
    }
}

impl From<UserKey> for Ids {
    fn from(key: UserKey) -> Self {
        Arc::unwrap_or_clone(key.0)
    }
}

impl UserKey {
    /// Validates both ids: non-empty, at most [`MAX_ID_BYTES`](crate::MAX_ID_BYTES) bytes, no control characters.
    pub fn new(mall_id: impl Into<String>, user_id: impl Into<String>) -> Result<Self, InvalidInput> {
        let (mall_id, user_id) = (mall_id.into(), user_id.into());
        validate(MALL_ID, &mall_id)?;
        validate(USER_ID, &user_id)?;
        Ok(Self(Arc::new(Ids { mall_id, user_id })))
    }

    /// The mall this user belongs to.
    pub fn mall_id(&self) -> &str {
        &self.0.mall_id
    }

    /// The user within the mall.
    pub fn user_id(&self) -> &str {
        &self.0.user_id
    }
}

/// Shows the original's `mallId-userId` form, for logs and error messages.
impl fmt::Display for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.mall_id(), self.user_id())
    }
}

/// The entity id is `<mall>-<user>` with `%` and `-` inside the ids
/// percent-escaped, so the encoding is injective: `("a-b", "c")` becomes
/// `a%2Db-c` and `("a", "b-c")` becomes `a-b%2Dc`. Ordinary ids read exactly
/// as in the original `mallId-userId` form.
impl EntityKey for UserKey {
    type Entity = UserState;

    fn entity_id(&self) -> String {
        join_parts([self.mall_id(), self.user_id()])
    }

    fn from_entity_id(id: &str) -> Result<Self, InvalidInput> {
        let mut parts = split_parts(id);
        match (parts.next(), parts.next(), parts.next()) {
            (Some(mall), Some(user), None) => UserKey::new(mall, user),
            _ => Err(InvalidInput::MalformedKey {
                entity_id: id.to_owned(),
                reason: "not a mall id and a user id joined by one `-`",
            }),
        }
    }
}

/// A product id, validated like the user ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProductId(String);

impl ProductId {
    /// Validates the id: non-empty, at most [`MAX_ID_BYTES`](crate::MAX_ID_BYTES) bytes, no control characters.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidInput> {
        let id = id.into();
        validate(PRODUCT_ID, &id)?;
        Ok(Self(id))
    }

    /// The id as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ProductId {
    type Error = InvalidInput;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        Self::new(id)
    }
}

impl From<ProductId> for String {
    fn from(id: ProductId) -> Self {
        id.0
    }
}

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::MAX_ID_BYTES;

    #[test]
    fn accepts_ordinary_ids() {
        let key = UserKey::new("mall001", "user001").unwrap();
        assert_eq!((key.mall_id(), key.user_id()), ("mall001", "user001"));
        assert_eq!(key.to_string(), "mall001-user001");
    }

    #[test]
    fn rejects_empty_ids_naming_the_field() {
        assert_eq!(UserKey::new("", "u"), Err(InvalidInput::EmptyId { field: MALL_ID }));
        assert_eq!(UserKey::new("m", ""), Err(InvalidInput::EmptyId { field: USER_ID }));
        assert_eq!(ProductId::new(""), Err(InvalidInput::EmptyId { field: PRODUCT_ID }));
    }

    #[test]
    fn rejects_ids_over_the_byte_limit() {
        let at_limit = "é".repeat(MAX_ID_BYTES / 2);
        assert!(UserKey::new(at_limit.clone(), "u").is_ok());
        let over = format!("{at_limit}x");
        assert_eq!(
            UserKey::new(over, "u"),
            Err(InvalidInput::IdTooLong {
                field: MALL_ID,
                len: MAX_ID_BYTES + 1,
                max: MAX_ID_BYTES
            })
        );
    }

    #[test]
    fn rejects_control_characters_with_their_position() {
        assert_eq!(
            UserKey::new("m", "us\ner"),
            Err(InvalidInput::ControlCharacter {
                field: USER_ID,
                position: 2
            })
        );
        assert!(ProductId::new("p\u{0}").is_err());
        assert!(ProductId::new("p\u{7f}").is_err());
    }

    #[test]
    fn pairs_that_join_to_the_same_string_are_different_keys() {
        let left = UserKey::new("a-b", "c").unwrap();
        let right = UserKey::new("a", "b-c").unwrap();
        assert_eq!(left.to_string(), right.to_string());
        assert_ne!(left, right);
    }

    #[test]
    fn ordinary_ids_keep_the_mall_dash_user_form() {
        let key = UserKey::new("mall001", "user001").unwrap();
        assert_eq!(key.persistence_id().as_str(), "UserState|mall001-user001");
    }

    #[test]
    fn dashes_and_percents_cannot_make_two_keys_collide() {
        let pairs = [
            (("a-b", "c"), ("a", "b-c")),
            (("a%2Db", "c"), ("a-b", "c")),
            (("a", "b%2Dc"), ("a", "b-c")),
            (("a-", "b"), ("a", "-b")),
        ];
        for ((m1, u1), (m2, u2)) in pairs {
            let left = UserKey::new(m1, u1).unwrap().persistence_id();
            let right = UserKey::new(m2, u2).unwrap().persistence_id();
            assert_ne!(left, right, "{m1}/{u1} vs {m2}/{u2}");
        }
    }

    #[test]
    fn entity_ids_decode_to_the_key_they_came_from() {
        for (mall, user) in [
            ("mall001", "user001"),
            ("a-b", "c"),
            ("a", "b-c"),
            ("%2D", "%"),
            ("-", "-"),
        ] {
            let key = UserKey::new(mall, user).unwrap();
            assert_eq!(UserKey::from_entity_id(&key.entity_id()).unwrap(), key);
        }
        assert!(UserKey::from_entity_id("no separator").is_err());
    }

    #[test]
    fn deserialising_validates() {
        let err = serde_json::from_str::<UserKey>(r#"{"mall_id":"","user_id":"u"}"#).unwrap_err();
        assert!(err.to_string().contains("mall id"), "{err}");
        assert!(serde_json::from_str::<ProductId>(r#""p\u0001""#).is_err());
    }
}
