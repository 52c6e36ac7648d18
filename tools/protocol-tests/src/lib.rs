// SPDX-License-Identifier: GPL-2.0

//! Userspace build of the driver's protocol layer, `src/protocol/`.
//!
//! The files are shared with the kernel module unchanged; this crate root only
//! provides the `#![no_std]` environment they are written for, so that a
//! dependency on `std` or `alloc` fails here as it would in the kernel.

#![no_std]
#![forbid(unsafe_code)]

#[path = "../../../src/protocol/mod.rs"]
pub mod protocol;
