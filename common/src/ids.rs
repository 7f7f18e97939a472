//! Identifiers that end up in subjects and KV keys.
//!
//! A saga id is both a KV key (`sagas/<id>`) and a subject token (`saga.events.<id>.<event>`), so it
//! must be valid in both places. The strictest common rule is the one we enforce everywhere:
//! 1-64 characters of `[A-Za-z0-9_-]` (no dots, which would split a subject token, no wildcards,
//! no whitespace).

/// Longest id we accept. Keeps subjects and message ids short and bounded.
pub const MAX_ID_LEN: usize = 64;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("id is empty")]
    Empty,
    #[error("id is {0} characters long; at most {MAX_ID_LEN} are allowed")]
    TooLong(usize),
    #[error("id contains {0:?}; only A-Z, a-z, 0-9, '_' and '-' are allowed")]
    BadChar(char),
}

/// Checks that `id` can be used as a saga id, a KV key and a subject token.
pub fn validate(id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::Empty);
    }
    let len = id.chars().count();
    if len > MAX_ID_LEN {
        return Err(Error::TooLong(len));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        Some(c) => Err(Error::BadChar(c)),
        None => Ok(()),
    }
}

/// Service and action names are subject tokens too; they follow a stricter, lower-case rule so
/// that subjects read the same everywhere: `[a-z0-9_-]{1,32}`.
pub fn validate_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        assert_eq!(validate("o-1001"), Ok(()));
        assert_eq!(validate("A_b-9"), Ok(()));
        assert_eq!(validate(""), Err(Error::Empty));
        assert_eq!(validate(&"x".repeat(65)), Err(Error::TooLong(65)));
        assert_eq!(validate(&"x".repeat(64)), Ok(()));
        assert_eq!(validate("a.b"), Err(Error::BadChar('.')));
        assert_eq!(validate("a b"), Err(Error::BadChar(' ')));
        assert_eq!(validate("a*"), Err(Error::BadChar('*')));
        assert_eq!(validate("é"), Err(Error::BadChar('é')));
        assert!(validate_name("payment"));
        assert!(!validate_name("Payment"));
        assert!(!validate_name("a.b"));
    }
}
