// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host side (CID 2) of one guest, bridged to Unix sockets with the
//! protocol of vhost-device-vsock:
//!
//! - guest connects to CID 2 port P: the device connects to the Unix socket
//!   `<uds-path>_P`; OP_RESPONSE on success, OP_RST on failure;
//! - a host program connects to `<uds-path>` and writes `CONNECT <port>\n`:
//!   the device sends OP_REQUEST from a fresh host port (from 1024 up) and,
//!   on OP_RESPONSE, writes `OK <host port>\n` back; on OP_RST it closes.
//!
//! Then bytes flow both ways as OP_RW. Here the device is the vsock peer, so
//! it keeps the credit accounting ([`Credit`]): it never sends more than the
//! guest's `buf_alloc` allows, advertises its own `buf_alloc`/`fwd_cnt` in
//! every header, answers OP_CREDIT_REQUEST and sends OP_CREDIT_UPDATE once it
//! has consumed a quarter of its buffer without telling the guest. A Unix EOF
//! becomes OP_SHUTDOWN(SEND); a guest SHUTDOWN(SEND) becomes `shutdown(Write)`
//! on the socket; once both directions are finished (or the guest shut both),
//! the device sends OP_RST and closes. Only stream sockets are bridged.
//!
//! Everything runs on the guest's thread; sockets are non-blocking and
//! watched by one epoll fd that the vhost glue polls (see [`Bridge::poll`]).

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::packet::{op, Hdr, Packet, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use crate::{debug, info};

/// Largest OP_RW payload the bridge sends (the guest splits nothing; the rx
/// writer splits over rx buffers).
pub const MAX_RW: usize = 64 * 1024;
/// First host port handed out for host-initiated connections.
pub const FIRST_HOST_PORT: u32 = 1024;
const LISTENER: u64 = 0;
const MAX_LINE: usize = 64;

/// Credit accounting of one connection, seen from the device.
#[derive(Clone, Debug, Default)]
pub struct Credit {
    /// Our receive buffer, advertised as `buf_alloc`.
    pub buf_alloc: u32,
    fwd_cnt: u32,
    rx_cnt: u32,
    last_fwd_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
}

impl Credit {
    /// Fresh accounting with our buffer size; the peer gives no credit until
    /// [`Credit::update_peer`].
    pub fn new(buf_alloc: u32) -> Self {
        Credit {
            buf_alloc,
            ..Credit::default()
        }
    }

    /// Record the `buf_alloc`/`fwd_cnt` carried by any packet from the peer.
    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes we may still send (u32 wrapping counters, as the kernel does).
    pub fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// We sent `n` payload bytes.
    pub fn on_send(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// The peer sent `n` payload bytes; false (and not counted) if that
    /// overflows the buffer we advertised.
    pub fn on_receive(&mut self, n: u32) -> bool {
        let used = self.rx_cnt.wrapping_sub(self.fwd_cnt);
        if u64::from(used) + u64::from(n) > u64::from(self.buf_alloc) {
            return false;
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(n);
        true
    }

    /// We consumed (forwarded) `n` received bytes.
    pub fn on_consume(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt)
    }

    /// Whether to send an unsolicited CREDIT_UPDATE: we consumed at least a
    /// quarter of our buffer since we last advertised `fwd_cnt`. A peer that
    /// is out of credit has a full buffer outstanding, so it always gets one.
    pub fn needs_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt) >= (self.buf_alloc / 4).max(1)
    }

    /// Put our `buf_alloc`/`fwd_cnt` into an outgoing header.
    pub fn stamp(&mut self, hdr: &mut Hdr) {
        hdr.buf_alloc = self.buf_alloc;
        hdr.fwd_cnt = self.fwd_cnt;
        self.last_fwd_cnt = self.fwd_cnt;
    }
}

