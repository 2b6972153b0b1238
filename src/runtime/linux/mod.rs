//! The Linux toolbox both backends share: cgroups, user namespaces and
//! their ID ranges, confinement (capabilities, seccomp, Landlock, bind
//! programs), the overlay root, host-side access to an instance's files,
//! /proc readers, shifted copies of the template where overlayfs takes no
//! idmapped one, ptys, one socket for many ports (`steer`), a TCP table
//! of its own for each network namespace (`netns`), and what the running
//! kernel offers, and a thread for the ends a start need not wait for
//! (`later`). Nothing here
//! knows which backend runs an instance; `native` (nifty's own launcher)
//! and `systemd` build on it; it builds on `crate::sys` and reads the
//! state on disk (`store`, `claims`), nothing above.

pub mod cgroup;
pub mod confine;
pub mod copy;
pub mod dbus;
pub mod delegate;
pub mod features;
pub mod files;
pub mod later;
pub mod netns;
pub mod overlay;
pub mod proc;
pub mod pty;
pub mod seccomp;
pub mod shift;
pub mod steer;
pub mod userns;
