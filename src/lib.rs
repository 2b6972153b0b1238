//! nifty: build, clone and run fleets of BusyBox + Dropbear system containers.
//!
//! The data flow shows in the module names: [`template`] builds the shared,
//! read-only root; [`store`] lays out state on disk and creates instances
//! from it; [`runtime`] boots, observes and stops them (the `native`
//! launcher talks to the kernel directly); [`fleet`] turns a selection such
//! as `1..1000` into parallel work with progress.

pub mod claims;
pub mod disk;
pub mod doctor;
pub mod error;
pub mod fleet;
pub mod image;
pub mod keys;
pub mod limits;
pub mod names;
pub mod printer;
pub mod provision;
pub mod runtime;
pub mod serve;
pub mod sshclient;
pub mod sshconfig;
pub mod store;
pub mod sys;
pub mod template;
pub mod update;
pub mod volume;

pub use error::{Error, Result};