/// A bridged connection: (host port, guest port).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    pub host_port: u32,
    pub guest_port: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, OP_REQUEST sent, waiting for the guest.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    credit: Credit,
    /// Guest -> host bytes not yet written to the socket.
    out: VecDeque<u8>,
    /// The host side reached EOF; SHUTDOWN(SEND) was sent.
    host_eof: bool,
    /// SHUTDOWN flags received from the guest.
    guest_shut: u32,
    /// `shutdown(Write)` done on the socket.
    wr_shut: bool,
    /// Events registered with epoll (empty: not registered).
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State, buf_alloc: u32) -> Self {
        Conn {
            stream,
            token,
            state,
            credit: Credit::new(buf_alloc),
            out: VecDeque::new(),
            host_eof: false,
            guest_shut: 0,
            wr_shut: false,
            interest: EventSet::empty(),
        }
    }

    fn wants_read(&self, room: bool) -> bool {
        room && self.state == State::Established
            && !self.host_eof
            && self.guest_shut & SHUTDOWN_RCV == 0
            && self.credit.peer_free() > 0
    }

    /// Write buffered guest data to the socket; Err on a socket error.
    fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let (a, _) = self.out.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                    self.credit.on_consume(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

enum Entry {
    Listener,
    /// Accepted from the host, reading `CONNECT <port>\n`.
    Pending {
        stream: UnixStream,
        line: Vec<u8>,
    },
    Conn(Key),
}

/// The host bridge of one guest.
pub struct Bridge {
    cid: u64,
    uds_path: Option<PathBuf>,
    _listener: Option<UnixListener>,
    epoll: Epoll,
    entries: HashMap<u64, Entry>,
    conns: HashMap<Key, Conn>,
    next_token: u64,
    next_port: u32,
    buf_alloc: u32,
    live: bool,
    scratch: Vec<u8>,
}

/// Parse `CONNECT <port>` (case-insensitive, surrounding blanks ignored).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let mut w = s.split_whitespace();
    let cmd = w.next()?;
    let port = w.next()?.parse().ok()?;
    (cmd.eq_ignore_ascii_case("connect") && w.next().is_none()).then_some(port)
}

