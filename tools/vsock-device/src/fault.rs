// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The fault-injection hook point.
//!
//! Every packet the device forwards passes through [`Hook::on_packet`] after
//! routing and before it is queued for its destination:
//!
//! ```text
//! guest tx chain -> gather -> Packet -> Router::route -> Hook -> per-destination Inbox -> rx writer (split)
//!                                                         \-> host bridge (dst CID 2)
//! host bridge (Unix sockets) -> Packet -> Hook -> Inbox of the guest
//! ```
//!
//! The default [`PassThrough`] forwards unchanged. A scripted hook (a future
//! `--fault SPEC` option or a control socket, built in `main.rs` and handed to
//! [`crate::router::Router::new`]) can drop, duplicate, delay (hold and emit
//! later, i.e. reorder) or corrupt packets here, since `emit` may be called
//! zero or more times with any packet. Other fault kinds plug in elsewhere
//! without a rewrite:
//! - malformed tx chains: [`crate::packet::gather`] already rejects them; a
//!   hook can produce malformed *rx* headers by editing `hdr` (e.g. a `len`
//!   that disagrees with the payload is not possible since the splitter sets
//!   `len`, but wrong ports/ops/flags are);
//! - TRANSPORT_RESET: [`crate::router::Port::request`] with
//!   [`crate::router::Control::TransportReset`];
//! - device reset: needs the frontend (QEMU `system_reset`), or dropping the
//!   vhost-user connection.

use crate::packet::Packet;

/// Where a routed packet is going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// The rx queue of the guest with this CID.
    Guest(u64),
    /// The host bridge of the sending guest.
    Host,
}

/// Context of one routed packet.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    /// CID of the guest that sent it, or 2 for the host bridge.
    pub from: u64,
    /// Where it is going.
    pub dest: Dest,
}

/// A stage between the router and the destination queue. Called from the
/// per-VM threads concurrently, hence `Sync` (use interior mutability).
pub trait Hook: Send + Sync {
    /// Handle one packet: call `emit` for each packet to queue in its place.
    fn on_packet(&self, ctx: &Ctx, pkt: Packet, emit: &mut dyn FnMut(Packet));
}

/// The default hook: forwards every packet unchanged.
#[derive(Debug, Default)]
pub struct PassThrough;

impl Hook for PassThrough {
    fn on_packet(&self, _ctx: &Ctx, pkt: Packet, emit: &mut dyn FnMut(Packet)) {
        emit(pkt)
    }
}
