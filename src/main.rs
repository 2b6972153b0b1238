//! nifty's binary: parse, run, exit code.

mod cli;
mod commands;
mod complete;

use std::process::ExitCode;

fn main() -> ExitCode {
    complete::answer();
    let cli = cli::Cli::from_args();
    // Verbs that put processes into containers run from a sealed copy of
    // the binary (see `sys::reexec_sealed`).
    if matches!(
        cli.command,
        cli::Command::Start(_)
            | cli::Command::Restart(_)
            | cli::Command::Up(_)
            | cli::Command::Exec(_)
            | cli::Command::Update(_)
    ) && !nifty::sys::running_sealed()
    {
        let e = nifty::sys::reexec_sealed();
        eprintln!(
            "nifty: error: cannot run from a sealed copy of nifty ({e}); \
             nifty does not let a container reach its host binary"
        );
        return ExitCode::FAILURE;
    }
    if matches!(
        cli.command,
        cli::Command::List(_)
            | cli::Command::Status(_)
            | cli::Command::Logs(_)
            | cli::Command::Diff(_)
            | cli::Command::SshConfig(_)
            | cli::Command::Inventory(_)
            | cli::Command::Completions { .. }
            | cli::Command::Template(cli::TemplateCmd::List(_) | cli::TemplateCmd::Show { .. })
    ) {
        nifty::sys::default_sigpipe();
    }
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NIFTY_LOG")
                .unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes (each says its own once).
            eprintln!("nifty: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
