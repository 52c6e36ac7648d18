// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The control socket (`--control PATH`) and `--fault SPEC`: scripted faults.
//!
//! A Unix stream socket; any number of clients, one after the other or at
//! once, each in its own thread. A client writes one command per line and
//! reads one reply line per command: `OK key=value ...` or
//! `ERR <reason>`. Commands name a guest by the CID it was configured with
//! (`--vm guest-cid=N`); its current config-space CID is accepted too.
//!
//! ```text
//! inject CID CLASS COUNT SEED      crafted rx packets (CLASS or random)
//! used CID KIND COUNT              bad_id | dup_id | never_posted | tx_len
//! event CID KIND [ARG]             reset | reset_cid NEWCID | unknown ID | short | storm N
//! config CID guest_cid VALUE       config-space guest_cid (routing follows)
//! features CID seqpacket on|off    offered from the next connection on
//! hold CID on|off                  keep the guest's packets back
//! stream CID PORT KIND PROB SEED   drop | dup | reorder | delay, PROB percent
//! stream CID PORT off
//! counts CID                       what was injected
//! reset-counts CID
//! status CID                       live, features, guest_cid, rx_avail, jobs
//! ```
//!
//! `inject`, `used` and `event` run on the guest's thread (see
//! [`crate::backend`]); their reply comes once what they did is on a used
//! ring. The others answer at once.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::backend::{Status, VmBackend};
use crate::fault::{EventJob, EventKind, InjectJob, Job, Scripted, StreamKind, UsedJob, UsedKind};
use crate::inject::{craft, Class, ClassCounts, CraftError, Kind};
use crate::packet::Packet;
use crate::prng::SplitMix64;
use crate::router::Router;
use crate::{debug, info};

/// Most packets or entries one command may ask for.
const MAX_COUNT: u32 = 100_000_000;
/// How long a driver must have been up without an event queue before the
/// frontend is taken for one that keeps the event queue to itself.
const EVQ_GRACE: Duration = Duration::from_millis(500);

/// What to do to the stream connections on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamRule {
    /// The fault.
    pub kind: StreamKind,
    /// Probability per packet, in percent.
    pub prob: u32,
    /// Seed of its generator.
    pub seed: u64,
}

/// One parsed control command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `inject CID CLASS COUNT SEED`.
    Inject {
        cid: u64,
        kind: Kind,
        count: u32,
        seed: u64,
    },
    /// `used CID KIND COUNT`.
    Used {
        cid: u64,
        kind: UsedKind,
        count: u32,
    },
    /// `event CID KIND [ARG]`.
    Event { cid: u64, kind: EventKind },
    /// `config CID guest_cid VALUE`.
    Config { cid: u64, guest_cid: u64 },
    /// `features CID seqpacket on|off`.
    Features { cid: u64, seqpacket: bool },
    /// `hold CID on|off`.
    Hold { cid: u64, on: bool },
    /// `stream CID PORT KIND PROB SEED` or `stream CID PORT off` (`None`).
    Stream {
        cid: u64,
        port: u32,
        rule: Option<StreamRule>,
    },
    /// `counts CID`.
    Counts { cid: u64 },
    /// `reset-counts CID`.
    ResetCounts { cid: u64 },
    /// `status CID`.
    Status { cid: u64 },
    /// `help`.
    Help,
}

/// The command words and their arguments, for `help` and errors.
const SYNTAX: [(&str, &str); 10] = [
    ("inject", "inject CID CLASS COUNT SEED"),
    ("used", "used CID bad_id|dup_id|never_posted|tx_len COUNT"),
    (
        "event",
        "event CID reset|reset_cid NEWCID|unknown ID|short|storm N",
    ),
    ("config", "config CID guest_cid VALUE"),
    ("features", "features CID seqpacket on|off"),
    ("hold", "hold CID on|off"),
    (
        "stream",
        "stream CID PORT drop|dup|reorder|delay PROB SEED, or stream CID PORT off",
    ),
    ("counts", "counts CID"),
    ("reset-counts", "reset-counts CID"),
    ("status", "status CID"),
];

