//! nifty's own SSH client command for an instance: nifty's client key, the
//! instance's port and login user, and exactly the instance's recorded host
//! key trusted (under an alias of its own), so a container answering on
//! another's port is refused.

use std::process::Command;

use crate::store::{Instance, Store};
use crate::{Error, Result};

/// An `ssh` command to `inst`, options set; append `-- CMD` to run one.
pub fn command(store: &Store, inst: &Instance) -> Result<Command> {
    let key = store.client_key();
    if !key.exists() {
        return Err(Error::Invalid(format!(
            "nifty's client key {} is missing: rebuild the template (`nifty template build`)",
            key.display()
        )));
    }
    let run = store.run_dir();
    std::fs::create_dir_all(run).map_err(Error::io("create", run))?;
    let known = run.join(format!("known_hosts.{}", inst.name));
    let lines = crate::sshconfig::known_host_lines(inst).join("\n") + "\n";
    crate::disk::write_atomic(&known, lines.as_bytes(), 0o644)?;
    let mut cmd = Command::new("ssh");
    cmd.arg("-i")
        .arg(&key)
        .args(["-p", &inst.port.to_string(), "-l", &inst.user])
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-o")
        .arg(format!(
            "HostKeyAlias={}",
            crate::sshconfig::alias(&inst.name)
        ))
        // The containers share the host's network; an address needs no
        // resolver (some hosts do not resolve "localhost").
        .arg("127.0.0.1");
    Ok(cmd)
}
