// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vsock-device` command line: parse, validate, start one thread per guest.
//! Compatible with vhost-device-vsock's `--vm guest-cid=..,socket=..,uds-path=..`
//! and `--guest-cid/--socket/--uds-path` forms.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vsock_device::backend::{self, VmBackend, VmConfig};
use vsock_device::control::{self, parse_command, Answer, Device};
use vsock_device::fault::{Hook, PassThrough, Scripted};
use vsock_device::info;
use vsock_device::router::{Port, Router};

const USAGE: &str = "\
vsock-device: vhost-user virtio-vsock device for several guests

Usage:
  vsock-device [OPTIONS] --vm guest-cid=N,socket=PATH[,uds-path=PATH][,tx-buffer-size=N][,queue-size=N] [--vm ...]
  vsock-device [OPTIONS] --guest-cid N --socket PATH [--uds-path PATH]

Per guest:
  guest-cid        the guest's CID (>= 3)
  socket           vhost-user socket to create; QEMU connects to it with
                   -chardev socket,path=PATH -device vhost-user-vsock-pci
  uds-path         host bridge: guest connecting to CID 2 port P reaches the
                   Unix socket PATH_P; a host program connecting to PATH and
                   writing \"CONNECT <port>\\n\" reaches the guest's port
                   (answer \"OK <host port>\\n\"). Without it, host is refused.

Options:
  --tx-buffer-size BYTES  buf_alloc the host bridge advertises per connection
                          (default 256K)
  --queue-size N          largest virtqueue size accepted (default 1024)
  --queue-limit BYTES     packets pending for one guest before its senders are
                          paused (default 4M)
  --control PATH          control socket for scripted faults (a line protocol:
                          inject, used, event, config, features, hold, stream,
                          counts, reset-counts, status; see README.md)
  --fault SPEC            run one control command at start, e.g.
                          --fault 'hold 3 on' (repeatable, in order)
  -v, --verbose           log every packet
  -h, --help              this text
  -V, --version           version

Sizes accept K/M/G suffixes (powers of 1024). Packets from one guest to
another are forwarded (dst CID = the other's), split over the receiver's rx
buffers; unknown CIDs get RST for connection requests.
";

/// Settings of one `--vm`.
#[derive(Debug, Default, PartialEq)]
struct VmSpec {
    cid: Option<u64>,
    socket: Option<PathBuf>,
    uds_path: Option<PathBuf>,
    tx_buffer_size: Option<u32>,
    queue_size: Option<usize>,
}

#[derive(Debug, PartialEq)]
struct Args {
    vms: Vec<VmConfig>,
    queue_limit: usize,
    verbose: bool,
    control: Option<PathBuf>,
    faults: Vec<String>,
}

#[derive(Debug, PartialEq)]
enum Cmd {
    Help,
    Version,
    Run(Args),
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("invalid number {s:?}"))
}

fn parse_vm(spec: &str) -> Result<VmSpec, String> {
    let mut v = VmSpec::default();
    for kv in spec.split(',').filter(|s| !s.is_empty()) {
        let (k, val) = kv
            .split_once('=')
            .ok_or_else(|| format!("--vm: expected key=value, got {kv:?}"))?;
        match k {
            "guest-cid" | "guest_cid" | "cid" => v.cid = Some(parse_size(val)?),
            "socket" => v.socket = Some(PathBuf::from(val)),
            "uds-path" | "uds_path" => v.uds_path = Some(PathBuf::from(val)),
            "tx-buffer-size" | "tx_buffer_size" => {
                v.tx_buffer_size = Some(to_u32(parse_size(val)?, "tx-buffer-size")?)
            }
            "queue-size" | "queue_size" => v.queue_size = Some(parse_size(val)? as usize),
            "groups" => {} // vhost-device-vsock sibling groups: every guest can reach every other
            _ => return Err(format!("--vm: unknown key {k:?}")),
        }
    }
    Ok(v)
}

fn to_u32(n: u64, what: &str) -> Result<u32, String> {
    u32::try_from(n).map_err(|_| format!("{what} {n} is too large"))
}

fn parse(args: &[String]) -> Result<Cmd, String> {
    let mut specs = Vec::new();
    let mut single = VmSpec::default();
    let mut tx_buffer_size: u32 = 256 << 10;
    let mut queue_size: usize = 1024;
    let mut queue_limit: usize = 4 << 20;
    let mut verbose = false;
    let mut control = None;
    let mut faults = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag {
            "-h" | "--help" => return Ok(Cmd::Help),
            "-V" | "--version" => return Ok(Cmd::Version),
            "-v" | "--verbose" => verbose = true,
            "--vm" => specs.push(parse_vm(&value()?)?),
            "--guest-cid" => single.cid = Some(parse_size(&value()?)?),
            "--socket" => single.socket = Some(PathBuf::from(value()?)),
            "--uds-path" => single.uds_path = Some(PathBuf::from(value()?)),
            "--tx-buffer-size" => tx_buffer_size = to_u32(parse_size(&value()?)?, flag)?,
            "--queue-size" => queue_size = parse_size(&value()?)? as usize,
            "--queue-limit" => queue_limit = parse_size(&value()?)? as usize,
            "--control" => control = Some(PathBuf::from(value()?)),
            "--fault" => faults.push(value()?),
            _ => return Err(format!("unknown argument {a:?} (see --help)")),
        }
    }
    if single != VmSpec::default() {
        specs.push(single);
    }
    if specs.is_empty() {
        return Err("no guest configured: use --vm guest-cid=N,socket=PATH (see --help)".into());
    }
    let mut vms: Vec<VmConfig> = Vec::new();
    for s in specs {
        let cid = s.cid.ok_or("a guest is missing guest-cid")?;
        let socket = s
            .socket
            .ok_or_else(|| format!("guest {cid} is missing socket"))?;
        let vm = VmConfig {
            cid,
            socket,
            uds_path: s.uds_path,
            buf_alloc: s.tx_buffer_size.unwrap_or(tx_buffer_size),
            queue_size: s.queue_size.unwrap_or(queue_size),
        };
        validate(&vm, &vms)?;
        vms.push(vm);
    }
    if queue_limit == 0 {
        return Err("--queue-limit must be > 0".into());
    }
    if let Some(c) = &control {
        check_dir(c, "--control")?;
        if vms
            .iter()
            .any(|v| v.socket == *c || v.uds_path.as_ref() == Some(c))
        {
            return Err(format!(
                "--control {} is also a guest's socket",
                c.display()
            ));
        }
    }
    for f in &faults {
        parse_command(f).map_err(|e| format!("--fault {f:?}: {e}"))?;
    }
    Ok(Cmd::Run(Args {
        vms,
        queue_limit,
        verbose,
        control,
        faults,
    }))
}