fn usage(cmd: &str) -> String {
    let s = SYNTAX
        .iter()
        .find(|(c, _)| *c == cmd)
        .map_or("", |(_, s)| s);
    format!("usage: {s}")
}

/// A number, decimal or `0x` hexadecimal.
fn number(what: &str, s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{what} {s:?} is not a number"))
}

fn number32(what: &str, s: &str) -> Result<u32, String> {
    let n = number(what, s)?;
    u32::try_from(n).map_err(|_| format!("{what} {s:?} does not fit in 32 bits"))
}

fn count(s: &str) -> Result<u32, String> {
    let n = number32("COUNT", s)?;
    if n > MAX_COUNT {
        return Err(format!("COUNT {n} is above {MAX_COUNT}"));
    }
    Ok(n)
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected on or off, not {s:?}")),
    }
}

/// Parse one command line (words separated by blanks).
pub fn parse_command(line: &str) -> Result<Command, String> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let Some((&verb, args)) = w.split_first() else {
        return Err("empty command".into());
    };
    if verb == "help" {
        return match args {
            [] => Ok(Command::Help),
            _ => Err("usage: help".into()),
        };
    }
    if !SYNTAX.iter().any(|(c, _)| *c == verb) {
        let verbs: Vec<&str> = SYNTAX.iter().map(|(c, _)| *c).collect();
        return Err(format!(
            "unknown command {verb:?} (one of {})",
            verbs.join(", ")
        ));
    }
    let bad = || usage(verb);
    let Some((&cid, rest)) = args.split_first() else {
        return Err(bad());
    };
    let cid = number("CID", cid)?;
    let c = match (verb, rest) {
        ("inject", &[class, n, seed]) => Command::Inject {
            cid,
            kind: Kind::from_name(class).ok_or_else(|| {
                let names: Vec<&str> = Class::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown class {class:?} (one of {}, random)",
                    names.join(", ")
                )
            })?,
            count: count(n)?,
            seed: number("SEED", seed)?,
        },
        ("used", &[kind, n]) => Command::Used {
            cid,
            kind: UsedKind::from_name(kind)
                .ok_or_else(|| format!("unknown used kind {kind:?}; {}", bad()))?,
            count: count(n)?,
        },
        ("event", rest) => Command::Event {
            cid,
            kind: match rest {
                ["reset"] => EventKind::Reset,
                ["reset_cid", v] => EventKind::ResetCid(number("NEWCID", v)?),
                ["unknown", id] => match number32("ID", id)? {
                    0 => return Err("event id 0 is TRANSPORT_RESET: use reset".into()),
                    id => EventKind::Unknown(id),
                },
                ["short"] => EventKind::Short,
                ["storm", n] => match count(n)? {
                    0 => return Err("storm N: N must be at least 1".into()),
                    n => EventKind::Storm(n),
                },
                _ => return Err(bad()),
            },
        },
        ("config", &["guest_cid", v]) => Command::Config {
            cid,
            guest_cid: number("VALUE", v)?,
        },
        ("features", &["seqpacket", v]) => Command::Features {
            cid,
            seqpacket: on_off(v)?,
        },
        ("hold", &[v]) => Command::Hold {
            cid,
            on: on_off(v)?,
        },
        ("stream", &[port, "off"]) => Command::Stream {
            cid,
            port: number32("PORT", port)?,
            rule: None,
        },
        ("stream", &[port, kind, prob, seed]) => {
            let prob = number32("PROB", prob)?;
            if prob > 100 {
                return Err(format!("PROB {prob} is above 100 (percent)"));
            }
            Command::Stream {
                cid,
                port: number32("PORT", port)?,
                rule: Some(StreamRule {
                    kind: StreamKind::from_name(kind)
                        .ok_or_else(|| format!("unknown stream fault {kind:?}; {}", bad()))?,
                    prob,
                    seed: number("SEED", seed)?,
                }),
            }
        }
        ("counts", &[]) => Command::Counts { cid },
        ("reset-counts", &[]) => Command::ResetCounts { cid },
        ("status", &[]) => Command::Status { cid },
        _ => return Err(bad()),
    };
    Ok(c)
}

