// SPDX-License-Identifier: GPL-2.0

//! Thin safe wrappers around AF_VSOCK sockets, on top of `libc`.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// `VMADDR_CID_ANY`.
pub const VMADDR_CID_ANY: u32 = u32::MAX;

/// `VMADDR_FLAG_TO_HOST`: route the connection to the host (G2H transport),
/// even to a CID that is not the host's.
pub const VMADDR_FLAG_TO_HOST: u8 = 0x01;

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID`, `_IO(7, 0xb9)`, on `/dev/vsock`.
pub const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD`, which takes a `struct timeval` with the
/// native `time_t` (64-bit on x86_64, so the same as `_NEW` there).
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

/// `struct sockaddr_vm` from `include/uapi/linux/vm_sockets.h`.
///
/// The `libc` crate's version lacks `svm_flags` (it has `svm_zero: [u8; 4]`),
/// so this mirrors the uapi layout exactly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockaddrVm {
    /// Always `AF_VSOCK`.
    pub svm_family: libc::sa_family_t,
    /// Must be zero.
    pub svm_reserved1: u16,
    /// Port.
    pub svm_port: u32,
    /// Context id.
    pub svm_cid: u32,
    /// `VMADDR_FLAG_*`.
    pub svm_flags: u8,
    /// Must be zero.
    pub svm_zero: [u8; 3],
}

const _: () = assert!(size_of::<SockaddrVm>() == size_of::<libc::sockaddr>());

impl SockaddrVm {
    /// Builds an address.
    pub fn new(cid: u32, port: u32, flags: u8) -> Self {
        SockaddrVm {
            svm_family: libc::AF_VSOCK as libc::sa_family_t,
            svm_port: port,
            svm_cid: cid,
            svm_flags: flags,
            ..Default::default()
        }
    }
}

/// Socket type, as on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockType {
    /// `SOCK_STREAM`.
    Stream,
    /// `SOCK_SEQPACKET`.
    SeqPacket,
}

impl SockType {
    /// Returns the name used on the command line and in output.
    pub fn name(self) -> &'static str {
        match self {
            SockType::Stream => "stream",
            SockType::SeqPacket => "seqpacket",
        }
    }

    fn raw(self) -> libc::c_int {
        match self {
            SockType::Stream => libc::SOCK_STREAM,
            SockType::SeqPacket => libc::SOCK_SEQPACKET,
        }
    }
}

/// Returns the last OS error if `ret` is negative.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Returns the last OS error if `ret` is negative; retrying on `EINTR` is up to the caller.
fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// An AF_VSOCK socket.
pub struct Socket {
    fd: OwnedFd,
    ty: SockType,
    /// Flags of every `send()`: 0, or `MSG_ZEROCOPY` after `set_zerocopy()`.
    send_flags: libc::c_int,
}

