//! `nifty cp`: files between the host and an instance.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use nifty::runtime::linux::copy::{self, CopyOptions, CopyReport};
use nifty::runtime::linux::files::Root;
use nifty::runtime::Runtime;

use super::Ctx;
use crate::cli::CpArgs;

/// One side of a copy.
enum Endpoint {
    Host(PathBuf),
    Instance { name: String, path: String },
}

/// `NAME:PATH` is in an instance when NAME is a valid instance name (no
/// `/`); anything else is a host path (`./a:b` for a host file with a colon).
fn endpoint(arg: &str) -> Endpoint {
    match arg.split_once(':') {
        Some((name, path)) if nifty::names::check_name("instance", name).is_ok() => {
            Endpoint::Instance {
                name: name.to_string(),
                path: path.to_string(),
            }
        }
        _ => Endpoint::Host(PathBuf::from(arg)),
    }
}

pub fn cp(ctx: &Ctx, a: CpArgs) -> Result<bool> {
    let opts = CopyOptions {
        recursive: a.recursive,
        owner: a.owner.clone(),
    };
    let (name, inward) = match (endpoint(&a.src), endpoint(&a.dest)) {
        (Endpoint::Host(_), Endpoint::Host(_)) => {
            bail!(
                "cp: neither {:?} nor {:?} is in an instance; write NAME:PATH for one of them",
                a.src,
                a.dest
            )
        }
        (Endpoint::Instance { .. }, Endpoint::Instance { .. }) => {
            bail!("cp: both sides are in instances; copy to the host first")
        }
        (Endpoint::Host(src), Endpoint::Instance { name, path }) => (name, Some((src, path))),
        (Endpoint::Instance { name, path }, Endpoint::Host(dest)) => {
            anyhow::ensure!(
                a.owner.is_none(),
                "cp: --owner is for files copied into an instance"
            );
            let (root, src) = open(ctx, &name, &path)?;
            let report = copy::copy_out(&root, &src, &dest, &opts)
                .with_context(|| format!("cp {name}:{src} to {}", dest.display()))?;
            return Ok(done(
                ctx,
                &report,
                &format!("{name}:{src}"),
                &dest.display().to_string(),
            ));
        }
    };
    let (src, path) = inward.expect("into an instance");
    let (root, dest) = open(ctx, &name, &path)?;
    let report = copy::copy_in(&root, &src, &dest, &opts)
        .with_context(|| format!("cp {} to {name}:{dest}", src.display()))?;
    Ok(done(
        ctx,
        &report,
        &src.display().to_string(),
        &format!("{name}:{dest}"),
    ))
}

/// The instance's merged root, and `path` checked and made absolute (a
/// relative one is in its login user's home).
fn open(ctx: &Ctx, name: &str, path: &str) -> Result<(Root, String)> {
    let inst = ctx.store.instance(name)?;
    let rt = Runtime::new(&ctx.store)?;
    let root = rt.open_root(&inst)?;
    let home = root.user(&inst.user).map(|u| u.home).unwrap_or("/".into());
    let path = copy::container_path(name, path, &home)?;
    Ok((root, path))
}

fn done(ctx: &Ctx, r: &CopyReport, from: &str, to: &str) -> bool {
    for s in &r.skipped {
        eprintln!("nifty: cp: skipped {s}");
    }
    ctx.printer.info(format!(
        "copied {from} to {to}: {} file(s), {} new director{}, {} bytes{}",
        r.files,
        r.directories,
        if r.directories == 1 { "y" } else { "ies" },
        r.bytes,
        if r.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} skipped", r.skipped.len())
        }
    ));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(arg: &str) -> (bool, String) {
        match endpoint(arg) {
            Endpoint::Host(p) => (false, p.display().to_string()),
            Endpoint::Instance { name, path } => (true, format!("{name}|{path}")),
        }
    }

    #[test]
    fn endpoints_are_instances_only_with_a_valid_name() {
        assert_eq!(
            side("7:/etc/os-release"),
            (true, "7|/etc/os-release".into())
        );
        assert_eq!(side("web-1:"), (true, "web-1|".into()));
        assert_eq!(side("./a:b"), (false, "./a:b".into()));
        assert_eq!(side("/tmp/a:b"), (false, "/tmp/a:b".into()));
        assert_eq!(side("notes.txt"), (false, "notes.txt".into()));
        assert_eq!(side("a b:c"), (false, "a b:c".into()));
    }
}