/// A reply now, or one the guest's thread will send.
pub enum Answer {
    /// The reply line.
    Now(String),
    /// The reply comes on this channel. With `pending_if_down`, a guest
    /// whose driver is down answers `pending=1` with this line instead.
    Later {
        rx: Receiver<String>,
        pending_if_down: Option<(Arc<VmBackend>, String)>,
    },
}

impl Answer {
    /// Wait for the reply line.
    pub fn wait(self) -> String {
        let (rx, fallback) = match self {
            Answer::Now(s) => return s,
            Answer::Later {
                rx,
                pending_if_down,
            } => (rx, pending_if_down),
        };
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(s) => return s,
                Err(RecvTimeoutError::Disconnected) => {
                    return "ERR the guest's thread dropped the request".into()
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Some((b, line)) = &fallback {
                        if !b.status().live {
                            return line.clone();
                        }
                    }
                }
            }
        }
    }
}

/// The device as the control socket drives it.
pub struct Device {
    guests: Vec<Arc<VmBackend>>,
    router: Arc<Router>,
    hook: Arc<Scripted>,
}

impl Device {
    /// A device over these guests; `hook` must be the router's hook. Starts
    /// a thread that releases delayed packets when due.
    pub fn new(
        guests: Vec<Arc<VmBackend>>,
        router: Arc<Router>,
        hook: Arc<Scripted>,
    ) -> io::Result<Arc<Self>> {
        let d = Arc::new(Device {
            guests,
            router,
            hook,
        });
        let weak = Arc::downgrade(&d);
        std::thread::Builder::new()
            .name("vsock-delay".into())
            .spawn(move || release_delayed(weak))?;
        Ok(d)
    }

    fn guest(&self, cid: u64) -> Result<&Arc<VmBackend>, String> {
        self.guests
            .iter()
            .find(|g| g.cid() == cid)
            .or_else(|| self.guests.iter().find(|g| g.port().guest_cid() == cid))
            .ok_or_else(|| {
                let cids: Vec<String> = self.guests.iter().map(|g| g.cid().to_string()).collect();
                format!("no guest with CID {cid} (guests: {})", cids.join(", "))
            })
    }

    /// Queue packets a fault held back for guest `cid`.
    fn release(&self, cid: u64, pkts: Vec<Packet>) {
        if let Some(p) = self.router.port(cid) {
            for pkt in pkts {
                self.router.release(p, pkt);
            }
        }
    }

    /// Run one command line; blocks until its reply is known.
    pub fn command(&self, line: &str) -> String {
        let reply = match parse_command(line) {
            Ok(c) => self.execute(c).wait(),
            Err(e) => format!("ERR {e}"),
        };
        info!("control: {} -> {reply}", line.trim());
        reply
    }

    /// Start one command; the reply may come later.
    pub fn execute(&self, cmd: Command) -> Answer {
        match self.try_execute(cmd) {
            Ok(a) => a,
            Err(e) => Answer::Now(format!("ERR {e}")),
        }
    }

