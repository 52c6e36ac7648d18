// SPDX-License-Identifier: GPL-2.0

//! `vsock-echo`: an AF_VSOCK echo server and client, and a local CID query.
//!
//! ```text
//! vsock-echo server [--type stream|seqpacket] [--cid CID] [--port PORT]
//!                   [--count CONNECTIONS] [--size MAX_MESSAGE]
//! vsock-echo client [--type stream|seqpacket] [--cid CID] [--port PORT]
//!                   [--to-host] [--zerocopy] [--count N] [--size BYTES] [--timeout SECS]
//!                   [--latency [--warmup N]]
//! vsock-echo cid
//! ```
//!
//! The client sends `--count` messages of `--size` bytes, reads each one back
//! from the server, checks it, and prints one summary line:
//!
//! ```text
//! echo ok: stream cid=2 port=1234 10 messages 40960 bytes
//! ```
//!
//! With `--latency` it times each round trip instead (after `--warmup` untimed
//! ones) and prints their distribution in microseconds:
//!
//! ```text
//! latency: stream cid=4 port=1234 n=1000 size=64 warmup=100 min_us=41.2 ...
//! ```
//!
//! The exit status is 0 on success, 1 on a failed echo or I/O error, and 2 on
//! a usage error.

mod vsock;

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vsock::{SockType, SockaddrVm, Socket, VMADDR_CID_ANY, VMADDR_FLAG_TO_HOST};

const USAGE: &str = "\
usage: vsock-echo server [--type stream|seqpacket] [--cid CID] [--port PORT]
                         [--count CONNECTIONS] [--size MAX_MESSAGE]
       vsock-echo client [--type stream|seqpacket] [--cid CID] [--port PORT]
                         [--to-host] [--zerocopy] [--count N] [--size BYTES] [--timeout SECS]
                         [--latency [--warmup N]]
       vsock-echo cid

server: listens on CID (default any) and PORT (default 1234) and echoes every
        connection; exits after CONNECTIONS connections (default 0: never).
        Seqpacket messages longer than MAX_MESSAGE (default 65536) are an error.
        Each connection ends with 'echo server: TYPE peer cid=C port=P
        flags=F BYTES bytes', F the peer address's svm_flags from accept().
client: connects to CID (default 2, the host) and PORT (default 1234), sends N
        (default 10) messages of BYTES (default 4096) bytes, checks the echo and
        prints 'echo ok: TYPE cid=CID port=PORT N messages TOTAL bytes'.
        --to-host sets VMADDR_FLAG_TO_HOST; --zerocopy sends with MSG_ZEROCOPY
        (SO_ZEROCOPY on); --timeout (default 10, 0 for none) bounds connect,
        send and receive.
        --latency times N (default 1000) round trips of BYTES (default 64)
        bytes, after --warmup (default 100) untimed ones, and prints
        'latency: TYPE cid=CID port=PORT n=N size=BYTES warmup=W min_us=..
        p50_us=.. p90_us=.. p99_us=.. max_us=.. mean_us=..'.
cid:    prints the local CID (IOCTL_VM_SOCKETS_GET_LOCAL_CID on /dev/vsock).
";

/// Command-line options shared by all subcommands.
#[derive(Debug)]
struct Opts {
    ty: SockType,
    cid: Option<u32>,
    port: u32,
    to_host: bool,
    zerocopy: bool,
    count: Option<u64>,
    size: Option<usize>,
    timeout: u64,
    latency: bool,
    warmup: Option<u64>,
}

/// Parses a number, in decimal or with a `0x` prefix.
fn parse_num<T: TryFrom<u64>>(opt: &str, val: Option<String>) -> Result<T, String> {
    let val = val.ok_or_else(|| format!("{opt} needs a value"))?;
    let n = match val.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => val.parse::<u64>(),
    }
    .map_err(|_| format!("{opt}: bad number '{val}'"))?;
    T::try_from(n).map_err(|_| format!("{opt}: {n} is out of range"))
}

