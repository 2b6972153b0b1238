//! Shell completion: the scripts come from clap's definitions
//! (`nifty completions SHELL`); while a shell completes, it runs nifty
//! with `NIFTY_COMPLETE` set, and the names of instances and templates are
//! read from the store (the `--root` on the line being completed, else
//! `NIFTY_ROOT`, else the default).

use std::ffi::OsStr;
use std::path::PathBuf;

use clap_complete::engine::CompletionCandidate;
use clap_complete::env::{CompleteEnv, Shells};

/// The variable that puts nifty in completion mode.
pub const VAR: &str = "NIFTY_COMPLETE";

/// Answers a completion request and exits, if this run is one.
pub fn answer() {
    CompleteEnv::with_factory(<crate::cli::Cli as clap::CommandFactory>::command)
        .var(VAR)
        .complete();
}

/// The completion script for `shell`, calling `nifty` on the PATH.
pub fn script(shell: &str) -> std::io::Result<Vec<u8>> {
    let shells = Shells::builtins();
    let sh = shells.completer(shell).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("no shell {shell}"),
        )
    })?;
    let mut buf = Vec::new();
    sh.write_registration(VAR, "nifty", "nifty", "nifty", &mut buf)?;
    if shell == "zsh" {
        // Installed as `_nifty` in $fpath, the file is autoloaded at the
        // first completion: complete that one too.
        buf.extend_from_slice(
            b"if [[ \"${funcstack[1]-}\" == _nifty ]]; then _clap_dynamic_completer_nifty \"$@\"; fi\n",
        );
    }
    Ok(buf)
}

/// The store the line being completed names.
fn store() -> nifty::store::Store {
    let args: Vec<_> = std::env::args_os().collect();
    let mut root = std::env::var_os("NIFTY_ROOT").map(PathBuf::from);
    for (i, a) in args.iter().enumerate() {
        if a == "--root" {
            if let Some(v) = args.get(i + 1) {
                root = Some(PathBuf::from(v));
            }
        } else if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--root=")) {
            root = Some(PathBuf::from(v));
        }
    }
    nifty::store::Store::new(root)
}

fn matching(
    names: Vec<String>,
    current: &OsStr,
    prefix: &str,
    suffix: &str,
) -> Vec<CompletionCandidate> {
    let cur = current.to_string_lossy();
    names
        .into_iter()
        .map(|n| format!("{prefix}{n}{suffix}"))
        .filter(|n| n.starts_with(cur.as_ref()))
        .map(CompletionCandidate::new)
        .collect()
}

/// Instance names.
pub fn instances(current: &OsStr) -> Vec<CompletionCandidate> {
    matching(
        store().instance_names().unwrap_or_default(),
        current,
        "",
        "",
    )
}

/// Template names.
pub fn templates(current: &OsStr) -> Vec<CompletionCandidate> {
    let names = store()
        .templates()
        .unwrap_or_default()
        .into_iter()
        .map(|t| t.name)
        .collect();
    matching(names, current, "", "")
}

/// `NAME:` of instances, and host paths.
pub fn copy_endpoint(current: &OsStr) -> Vec<CompletionCandidate> {
    let mut out = matching(
        store().instance_names().unwrap_or_default(),
        current,
        "",
        ":",
    );
    use clap_complete::engine::ValueCompleter;
    out.extend(clap_complete::engine::PathCompleter::any().complete(current));
    out
}
