//! The fleet as OpenSSH clients and Ansible see it: a `known_hosts` that
//! nifty keeps current with every instance's real host key, an OpenSSH
//! client config (`nifty ssh-config`) and an Ansible inventory (`nifty
//! inventory`), all naming an instance `nifty-NAME`.
//!
//! Every instance listens on 127.0.0.1, so its host key is pinned under an
//! alias of its own (`HostKeyAlias`), never under `[127.0.0.1]:PORT`: a
//! container that took another's port is refused by a strict client.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::store::{Instance, Store};
use crate::{Error, Result};

/// The name OpenSSH and Ansible know an instance by.
pub fn alias(name: &str) -> String {
    format!("nifty-{name}")
}

/// The instance `alias` names, if it is one of nifty's.
pub fn unalias(alias: &str) -> Option<&str> {
    alias.strip_prefix("nifty-").filter(|n| !n.is_empty())
}

/// The `known_hosts` lines of one instance: its host key and, after a
/// `rekey` while it ran, the key it still serves until its next start.
pub fn known_host_lines(inst: &Instance) -> Vec<String> {
    std::iter::once(&inst.host_key)
        .chain(inst.host_key_previous.as_ref())
        .filter(|k| !k.is_empty())
        .map(|k| format!("{} {}", alias(&inst.name), k.trim()))
        .collect()
}

/// Rewrites the fleet's `known_hosts` and `ssh_config` from the instance
/// records (after `create`, `rekey`, `rm`, and a start that retired a
/// previous key). Writers take turns, each reading the records under the
/// lock, so the last one written holds every change.
///
/// The config is a file as well as `nifty ssh-config`'s output because
/// OpenSSH's `ssh` closes every inherited descriptor above stderr before
/// it reads `-F`, so `ssh -F <(nifty ssh-config)` cannot work; `ssh -F
/// /var/lib/nifty/ssh_config nifty-7` and `Include` of that file do.
pub fn refresh_known_hosts(store: &Store) -> Result<PathBuf> {
    let path = store.known_hosts();
    let _lock = crate::disk::lock_file(&store.root().join(".known_hosts.lock"))?;
    let mut insts = Vec::new();
    let mut text = String::from(
        "# The host keys of nifty's instances, kept current by nifty (create, rekey, rm).\n\
         # Use with `HostKeyAlias nifty-NAME` (see `nifty ssh-config`).\n",
    );
    for name in store.instance_names()? {
        // An instance being created or removed has no readable record yet
        // (or any more): it has no key to trust.
        if let Ok(inst) = store.instance(&name) {
            for line in known_host_lines(&inst) {
                text.push_str(&line);
                text.push('\n');
            }
            insts.push(inst);
        }
    }
    crate::disk::write_atomic(&path, text.as_bytes(), 0o644)?;
    crate::disk::write_atomic(
        &store.ssh_config(),
        ssh_config(store, &insts).as_bytes(),
        0o644,
    )?;
    Ok(path)
}

/// What a client needs to reach one instance.
struct Host {
    alias: String,
    port: u16,
    user: String,
    template: String,
}

fn hosts(insts: &[Instance]) -> Vec<Host> {
    insts
        .iter()
        .map(|i| Host {
            alias: alias(&i.name),
            port: i.port,
            user: i.user.clone(),
            template: i.template.clone(),
        })
        .collect()
}

/// The options that pin an instance's host key, as `ssh -o` arguments.
fn pin_options(store: &Store, alias: &str) -> Vec<String> {
    vec![
        format!("HostKeyAlias={alias}"),
        format!("UserKnownHostsFile={}", store.known_hosts().display()),
        "StrictHostKeyChecking=yes".into(),
        "IdentitiesOnly=yes".into(),
    ]
}

/// Quotes a path for ssh_config, which splits on spaces.
fn quote(p: &std::path::Path) -> String {
    let s = p.display().to_string();
    if s.contains([' ', '\t', '"']) {
        format!("\"{}\"", s.replace('"', ""))
    } else {
        s
    }
}

