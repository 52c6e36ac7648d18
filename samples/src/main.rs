// SPDX-License-Identifier: GPL-2.0

//! `vsock-echo`: an AF_VSOCK echo server and client, and a local CID query.
//!
//! ```text
//! vsock-echo server [--type stream|seqpacket] [--cid CID] [--port PORT]
//!                   [--count CONNECTIONS] [--size MAX_MESSAGE]
//! vsock-echo client [--type stream|seqpacket] [--cid CID] [--port PORT]
//!                   [--to-host] [--count N] [--size BYTES] [--timeout SECS]
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
//! The exit status is 0 on success, 1 on a failed echo or I/O error, and 2 on
//! a usage error.

mod vsock;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use vsock::{SockType, SockaddrVm, Socket, VMADDR_CID_ANY, VMADDR_FLAG_TO_HOST};

const USAGE: &str = "\
usage: vsock-echo server [--type stream|seqpacket] [--cid CID] [--port PORT]
                         [--count CONNECTIONS] [--size MAX_MESSAGE]
       vsock-echo client [--type stream|seqpacket] [--cid CID] [--port PORT]
                         [--to-host] [--count N] [--size BYTES] [--timeout SECS]
       vsock-echo cid

server: listens on CID (default any) and PORT (default 1234) and echoes every
        connection; exits after CONNECTIONS connections (default 0: never).
        Seqpacket messages longer than MAX_MESSAGE (default 65536) are an error.
client: connects to CID (default 2, the host) and PORT (default 1234), sends N
        (default 10) messages of BYTES (default 4096) bytes, checks the echo and
        prints 'echo ok: TYPE cid=CID port=PORT N messages TOTAL bytes'.
        --to-host sets VMADDR_FLAG_TO_HOST; --timeout (default 10, 0 for none)
        bounds connect, send and receive.
cid:    prints the local CID (IOCTL_VM_SOCKETS_GET_LOCAL_CID on /dev/vsock).
";

/// Command-line options shared by all subcommands.
#[derive(Debug)]
struct Opts {
    ty: SockType,
    cid: Option<u32>,
    port: u32,
    to_host: bool,
    count: Option<u64>,
    size: Option<usize>,
    timeout: u64,
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
        count: None,
        size: None,
        timeout: 10,
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
            _ => return Err(format!("unknown option '{arg}'")),
        }
    }
    Ok(opts)
}

/// The byte at offset `off` of message `msg`: distinct per message and offset.
fn pattern(msg: u64, off: usize) -> u8 {
    (msg.wrapping_mul(131).wrapping_add(off as u64 * 7) % 251) as u8
}

/// Sends `count` messages of `size` bytes and checks each echo; returns the
/// number of bytes echoed.
fn exchange(sock: &Socket, count: u64, size: usize) -> Result<u64, String> {
    let mut out = vec![0u8; size];
    let mut back = vec![0u8; size];
    let mut total = 0u64;
    for i in 0..count {
        for (off, b) in out.iter_mut().enumerate() {
            *b = pattern(i, off);
        }
        sock.send_all(&out)
            .map_err(|e| format!("send message {i}: {e}"))?;
        sock.recv_exact(&mut back)
            .map_err(|e| format!("receive message {i}: {e}"))?;
        if let Some(off) = out.iter().zip(&back).position(|(a, b)| a != b) {
            return Err(format!("message {i} differs at byte {off}"));
        }
        total += size as u64;
    }
    Ok(total)
}

fn run_client(opts: &Opts) -> Result<(), String> {
    let cid = opts.cid.unwrap_or(libc::VMADDR_CID_HOST);
    let count = opts.count.unwrap_or(10);
    let size = opts.size.unwrap_or(4096);
    if size == 0 {
        // A zero-length send transmits nothing (the common vsock code does not
        // send empty OP_RW packets), so nothing could be echoed.
        return Err("--size must be at least 1".into());
    }
    let flags = if opts.to_host { VMADDR_FLAG_TO_HOST } else { 0 };
    let what = format!("{} cid={cid} port={}", opts.ty.name(), opts.port);

    let sock = Socket::new(opts.ty).map_err(|e| format!("socket: {e}"))?;
    let timeout = (opts.timeout > 0).then(|| Duration::from_secs(opts.timeout));
    sock.set_timeout(timeout)
        .map_err(|e| format!("setsockopt: {e}"))?;
    sock.connect(&SockaddrVm::new(cid, opts.port, flags))
        .map_err(|e| format!("connect {what}: {e}"))?;

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
            let who = format!("{ty} peer cid={} port={}", peer.svm_cid, peer.svm_port);
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

    #[test]
    fn pattern_differs_between_messages() {
        assert_ne!(
            (0..64).map(|o| pattern(0, o)).collect::<Vec<_>>(),
            (0..64).map(|o| pattern(1, o)).collect::<Vec<_>>()
        );
    }
}
