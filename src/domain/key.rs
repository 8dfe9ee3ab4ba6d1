use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{IdField, InvalidInput};

/// The longest id accepted, in bytes, for mall ids, user ids and product ids.
///
/// Ids end up in primary keys and log lines; a bound keeps both cheap and
/// turns a runaway producer into a clear error instead of a bloated row.
pub const MAX_ID_BYTES: usize = 128;

pub(super) fn validate(field: IdField, value: &str) -> Result<(), InvalidInput> {
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
    /// Validates both ids: non-empty, at most [`MAX_ID_BYTES`] bytes, no control characters.
    pub fn new(mall_id: impl Into<String>, user_id: impl Into<String>) -> Result<Self, InvalidInput> {
        let (mall_id, user_id) = (mall_id.into(), user_id.into());
        validate(IdField::MallId, &mall_id)?;
        validate(IdField::UserId, &user_id)?;
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

/// A product id, validated like the user ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProductId(String);

impl ProductId {
    /// Validates the id: non-empty, at most [`MAX_ID_BYTES`] bytes, no control characters.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidInput> {
        let id = id.into();
        validate(IdField::ProductId, &id)?;
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

    #[test]
    fn accepts_ordinary_ids() {
        let key = UserKey::new("mall001", "user001").unwrap();
        assert_eq!((key.mall_id(), key.user_id()), ("mall001", "user001"));
        assert_eq!(key.to_string(), "mall001-user001");
    }

    #[test]
    fn rejects_empty_ids_naming_the_field() {
        assert_eq!(
            UserKey::new("", "u"),
            Err(InvalidInput::EmptyId { field: IdField::MallId })
        );
        assert_eq!(
            UserKey::new("m", ""),
            Err(InvalidInput::EmptyId { field: IdField::UserId })
        );
        assert_eq!(
            ProductId::new(""),
            Err(InvalidInput::EmptyId {
                field: IdField::ProductId
            })
        );
    }

    #[test]
    fn rejects_ids_over_the_byte_limit() {
        let at_limit = "é".repeat(MAX_ID_BYTES / 2);
        assert!(UserKey::new(at_limit.clone(), "u").is_ok());
        let over = format!("{at_limit}x");
        assert_eq!(
            UserKey::new(over, "u"),
            Err(InvalidInput::IdTooLong {
                field: IdField::MallId,
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
                field: IdField::UserId,
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
    fn deserialising_validates() {
        let err = serde_json::from_str::<UserKey>(r#"{"mall_id":"","user_id":"u"}"#).unwrap_err();
        assert!(err.to_string().contains("mall id"), "{err}");
        assert!(serde_json::from_str::<ProductId>(r#""p\u0001""#).is_err());
    }
}