    fn try_execute(&self, cmd: Command) -> Result<Answer, String> {
        let now = |s: String| Ok(Answer::Now(s));
        match cmd {
            Command::Help => {
                let verbs: Vec<&str> = SYNTAX.iter().map(|(c, _)| *c).collect();
                now(format!("OK commands={}", verbs.join(",")))
            }
            Command::Inject {
                cid,
                kind,
                count,
                seed,
            } => {
                let g = self.guest(cid)?;
                let mut job = InjectJob {
                    kind,
                    total: count,
                    done: 0,
                    rng: SplitMix64::new(seed),
                    landed: ClassCounts::default(),
                    reply: None,
                };
                if count == 0 {
                    return now(job.ok_line());
                }
                check_craftable(kind, g)?;
                let (tx, rx) = mpsc::channel();
                job.reply = Some(tx);
                g.submit(Job::Inject(job));
                Ok(Answer::Later {
                    rx,
                    pending_if_down: None,
                })
            }
            Command::Used { cid, kind, count } => {
                let g = self.guest(cid)?;
                if count == 0 {
                    return now(format!("OK used={} count=0", kind.name()));
                }
                let (tx, rx) = mpsc::channel();
                g.submit(Job::Used(UsedJob {
                    kind,
                    total: count,
                    done: 0,
                    reply: Some(tx),
                }));
                Ok(Answer::Later {
                    rx,
                    pending_if_down: None,
                })
            }
            Command::Event { cid, kind } => {
                let g = self.guest(cid)?;
                let st = settled_status(g);
                if st.live && !st.evq_ready {
                    return Err(
                        "event queue not owned by the device (vhost-user-vsock-pci front)".into(),
                    );
                }
                if let EventKind::ResetCid(new) = kind {
                    g.set_guest_cid(new);
                }
                let pending = format!("OK event={} pending=1", kind.name());
                let mut job = EventJob {
                    kind,
                    done: 0,
                    reply: None,
                };
                if !st.live {
                    g.submit(Job::Event(job));
                    return now(pending);
                }
                let (tx, rx) = mpsc::channel();
                job.reply = Some(tx);
                g.submit(Job::Event(job));
                Ok(Answer::Later {
                    rx,
                    pending_if_down: Some((g.clone(), pending)),
                })
            }
            Command::Config { cid, guest_cid } => {
                let g = self.guest(cid)?;
                let st = settled_status(g);
                if st.live && !st.evq_ready {
                    return Err("config space is read once, at start, by the \
                                vhost-user-vsock-pci front"
                        .into());
                }
                g.set_guest_cid(guest_cid);
                now(format!("OK guest_cid={guest_cid}"))
            }
            Command::Features { cid, seqpacket } => {
                self.guest(cid)?.offer_seqpacket(seqpacket);
                let v = if seqpacket { "on" } else { "off" };
                now(format!("OK seqpacket={v}"))
            }
            Command::Hold { cid, on } => {
                let g = self.guest(cid)?;
                let queued = g.port().inbox().set_hold(on);
                if on {
                    now("OK hold=on".into())
                } else {
                    g.port().wake();
                    now(format!("OK hold=off released={queued}"))
                }
            }
            Command::Stream { cid, port, rule } => {
                let g = self.guest(cid)?.cid();
                match rule {
                    Some(r) => {
                        let back = self.hook.set_rule(g, port, r.kind, r.prob, r.seed);
                        self.release(g, back);
                        now(format!(
                            "OK stream={} port={port} prob={}",
                            r.kind.name(),
                            r.prob
                        ))
                    }
                    None => {
                        let (done, back) = self.hook.clear_rule(g, port).ok_or_else(|| {
                            format!("no stream fault on port {port} of guest {g}")
                        })?;
                        self.release(g, back);
                        now(format!("OK stream=off port={port} {done}"))
                    }
                }
            }
            Command::Counts { cid } => {
                let g = self.guest(cid)?;
                let line = g.counts().to_kv(&self.hook.counts(g.cid()));
                now(format!("OK {line}"))
            }
            Command::ResetCounts { cid } => {
                let g = self.guest(cid)?;
                g.reset_counts();
                self.hook.reset_counts(g.cid());
                now("OK".into())
            }
            Command::Status { cid } => {
                let st = self.guest(cid)?.status();
                now(format!(
                    "OK live={} seqpacket={} event_idx={} guest_cid={} rx_avail={} jobs={}",
                    u8::from(st.live),
                    u8::from(st.seqpacket),
                    u8::from(st.event_idx),
                    st.guest_cid,
                    st.rx_avail,
                    st.jobs
                ))
            }
        }
    }
}