/// `<uds-path>_<port>`.
pub fn port_path(base: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(base.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

impl Bridge {
    /// A bridge for guest `cid`. With a `uds_path`, a stale socket file is
    /// removed and the listener bound there; without, every connection to
    /// the host is refused.
    pub fn new(cid: u64, uds_path: Option<PathBuf>, buf_alloc: u32) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let mut entries = HashMap::new();
        let listener = match &uds_path {
            Some(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                l.set_nonblocking(true)?;
                epoll.ctl(
                    ControlOperation::Add,
                    l.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, LISTENER),
                )?;
                entries.insert(LISTENER, Entry::Listener);
                Some(l)
            }
            None => None,
        };
        Ok(Bridge {
            cid,
            uds_path,
            _listener: listener,
            epoll,
            entries,
            conns: HashMap::new(),
            next_token: LISTENER + 1,
            next_port: FIRST_HOST_PORT,
            buf_alloc,
            live: false,
            scratch: vec![0; MAX_RW],
        })
    }

    /// The guest's CID changed (config space): packets from the host are
    /// addressed to `cid` from now on.
    pub fn set_cid(&mut self, cid: u64) {
        self.cid = cid;
    }

    /// The epoll fd to watch: readable when [`Bridge::poll`] has work.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of open bridged connections.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// The guest driver came up or went away. Going away drops every
    /// connection (their sockets close; nothing is sent to the guest).
    pub fn set_live(&mut self, live: bool) {
        if !live {
            self.drop_all();
        }
        self.live = live;
    }

    /// Close every connection without telling the guest (after a transport
    /// reset or when the guest goes away).
    pub fn drop_all(&mut self) {
        if !self.conns.is_empty() {
            info!(
                "cid {}: closing {} host connection(s)",
                self.cid,
                self.conns.len()
            );
        }
        self.conns.clear();
        self.entries.retain(|_, e| matches!(e, Entry::Listener));
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn mk(cid: u64, key: Key, credit: &mut Credit, op: u16, flags: u32, data: Vec<u8>) -> Packet {
        let mut hdr = Hdr {
            src_cid: HOST_CID,
            dst_cid: cid,
            src_port: key.host_port,
            dst_port: key.guest_port,
            type_: TYPE_STREAM,
            op,
            flags,
            ..Hdr::default()
        };
        credit.stamp(&mut hdr);
        Packet::with_payload(hdr, data)
    }

    /// Remove a connection, optionally sending OP_RST to the guest.
    fn close(&mut self, key: Key, rst: bool, why: &str, out: &mut Vec<Packet>) {
        let Some(mut c) = self.conns.remove(&key) else {
            return;
        };
        self.entries.remove(&c.token);
        if !c.interest.is_empty() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        info!(
            "cid {}: host port {} <-> guest port {} closed ({why})",
            self.cid, key.host_port, key.guest_port
        );
        if rst {
            out.push(Self::mk(
                self.cid,
                key,
                &mut c.credit,
                op::RST,
                0,
                Vec::new(),
            ));
        }
    }

    /// Handle a packet the guest sent to CID 2. Packets for the guest are
    /// appended to `out`.
    pub fn on_guest_packet(&mut self, pkt: Packet, out: &mut Vec<Packet>) {
        let h = pkt.hdr;
        let key = Key {
            host_port: h.dst_port,
            guest_port: h.src_port,
        };
        if h.type_ != TYPE_STREAM || !self.live {
            if h.op != op::RST {
                debug!("cid {}: refusing {h}", self.cid);
                out.push(Packet::control(h.reply(op::RST)));
            }
            return;
        }
        let cid = self.cid;
        let Some(c) = self.conns.get_mut(&key) else {
            match h.op {
                op::REQUEST => self.connect(h, out),
                op::RST => {}
                _ => out.push(Packet::control(h.reply(op::RST))),
            }
            return;
        };
        c.credit.update_peer(h.buf_alloc, h.fwd_cnt);
        match (h.op, &c.state) {
            (op::RESPONSE, State::Connecting) => {
                let line = format!("OK {}\n", key.host_port);
                if let Err(e) = c.stream.write_all(line.as_bytes()) {
                    return self.close(key, true, &format!("writing OK: {e}"), out);
                }
                c.state = State::Established;
                info!(
                    "cid {cid}: host port {} connected to guest port {}",
                    key.host_port, key.guest_port
                );
            }
            (op::RST, _) => return self.close(key, false, "guest RST", out),
            (op::RW, State::Established) if c.guest_shut & SHUTDOWN_SEND == 0 => {
                let n = pkt.payload.len() as u32;
                if c.credit.on_receive(n) {
                    c.out.extend(pkt.payload.iter());
                } else {
                    info!(
                        "cid {cid}: guest port {} overran its credit ({} buffered, +{n}): dropped",
                        key.guest_port,
                        c.credit.buffered()
                    );
                }
            }
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, State::Established) => out.push(Self::mk(
                cid,
                key,
                &mut c.credit,
                op::CREDIT_UPDATE,
                0,
                Vec::new(),
            )),
            (op::SHUTDOWN, State::Established) => {
                c.guest_shut |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
            }
            _ => {
                let why = format!("unexpected {} from guest", op::name(h.op));
                return self.close(key, true, &why, out);
            }
        }
        self.service(key, out);
    }

    /// Guest-initiated connection to host port `h.dst_port`.
    fn connect(&mut self, h: Hdr, out: &mut Vec<Packet>) {
        let Some(base) = &self.uds_path else {
            out.push(Packet::control(h.reply(op::RST)));
            return;
        };
        let path = port_path(base, h.dst_port);
        let stream = UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s));
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                info!(
                    "cid {}: guest port {} -> host port {}: {}: {e}; RST",
                    self.cid,
                    h.src_port,
                    h.dst_port,
                    path.display()
                );
                out.push(Packet::control(h.reply(op::RST)));
                return;
            }
        };
        let key = Key {
            host_port: h.dst_port,
            guest_port: h.src_port,
        };
        let token = self.token();
        let mut c = Conn::new(stream, token, State::Established, self.buf_alloc);
        c.credit.update_peer(h.buf_alloc, h.fwd_cnt);
        out.push(Self::mk(
            self.cid,
            key,
            &mut c.credit,
            op::RESPONSE,
            0,
            Vec::new(),
        ));
        info!(
            "cid {}: guest port {} connected to {}",
            self.cid,
            h.src_port,
            path.display()
        );
        self.entries.insert(token, Entry::Conn(key));
        self.conns.insert(key, c);
    }

    /// After any activity on a connection: flush guest data, credit update,
    /// half-close, final close.
    fn service(&mut self, key: Key, out: &mut Vec<Packet>) {
        let cid = self.cid;
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if let Err(e) = c.flush() {
            return self.close(key, true, &format!("socket write: {e}"), out);
        }
        if c.state == State::Established && c.credit.needs_update() {
            out.push(Self::mk(
                cid,
                key,
                &mut c.credit,
                op::CREDIT_UPDATE,
                0,
                Vec::new(),
            ));
        }
        let guest_done = c.guest_shut & SHUTDOWN_SEND != 0;
        if guest_done && c.out.is_empty() && !c.wr_shut {
            c.wr_shut = true;
            let _ = c.stream.shutdown(Shutdown::Write);
        }
        let finished = c.guest_shut == SHUTDOWN_RCV | SHUTDOWN_SEND || (guest_done && c.host_eof);
        if finished && c.out.is_empty() {
            self.close(key, true, "both sides shut down", out);
        }
    }

    /// Handle ready sockets: accept host connections, read `CONNECT` lines,
    /// move data. `room`: the guest's inbox can take more packets (no socket
    /// is read otherwise). Packets for the guest are appended to `out`.
    /// Returns whether any event was handled.
    pub fn poll(&mut self, room: bool, out: &mut Vec<Packet>) -> bool {
        let mut evs = [EpollEvent::default(); 32];
        let n = loop {
            match self.epoll.wait(0, &mut evs) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                r => break r.unwrap_or(0),
            }
        };
        for ev in &evs[..n] {
            self.on_event(ev.data(), ev.event_set(), room, out);
        }
        self.refresh(room);
        n > 0
    }

    fn on_event(&mut self, token: u64, evs: EventSet, room: bool, out: &mut Vec<Packet>) {
        match self.entries.get(&token) {
            Some(Entry::Listener) => self.accept_all(),
            Some(Entry::Pending { .. }) => self.read_line(token, out),
            Some(Entry::Conn(key)) => {
                let key = *key;
                self.conn_event(key, evs, room, out)
            }
            None => {}
        }
    }

    fn accept_all(&mut self) {
        let Some(l) = &self._listener else { return };
        loop {
            let s = match l.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    info!("cid {}: accept: {e}", self.cid);
                    return;
                }
            };
            if !self.live {
                info!(
                    "cid {}: host connection closed: guest driver not ready",
                    self.cid
                );
                continue;
            }
            let token = self.next_token + 1;
            let ok = s.set_nonblocking(true).is_ok()
                && self
                    .epoll
                    .ctl(
                        ControlOperation::Add,
                        s.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, token),
                    )
                    .is_ok();
            if ok {
                self.next_token = token;
                let e = Entry::Pending {
                    stream: s,
                    line: Vec::new(),
                };
                self.entries.insert(token, e);
            }
        }
    }

    /// Read a `CONNECT <port>\n` line byte by byte (so no data is read past it).
    fn read_line(&mut self, token: u64, out: &mut Vec<Packet>) {
        let Some(Entry::Pending { stream, line }) = self.entries.get_mut(&token) else {
            return;
        };
        let mut b = [0u8; 1];
        let done = loop {
            match stream.read(&mut b) {
                Ok(1) if b[0] == b'\n' => break true,
                Ok(1) if line.len() < MAX_LINE => line.push(b[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => break false, // EOF, error, overlong line
            }
        };
        let Some(Entry::Pending { stream, line }) = self.entries.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let port = if done { parse_connect(&line) } else { None };
        let Some(port) = port else {
            info!(
                "cid {}: bad host command {:?}; closing",
                self.cid,
                String::from_utf8_lossy(&line)
            );
            return;
        };
        let Some(host_port) = self.alloc_port() else {
            info!("cid {}: no free host port; closing", self.cid);
            return;
        };
        let key = Key {
            host_port,
            guest_port: port,
        };
        let mut c = Conn::new(stream, token, State::Connecting, self.buf_alloc);
        out.push(Self::mk(
            self.cid,
            key,
            &mut c.credit,
            op::REQUEST,
            0,
            Vec::new(),
        ));
        info!(
            "cid {}: host CONNECT {port}: REQUEST from host port {host_port}",
            self.cid
        );
        self.entries.insert(token, Entry::Conn(key));
        self.conns.insert(key, c);
    }

    /// Next host port not used by a connection, counting up from 1024.
    fn alloc_port(&mut self) -> Option<u32> {
        for _ in 0..=self.conns.len() {
            let p = self.next_port;
            self.next_port = if p >= u32::MAX - 1 {
                FIRST_HOST_PORT
            } else {
                p + 1
            };
            if !self.conns.keys().any(|k| k.host_port == p) {
                return Some(p);
            }
        }
        None
    }

    fn conn_event(&mut self, key: Key, evs: EventSet, room: bool, out: &mut Vec<Packet>) {
        let cid = self.cid;
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let readable = evs.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR);
        if readable && c.wants_read(room) {
            let n = (c.credit.peer_free() as usize).min(MAX_RW);
            match c.stream.read(&mut self.scratch[..n]) {
                Ok(0) => {
                    c.host_eof = true;
                    out.push(Self::mk(
                        cid,
                        key,
                        &mut c.credit,
                        op::SHUTDOWN,
                        SHUTDOWN_SEND,
                        Vec::new(),
                    ));
                    debug!("cid {cid}: host port {} EOF: SHUTDOWN(SEND)", key.host_port);
                }
                Ok(n) => {
                    c.credit.on_send(n as u32);
                    let data = self.scratch[..n].to_vec();
                    out.push(Self::mk(cid, key, &mut c.credit, op::RW, 0, data));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return self.close(key, true, &format!("socket read: {e}"), out),
            }
        }
        self.service(key, out);
    }

    /// Bring each connection's epoll registration in line with what it can
    /// do now, so level-triggered events never fire for work we cannot take
    /// (no credit, no room, half-closed): no busy loop.
    pub fn refresh(&mut self, room: bool) {
        for c in self.conns.values_mut() {
            let mut want = EventSet::empty();
            if c.wants_read(room) {
                want |= EventSet::IN;
            }
            if !c.out.is_empty() {
                want |= EventSet::OUT;
            }
            if want == c.interest {
                continue;
            }
            let fd = c.stream.as_raw_fd();
            let r = if want.is_empty() {
                self.epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            } else if c.interest.is_empty() {
                let ev = EpollEvent::new(want, c.token);
                self.epoll.ctl(ControlOperation::Add, fd, ev)
            } else {
                let ev = EpollEvent::new(want, c.token);
                self.epoll.ctl(ControlOperation::Modify, fd, ev)
            };
            match r {
                Ok(()) => c.interest = want,
                Err(e) => info!("cid {}: epoll update: {e}", self.cid),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::TYPE_SEQPACKET;
    use std::time::Duration;

    #[test]
    fn credit_wrapping_and_bounds() {
        let mut c = Credit::new(1000);
        assert_eq!(c.peer_free(), 0);
        // Counters about to wrap.
        c.tx_cnt = u32::MAX - 10;
        c.update_peer(100, u32::MAX - 50);
        assert_eq!(c.peer_free(), 60);
        c.on_send(60);
        assert_eq!(c.tx_cnt, 49); // wrapped
        assert_eq!(c.peer_free(), 0);
        c.update_peer(100, 20); // peer consumed across the wrap
        assert_eq!(c.peer_free(), 71);
        // Peer shrinks its buffer below what is in flight: zero, not huge.
        c.update_peer(10, 20);
        assert_eq!(c.peer_free(), 0);
        // Bogus fwd_cnt ahead of tx_cnt: in flight looks huge: zero credit.
        c.update_peer(100, 1000);
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn credit_receive_side_and_update_threshold() {
        let mut c = Credit::new(1000);
        c.rx_cnt = u32::MAX - 100;
        c.fwd_cnt = u32::MAX - 100;
        c.last_fwd_cnt = c.fwd_cnt;
        assert!(c.on_receive(600));
        assert!(c.on_receive(400));
        assert!(!c.on_receive(1), "never beyond buf_alloc");
        assert_eq!(c.buffered(), 1000);
        c.on_consume(249);
        assert!(!c.needs_update());
        c.on_consume(1);
        assert!(c.needs_update()); // a quarter consumed, across the wrap
        let mut h = Hdr::default();
        c.stamp(&mut h);
        assert_eq!((h.buf_alloc, h.fwd_cnt), (1000, 149));
        assert!(!c.needs_update());
        assert!(c.on_receive(250));
        assert!(!c.on_receive(1));
    }

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"connect 5 \r"), Some(5));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT x"), None);
        assert_eq!(parse_connect(b"CONNECT 1 2"), None);
        assert_eq!(parse_connect(b"LISTEN 1"), None);
        assert_eq!(
            port_path(Path::new("/a/b.vsock"), 99),
            PathBuf::from("/a/b.vsock_99")
        );
    }

    // ---- state machine against real Unix sockets and a fake guest ----

    struct Env {
        dir: PathBuf,
        b: Bridge,
    }

    impl Env {
        fn new(name: &str, buf_alloc: u32) -> Env {
            let dir = std::env::temp_dir().join(format!("vsockdev-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let mut b = Bridge::new(3, Some(dir.join("g.vsock")), buf_alloc).unwrap();
            b.set_live(true);
            Env { dir, b }
        }
        fn guest(&mut self, h: Hdr, data: &[u8]) -> Vec<Packet> {
            let mut out = Vec::new();
            self.b
                .on_guest_packet(Packet::with_payload(h, data.to_vec()), &mut out);
            out
        }
        /// Poll until at least `n` packets came out (or give up).
        fn poll(&mut self, n: usize) -> Vec<Packet> {
            let mut out = Vec::new();
            for _ in 0..200 {
                self.b.poll(true, &mut out);
                if out.len() >= n {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            out
        }
    }

    impl Drop for Env {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn g(op: u16, gport: u32, hport: u32) -> Hdr {
        Hdr {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: gport,
            dst_port: hport,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 8192,
            ..Hdr::default()
        }
    }

    fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut v = vec![0; n];
        s.read_exact(&mut v).unwrap();
        v
    }

    #[test]
    fn guest_connects_to_host_and_exchanges_data_within_credit() {
        let mut e = Env::new("g2h", 4096);
        // Nobody listening: RST.
        let out = e.guest(g(op::REQUEST, 5000, 1234), &[]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].hdr.op, op::RST);
        assert_eq!((out[0].hdr.dst_cid, out[0].hdr.dst_port), (3, 5000));

        let l = UnixListener::bind(port_path(&e.dir.join("g.vsock"), 1234)).unwrap();
        let out = e.guest(g(op::REQUEST, 5000, 1234), &[]);
        assert_eq!(out[0].hdr.op, op::RESPONSE);
        assert_eq!(out[0].hdr.buf_alloc, 4096);
        assert_eq!((out[0].hdr.src_cid, out[0].hdr.src_port), (HOST_CID, 1234));
        let (mut host, _) = l.accept().unwrap();

        // Guest -> host.
        assert!(e.guest(g(op::RW, 5000, 1234), b"hello").is_empty());
        assert_eq!(read_n(&mut host, 5), b"hello");
        // Beyond our credit: dropped.
        let mut h = g(op::RW, 5000, 1234);
        h.len = 5000;
        assert!(e.guest(h, &[1; 5000]).is_empty());
        // Consuming a quarter of the buffer triggers CREDIT_UPDATE.
        let out = e.guest(g(op::RW, 5000, 1234), &[7; 1100]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].hdr.op, op::CREDIT_UPDATE);
        assert_eq!(out[0].hdr.fwd_cnt, 1105);
        read_n(&mut host, 1100);
        // CREDIT_REQUEST is answered.
        let out = e.guest(g(op::CREDIT_REQUEST, 5000, 1234), &[]);
        assert_eq!(out[0].hdr.op, op::CREDIT_UPDATE);

        // Host -> guest: 20000 bytes but the guest only gives 8192 credit.
        host.write_all(&vec![9u8; 20000]).unwrap();
        let out = e.poll(1);
        let sent: usize = out.iter().map(|p| p.payload.len()).sum();
        assert_eq!(sent, 8192);
        assert!(out
            .iter()
            .all(|p| p.hdr.op == op::RW && p.hdr.len as usize == p.payload.len()));
        assert!(e.poll(1).is_empty(), "no credit, nothing more");
        // The guest consumed 5000 bytes.
        let mut h = g(op::CREDIT_UPDATE, 5000, 1234);
        h.fwd_cnt = 5000;
        assert!(e.guest(h, &[]).is_empty());
        let out = e.poll(1);
        let sent: usize = out.iter().map(|p| p.payload.len()).sum();
        assert_eq!(sent, 5000);

        // Guest shuts down both directions: RST, socket closed.
        let mut h = g(op::SHUTDOWN, 5000, 1234);
        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        let out = e.guest(h, &[]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].hdr.op, op::RST);
        assert_eq!(e.b.conn_count(), 0);
        // Closed (unread host data makes it a reset rather than an EOF).
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match host.read_to_end(&mut Vec::new()) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
        }
    }

    #[test]
    fn host_connects_to_guest() {
        let mut e = Env::new("h2g", 65536);
        let mut c = UnixStream::connect(e.dir.join("g.vsock")).unwrap();
        c.write_all(b"CONNECT 5000\n").unwrap();
        let out = e.poll(1);
        assert_eq!(out.len(), 1);
        let req = out[0].hdr;
        assert_eq!(req.op, op::REQUEST);
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port),
            (HOST_CID, 3, 5000)
        );
        assert_eq!(req.src_port, FIRST_HOST_PORT);
        assert_eq!(req.buf_alloc, 65536);

        // Guest accepts.
        let resp = Hdr {
            buf_alloc: 1 << 20,
            ..req.reply(op::RESPONSE)
        };
        assert!(e.guest(resp, &[]).is_empty());
        assert_eq!(read_n(&mut c, 8), b"OK 1024\n");

        // Data both ways.
        c.write_all(b"ping").unwrap();
        let out = e.poll(1);
        assert_eq!(out[0].payload, b"ping");
        assert_eq!(out[0].hdr.src_port, 1024);
        let rw = Hdr { op: op::RW, ..resp };
        e.guest(rw, b"pong");
        assert_eq!(read_n(&mut c, 4), b"pong");

        // Host half-closes: SHUTDOWN(SEND); guest can still send.
        c.shutdown(Shutdown::Write).unwrap();
        let out = e.poll(1);
        assert_eq!(out[0].hdr.op, op::SHUTDOWN);
        assert_eq!(out[0].hdr.flags, SHUTDOWN_SEND);
        e.guest(rw, b"late");
        assert_eq!(read_n(&mut c, 4), b"late");
        // Guest finishes too: RST, socket closed.
        let sh = Hdr {
            op: op::SHUTDOWN,
            flags: SHUTDOWN_SEND,
            ..resp
        };
        let out = e.guest(sh, &[]);
        assert_eq!(out[0].hdr.op, op::RST);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());

        // A second host connection gets the next port; guest refuses it.
        let mut c2 = UnixStream::connect(e.dir.join("g.vsock")).unwrap();
        c2.write_all(b"connect 6000\n").unwrap();
        let out = e.poll(1);
        assert_eq!(out[0].hdr.src_port, 1025);
        e.guest(out[0].hdr.reply(op::RST), &[]);
        let mut rest = Vec::new();
        c2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c2.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(e.b.conn_count(), 0);

        // Garbage command: closed, nothing sent to the guest.
        let mut c3 = UnixStream::connect(e.dir.join("g.vsock")).unwrap();
        c3.write_all(b"HELLO\n").unwrap();
        assert!(e.poll(1).is_empty());
    }

    #[test]
    fn refusals() {
        let mut e = Env::new("refuse", 4096);
        // SEQPACKET to the host: RST.
        let mut h = g(op::REQUEST, 1, 2);
        h.type_ = TYPE_SEQPACKET;
        assert_eq!(e.guest(h, &[])[0].hdr.op, op::RST);
        // Data for an unknown connection: RST; RST for one: nothing.
        assert_eq!(e.guest(g(op::RW, 1, 2), b"x")[0].hdr.op, op::RST);
        assert!(e.guest(g(op::RST, 1, 2), &[]).is_empty());
        // Guest gone: host connections are closed on accept.
        e.b.set_live(false);
        let mut c = UnixStream::connect(e.dir.join("g.vsock")).unwrap();
        assert!(e.poll(1).is_empty());
        let mut rest = Vec::new();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.read_to_end(&mut rest).unwrap();
    }

    #[test]
    fn host_eof_with_no_room_does_not_spin() {
        let mut e = Env::new("noroom", 4096);
        let l = UnixListener::bind(port_path(&e.dir.join("g.vsock"), 7)).unwrap();
        e.guest(g(op::REQUEST, 9, 7), &[]);
        let (host, _) = l.accept().unwrap();
        drop(host); // HUP
        let mut out = Vec::new();
        e.b.poll(false, &mut out); // no room: deregisters
        assert!(
            !e.b.poll(false, &mut out),
            "no event while there is no room"
        );
        assert!(out.is_empty());
        let out = e.poll(1); // room again: EOF seen
        assert_eq!(out[0].hdr.op, op::SHUTDOWN);
    }
}
