//! The account files of a template: passwd, group, shadow. Root has no
//! usable password and never logs in over the network (Dropbear `-w`); the
//! login user gets in by key, or by a SHA-512 crypt password if one is set.

/// UID and GID of the login user.
pub const USER_ID: u32 = 1000;

/// `etc/passwd`.
pub fn passwd(user: &str) -> String {
    format!(
        "root:x:0:0:root:/root:/bin/sh\n\
         {user}:x:{USER_ID}:{USER_ID}:{user}:/home/{user}:/bin/sh\n\
         nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    )
}

/// `etc/group`.
pub fn group(user: &str) -> String {
    format!(
        "root:x:0:\n\
         tty:x:5:\n\
         {user}:x:{USER_ID}:\n\
         nogroup:x:65534:\n"
    )
}

/// `etc/shadow` (mode 600). `hash` is a crypt(3) hash for the login user;
/// without one the field is `*`: no password matches, keys still work.
/// Root's field is `!`: locked.
pub fn shadow(user: &str, hash: Option<&str>) -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0);
    let field = hash.unwrap_or("*");
    format!(
        "root:!:{days}:0:99999:7:::\n\
         {user}:{field}:{days}:0:99999:7:::\n\
         nobody:*:{days}:0:99999:7:::\n"
    )
}

/// Hashes a password with SHA-512 crypt (`$6$`), which glibc's crypt and
/// so Debian's Dropbear verify.
pub fn hash_password(password: &str) -> crate::Result<String> {
    let params = sha_crypt::Sha512Params::new(5000)
        .map_err(|e| crate::Error::Host(format!("SHA-512 crypt parameters: {e:?}")))?;
    sha_crypt::sha512_simple(password, &params)
        .map_err(|e| crate::Error::Host(format!("SHA-512 crypt: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_has_root_and_user() {
        let p = passwd("luser");
        let lines: Vec<_> = p.lines().collect();
        assert_eq!(lines[0], "root:x:0:0:root:/root:/bin/sh");
        assert_eq!(lines[1], "luser:x:1000:1000:luser:/home/luser:/bin/sh");
        assert!(lines.iter().all(|l| l.split(':').count() == 7));
    }

    #[test]
    fn group_has_user_group() {
        let g = group("bob");
        assert!(g.lines().any(|l| l == "bob:x:1000:"));
        assert!(g.lines().all(|l| l.split(':').count() == 4));
    }

    #[test]
    fn shadow_locks_root() {
        let s = shadow("luser", None);
        let root: Vec<_> = s.lines().next().unwrap().split(':').collect();
        assert_eq!((root[0], root[1]), ("root", "!"));
        let user: Vec<_> = s.lines().nth(1).unwrap().split(':').collect();
        assert_eq!((user[0], user[1]), ("luser", "*"));
        assert!(s.lines().all(|l| l.split(':').count() == 9));
        let h = hash_password("secret").unwrap();
        let s = shadow("luser", Some(&h));
        assert!(s.contains(&format!("luser:{h}:")));
    }

    #[test]
    fn password_hash_is_sha512_crypt() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$6$"), "{h}");
        assert!(sha_crypt::sha512_check("correct horse", &h).is_ok());
        assert!(sha_crypt::sha512_check("wrong", &h).is_err());
        assert_ne!(h, hash_password("correct horse").unwrap(), "salted");
    }
}