/// The guest's status, waiting out the moment after its driver came up in
/// which the frontend may still be setting up the event queue.
fn settled_status(g: &VmBackend) -> Status {
    let st = g.status();
    match st.live_for {
        Some(t) if st.live && !st.evq_ready && t < EVQ_GRACE => {
            std::thread::sleep(EVQ_GRACE - t);
            g.status()
        }
        _ => st,
    }
}

/// Refuse at once what cannot be crafted for the guest as it is now.
fn check_craftable(kind: Kind, g: &VmBackend) -> Result<(), String> {
    let Kind::Class(class) = kind else {
        return Ok(());
    };
    let t = g.target();
    let live = g.status().live;
    match craft(kind, &mut SplitMix64::new(0), 0, 4096, &t) {
        Err(CraftError::SeqpacketNegotiated) if !live => Ok(()),
        Err(e) => Err(e.to_string()),
        Ok(c) if c.class == class => Ok(()),
        Ok(c) => Err(format!("crafted {} instead of {class}", c.class)),
    }
}

/// Release delayed packets when due, as long as the device exists.
fn release_delayed(dev: Weak<Device>) {
    loop {
        let Some(d) = dev.upgrade() else {
            return;
        };
        let due = d.hook.take_due(Instant::now());
        for (cid, pkt) in due {
            d.release(cid, vec![pkt]);
        }
        drop(d);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Serve one client: a reply line per command line. Blank lines are
/// skipped.
fn client(dev: Arc<Device>, stream: UnixStream) -> io::Result<()> {
    let mut out = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = dev.command(&line);
        out.write_all(format!("{reply}\n").as_bytes())?;
    }
    Ok(())
}

/// Listen on `path` (a stale socket file is replaced) and serve every
/// client in its own thread.
pub fn serve(path: &Path, dev: Arc<Device>) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    info!("control socket {}", path.display());
    std::thread::Builder::new()
        .name("vsock-control".into())
        .spawn(move || {
            for s in l.incoming() {
                match s {
                    Ok(s) => {
                        let d = dev.clone();
                        let r = std::thread::Builder::new()
                            .name("vsock-control-client".into())
                            .spawn(move || {
                                if let Err(e) = client(d, s) {
                                    debug!("control client: {e}");
                                }
                            });
                        if let Err(e) = r {
                            info!("control: spawning a client thread: {e}");
                        }
                    }
                    Err(e) => info!("control accept: {e}"),
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Command {
        parse_command(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &str) -> String {
        let e = parse_command(s).expect_err(s);
        assert!(!e.contains('\n'), "one line: {e:?}");
        assert!(!e.is_empty());
        e
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(
            ok("inject 3 short_buffer 10000 1"),
            Command::Inject {
                cid: 3,
                kind: Kind::Class(Class::ShortBuffer),
                count: 10000,
                seed: 1
            }
        );
        assert_eq!(
            ok("  inject  4 random 5 0xdeadbeef "),
            Command::Inject {
                cid: 4,
                kind: Kind::Random,
                count: 5,
                seed: 0xdead_beef
            }
        );
        for c in Class::ALL {
            assert!(matches!(
                ok(&format!("inject 3 {c} 1 2")),
                Command::Inject { kind: Kind::Class(k), .. } if k == c
            ));
        }
        for k in UsedKind::ALL {
            assert_eq!(
                ok(&format!("used 3 {} 2", k.name())),
                Command::Used {
                    cid: 3,
                    kind: k,
                    count: 2
                }
            );
        }
        let ev = |s: &str| match ok(s) {
            Command::Event { cid: 3, kind } => kind,
            c => panic!("{c:?}"),
        };
        assert_eq!(ev("event 3 reset"), EventKind::Reset);
        assert_eq!(ev("event 3 reset_cid 5"), EventKind::ResetCid(5));
        assert_eq!(ev("event 3 unknown 7"), EventKind::Unknown(7));
        assert_eq!(ev("event 3 short"), EventKind::Short);
        assert_eq!(ev("event 3 storm 100"), EventKind::Storm(100));
        for (v, want) in [
            ("0", 0),
            ("0xffffffff", 0xffff_ffff),
            ("4294967299", (1 << 32) | 3),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(
                ok(&format!("config 3 guest_cid {v}")),
                Command::Config {
                    cid: 3,
                    guest_cid: want
                }
            );
        }
        assert_eq!(
            ok("features 4 seqpacket off"),
            Command::Features {
                cid: 4,
                seqpacket: false
            }
        );
        assert_eq!(ok("hold 3 on"), Command::Hold { cid: 3, on: true });
        assert_eq!(
            ok("stream 3 3000 reorder 25 9"),
            Command::Stream {
                cid: 3,
                port: 3000,
                rule: Some(StreamRule {
                    kind: StreamKind::Reorder,
                    prob: 25,
                    seed: 9
                })
            }
        );
        assert_eq!(
            ok("stream 3 3000 off"),
            Command::Stream {
                cid: 3,
                port: 3000,
                rule: None
            }
        );
        assert_eq!(ok("counts 3"), Command::Counts { cid: 3 });
        assert_eq!(ok("reset-counts 3"), Command::ResetCounts { cid: 3 });
        assert_eq!(ok("status 4"), Command::Status { cid: 4 });
        assert_eq!(ok("help"), Command::Help);
    }

    #[test]
    fn bad_lines_give_one_clear_error() {
        assert!(err("").contains("empty"));
        assert!(err("frobnicate 3").contains("unknown command \"frobnicate\""));
        assert!(err("inject").contains("usage: inject CID CLASS COUNT SEED"));
        assert!(err("inject 3 short_buffer 10").contains("usage: inject"));
        assert!(err("inject 3 short_buffer 10 1 extra").contains("usage: inject"));
        assert!(err("inject x short_buffer 10 1").contains("CID \"x\" is not a number"));
        assert!(err("inject 3 bogus 10 1").contains("unknown class \"bogus\""));
        assert!(err("inject 3 short_buffer -1 1").contains("COUNT"));
        assert!(err("inject 3 short_buffer 999999999999 1").contains("32 bits"));
        assert!(err("inject 3 short_buffer 100000001 1").contains("above"));
        assert!(err("inject 3 short_buffer 1 seed").contains("SEED"));
        assert!(err("used 3 weird 1").contains("unknown used kind"));
        assert!(err("event 3").contains("usage: event"));
        assert!(err("event 3 reset 1").contains("usage: event"));
        assert!(err("event 3 unknown 0").contains("TRANSPORT_RESET"));
        assert!(err("event 3 storm 0").contains("at least 1"));
        assert!(err("event 3 reset_cid").contains("usage: event"));
        assert!(err("config 3 guest_cid").contains("usage: config"));
        assert!(err("config 3 cid 5").contains("usage: config"));
        assert!(err("config 3 guest_cid 0x").contains("not a number"));
        assert!(err("features 3 seqpacket maybe").contains("on or off"));
        assert!(err("features 3 stream on").contains("usage: features"));
        assert!(err("hold 3").contains("usage: hold"));
        assert!(err("stream 3 3000 drop 101 1").contains("above 100"));
        assert!(err("stream 3 3000 burn 10 1").contains("unknown stream fault"));
        assert!(err("stream 3 3000").contains("usage: stream"));
        assert!(err("stream 3 70000000000 off").contains("32 bits"));
        assert!(err("counts").contains("usage: counts"));
        assert!(err("status 3 4").contains("usage: status"));
        assert!(err("help me").contains("usage: help"));
    }
}
