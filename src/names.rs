//! Validation of the names users give nifty: instances, templates, users.

use crate::{Error, Result};

/// Longest instance or template name. The hostname `nifty<name>` must fit
/// the kernel's 64-byte limit, and systemd unit names stay short.
pub const MAX_NAME: usize = 48;

/// Checks an instance or template name: `[A-Za-z0-9_-]`, not empty, not
/// starting with `-` or `.`, at most [`MAX_NAME`] bytes. This rules out `/`,
/// `..` and anything a shell, a path or a unit name would mangle.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::Invalid(format!(
            "invalid {kind} name {name:?}: {why}"
        )))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME {
        return bad(&format!("longer than {MAX_NAME} characters"));
    }
    if name.starts_with('-') {
        return bad("it must not start with '-'");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return bad(&format!(
            "{c:?} is not allowed (use letters, digits, '_' and '-')"
        ));
    }
    Ok(())
}

/// Checks a login user name the way Debian's `adduser` does by default:
/// `[a-z_][a-z0-9_-]*`, at most 32 bytes, and not `root`.
pub fn check_user(name: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::Invalid(format!("invalid user name {name:?}: {why}")));
    if name.is_empty() || name.len() > 32 {
        return bad("it must have 1 to 32 characters");
    }
    if name == "root" {
        return bad("root cannot be the login user: root never logs in over the network");
    }
    let mut chars = name.chars();
    let first = chars.next().unwrap_or('-');
    if !(first.is_ascii_lowercase() || first == '_') {
        return bad("it must start with a lowercase letter or '_'");
    }
    if let Some(c) =
        chars.find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
    {
        return bad(&format!("{c:?} is not allowed (use a-z, 0-9, '_' and '-')"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names() {
        for ok in ["1", "42", "slick", "web-01", "a_b", "Z9"] {
            check_name("instance", ok).unwrap();
        }
        for bad in [
            "",
            "a/b",
            "..",
            ".",
            "a.b",
            "-x",
            "a b",
            "ü",
            &"x".repeat(49),
        ] {
            let e = check_name("instance", bad).unwrap_err().to_string();
            assert!(e.contains("invalid instance name"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn user_names() {
        for ok in ["luser", "_svc", "a1-b_c"] {
            check_user(ok).unwrap();
        }
        for bad in ["", "root", "Luser", "1abc", "a:b", "a/b", &"a".repeat(33)] {
            assert!(check_user(bad).is_err(), "{bad:?}");
        }
    }
}
