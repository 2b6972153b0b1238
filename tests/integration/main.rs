//! nifty's integration tests, one binary: the real `nifty` binary against
//! temp state roots. `cli` needs no root; the others are privileged (they
//! fail instead of skipping under NIFTY_REQUIRE_PRIVILEGED=1) and boot real
//! containers; `systemd` boots a real systemd. Privileged tests run one at
//! a time (`common::Root` holds the suite's lock): containers share the
//! host's network and port numbers.

mod common;

mod cli;
mod doctor;
mod fleet;
mod image;
mod limits;
mod ondemand;
mod security;
mod systemd;
mod template;
mod transfer;
mod update;