fn check_dir(p: &Path, what: &str) -> Result<(), String> {
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "{what} {}: directory {} does not exist",
            p.display(),
            dir.display()
        ));
    }
    Ok(())
}

fn validate(vm: &VmConfig, prev: &[VmConfig]) -> Result<(), String> {
    if vm.cid < 3 {
        return Err(format!(
            "guest-cid {}: CIDs 0-2 are reserved (2 is the host); use 3 or more",
            vm.cid
        ));
    }
    if vm.cid >= u64::from(u32::MAX) {
        return Err(format!("guest-cid {} is too large", vm.cid));
    }
    if !(1..=32768).contains(&vm.queue_size) || !vm.queue_size.is_power_of_two() {
        return Err(format!(
            "queue-size {} must be a power of two <= 32768",
            vm.queue_size
        ));
    }
    if vm.buf_alloc == 0 {
        return Err("tx-buffer-size must be > 0".into());
    }
    check_dir(&vm.socket, "socket")?;
    if let Some(u) = &vm.uds_path {
        check_dir(u, "uds-path")?;
        if *u == vm.socket {
            return Err(format!(
                "guest {}: socket and uds-path are the same",
                vm.cid
            ));
        }
    }
    for p in prev {
        if p.cid == vm.cid {
            return Err(format!("guest-cid {} is given twice", vm.cid));
        }
        let mut paths = [Some(&p.socket), p.uds_path.as_ref()].into_iter().flatten();
        let mine = [Some(&vm.socket), vm.uds_path.as_ref()];
        if let Some(dup) = mine.into_iter().flatten().find(|m| paths.any(|x| x == *m)) {
            return Err(format!(
                "guests {} and {} both use {}",
                p.cid,
                vm.cid,
                dup.display()
            ));
        }
    }
    Ok(())
}

