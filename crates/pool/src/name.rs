//! Name rules for pools and entries.

use crate::error::{Error, Result};

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// Checks a pool or entry name: 1–63 characters of `a-z 0-9 . _ -`, not
/// starting with `.`.
///
/// The rule keeps names safe as single path components (no `/`, no `..`,
/// no NUL, no hidden files) and portable to other backends (RBD image names).
/// The error names the rule that was broken.
pub fn validate_name(name: &str) -> Result<()> {
    let fail = |rule| {
        Err(Error::InvalidName {
            name: name.to_string(),
            rule,
        })
    };
    if name.is_empty() {
        return fail("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("must be at most 63 characters");
    }
    if name.contains('\0') {
        return fail("must not contain NUL");
    }
    if name.contains('/') {
        return fail("must not contain '/'");
    }
    if name.starts_with('.') {
        return fail("must not start with '.' (this also refuses '.' and '..')");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return fail("may contain only a-z, 0-9, '.', '_' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_names() {
        for n in ["a", "pool-1", "x.y_z", "0", &"a".repeat(63)] {
            validate_name(n).unwrap_or_else(|e| panic!("{n}: {e}"));
        }
    }

    #[test]
    fn rejects_bad_names_with_rule() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            (&"a".repeat(64), "63"),
            ("a/b", "'/'"),
            ("..", "'.'"),
            (".hidden", "'.'"),
            ("a\0b", "NUL"),
            ("Upper", "a-z"),
            ("sp ace", "a-z"),
            ("ü", "a-z"),
        ];
        for (n, frag) in cases {
            match validate_name(n) {
                Err(Error::InvalidName { rule, .. }) => {
                    assert!(rule.contains(frag), "{n:?}: rule {rule:?} lacks {frag:?}")
                }
                other => panic!("{n:?}: {other:?}"),
            }
        }
    }
}