/// An OpenSSH client config for `insts`: `ssh -F <(nifty ssh-config)
/// nifty-7`, or `Include` it from `~/.ssh/config`.
pub fn ssh_config(store: &Store, insts: &[Instance]) -> String {
    let mut out = String::from(
        "# nifty's instances as OpenSSH clients see them (`nifty ssh-config`).\n\
         # `ssh -F FILE nifty-NAME`, or `Include FILE` in ~/.ssh/config; nifty keeps\n\
         # the whole fleet's in its state root (ssh_config) current.\n",
    );
    for h in hosts(insts) {
        out.push_str(&format!(
            "\nHost {alias}\n    HostName 127.0.0.1\n    Port {port}\n    User {user}\n    \
             IdentityFile {key}\n    IdentitiesOnly yes\n    HostKeyAlias {alias}\n    \
             UserKnownHostsFile {known}\n    StrictHostKeyChecking yes\n",
            alias = h.alias,
            port = h.port,
            user = h.user,
            key = quote(&store.client_key()),
            known = quote(&store.known_hosts()),
        ));
    }
    out
}

/// Inventory formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ini,
    Yaml,
    Json,
}

/// An Ansible group name from a template name (letters, digits, `_`).
fn group(template: &str) -> String {
    let g: String = template
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("template_{g}")
}

/// The variables of one host.
fn host_vars(store: &Store, h: &Host) -> BTreeMap<&'static str, Value> {
    let args = pin_options(store, &h.alias)
        .iter()
        .map(|o| format!("-o {}", shell_quote(o)))
        .collect::<Vec<_>>()
        .join(" ");
    BTreeMap::from([
        ("ansible_host", json!("127.0.0.1")),
        ("ansible_port", json!(h.port)),
        ("ansible_user", json!(h.user)),
        (
            "ansible_ssh_private_key_file",
            json!(store.client_key().display().to_string()),
        ),
        ("ansible_ssh_common_args", json!(args)),
    ])
}

/// Quotes a word for a POSIX shell (Ansible splits these args with shlex).
fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_=/.,:@+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Hosts per group: `nifty` (all of them) and one per template.
fn groups(hosts: &[Host]) -> BTreeMap<String, Vec<&Host>> {
    let mut g: BTreeMap<String, Vec<&Host>> = BTreeMap::new();
    g.entry("nifty".into()).or_default();
    for h in hosts {
        g.entry("nifty".into()).or_default().push(h);
        g.entry(group(&h.template)).or_default().push(h);
    }
    g
}

/// An Ansible inventory of `insts`, in a static format.
pub fn inventory(store: &Store, insts: &[Instance], format: Format) -> Result<String> {
    let hosts = hosts(insts);
    let groups = groups(&hosts);
    match format {
        Format::Ini => {
            let mut out = String::from("# nifty instances (`nifty inventory`)\n");
            for (name, members) in &groups {
                out.push_str(&format!("\n[{name}]\n"));
                for h in members {
                    out.push_str(&h.alias);
                    // Only the `nifty` group carries the variables; a host
                    // is listed again under its template's group.
                    if name == "nifty" {
                        for (k, v) in host_vars(store, h) {
                            let v = match v {
                                Value::String(s) => ini_quote(&s),
                                other => other.to_string(),
                            };
                            out.push_str(&format!(" {k}={v}"));
                        }
                    }
                    out.push('\n');
                }
            }
            Ok(out)
        }
        Format::Yaml | Format::Json => {
            let mut children = serde_json::Map::new();
            for (name, members) in &groups {
                let mut hs = serde_json::Map::new();
                for h in members {
                    let vars = if name == "nifty" {
                        json!(host_vars(store, h))
                    } else {
                        json!({})
                    };
                    hs.insert(h.alias.clone(), vars);
                }
                children.insert(name.clone(), json!({ "hosts": hs }));
            }
            let doc = json!({ "all": { "children": children } });
            if format == Format::Json {
                serde_json::to_string_pretty(&doc)
                    .map(|s| s + "\n")
                    .map_err(|e| Error::Invalid(format!("inventory as JSON: {e}")))
            } else {
                serde_norway::to_string(&doc)
                    .map_err(|e| Error::Invalid(format!("inventory as YAML: {e}")))
            }
        }
    }
}

/// An INI value: quoted when it holds spaces or quotes.
fn ini_quote(s: &str) -> String {
    if s.contains([' ', '\t', '\'', '"', '#', ';', '=']) {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s.to_string()
    }
}