fn run(args: Args) -> Result<(), String> {
    vsock_device::set_verbose(args.verbose);
    let mut ports = Vec::new();
    for vm in &args.vms {
        let p = Port::new(vm.cid, args.queue_limit).map_err(|e| format!("eventfd: {e}"))?;
        ports.push(Arc::new(p));
    }
    // Without --control or --fault, packets go through unchanged.
    let scripted =
        (args.control.is_some() || !args.faults.is_empty()).then(|| Arc::new(Scripted::new()));
    let hook: Arc<dyn Hook> = match &scripted {
        Some(s) => s.clone(),
        None => Arc::new(PassThrough),
    };
    let router = Arc::new(Router::new(ports, hook));
    let mut guests = Vec::new();
    for cfg in args.vms {
        let listener = Listener::new(&cfg.socket, true)
            .map_err(|e| format!("socket {}: {e}", cfg.socket.display()))?;
        let sock = cfg.socket.display().to_string();
        let uds = cfg.uds_path.as_ref().map(|p| p.display().to_string());
        let cid = cfg.cid;
        let b = VmBackend::new(cfg, router.clone()).map_err(|e| format!("uds-path {e}"))?;
        info!(
            "cid {cid}: vhost-user socket {sock}, host bridge {}",
            uds.as_deref().unwrap_or("(none)")
        );
        guests.push((Arc::new(b), listener));
    }
    // Faults are in place before any frontend connects.
    let _device = match scripted {
        Some(s) => {
            let backends = guests.iter().map(|(b, _)| b.clone()).collect();
            let dev = Device::new(backends, router.clone(), s)
                .map_err(|e| format!("spawning thread: {e}"))?;
            start_faults(&dev, &args.faults)?;
            if let Some(p) = &args.control {
                control::serve(p, dev.clone()).map_err(|e| format!("--control {e}"))?;
            }
            Some(dev)
        }
        None => None,
    };
    let mut threads = Vec::new();
    for (b, listener) in guests {
        let t = std::thread::Builder::new()
            .name(format!("vsock-cid{}", b.cid()))
            .spawn(move || backend::serve(b, listener))
            .map_err(|e| format!("spawning thread: {e}"))?;
        threads.push(t);
    }
    for t in threads {
        match t.join() {
            Ok(r) => r?,
            Err(_) => return Err("a guest thread panicked".into()),
        }
    }
    Ok(())
}