fn parse_opts(args: impl Iterator<Item = String>) -> Result<Opts, String> {
    let mut opts = Opts {
        ty: SockType::Stream,
        cid: None,
        port: 1234,
        to_host: false,
        zerocopy: false,
        count: None,
        size: None,
        timeout: 10,
        latency: false,
        warmup: None,
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        // Accept both `--opt value` and `--opt=value`.
        let (opt, mut val) = match arg.split_once('=') {
            Some((o, v)) => (o.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || val.take().or_else(|| args.next());
        match opt.as_str() {
            "--type" | "-t" => {
                opts.ty = match value().as_deref() {
                    Some("stream") => SockType::Stream,
                    Some("seqpacket") => SockType::SeqPacket,
                    other => return Err(format!("--type: bad type {other:?}")),
                }
            }
            "--cid" | "-c" => opts.cid = Some(parse_num("--cid", value())?),
            "--port" | "-p" => opts.port = parse_num("--port", value())?,
            "--count" | "-n" => opts.count = Some(parse_num("--count", value())?),
            "--size" | "-s" => opts.size = Some(parse_num("--size", value())?),
            "--timeout" => opts.timeout = parse_num("--timeout", value())?,
            "--to-host" => opts.to_host = true,
            "--zerocopy" => opts.zerocopy = true,
            "--latency" => opts.latency = true,
            "--warmup" => opts.warmup = Some(parse_num("--warmup", value())?),
            _ => return Err(format!("unknown option '{arg}'")),
        }
    }
    Ok(opts)
}

/// The byte at offset `off` of message `msg`: distinct per message and offset.
fn pattern(msg: u64, off: usize) -> u8 {
    (msg.wrapping_mul(131).wrapping_add(off as u64 * 7) % 251) as u8
}

/// Fills `buf` with the pattern of message `msg`.
fn fill(buf: &mut [u8], msg: u64) {
    for (off, b) in buf.iter_mut().enumerate() {
        *b = pattern(msg, off);
    }
}

/// Sends message `i` from `out` and reads its echo into `back`, unchecked.
fn round_trip(sock: &Socket, i: u64, out: &[u8], back: &mut [u8]) -> Result<(), String> {
    sock.send_all(out)
        .map_err(|e| io_failed(sock, format!("send message {i}"), e))?;
    sock.recv_exact(back)
        .map_err(|e| io_failed(sock, format!("receive message {i}"), e))
}

/// The message for a failed send or receive: what failed, the error, and
/// the socket's pending error if it has another one (after a transport
/// reset a call may fail with `ENOTCONN` while `SO_ERROR` holds the
/// `ECONNRESET`).
fn io_failed(sock: &Socket, what: String, e: io::Error) -> String {
    match sock.take_error() {
        Ok(Some(pending)) if pending.raw_os_error() != e.raw_os_error() => {
            format!("{what}: {e}; pending socket error: {pending}")
        }
        _ => format!("{what}: {e}"),
    }
}

/// Checks that the echo `back` of message `i` equals what was sent, `out`.
fn check_echo(i: u64, out: &[u8], back: &[u8]) -> Result<(), String> {
    match out.iter().zip(back).position(|(a, b)| a != b) {
        Some(off) => Err(format!("message {i} differs at byte {off}")),
        None => Ok(()),
    }
}

/// Sends `count` messages of `size` bytes and checks each echo; returns the
/// number of bytes echoed.
fn exchange(sock: &Socket, count: u64, size: usize) -> Result<u64, String> {
    let mut out = vec![0u8; size];
    let mut back = vec![0u8; size];
    let mut total = 0u64;
    for i in 0..count {
        fill(&mut out, i);
        round_trip(sock, i, &out, &mut back)?;
        check_echo(i, &out, &back)?;
        total += size as u64;
    }
    Ok(total)
}

/// Times `count` round trips of `size` bytes after `warmup` untimed ones,
/// checking every echo; returns the round-trip times of the timed ones.
///
/// Only the send and the receive of the echo are timed, not the filling and
/// checking of the buffers.
fn latency(sock: &Socket, warmup: u64, count: u64, size: usize) -> Result<Vec<Duration>, String> {
    let mut out = vec![0u8; size];
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for i in 0..warmup.saturating_add(count) {
        fill(&mut out, i);
        let start = Instant::now();
        round_trip(sock, i, &out, &mut back)?;
        let rtt = start.elapsed();
        check_echo(i, &out, &back)?;
        if i >= warmup {
            rtts.push(rtt);
        }
    }
    Ok(rtts)
}

/// Distribution of a set of round-trip times.
#[derive(Debug, PartialEq, Eq)]
struct Stats {
    n: usize,
    min: Duration,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
    mean: Duration,
}

impl Stats {
    /// Computes the distribution of `samples`; `None` when there are none.
    ///
    /// Percentiles use the nearest-rank method: the `p`th percentile is the
    /// smallest sample that at least `p` percent of the samples do not exceed.
    fn new(samples: &[Duration]) -> Option<Stats> {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let n = sorted.len();
        let min = *sorted.first()?;
        let max = *sorted.last()?;
        let rank = |p: usize| {
            let idx = (p * n).div_ceil(100).max(1) - 1;
            sorted.get(idx).copied().unwrap_or(max)
        };
        let total: u128 = sorted.iter().map(Duration::as_nanos).sum();
        let mean = u64::try_from(total / n as u128).map_or(Duration::MAX, Duration::from_nanos);
        Some(Stats {
            n,
            min,
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max,
            mean,
        })
    }

    /// Formats the times as `key=value` pairs, in microseconds.
    fn times(&self) -> String {
        let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
        format!(
            "min_us={} p50_us={} p90_us={} p99_us={} max_us={} mean_us={}",
            us(self.min),
            us(self.p50),
            us(self.p90),
            us(self.p99),
            us(self.max),
            us(self.mean)
        )
    }
}

fn run_client(opts: &Opts) -> Result<(), String> {
    let cid = opts.cid.unwrap_or(libc::VMADDR_CID_HOST);
    let (count, size) = if opts.latency {
        (opts.count.unwrap_or(1000), opts.size.unwrap_or(64))
    } else {
        (opts.count.unwrap_or(10), opts.size.unwrap_or(4096))
    };
    if size == 0 {
        // A zero-length send transmits nothing (the common vsock code does not
        // send empty OP_RW packets), so nothing could be echoed.
        return Err("--size must be at least 1".into());
    }
    let flags = if opts.to_host { VMADDR_FLAG_TO_HOST } else { 0 };
    let what = format!("{} cid={cid} port={}", opts.ty.name(), opts.port);

    let mut sock = Socket::new(opts.ty).map_err(|e| format!("socket: {e}"))?;
    let timeout = (opts.timeout > 0).then(|| Duration::from_secs(opts.timeout));
    sock.set_timeout(timeout)
        .map_err(|e| format!("setsockopt: {e}"))?;
    if opts.zerocopy {
        sock.set_zerocopy()
            .map_err(|e| format!("setsockopt SO_ZEROCOPY: {e}"))?;
    }
    sock.connect(&SockaddrVm::new(cid, opts.port, flags))
        .map_err(|e| format!("connect {what}: {e}"))?;

    if opts.latency {
        let warmup = opts.warmup.unwrap_or(100);
        let rtts = latency(&sock, warmup, count, size).map_err(|e| format!("{what}: {e}"))?;
        let stats = Stats::new(&rtts).ok_or("--count must be at least 1")?;
        println!(
            "latency: {what} n={} size={size} warmup={warmup} {}",
            stats.n,
            stats.times()
        );
        return Ok(());
    }
    let total = exchange(&sock, count, size).map_err(|e| format!("{what}: {e}"))?;
    println!("echo ok: {what} {count} messages {total} bytes");
    Ok(())
}

/// Echoes one connection until the peer closes it; returns messages and bytes.
///
/// For stream sockets "messages" counts the reads, which need not match the
/// peer's writes.
fn echo(conn: &Socket, max: usize) -> std::io::Result<(u64, u64)> {
    let mut buf = vec![0u8; max.max(1)];
    let (mut msgs, mut bytes) = (0u64, 0u64);
    loop {
        let (n, trunc) = conn.recv(&mut buf)?;
        if n == 0 {
            return Ok((msgs, bytes));
        }
        if trunc {
            return Err(std::io::Error::other(format!(
                "message longer than {max} bytes (use --size)"
            )));
        }
        conn.send_all(buf.get(..n).unwrap_or(&[]))?;
        msgs += 1;
        bytes += n as u64;
    }
}

fn run_server(opts: &Opts) -> Result<(), String> {
    let cid = opts.cid.unwrap_or(VMADDR_CID_ANY);
    let max = opts.size.unwrap_or(64 * 1024);
    let limit = opts.count.unwrap_or(0);
    let ty = opts.ty.name();

    let sock = Socket::new(opts.ty).map_err(|e| format!("socket: {e}"))?;
    sock.bind(&SockaddrVm::new(cid, opts.port, 0))
        .map_err(|e| format!("bind cid={cid} port={}: {e}", opts.port))?;
    sock.listen(16).map_err(|e| format!("listen: {e}"))?;
    let local = sock.local_addr().map_err(|e| format!("getsockname: {e}"))?;
    println!(
        "echo server: {ty} listening on cid={} port={}",
        local.svm_cid, local.svm_port
    );
    let _ = std::io::stdout().flush();

    let mut served = 0u64;
    let mut workers = Vec::new();
    while limit == 0 || served < limit {
        let (conn, peer) = sock.accept().map_err(|e| format!("accept: {e}"))?;
        served += 1;
        let worker = std::thread::spawn(move || {
            let who = format!(
                "{ty} peer cid={} port={} flags={:#x}",
                peer.svm_cid, peer.svm_port, peer.svm_flags
            );
            match echo(&conn, max) {
                Ok((m, b)) if ty == "seqpacket" => {
                    println!("echo server: {who} {m} messages {b} bytes")
                }
                Ok((_, b)) => println!("echo server: {who} {b} bytes"),
                Err(e) => eprintln!("echo server: {who}: {e}"),
            }
            let _ = std::io::stdout().flush();
        });
        workers.push(worker);
        workers.retain(|w| !w.is_finished());
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let cmd = args.next();
    let opts = match parse_opts(args) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("vsock-echo: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let res = match cmd.as_deref() {
        Some("server") => run_server(&opts),
        Some("client") => run_client(&opts),
        Some("cid") => vsock::local_cid()
            .map(|cid| println!("{cid}"))
            .map_err(|e| format!("/dev/vsock: {e}")),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> Result<Opts, String> {
        parse_opts(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_options() {
        let o = opts(&[
            "--type",
            "seqpacket",
            "--cid=4",
            "--port",
            "0x400",
            "--to-host",
            "-n",
            "3",
            "--size",
            "100",
        ])
        .unwrap();
        assert_eq!(o.ty, SockType::SeqPacket);
        assert_eq!(o.cid, Some(4));
        assert_eq!(o.port, 1024);
        assert!(o.to_host);
        assert_eq!(o.count, Some(3));
        assert_eq!(o.size, Some(100));
    }

    #[test]
    fn rejects_bad_options() {
        assert!(opts(&["--type", "dgram"]).is_err());
        assert!(opts(&["--cid", "4294967296"]).is_err());
        assert!(opts(&["--port"]).is_err());
        assert!(opts(&["--bogus"]).is_err());
    }

    #[test]
    fn sockaddr_layout() {
        let a = SockaddrVm::new(3, 1234, VMADDR_FLAG_TO_HOST);
        assert_eq!(std::mem::size_of::<SockaddrVm>(), 16);
        assert_eq!(std::mem::offset_of!(SockaddrVm, svm_port), 4);
        assert_eq!(std::mem::offset_of!(SockaddrVm, svm_cid), 8);
        assert_eq!(std::mem::offset_of!(SockaddrVm, svm_flags), 12);
        assert_eq!(a.svm_family, libc::AF_VSOCK as libc::sa_family_t);
        assert_eq!(a.svm_flags, 1);
    }

    /// Runs the client exchange against the echo loop over a socketpair.
    fn echo_over_pair(ty: SockType, count: u64, size: usize, max: usize) -> Result<u64, String> {
        let (client, server) = Socket::pair(ty).unwrap();
        let echoer = std::thread::spawn(move || echo(&server, max));
        let res = exchange(&client, count, size);
        drop(client);
        let echoed = echoer.join().unwrap();
        if let Ok(total) = res {
            let (msgs, bytes) = echoed.unwrap();
            assert_eq!(bytes, total);
            if ty == SockType::SeqPacket {
                assert_eq!(msgs, count);
            }
        }
        res
    }

    #[test]
    fn echo_stream() {
        assert_eq!(echo_over_pair(SockType::Stream, 10, 4096, 1000), Ok(40960));
        assert_eq!(
            echo_over_pair(SockType::Stream, 3, 100_000, 65536),
            Ok(300_000)
        );
        assert_eq!(echo_over_pair(SockType::Stream, 0, 1, 1), Ok(0));
    }

    #[test]
    fn echo_seqpacket() {
        assert_eq!(
            echo_over_pair(SockType::SeqPacket, 10, 1000, 65536),
            Ok(10_000)
        );
        assert_eq!(echo_over_pair(SockType::SeqPacket, 5, 1, 65536), Ok(5));
        // A message longer than the server's maximum ends the connection.
        assert!(echo_over_pair(SockType::SeqPacket, 1, 2000, 1000).is_err());
    }

    fn us(v: u64) -> Duration {
        Duration::from_micros(v)
    }

    #[test]
    fn latency_stats() {
        // 1..=100 us, in a scrambled order.
        let samples: Vec<Duration> = (0..100u64).map(|i| us((i * 37) % 100 + 1)).collect();
        let s = Stats::new(&samples).unwrap();
        assert_eq!(
            s,
            Stats {
                n: 100,
                min: us(1),
                p50: us(50),
                p90: us(90),
                p99: us(99),
                max: us(100),
                mean: Duration::from_nanos(50_500),
            }
        );
        assert_eq!(
            s.times(),
            "min_us=1.0 p50_us=50.0 p90_us=90.0 p99_us=99.0 max_us=100.0 mean_us=50.5"
        );
        // Nearest rank on a few samples: p50 of 4 is the 2nd, p90 the 4th.
        let s = Stats::new(&[us(40), us(10), us(30), us(20)]).unwrap();
        assert_eq!((s.p50, s.p90, s.p99), (us(20), us(40), us(40)));
        assert_eq!(s.mean, us(25));
        let s = Stats::new(&[us(7)]).unwrap();
        assert_eq!(
            (s.min, s.p50, s.p99, s.max, s.mean),
            (us(7), us(7), us(7), us(7), us(7))
        );
        assert_eq!(Stats::new(&[]), None);
    }

    #[test]
    fn latency_over_pair() {
        for ty in [SockType::Stream, SockType::SeqPacket] {
            let (client, server) = Socket::pair(ty).unwrap();
            let echoer = std::thread::spawn(move || echo(&server, 65536));
            let rtts = latency(&client, 5, 20, 64).unwrap();
            drop(client);
            assert_eq!(echoer.join().unwrap().unwrap().1, 25 * 64);
            assert_eq!(rtts.len(), 20);
            assert!(Stats::new(&rtts).unwrap().min > Duration::ZERO);
        }
    }

    #[test]
    fn parses_latency_options() {
        let o = opts(&["--latency", "--warmup", "5", "-n", "2000"]).unwrap();
        assert!(o.latency);
        assert_eq!(o.warmup, Some(5));
        assert_eq!(o.count, Some(2000));
        assert!(!opts(&[]).unwrap().latency);
    }

    #[test]
    fn pattern_differs_between_messages() {
        assert_ne!(
            (0..64).map(|o| pattern(0, o)).collect::<Vec<_>>(),
            (0..64).map(|o| pattern(1, o)).collect::<Vec<_>>()
        );
    }
}
