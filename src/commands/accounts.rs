//! `nifty passwd`, `authorized-keys`, `rekey`: accounts and keys changed
//! from the host, so that nobody needs setuid `su`/`passwd` inside.

use std::io::Read;

use anyhow::{Context, Result};
use nifty::fleet;
use nifty::keys::HostKey;
use nifty::runtime::linux::files::{is_crypt_hash, set_shadow_hash};
use nifty::runtime::Runtime;
use nifty::template::accounts::hash_password;
use nifty::template::inittab::HOST_KEY;

use super::instance::select;
use super::Ctx;
use crate::cli::{KeysArgs, PasswdArgs, Selection};

pub fn passwd(ctx: &Ctx, a: PasswdArgs) -> Result<bool> {
    let inst = ctx.store.instance(&a.name)?;
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading stdin")?;
    let line = input.lines().next().unwrap_or("").to_string();
    anyhow::ensure!(
        !line.is_empty(),
        "passwd: stdin holds no {}",
        if a.hash { "hash" } else { "password" }
    );
    let hash = if a.hash {
        anyhow::ensure!(
            is_crypt_hash(&line),
            "passwd: {line:?} is not a crypt(3) hash such as $6$salt$hash"
        );
        line
    } else {
        hash_password(&line)?
    };
    let rt = Runtime::new(&ctx.store)?;
    let root = rt.open_root(&inst)?;
    root.user(&a.user)?;
    let shadow = root
        .read("/etc/shadow")?
        .context("the instance has no /etc/shadow")?;
    let text = set_shadow_hash(&String::from_utf8_lossy(&shadow), &a.user, &hash)?;
    root.write("/etc/shadow", text.as_bytes(), 0, 0, 0o600)?;
    ctx.printer.info(format!(
        "password of {} set in instance {}",
        a.user, inst.name
    ));
    Ok(true)
}

/// Public keys named by an argument: the key itself, or a file of keys.
fn keys_of(arg: &str) -> Result<Vec<String>> {
    let text = if std::path::Path::new(arg).is_file() {
        std::fs::read_to_string(arg).with_context(|| format!("read {arg}"))?
    } else {
        arg.to_string()
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

/// The "type base64" part of a key line, which identifies the key.
fn key_id(line: &str) -> Option<String> {
    let k = ssh_key::PublicKey::from_openssh(line).ok()?;
    k.to_openssh()
        .ok()
        .map(|s| s.split(' ').take(2).collect::<Vec<_>>().join(" "))
}

pub fn authorized_keys(ctx: &Ctx, a: KeysArgs) -> Result<bool> {
    let inst = ctx.store.instance(&a.name)?;
    let mut add = Vec::new();
    for arg in &a.add {
        for k in keys_of(arg)? {
            anyhow::ensure!(
                key_id(&k).is_some(),
                "--add: {k:?} is not an OpenSSH public key"
            );
            add.push(k);
        }
    }
    let rt = Runtime::new(&ctx.store)?;
    let root = rt.open_root(&inst)?;
    let user = root.user(&a.user)?;
    let ssh_dir = format!("{}/.ssh", user.home.trim_end_matches('/'));
    let path = format!("{ssh_dir}/authorized_keys");
    let current = root
        .read(&path)?
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default();
    let mut lines: Vec<String> = current.lines().map(String::from).collect();
    if add.is_empty() && a.remove.is_empty() {
        for l in &lines {
            println!("{}", nifty::printer::escape_controls(l.as_bytes()));
        }
        return Ok(true);
    }
    let mut removed = 0;
    for r in &a.remove {
        let ids: Vec<String> = keys_of(r)?.iter().filter_map(|k| key_id(k)).collect();
        let before = lines.len();
        lines.retain(|l| {
            let id = key_id(l);
            let comment = l.split_whitespace().nth(2);
            !(id.as_ref().is_some_and(|i| ids.contains(i)) || comment == Some(r.as_str()))
        });
        anyhow::ensure!(
            lines.len() < before,
            "--remove {r:?}: no such key for {} in instance {}",
            a.user,
            inst.name
        );
        removed += before - lines.len();
    }
    let mut added = 0;
    for k in add {
        let id = key_id(&k);
        if !lines.iter().any(|l| key_id(l) == id) {
            lines.push(k);
            added += 1;
        }
    }
    root.mkdir(&ssh_dir, user.uid, user.gid, 0o700)?;
    let text = if lines.is_empty() {
        String::new()
    } else {
        format!("{}\n", lines.join("\n"))
    };
    root.write(&path, text.as_bytes(), user.uid, user.gid, 0o600)?;
    ctx.printer.info(format!(
        "{}: {added} key(s) added, {removed} removed for {}",
        inst.name, a.user
    ));
    Ok(true)
}

pub fn rekey(ctx: &Ctx, sel: Selection) -> Result<bool> {
    let names = select(ctx, &sel)?;
    let rt = Runtime::new(&ctx.store)?;
    let out = fleet::run(&ctx.printer, "rekey", &names, |name| {
        let mut inst = ctx.store.instance(name)?;
        let key = HostKey::generate();
        let root = rt.open_root(&inst)?;
        root.mkdir("/etc/dropbear", 0, 0, 0o700)?;
        root.write(HOST_KEY, &key.dropbear_private(), 0, 0, 0o600)?;
        // A running instance serves its old key until it restarts: both
        // are trusted until then.
        if rt.init_pid(&inst).is_some() && inst.host_key_previous.is_none() {
            inst.host_key_previous = Some(inst.host_key.clone());
        }
        inst.host_key = key.openssh_public();
        ctx.store.save_instance(&inst)
    });
    nifty::sshconfig::refresh_known_hosts(&ctx.store)?;
    let ok = out.report(&ctx.printer, "rekey");
    ctx.printer
        .info("new host keys take effect at the next start (nifty restart)");
    Ok(ok)
}