/// Run the `--fault` commands in order. One refused at once is an error;
/// one that completes later (inject, used, event) logs its reply then.
fn start_faults(dev: &Device, faults: &[String]) -> Result<(), String> {
    for f in faults {
        let cmd = parse_command(f).map_err(|e| format!("--fault {f:?}: {e}"))?;
        match dev.execute(cmd) {
            Answer::Now(r) => {
                info!("--fault {f:?}: {r}");
                if let Some(e) = r.strip_prefix("ERR ") {
                    return Err(format!("--fault {f:?}: {e}"));
                }
            }
            later => {
                let f = f.clone();
                std::thread::Builder::new()
                    .name("vsock-fault".into())
                    .spawn(move || info!("--fault {f:?}: {}", later.wait()))
                    .map_err(|e| format!("spawning thread: {e}"))?;
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match parse(&args) {
        Ok(Cmd::Help) => {
            print!("{USAGE}");
            Ok(())
        }
        Ok(Cmd::Version) => {
            println!("vsock-device {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Ok(Cmd::Run(a)) => run(a),
        Err(e) => Err(e),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vsock-device: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Cmd, String> {
        parse(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn cli_forms() {
        let Ok(Cmd::Run(a)) = p("--vm guest-cid=3,socket=/tmp/a.sock,uds-path=/tmp/a.vsock \
             --vm guest-cid=4,socket=/tmp/b.sock,tx-buffer-size=64K --queue-limit=1M -v")
        else {
            panic!()
        };
        assert_eq!(a.vms.len(), 2);
        assert_eq!(a.vms[0].uds_path, Some(PathBuf::from("/tmp/a.vsock")));
        assert_eq!(a.vms[0].buf_alloc, 256 << 10);
        assert_eq!(a.vms[1].buf_alloc, 64 << 10);
        assert_eq!(a.queue_limit, 1 << 20);
        assert!(a.verbose);
        assert_eq!(a.control, None);
        assert!(a.faults.is_empty());
        let args = [
            "--control",
            "/tmp/c.sock",
            "--vm",
            "guest-cid=3,socket=/tmp/a.sock",
            "--fault",
            "hold 3 on",
            "--fault=stream 3 1234 drop 10 1",
        ];
        let Ok(Cmd::Run(a)) = parse(&args.map(String::from)) else {
            panic!()
        };
        assert_eq!(a.control, Some(PathBuf::from("/tmp/c.sock")));
        assert_eq!(a.faults, vec!["hold 3 on", "stream 3 1234 drop 10 1"]);
        let Ok(Cmd::Run(a)) = p("--guest-cid 5 --socket /tmp/c.sock --uds-path /tmp/c.vsock")
        else {
            panic!()
        };
        assert_eq!(a.vms[0].cid, 5);
        assert_eq!(p("--help"), Ok(Cmd::Help));
    }

    #[test]
    fn cli_errors() {
        let err = |s| p(s).unwrap_err();
        assert!(err("--vm guest-cid=2,socket=/tmp/a.sock").contains("reserved"));
        assert!(err("--vm guest-cid=3,socket=/nonexistent/dir/a.sock").contains("does not exist"));
        assert!(
            err("--vm guest-cid=3,socket=/tmp/a --vm guest-cid=3,socket=/tmp/b").contains("twice")
        );
        assert!(
            err("--vm guest-cid=3,socket=/tmp/a --vm guest-cid=4,socket=/tmp/a")
                .contains("both use")
        );
        assert!(err("--vm guest-cid=3").contains("missing socket"));
        assert!(err("--vm guest-cid=3,socket=/tmp/a,bogus=1").contains("unknown key"));
        assert!(err("").contains("no guest"));
        assert!(err("--frob").contains("unknown argument"));
        assert!(err("--vm guest-cid=3,socket=/tmp/a,queue-size=1000").contains("power of two"));
        let fault = |f: &str| {
            parse(&["--vm", "guest-cid=3,socket=/tmp/a", "--fault", f].map(String::from))
                .unwrap_err()
        };
        assert!(fault("hold 3").contains("--fault \"hold 3\": usage: hold CID on|off"));
        assert!(fault("bogus").contains("unknown command"));
        assert!(
            err("--vm guest-cid=3,socket=/tmp/a --control /nonexistent/c")
                .contains("does not exist")
        );
        assert!(err("--vm guest-cid=3,socket=/tmp/a --control /tmp/a").contains("also a guest"));
        assert!(err("--vm guest-cid=3,socket=/tmp/a --control").contains("needs a value"));
    }
}
