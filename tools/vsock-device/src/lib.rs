// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vsock-device`: a vhost-user virtio-vsock device backend for testing
//! guest drivers.
//!
//! One process serves several guests. Packet path:
//!
//! ```text
//! guest tx chain -> packet::gather -> Packet -> router::Router::route -> fault::Hook
//!     -> router::Inbox of the destination guest -> packet::deliver/write_fragment (split over rx buffers)
//!     \-> bridge::Bridge (dst CID 2: Unix sockets on the host)
//! ```
//!
//! Modules: [`packet`] (header, gather, split), [`router`] (ports, inboxes,
//! back-pressure), [`fault`] (hook point), [`bridge`] (host side, credit),
//! [`backend`] (vhost-user glue, one thread per guest).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

pub mod backend;
pub mod bridge;
pub mod control;
pub mod fault;
pub mod inject;
pub mod packet;
pub mod prng;
pub mod router;

static VERBOSE: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();

/// Enable per-packet debug logging.
pub fn set_verbose(v: bool) {
    VERBOSE.store(v, Ordering::Relaxed);
    START.get_or_init(Instant::now);
}

/// Whether per-packet debug logging is on.
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Print one log line to stderr, with seconds since start.
pub fn log_line(args: std::fmt::Arguments) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:10.3}] vsock-device: {args}");
}

/// Log a notable event.
#[macro_export]
macro_rules! info {
    ($($a:tt)*) => { $crate::log_line(format_args!($($a)*)) };
}

/// Log per-packet detail (only with `-v`).
#[macro_export]
macro_rules! debug {
    ($($a:tt)*) => { if $crate::verbose() { $crate::log_line(format_args!($($a)*)) } };
}