impl Socket {
    /// Creates a socket of type `ty`.
    pub fn new(ty: SockType) -> io::Result<Self> {
        // SAFETY: `socket()` takes no pointers.
        let fd = cvt(unsafe { libc::socket(libc::AF_VSOCK, ty.raw() | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: `fd` was just returned by `socket()` and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Socket {
            fd,
            ty,
            send_flags: 0,
        })
    }

    /// Creates a connected pair of AF_UNIX sockets of type `ty`, to test the
    /// I/O paths (`send`, `recvmsg`) without a vsock transport.
    #[cfg(test)]
    pub fn pair(ty: SockType) -> io::Result<(Socket, Socket)> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is valid for writes of two `int`s.
        cvt(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                ty.raw() | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })?;
        // SAFETY: Both fds were just returned by `socketpair()` and are owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((
            Socket {
                fd: a,
                ty,
                send_flags: 0,
            },
            Socket {
                fd: b,
                ty,
                send_flags: 0,
            },
        ))
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Binds to `addr`.
    pub fn bind(&self, addr: &SockaddrVm) -> io::Result<()> {
        // SAFETY: `addr` points to a valid `sockaddr_vm` of the given length.
        cvt(unsafe {
            libc::bind(
                self.raw(),
                (addr as *const SockaddrVm).cast(),
                size_of::<SockaddrVm>() as libc::socklen_t,
            )
        })?;
        Ok(())
    }

    /// Listens with a backlog of `backlog`.
    pub fn listen(&self, backlog: i32) -> io::Result<()> {
        // SAFETY: `listen()` takes no pointers.
        cvt(unsafe { libc::listen(self.raw(), backlog) })?;
        Ok(())
    }

    /// Accepts a connection, returning it and the peer's address.
    pub fn accept(&self) -> io::Result<(Socket, SockaddrVm)> {
        loop {
            let mut addr = SockaddrVm::default();
            let mut len = size_of::<SockaddrVm>() as libc::socklen_t;
            // SAFETY: `addr` and `len` are valid for writes and `len` is the size of `addr`.
            let ret = unsafe {
                libc::accept4(
                    self.raw(),
                    (&mut addr as *mut SockaddrVm).cast(),
                    &mut len,
                    libc::SOCK_CLOEXEC,
                )
            };
            match cvt(ret) {
                Ok(fd) => {
                    // SAFETY: `fd` was just returned by `accept4()` and is owned by nobody else.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    return Ok((
                        Socket {
                            fd,
                            ty: self.ty,
                            send_flags: 0,
                        },
                        addr,
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Connects to `addr`.
    pub fn connect(&self, addr: &SockaddrVm) -> io::Result<()> {
        // SAFETY: `addr` points to a valid `sockaddr_vm` of the given length.
        cvt(unsafe {
            libc::connect(
                self.raw(),
                (addr as *const SockaddrVm).cast(),
                size_of::<SockaddrVm>() as libc::socklen_t,
            )
        })?;
        Ok(())
    }

    /// Returns the local address.
    pub fn local_addr(&self) -> io::Result<SockaddrVm> {
        let mut addr = SockaddrVm::default();
        let mut len = size_of::<SockaddrVm>() as libc::socklen_t;
        // SAFETY: `addr` and `len` are valid for writes and `len` is the size of `addr`.
        cvt(unsafe {
            libc::getsockname(self.raw(), (&mut addr as *mut SockaddrVm).cast(), &mut len)
        })?;
        Ok(addr)
    }

    /// Takes the socket's pending error (`SO_ERROR`), if it has one.
    ///
    /// A transport reset sets `ECONNRESET` there; a call that was not
    /// waiting when the reset came fails with `ENOTCONN` and leaves it
    /// pending (the core checks the state before the error).
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        let mut err: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `err` and `len` are valid for writes and `len` is the size of `err`.
        cvt(unsafe {
            libc::getsockopt(
                self.raw(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            )
        })?;
        Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
    }

    /// Sets the connect, send and receive timeouts; `None` means no timeout.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = match timeout {
            Some(t) => libc::timeval {
                tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_usec: libc::suseconds_t::from(t.subsec_micros()),
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        for (level, name) in [
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO),
            (libc::SOL_SOCKET, libc::SO_SNDTIMEO),
            (libc::AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT),
        ] {
            // A zero connect timeout would make connect() fail at once: keep
            // the kernel's default (2 s) when no timeout is asked for.
            if timeout.is_none() && name == SO_VM_SOCKETS_CONNECT_TIMEOUT {
                continue;
            }
            // SAFETY: `tv` is a valid `timeval` of the given length.
            cvt(unsafe {
                libc::setsockopt(
                    self.raw(),
                    level,
                    name,
                    (&tv as *const libc::timeval).cast(),
                    size_of::<libc::timeval>() as libc::socklen_t,
                )
            })?;
        }
        Ok(())
    }

    /// Turns on `SO_ZEROCOPY`: from now on every send uses `MSG_ZEROCOPY`.
    ///
    /// The kernel pins the sent pages instead of copying them and reports
    /// their release on the error queue, which is left unread here (closing
    /// the socket drops it).
    pub fn set_zerocopy(&mut self) -> io::Result<()> {
        let on: libc::c_int = 1;
        // SAFETY: `on` is a valid `c_int` of the given length.
        cvt(unsafe {
            libc::setsockopt(
                self.raw(),
                libc::SOL_SOCKET,
                libc::SO_ZEROCOPY,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
        self.send_flags = libc::MSG_ZEROCOPY;
        Ok(())
    }

    /// Sends `buf` with one `send()` call, retrying on `EINTR`.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
            let ret =
                unsafe { libc::send(self.raw(), buf.as_ptr().cast(), buf.len(), self.send_flags) };
            match cvt_size(ret) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Sends all of `buf` (one message for seqpacket).
    pub fn send_all(&self, mut buf: &[u8]) -> io::Result<()> {
        if self.ty == SockType::SeqPacket {
            let n = self.send(buf)?;
            if n != buf.len() {
                return Err(io::Error::other(format!(
                    "short seqpacket send: {n} of {} bytes",
                    buf.len()
                )));
            }
            return Ok(());
        }
        while !buf.is_empty() {
            let n = self.send(buf)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = buf.get(n..).unwrap_or(&[]);
        }
        Ok(())
    }

    /// Receives once into `buf`, returning the length and whether the message
    /// was truncated (seqpacket only). A zero length means end of stream.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, bool)> {
        loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: An all-zero `msghdr` is valid (no name, no control data).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            // SAFETY: `msg` points to one `iovec` describing `buf`, valid for writes.
            let ret = unsafe { libc::recvmsg(self.raw(), &mut msg, 0) };
            match cvt_size(ret) {
                Ok(n) => return Ok((n, msg.msg_flags & libc::MSG_TRUNC != 0)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives exactly `buf.len()` bytes (one whole message for seqpacket).
    pub fn recv_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        if self.ty == SockType::SeqPacket {
            // One spare byte tells a longer message from an exact one.
            let mut msg = vec![0u8; buf.len() + 1];
            let (n, trunc) = self.recv(&mut msg)?;
            if n != buf.len() || trunc {
                return Err(io::Error::other(format!(
                    "seqpacket message of {n}{} bytes, expected {}",
                    if trunc { "+" } else { "" },
                    buf.len()
                )));
            }
            buf.copy_from_slice(msg.get(..n).unwrap_or(&[]));
            return Ok(());
        }
        let mut off = 0;
        while off < buf.len() {
            let rest = buf.get_mut(off..).unwrap_or(&mut []);
            let (n, _) = self.recv(rest)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            off += n;
        }
        Ok(())
    }
}

/// Returns the local CID, with `IOCTL_VM_SOCKETS_GET_LOCAL_CID` on `/dev/vsock`.
pub fn local_cid() -> io::Result<u32> {
    let dev = std::fs::File::open("/dev/vsock")?;
    let mut cid: libc::c_uint = 0;
    // SAFETY: This ioctl writes one `unsigned int` to the pointer, which is valid.
    cvt(unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID,
            &mut cid as *mut libc::c_uint,
        )
    })?;
    Ok(cid)
}