/// `--list` of an Ansible dynamic inventory script: groups with their
/// hosts, and every host's variables under `_meta`.
pub fn dynamic_list(store: &Store, insts: &[Instance]) -> Value {
    let hosts = hosts(insts);
    let mut doc = serde_json::Map::new();
    let groups = groups(&hosts);
    doc.insert(
        "all".into(),
        json!({ "children": groups.keys().collect::<Vec<_>>() }),
    );
    for (name, members) in &groups {
        doc.insert(
            name.clone(),
            json!({ "hosts": members.iter().map(|h| &h.alias).collect::<Vec<_>>() }),
        );
    }
    let vars: BTreeMap<&str, _> = hosts
        .iter()
        .map(|h| (h.alias.as_str(), host_vars(store, h)))
        .collect();
    doc.insert("_meta".into(), json!({ "hostvars": vars }));
    Value::Object(doc)
}

/// `--host ALIAS` of a dynamic inventory script: that host's variables
/// (an empty object for a host nifty does not know, as Ansible expects).
pub fn dynamic_host(store: &Store, inst: Option<&Instance>) -> Value {
    match inst {
        Some(i) => json!(host_vars(store, &hosts(std::slice::from_ref(i))[0])),
        None => json!({}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(name: &str, port: u16) -> Instance {
        let mut i: Instance = toml::from_str(&format!(
            "name = {name:?}\ntemplate = \"web-1\"\nbackend = \"native\"\nport = {port}\n\
             user = \"luser\"\nhost_key = \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK7 nifty\"\n\
             created = \"now\"\n[limits]\ntasks = 512\n"
        ))
        .unwrap();
        i.host_key_previous = None;
        i
    }

    #[test]
    fn aliases_round_trip() {
        assert_eq!(alias("7"), "nifty-7");
        assert_eq!(unalias("nifty-web-1"), Some("web-1"));
        assert_eq!(unalias("nifty-"), None);
        assert_eq!(unalias("other"), None);
    }

    #[test]
    fn known_hosts_carry_the_previous_key_until_the_next_start() {
        let mut i = inst("3", 2203);
        assert_eq!(known_host_lines(&i).len(), 1);
        assert!(known_host_lines(&i)[0].starts_with("nifty-3 ssh-ed25519 "));
        i.host_key_previous = Some("ssh-ed25519 AAAAold".into());
        let l = known_host_lines(&i);
        assert_eq!(l.len(), 2);
        assert_eq!(l[1], "nifty-3 ssh-ed25519 AAAAold");
    }

    #[test]
    fn ssh_config_pins_each_host_key_under_its_alias() {
        let store = Store::new(Some("/srv/my state".into()));
        let c = ssh_config(&store, &[inst("7", 2207)]);
        assert!(c.contains("Host nifty-7\n"));
        assert!(c.contains("    Port 2207\n"));
        assert!(c.contains("    HostKeyAlias nifty-7\n"));
        assert!(c.contains("    StrictHostKeyChecking yes\n"));
        assert!(c.contains("UserKnownHostsFile \"/srv/my state/known_hosts\"\n"));
    }

    #[test]
    fn inventories_list_every_host_in_every_format() {
        let store = Store::new(Some("/srv/nifty".into()));
        let insts = [inst("1", 2201), inst("2", 2202)];
        let ini = inventory(&store, &insts, Format::Ini).unwrap();
        assert!(ini.contains("[nifty]\nnifty-1 ansible_host=127.0.0.1 ansible_port=2201"));
        assert!(ini.contains("[template_web_1]\nnifty-1\nnifty-2\n"));
        assert!(ini.contains("ansible_ssh_common_args=\"-o HostKeyAlias=nifty-2 -o "));
        let y = inventory(&store, &insts, Format::Yaml).unwrap();
        let back: Value = serde_norway::from_str(&y).unwrap();
        let j: Value =
            serde_json::from_str(&inventory(&store, &insts, Format::Json).unwrap()).unwrap();
        assert_eq!(back, j);
        assert_eq!(
            j["all"]["children"]["nifty"]["hosts"]["nifty-2"]["ansible_port"],
            2202
        );
        let list = dynamic_list(&store, &insts);
        assert_eq!(list["nifty"]["hosts"], json!(["nifty-1", "nifty-2"]));
        assert_eq!(
            list["_meta"]["hostvars"]["nifty-1"]["ansible_user"],
            "luser"
        );
        assert_eq!(dynamic_host(&store, None), json!({}));
    }
}
